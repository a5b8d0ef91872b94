// Software prefetch for the kernels' streams, which look ahead of the data they compute on.
#ifndef BITNET_JAX_XLA_FFI_PREFETCH_H_
#define BITNET_JAX_XLA_FFI_PREFETCH_H_

#include <cstdint>

namespace bitnet {

// Prefetches (into every cache level) the line at byte `offset` from `base`, which may lie past
// the end of base's array (a stream looking ahead from its last tile): the address is formed as an
// integer, never as an out-of-range pointer, and a prefetch never faults.
inline void PrefetchAt(const void* base, int64_t offset) {
  __builtin_prefetch(reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(base) + static_cast<uintptr_t>(offset)));
}

// As PrefetchAt, into the outer caches only (x86 prefetcht1: L2 and below), for streams fetched
// far ahead of a slow consumer: the lines wait in L2 without holding L1's few fill buffers, which
// the kernel's own loads need.
inline void PrefetchL2At(const void* base, int64_t offset) {
  __builtin_prefetch(reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(base) + static_cast<uintptr_t>(offset)),
                     /*rw=*/0, /*locality=*/2);
}

}  // namespace bitnet

#endif  // BITNET_JAX_XLA_FFI_PREFETCH_H_
