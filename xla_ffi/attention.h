// Decode attention over the stacked KV cache as an XLA FFI handler (CPU); see attention.cc.
#ifndef BITNET_JAX_XLA_FFI_ATTENTION_H_
#define BITNET_JAX_XLA_FFI_ATTENTION_H_

#include "xla/ffi/api/ffi.h"

XLA_FFI_DECLARE_HANDLER_SYMBOL(BitnetDecodeAttention);
XLA_FFI_DECLARE_HANDLER_SYMBOL(BitnetDecodeAttentionI8);

#endif  // BITNET_JAX_XLA_FFI_ATTENTION_H_
