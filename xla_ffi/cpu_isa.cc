#include "cpu_isa.h"

#include <cstdlib>
#include <cstring>

namespace bitnet {

namespace {

#if BITNET_JAX_X86_SIMD
bool CpuRuns(Isa isa) {
  __builtin_cpu_init();  // idempotent; needed if this runs before libgcc's constructors have
  switch (isa) {
    case Isa::kScalar:
      return true;
    case Isa::kAvx2:
      // libgcc's checks include the OS (XSAVE) support of the wider registers.
      return __builtin_cpu_supports("avx2");
    case Isa::kAvx512Vnni:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
  }
  return false;
}
#else
// Not x86-64: the build holds no SIMD path (cpu_isa.h).
bool CpuRuns(Isa isa) { return isa == Isa::kScalar; }
#endif

bool ParseIsa(const char* name, Isa* isa) {
  if (std::strcmp(name, "scalar") == 0) *isa = Isa::kScalar;
  else if (std::strcmp(name, "avx2") == 0) *isa = Isa::kAvx2;
  else if (std::strcmp(name, "avx512") == 0) *isa = Isa::kAvx512Vnni;
  else return false;
  return true;
}

}  // namespace

const char* IsaName(Isa isa) {
  switch (isa) {
    case Isa::kScalar: return "scalar";
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512Vnni: return "avx512";
  }
  return "unknown";
}

const std::vector<Isa>& AvailableIsas() {
  static const std::vector<Isa> available = [] {
    std::vector<Isa> isas;
    for (Isa isa : kAllIsas) {
      if (CpuRuns(isa)) isas.push_back(isa);
    }
    return isas;
  }();
  return available;
}

bool SelectIsa(Isa* isa, std::string* error) {
  const std::vector<Isa>& available = AvailableIsas();
  const char* forced = std::getenv("BITNET_JAX_ISA");
  if (forced == nullptr || forced[0] == '\0') {
    *isa = available.back();
    return true;
  }
  std::string names;
  for (Isa a : available) names += std::string(names.empty() ? "" : ", ") + IsaName(a);
  Isa wanted;
  if (!ParseIsa(forced, &wanted)) {
    *error = std::string("BITNET_JAX_ISA=") + forced +
             " is not a kernel path: expected one of scalar, avx2, avx512 (this CPU runs: " +
             names + "); unset it to use the fastest";
    return false;
  }
  for (Isa a : available) {
    if (a == wanted) {
      *isa = wanted;
      return true;
    }
  }
  *error = std::string("BITNET_JAX_ISA=") + forced + " asks for a path this CPU cannot run (it runs: " +
           names + ")";
  return false;
}

}  // namespace bitnet
