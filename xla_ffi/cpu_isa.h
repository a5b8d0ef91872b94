// Which SIMD path the kernels take: decided at run time, here and nowhere else.
#ifndef BITNET_JAX_XLA_FFI_CPU_ISA_H_
#define BITNET_JAX_XLA_FFI_CPU_ISA_H_

#include <string>
#include <vector>

namespace bitnet {

// Every kernel has one implementation per Isa; kScalar is the portable twin of the others.
enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512Vnni = 2 };

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
