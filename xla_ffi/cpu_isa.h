// Which SIMD path the kernels take: decided at run time, here and nowhere else.
#ifndef BITNET_JAX_XLA_FFI_CPU_ISA_H_
#define BITNET_JAX_XLA_FFI_CPU_ISA_H_

#include <string>
#include <vector>

namespace bitnet {

// Every kernel has one implementation per Isa; kScalar is the portable twin of the others.
// kNeon is Armv8.0 Advanced SIMD (baseline on aarch64); kNeonDot adds the Armv8.2-A dot-product
// instructions (sdot), which not every aarch64 core has.
enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512Vnni = 2, kNeon = 3, kNeonDot = 4 };

// Every path, in the order AvailableIsas lists them (on each architecture, narrowest first).
inline constexpr Isa kAllIsas[] = {Isa::kScalar, Isa::kAvx2, Isa::kAvx512Vnni, Isa::kNeon,
                                   Isa::kNeonDot};

// The SIMD paths use GCC / Clang target attributes, not MSVC's (hence __x86_64__, not _M_X64):
// x86-64 builds hold the AVX paths, aarch64 builds the NEON ones, and any other build the scalar
// twins alone. Sources test these macros, never the compiler's own.
#if defined(__x86_64__)
#define BITNET_JAX_X86_SIMD 1
#else
#define BITNET_JAX_X86_SIMD 0
#endif
#if defined(__aarch64__)
#define BITNET_JAX_ARM_SIMD 1
#else
#define BITNET_JAX_ARM_SIMD 0
#endif

// Whether this build holds path `isa` at all (whether this CPU runs it is AvailableIsas' question).
constexpr bool IsaBuilt(Isa isa) {
  switch (isa) {
    case Isa::kScalar: return true;
    case Isa::kAvx2:
    case Isa::kAvx512Vnni: return BITNET_JAX_X86_SIMD;
    case Isa::kNeon:
    case Isa::kNeonDot: return BITNET_JAX_ARM_SIMD;
  }
  return false;
}

const char* IsaName(Isa isa);

// The paths this CPU (and its OS) can run, scalar first.
const std::vector<Isa>& AvailableIsas();

// The path to use: the one named by the environment variable BITNET_JAX_ISA (scalar | avx2 |
// avx512 | neon | neon_dot) if set, else the widest available. Returns false with a message in
// *error if the variable names an unknown path or one this CPU cannot run. Read on every call (it
// is cheap), so tests can switch paths inside one process.
bool SelectIsa(Isa* isa, std::string* error);

// Whether this CPU runs 512-bit vector operations at full width. AMD Zen 4 (family 19h) splits
// each into two 256-bit halves: a kernel whose 512-bit form gains only arithmetic width, not
// fewer memory operations, runs no faster there (decode attention: 12% slower on a Zen 4,
// benchmarks/RESULTS.md), so such kernels take their AVX2 form where this is false. True on
// Intel's AVX-512 cores (measured on an Ice Lake Xeon) and every other x86-64 CPU; false off x86-64.
bool CpuRuns512AtFullWidth();

}  // namespace bitnet

#endif  // BITNET_JAX_XLA_FFI_CPU_ISA_H_
