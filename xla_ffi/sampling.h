// The sampling cuts (top-k, then top-p) of a decode step's rows, and their greedy tokens, as XLA
// FFI handlers (CPU); see sampling.cc.
#ifndef BITNET_JAX_XLA_FFI_SAMPLING_H_
#define BITNET_JAX_XLA_FFI_SAMPLING_H_

#include "xla/ffi/api/ffi.h"

XLA_FFI_DECLARE_HANDLER_SYMBOL(BitnetSamplingCut);
XLA_FFI_DECLARE_HANDLER_SYMBOL(BitnetArgmax);

#endif  // BITNET_JAX_XLA_FFI_SAMPLING_H_
