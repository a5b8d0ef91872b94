// Per-row (last axis) absmax int8 quantization of activations, as an XLA FFI CPU handler.
// The arithmetic, and why it matches the pure-JAX reference bit for bit, is in quantize.h.
//
// Single-threaded: the op is memory-bound and small next to the matmuls it feeds.

#include "act_quant.h"

#include <algorithm>
#include <cstdint>
#include <string>

#include "ffi_util.h"
#include "quantize.h"

namespace ffi = xla::ffi;

namespace {

using bitnet::ShapeString;

// x_rk: rows x K input, q_rk: rows x K output, scale_r: one scale per row.
template <typename T>
void QuantizeRows(const T* x_rk, int64_t rows, int64_t k, int8_t* q_rk, float* scale_r) {
  int32_t unused_sum = 0;
  for (int64_t r = 0; r < rows; ++r) {
    scale_r[r] = bitnet::QuantizeRow(x_rk + r * k, k, 8, q_rk + r * k, &unused_sum);
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
