// Embedding lookup as an XLA FFI handler (CPU); see embed.cc.
#ifndef BITNET_JAX_XLA_FFI_EMBED_H_
#define BITNET_JAX_XLA_FFI_EMBED_H_

#include "xla/ffi/api/ffi.h"

XLA_FFI_DECLARE_HANDLER_SYMBOL(BitnetEmbedRows);

#endif  // BITNET_JAX_XLA_FFI_EMBED_H_
