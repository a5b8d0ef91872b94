// Per-row (last axis) absmax int8 quantization of activations, as an XLA FFI CPU handler.
//
// For x [..., K]:  amax  = max_k |x|                               (float32)
//                  scale = 127.0f / max(amax, 1e-5f)               (float32)
//                  x_q   = clamp(nearbyint(x * scale), -128, 127)  (int8)
// The result must equal, bit for bit, the pure-JAX reference
//   scale = 127 / jnp.maximum(jnp.max(jnp.abs(x), -1, keepdims=True), 1e-5)
//   x_q = jnp.clip(jnp.round(x * scale), -128, 127).astype(jnp.int8)
// so: every step is plain float32 arithmetic in the order written (this file is compiled with
// -ffp-contract=off, so x * scale is never fused into anything), rounding is std::nearbyint in
// the default round-to-nearest-even mode (jnp.round is half-to-even), and NaN follows XLA: a NaN
// anywhere in a row makes its scale NaN, and a NaN product converts to 0 (as XLA's float->int
// convert does). bf16 input is widened to float32 exactly, so it quantizes like x.astype(f32).
//
// Single-threaded for now: the op is memory-bound and small next to the matmuls it feeds.

#include "act_quant.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>

namespace ffi = xla::ffi;

namespace {

constexpr float kQMax = 127.0f;
constexpr float kEps = 1e-5f;

std::string ShapeString(ffi::AnyBuffer::Dimensions dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(dims[i]);
  }
  return s + "]";
}

inline float Load(const float* p, int64_t i) { return p[i]; }

// bfloat16 is the high half of a float32: widening is exact.
inline float Load(const uint16_t* p, int64_t i) {
  uint32_t bits = static_cast<uint32_t>(p[i]) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline int8_t QuantizeOne(float v) {
  if (std::isnan(v)) return 0;  // XLA converts NaN to 0.
  // Clamping before rounding gives the same result as after (the bounds are integers) and keeps
  // the float->int conversion in range.
  v = v < -128.0f ? -128.0f : (v > 127.0f ? 127.0f : v);
  return static_cast<int8_t>(std::nearbyint(v));
}

// x_rk: rows x K input, q_rk: rows x K output, scale_r: one scale per row.
template <typename T>
void QuantizeRows(const T* x_rk, int64_t rows, int64_t k, int8_t* q_rk, float* scale_r) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* x = x_rk + r * k;
    int8_t* q = q_rk + r * k;
    float amax = 0.0f;
    bool has_nan = false;
    for (int64_t i = 0; i < k; ++i) {
      float a = std::fabs(Load(x, i));
      has_nan |= std::isnan(a);
      amax = a > amax ? a : amax;
    }
    if (has_nan) amax = NAN;  // jnp.max / jnp.maximum propagate NaN.
    const float scale = kQMax / (amax > kEps || std::isnan(amax) ? amax : kEps);
    scale_r[r] = scale;
    for (int64_t i = 0; i < k; ++i) {
      const float v = Load(x, i) * scale;
      q[i] = QuantizeOne(v);
    }
  }
}

ffi::Error ActQuantI8Impl(ffi::AnyBuffer x, ffi::Result<ffi::Buffer<ffi::S8>> x_q,
                          ffi::Result<ffi::Buffer<ffi::F32>> scale) {
  const auto x_dims = x.dimensions();
  if (x_dims.size() < 1) {
    return ffi::Error::InvalidArgument(
        "bitnet_act_quant_i8: expected x of rank >= 1 ([..., K]), got a scalar");
  }
  const int64_t k = x_dims.back();
  if (k < 1) {
    return ffi::Error::InvalidArgument(
        "bitnet_act_quant_i8: expected a non-empty last axis K, got x of shape " +
        ShapeString(x_dims));
  }
  const auto q_dims = x_q->dimensions();
  if (q_dims.size() != x_dims.size() ||
      !std::equal(q_dims.begin(), q_dims.end(), x_dims.begin())) {
    return ffi::Error::InvalidArgument(
        "bitnet_act_quant_i8: x_q must have the shape of x " + ShapeString(x_dims) + ", got " +
        ShapeString(q_dims));
  }
  const auto s_dims = scale->dimensions();
  if (s_dims.size() != x_dims.size() || s_dims.back() != 1 ||
      !std::equal(s_dims.begin(), s_dims.end() - 1, x_dims.begin())) {
    return ffi::Error::InvalidArgument(
        "bitnet_act_quant_i8: scale must have shape [..., 1] matching x " +
        ShapeString(x_dims) + ", got " + ShapeString(s_dims));
  }

  const int64_t rows = static_cast<int64_t>(x.element_count()) / k;
  int8_t* q_data = x_q->typed_data();
  float* s_data = scale->typed_data();
  switch (x.element_type()) {
    case ffi::DataType::F32:
      QuantizeRows(static_cast<const float*>(x.untyped_data()), rows, k, q_data, s_data);
      return ffi::Error::Success();
    case ffi::DataType::BF16:
      QuantizeRows(static_cast<const uint16_t*>(x.untyped_data()), rows, k, q_data, s_data);
      return ffi::Error::Success();
    default:
      return ffi::Error::InvalidArgument(
          "bitnet_act_quant_i8: expected x of dtype float32 or bfloat16, got XLA dtype code " +
          std::to_string(static_cast<int>(x.element_type())));
  }
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    BitnetActQuantI8, ActQuantI8Impl,
    ffi::Ffi::Bind()
        .Arg<ffi::AnyBuffer>()           // x: activations [..., K], float32 or bfloat16
        .Ret<ffi::Buffer<ffi::S8>>()     // x_q: int8 [..., K], in [-128, 127]
        .Ret<ffi::Buffer<ffi::F32>>());  // scale: float32 [..., 1]; x ~= x_q / scale
