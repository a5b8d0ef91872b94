// Which SIMD path the kernels take: decided at run time, here and nowhere else.
#ifndef BITNET_JAX_XLA_FFI_CPU_ISA_H_
#define BITNET_JAX_XLA_FFI_CPU_ISA_H_

#include <string>
#include <vector>

namespace bitnet {

// Every kernel has one implementation per Isa; kScalar is the portable twin of the others.
enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512Vnni = 2 };

// Every path, in the order AvailableIsas lists them.
inline constexpr Isa kAllIsas[] = {Isa::kScalar, Isa::kAvx2, Isa::kAvx512Vnni};

// The SIMD paths are x86-64 code (GCC / Clang target attributes and __builtin_cpu_supports, not
// MSVC's, hence not _M_X64). Other builds (aarch64) hold the scalar twins alone, and
// AvailableIsas() is {kScalar} there. Sources test this macro, never the compiler's own.
#if defined(__x86_64__)
#define BITNET_JAX_X86_SIMD 1
#else
#define BITNET_JAX_X86_SIMD 0
#endif

const char* IsaName(Isa isa);

// The paths this CPU (and its OS) can run, scalar first.
const std::vector<Isa>& AvailableIsas();

// The path to use: the one named by the environment variable BITNET_JAX_ISA (scalar | avx2 |
// avx512) if set, else the widest available. Returns false with a message in *error if the
// variable names an unknown path or one this CPU cannot run. Read on every call (it is cheap),
// so tests can switch paths inside one process.
bool SelectIsa(Isa* isa, std::string* error);

}  // namespace bitnet

#endif  // BITNET_JAX_XLA_FFI_CPU_ISA_H_
