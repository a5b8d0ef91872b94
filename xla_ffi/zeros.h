// Zero-filled buffers whose memory becomes resident only where it is written (see zeros.cc).
#ifndef BITNET_JAX_XLA_FFI_ZEROS_H_
#define BITNET_JAX_XLA_FFI_ZEROS_H_

#include <cstddef>

#include "xla/ffi/api/ffi.h"

namespace bitnet {

// Sets `bytes` bytes at `data` to zero. On Linux the whole pages inside the range are handed back
// to the kernel (madvise MADV_DONTNEED on private anonymous memory, which XLA:CPU's buffers are),
// which reads them as zeros from then on and allocates them at their first write; the partial
// pages at either end, and any range madvise refuses, are written with memset.
void ZeroLazily(void* data, size_t bytes);

}  // namespace bitnet

XLA_FFI_DECLARE_HANDLER_SYMBOL(BitnetZeros);

#endif  // BITNET_JAX_XLA_FFI_ZEROS_H_
