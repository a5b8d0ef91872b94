// Per-thread scratch memory that the kernels reuse from call to call (a fresh allocation per call
// costs page faults at prefill sizes), starting on a 64-byte cache line.
//
// The kernels read activation rows and unpacked codes in 32- and 64-byte vector loads from the
// start of a row (rows are whole multiples of 64 bytes long). malloc promises 16-byte alignment:
// a buffer starting 16 bytes into a line splits half of the 32-byte loads across two lines, which
// made the AVX2 ternary tiles ~20% slower at 4-8 rows on a Zen 3 core (benchmarks/RESULTS.md).
#ifndef BITNET_JAX_XLA_FFI_SCRATCH_H_
#define BITNET_JAX_XLA_FFI_SCRATCH_H_

#include <cstdint>
#include <vector>

namespace bitnet {

constexpr int64_t kCacheLine = 64;

// `count` elements of `storage` (a thread_local vector, grown as needed), the first on a cache line.
template <typename T>
T* CacheLineScratch(std::vector<T>& storage, int64_t count) {
  static_assert(kCacheLine % sizeof(T) == 0, "an element must not straddle the alignment");
  storage.resize(count + kCacheLine / sizeof(T));
  const uintptr_t address = reinterpret_cast<uintptr_t>(storage.data());
  const uintptr_t aligned = (address + kCacheLine - 1) / kCacheLine * kCacheLine;
  return storage.data() + (aligned - address) / sizeof(T);
}

}  // namespace bitnet

#endif  // BITNET_JAX_XLA_FFI_SCRATCH_H_
