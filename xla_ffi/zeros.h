// Zero-filled buffers whose memory becomes resident only where it is written (see zeros.cc).
#ifndef BITNET_JAX_XLA_FFI_ZEROS_H_
#define BITNET_JAX_XLA_FFI_ZEROS_H_

#include "xla/ffi/api/ffi.h"

XLA_FFI_DECLARE_HANDLER_SYMBOL(BitnetZeros);

#endif  // BITNET_JAX_XLA_FFI_ZEROS_H_
