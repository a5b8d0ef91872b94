// Per-row absmax int8 activation quantization (XLA FFI handler, CPU).
#ifndef BITNET_JAX_XLA_FFI_ACT_QUANT_H_
#define BITNET_JAX_XLA_FFI_ACT_QUANT_H_

#include "xla/ffi/api/ffi.h"

// FFI target "bitnet_act_quant_i8": x [..., K] (f32 or bf16) ->
//   x_q   int8 [..., K]  = clamp(round_half_even(x * scale), -128, 127)
//   scale f32  [..., 1]  = 127 / max(max_k |x|, 1e-5)
XLA_FFI_DECLARE_HANDLER_SYMBOL(BitnetActQuantI8);

#endif  // BITNET_JAX_XLA_FFI_ACT_QUANT_H_
