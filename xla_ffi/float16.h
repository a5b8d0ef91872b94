// IEEE float16 -> float32, exactly (every float16 is a float32): the one conversion of the
// kernels, for the int4 lm_head's scales (layout.h, I4G) and float16 embedding tables (embed.cc).
#ifndef BITNET_JAX_XLA_FFI_FLOAT16_H_
#define BITNET_JAX_XLA_FFI_FLOAT16_H_

#include <cstdint>
#include <cstring>

namespace bitnet {

// Sign, 5-bit exponent (bias 15), 10-bit mantissa; subnormals, inf and NaN included.
inline float HalfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  const uint32_t exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
  float magnitude;
  if (exponent == 0) {
    magnitude = static_cast<float>(mantissa) * 0x1p-24f;  // subnormal (or zero): exact in float32
  } else if (exponent == 31) {
    magnitude = mantissa ? __builtin_nanf("") : __builtin_inff();
  } else {
    const uint32_t bits = ((exponent + 112) << 23) | (mantissa << 13);
    std::memcpy(&magnitude, &bits, sizeof(bits));
  }
  uint32_t out;
  std::memcpy(&out, &magnitude, sizeof(out));
  out |= sign;
  float result;
  std::memcpy(&result, &out, sizeof(result));
  return result;
}

}  // namespace bitnet

#endif  // BITNET_JAX_XLA_FFI_FLOAT16_H_
