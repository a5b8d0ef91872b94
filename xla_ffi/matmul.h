// Serving matmuls as XLA FFI handlers (CPU); see matmul.cc for the contracts.
#ifndef BITNET_JAX_XLA_FFI_MATMUL_H_
#define BITNET_JAX_XLA_FFI_MATMUL_H_

#include "xla/ffi/api/ffi.h"

XLA_FFI_DECLARE_HANDLER_SYMBOL(BitnetTernaryMatmul);
XLA_FFI_DECLARE_HANDLER_SYMBOL(BitnetTernaryMatmuls);
XLA_FFI_DECLARE_HANDLER_SYMBOL(BitnetTernaryMatmulI32);
XLA_FFI_DECLARE_HANDLER_SYMBOL(BitnetTernaryGroupMatmul);
XLA_FFI_DECLARE_HANDLER_SYMBOL(BitnetTernaryGroupMatmulDot);
XLA_FFI_DECLARE_HANDLER_SYMBOL(BitnetInt8Matmul);
XLA_FFI_DECLARE_HANDLER_SYMBOL(BitnetInt8MatmulI32);
XLA_FFI_DECLARE_HANDLER_SYMBOL(BitnetInt4Matmul);
XLA_FFI_DECLARE_HANDLER_SYMBOL(BitnetInt4MatmulDot);

#endif  // BITNET_JAX_XLA_FFI_MATMUL_H_
