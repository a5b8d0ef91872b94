#include "cpu_isa.h"

#include <cstdlib>
#include <cstring>

#if BITNET_JAX_X86_SIMD
#include <cpuid.h>
#endif

#if BITNET_JAX_ARM_SIMD && defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)  // Linux's bit (uapi asm/hwcap.h); glibc before 2.28 lacks the name
#endif
#endif

namespace bitnet {

namespace {

#if BITNET_JAX_X86_SIMD
bool CpuRuns(Isa isa) {
  __builtin_cpu_init();  // idempotent; needed if this runs before libgcc's constructors have
  switch (isa) {
    case Isa::kScalar:
      return true;
    case Isa::kAvx2:
      // libgcc's checks include the OS (XSAVE) support of the wider registers. Every AVX2 CPU
      // has FMA and F16C too (the AVX2 kernels use both); checked all the same.
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    case Isa::kAvx512Vnni:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
    case Isa::kNeon:
    case Isa::kNeonDot:
      return false;  // not in this build (IsaBuilt)
  }
  return false;
}
#elif BITNET_JAX_ARM_SIMD
#if defined(__linux__)
// The kernel's hardware capabilities: what the core has and the kernel lets user space run.
bool CpuHasDotProd() { return (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0; }
#else
// No detection for other OSes yet: the plain NEON path runs on every aarch64 core.
bool CpuHasDotProd() { return false; }
#endif

bool CpuRuns(Isa isa) {
  switch (isa) {
    case Isa::kScalar:
    case Isa::kNeon:  // Advanced SIMD is part of the AArch64 base architecture
      return true;
    case Isa::kNeonDot:
      return CpuHasDotProd();
    case Isa::kAvx2:
    case Isa::kAvx512Vnni:
      return false;  // not in this build (IsaBuilt)
  }
  return false;
}
#else
// Neither x86-64 nor aarch64: the build holds no SIMD path (cpu_isa.h).
bool CpuRuns(Isa isa) { return isa == Isa::kScalar; }
#endif

bool ParseIsa(const char* name, Isa* isa) {
  for (Isa a : kAllIsas) {
    if (std::strcmp(name, IsaName(a)) == 0) {
      *isa = a;
      return true;
    }
  }
  return false;
}

// "a, b, c": the names of `isas`.
template <typename Isas>
std::string JoinNames(const Isas& isas) {
  std::string names;
  for (Isa a : isas) names += std::string(names.empty() ? "" : ", ") + IsaName(a);
  return names;
}

}  // namespace

const char* IsaName(Isa isa) {
  switch (isa) {
    case Isa::kScalar: return "scalar";
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512Vnni: return "avx512";
    case Isa::kNeon: return "neon";
    case Isa::kNeonDot: return "neon_dot";
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
  Isa wanted;
  if (!ParseIsa(forced, &wanted)) {
    *error = std::string("BITNET_JAX_ISA=") + forced + " is not a kernel path: expected one of " +
             JoinNames(kAllIsas) + " (this CPU runs: " + JoinNames(available) +
             "); unset it to use the fastest";
    return false;
  }
  for (Isa a : available) {
    if (a == wanted) {
      *isa = wanted;
      return true;
    }
  }
  *error = std::string("BITNET_JAX_ISA=") + forced + " asks for a path this CPU cannot run (it runs: " +
           JoinNames(available) + ")";
  return false;
}

bool CpuRuns512AtFullWidth() {
#if BITNET_JAX_X86_SIMD
  static const bool full_width = [] {
    unsigned eax, ebx, ecx, edx;
    if (!__get_cpuid(0, &eax, &ebx, &ecx, &edx)) return true;
    char vendor[13];
    std::memcpy(vendor, &ebx, 4);
    std::memcpy(vendor + 4, &edx, 4);
    std::memcpy(vendor + 8, &ecx, 4);
    vendor[12] = '\0';
    if (std::strcmp(vendor, "AuthenticAMD") != 0 || !__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return true;
    // The family: the base field, plus the extended field where the base one is 0xF.
    const unsigned base = (eax >> 8) & 0xF;
    const unsigned family = base == 0xF ? base + ((eax >> 20) & 0xFF) : base;
    return family != 0x19;  // Zen 3 (no AVX-512) and Zen 4
  }();
  return full_width;
#else
  return false;
#endif
}

}  // namespace bitnet
