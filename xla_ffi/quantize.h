// Per-row absmax activation quantization, shared by the act-quant op and the fused matmuls.
//
// For a row x[K]:  amax  = max_k |x|                                   (float32)
//                  scale = q_max / max(amax, 1e-5)                      (float32)
//                  x_q   = clamp(round(x * scale), -q_max - 1, q_max)   (int8)
// with q_max = 2^(bits-1) - 1. It must equal, bit for bit, the pure-JAX reference
// `bitnet_jax.quant.act_quantize(x, "token", bits)`: every step is float32 arithmetic in the
// order written (the files that include this are compiled with -ffp-contract=off, so x * scale is
// never fused into anything), rounding is std::nearbyint in the default round-to-nearest-even
// mode (jnp.round is half-to-even), and NaN follows XLA: a NaN anywhere in a row makes its scale
// NaN, and a NaN product converts to 0 (as XLA's float->int convert does). bf16 input is widened
// to float32 exactly, so it quantizes like x.astype(float32).
#ifndef BITNET_JAX_XLA_FFI_QUANTIZE_H_
#define BITNET_JAX_XLA_FFI_QUANTIZE_H_

#include <cmath>
#include <cstdint>
#include <cstring>

namespace bitnet {

constexpr float kQuantEps = 1e-5f;

inline float LoadF32(const float* p, int64_t i) { return p[i]; }

// bfloat16 is the high half of a float32: widening is exact.
inline float LoadF32(const uint16_t* p, int64_t i) {
  const uint32_t bits = static_cast<uint32_t>(p[i]) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// Quantizes x[0..k) into q[0..k); returns the scale (x ~= q / scale) and adds sum_k q to *q_sum.
template <typename T>
float QuantizeRow(const T* x, int64_t k, int bits, int8_t* q, int32_t* q_sum) {
  const float q_max = static_cast<float>((1 << (bits - 1)) - 1);
  const float q_min = -q_max - 1.0f;
  float amax = 0.0f;
  bool has_nan = false;
  for (int64_t i = 0; i < k; ++i) {
    const float a = std::fabs(LoadF32(x, i));
    has_nan |= std::isnan(a);
    amax = a > amax ? a : amax;
  }
  if (has_nan) amax = NAN;  // jnp.max / jnp.maximum propagate NaN.
  const float scale = q_max / (amax > kQuantEps || std::isnan(amax) ? amax : kQuantEps);
  int32_t sum = 0;
  for (int64_t i = 0; i < k; ++i) {
    float v = LoadF32(x, i) * scale;
    int8_t qi = 0;  // XLA converts NaN to 0.
    if (!std::isnan(v)) {
      // Clamping before rounding equals clamping after (the bounds are integers) and keeps the
      // float->int conversion in range.
      v = v < q_min ? q_min : (v > q_max ? q_max : v);
      qi = static_cast<int8_t>(std::nearbyint(v));
    }
    q[i] = qi;
    sum += qi;
  }
  *q_sum += sum;
  return scale;
}

}  // namespace bitnet

#endif  // BITNET_JAX_XLA_FFI_QUANTIZE_H_
