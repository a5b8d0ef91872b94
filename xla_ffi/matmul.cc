// XLA FFI handlers of the serving matmuls (CPU): ternary (2-bit packed) and int8 weights.
//
//   bitnet_ternary_matmul      x [..., K] f32|bf16, w packed (layout.h), w_scale f32 [1 | N],
//                              layer int32 []
//                              -> y f32 [..., N] = (acc * (1 / x_scale)) * w_scale
//                              w and w_scale may carry a leading layer axis ([L, G, X], [L, S]):
//                              the call then reads layer `layer` in place, so a scan over
//                              stacked layers passes the whole stack and nothing is copied.
//   bitnet_ternary_matmuls     x [..., K], layer, then (w, w_scale) of P projections of x
//                              -> y_p f32 [..., N_p]: P bitnet_ternary_matmul results, the same
//                              bits, from one quantization of x and one split of all P
//                              projections' output rows over the threads (q, k and v of a decode
//                              step: k and v alone are too small to keep both threads streaming)
//   bitnet_ternary_matmul_i32  x_q int8 [..., K], w packed -> acc int32 [..., N]
//   bitnet_ternary_group_matmul
//                              x [..., K] f32|bf16, w TQ2G tiles, w_scale f32 [T, (K / G) * 16] (a
//                              scale per output row and group of G inputs, G a multiple of 64,
//                              tiled as the codes), layer
//                              -> y f32 [..., N] = dot * (1 / x_scale); stacked like the above
//   bitnet_ternary_group_matmul_dot
//                              x_q int8 [..., K], w, w_scale, layer -> dot f32 [..., N] (gemm.h's order)
//   bitnet_int8_matmul         x [..., K] f32|bf16, w int8 [N, Kp], w_scale f32 [N] -> y f32
//   bitnet_int8_matmul_i32     x_q int8 [..., K], w int8 [N, Kp] -> acc int32 [..., N]
//   bitnet_int4_matmul         x [..., K] f32|bf16, w uint8 [N, Kp / 2] (I4G), w_scale f16
//                              [N, Kp / 32] -> y f32 [..., N] = dot * (1 / x_scale)
//   bitnet_int4_matmul_dot     x_q int8 [..., K], w, w_scale -> dot f32 [..., N] (gemm.h's order)
//
// The fused ops quantize each activation row (quantize.h, the same arithmetic as the pure-JAX
// reference), multiply in exact int32 (gemm.h), then scale: y = (float(acc) * (1 / x_scale)) *
// w_scale in that order, with -ffp-contract=off, so a pure-JAX reference written the same way is
// bit-exact. (A reciprocal, not a division: XLA rewrites `a / broadcast(b)` into
// `a * broadcast(1 / b)`, so that is what the fake-quant model computes too.)
// The i32 variants expose the integer product alone, for exact tests of every SIMD path; the int4
// head's product is a float sum of scaled group sums in one fixed order (gemm.h), which the _dot
// variant exposes alone.
//
// Handlers check shapes, dtypes and the layout version and return an error (a Python exception
// at the call site), never crash. Work is split over output rows on XLA's intra-op thread pool.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "cpu_isa.h"
#include "ffi_util.h"
#include "gemm.h"
#include "layout.h"
#include "matmul.h"
#include "parallel.h"
#include "quantize.h"
#include "scratch.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace bitnet {
namespace {

// Output row groups (ternary) or rows (int8) per parallel chunk, at least: enough work per task
// that scheduling is noise.
constexpr int64_t kMinGroupsPerChunk = 16;
constexpr int64_t kMinRowsPerChunk = 64;

ffi::Error Invalid(const std::string& op, const std::string& message) {
  return ffi::Error::InvalidArgument(op + ": " + message);
}

// The activations [..., K] seen as rows x K.
struct Rows {
  int64_t rows = 0;
  int64_t k = 0;
};

ffi::Error CheckActivations(const std::string& op, ffi::AnyBuffer::Dimensions x_dims, Rows* out) {
  if (x_dims.size() < 1) return Invalid(op, "expected activations of rank >= 1 ([..., K]), got a scalar");
  out->k = x_dims.back();
  if (out->k < 1) return Invalid(op, "expected a non-empty last axis K, got x of shape " + ShapeString(x_dims));
  out->rows = 1;
  for (size_t i = 0; i + 1 < x_dims.size(); ++i) out->rows *= x_dims[i];
  return ffi::Error::Success();
}

ffi::Error CheckOutput(const std::string& op, ffi::AnyBuffer::Dimensions x_dims,
                       ffi::AnyBuffer::Dimensions y_dims, int64_t n) {
  bool ok = y_dims.size() == x_dims.size() && y_dims.back() == n;
  for (size_t i = 0; ok && i + 1 < x_dims.size(); ++i) ok = y_dims[i] == x_dims[i];
  if (!ok) {
    return Invalid(op, "the output must have shape [..., " + std::to_string(n) + "] matching x " +
                           ShapeString(x_dims) + ", got " + ShapeString(y_dims));
  }
  return ffi::Error::Success();
}

ffi::Error CheckLayoutVersion(const std::string& op, int64_t version) {
  if (version != kLayoutVersion) {
    return Invalid(op, "the weights are packed in layout version " + std::to_string(version) +
                           ", but this build reads version " + std::to_string(kLayoutVersion) +
                           "; convert the model again with this bitnet_jax (bitnet-jax convert)");
  }
  return ffi::Error::Success();
}

ffi::Error CheckScale(const std::string& op, ffi::AnyBuffer::Dimensions s_dims, int64_t n,
                      bool per_tensor_ok) {
  if (s_dims.size() == 1 && (s_dims[0] == n || (per_tensor_ok && s_dims[0] == 1))) {
    return ffi::Error::Success();
  }
  return Invalid(op, std::string("expected w_scale of shape [") + (per_tensor_ok ? "1] or [" : "") +
                         std::to_string(n) + "], got " + ShapeString(s_dims));
}

// Ternary weights: packed [G, KB * 256] must hold N rows of K weights.
ffi::Error CheckTernaryWeights(const std::string& op, ffi::AnyBuffer::Dimensions w_dims, int64_t k,
                               int64_t n, int64_t* kb) {
  *kb = CeilDiv(k, kBlockK);
  const int64_t groups = CeilDiv(n, kRowsPerGroup);
  if (n < 1) return Invalid(op, "expected n (output features) >= 1, got " + std::to_string(n));
  if (w_dims.size() != 2 || w_dims[0] != groups || w_dims[1] != *kb * kGroupBlockBytes) {
    return Invalid(op, "packed ternary weights for K=" + std::to_string(k) + " inputs and N=" +
                           std::to_string(n) + " outputs must be uint8 [" + std::to_string(groups) +
                           ", " + std::to_string(*kb * kGroupBlockBytes) + "], got " +
                           ShapeString(w_dims) + " (pack them with bitnet_jax.layout.pack_ternary)");
  }
  return ffi::Error::Success();
}

// Ternary weights of a group-scale model: TQ2G tiles [T, Kp * 4] must hold N rows of K weights.
ffi::Error CheckTernaryTiles(const std::string& op, ffi::AnyBuffer::Dimensions w_dims, int64_t k, int64_t n,
                             int64_t* kp) {
  *kp = TernaryTileKp(k);
  const int64_t tiles = CeilDiv(n, kTileRows);
  if (n < 1) return Invalid(op, "expected n (output features) >= 1, got " + std::to_string(n));
  if (w_dims.size() != 2 || w_dims[0] != tiles || w_dims[1] != TernaryTileBytes(*kp)) {
    return Invalid(op, "packed ternary tiles (group scales) for K=" + std::to_string(k) + " inputs and N=" +
                           std::to_string(n) + " outputs must be uint8 [" + std::to_string(tiles) + ", " +
                           std::to_string(TernaryTileBytes(*kp)) + "], got " + ShapeString(w_dims) +
                           " (pack them with bitnet_jax.layout.pack_ternary_tiles)");
  }
  return ffi::Error::Success();
}

ffi::Error CheckInt8Weights(const std::string& op, ffi::AnyBuffer::Dimensions w_dims, int64_t k,
                            int64_t* kp) {
  *kp = CeilDiv(k, kInt8RowAlign) * kInt8RowAlign;
  if (w_dims.size() != 2 || w_dims[1] != *kp || w_dims[0] < 1) {
    return Invalid(op, "int8 weights for K=" + std::to_string(k) + " inputs must be int8 [N, " +
                           std::to_string(*kp) + "] (rows padded to a multiple of " +
                           std::to_string(kInt8RowAlign) + "), got " + ShapeString(w_dims) +
                           " (pack them with bitnet_jax.layout.pack_int8)");
  }
  return ffi::Error::Success();
}

ffi::Error CheckInt4Weights(const std::string& op, ffi::AnyBuffer::Dimensions w_dims,
                            ffi::AnyBuffer::Dimensions s_dims, int64_t k, int64_t* kp) {
  *kp = CeilDiv(k, kInt4GroupK) * kInt4GroupK;
  const int64_t groups = *kp / kInt4GroupK;
  if (w_dims.size() != 2 || w_dims[1] != groups * kInt4GroupBytes || w_dims[0] < 1) {
    return Invalid(op, "int4 weights for K=" + std::to_string(k) + " inputs must be uint8 [N, " +
                           std::to_string(groups * kInt4GroupBytes) + "] (two per byte, rows padded to a multiple of " +
                           std::to_string(kInt4GroupK) + " inputs), got " + ShapeString(w_dims) +
                           " (pack them with bitnet_jax.layout.pack_int4)");
  }
  if (s_dims.size() != 2 || s_dims[0] != w_dims[0] || s_dims[1] != groups) {
    return Invalid(op, "expected w_scale of shape [" + std::to_string(w_dims[0]) + ", " + std::to_string(groups) +
                           "] (float16, one per row and group of " + std::to_string(kInt4GroupK) + " inputs), got " +
                           ShapeString(s_dims));
  }
  return ffi::Error::Success();
}

// Group scales of ternary weights, tiled as the TQ2G codes (layout.h): float32 [T, C * 16], T tiles
// of 16 outputs, C groups of G = K / C inputs, G a multiple of kTernaryGroupAlign.
ffi::Error CheckGroupScale(const std::string& op, ffi::AnyBuffer::Dimensions s_dims, int64_t k, int64_t n,
                           int64_t* group_k, int64_t* groups) {
  const int64_t tiles = CeilDiv(n, kTileRows);
  const int64_t c = s_dims.size() == 2 ? s_dims[1] / kTileRows : 0;
  if (s_dims.size() != 2 || s_dims[0] != tiles || s_dims[1] % kTileRows != 0 || c < 1 || k % c != 0 ||
      (k / c) % kTernaryGroupAlign != 0) {
    return Invalid(op, "expected w_scale float32 [" + std::to_string(tiles) + ", (K / G) * 16] (the tiled scales of " +
                           std::to_string(n) + " outputs, bitnet_jax.layout.tile_group_scales) for K=" +
                           std::to_string(k) + " inputs in groups of G, G a multiple of " +
                           std::to_string(kTernaryGroupAlign) + ", got " + ShapeString(s_dims));
  }
  *groups = c;
  *group_k = k / *groups;
  return ffi::Error::Success();
}

ffi::Error Select(const std::string& op, Isa* isa) {
  std::string error;
  if (!SelectIsa(isa, &error)) return Invalid(op, error);
  return ffi::Error::Success();
}

// Activations padded with zeros to kp columns: int8 rows (from a cache line, scratch.h) plus their
// sums and scales. The storage is per thread and reused; a handler runs on one thread from start
// to end, so nothing else uses it meanwhile.
struct QuantizedRows {
  int8_t* q = nullptr;
  int32_t* sum = nullptr;
  float* scale = nullptr;

  static QuantizedRows Scratch(int64_t rows, int64_t kp) {
    thread_local std::vector<int8_t> q_storage;
    thread_local std::vector<int32_t> sum_storage;
    thread_local std::vector<float> scale_storage;
    sum_storage.resize(rows);
    scale_storage.resize(rows);
    return {CacheLineScratch(q_storage, rows * kp), sum_storage.data(), scale_storage.data()};
  }
};

// Activation rows per parallel chunk of quantization: about 16K elements.
int64_t QuantizeChunk(int64_t k) { return std::max<int64_t>(1, 16384 / k); }

template <typename T>
void QuantizeAll(ffi::ThreadPool& pool, Isa isa, const T* x, const Rows& shape, int64_t kp, int bits,
                 const QuantizedRows& out) {
  ParallelFor(pool, shape.rows, QuantizeChunk(shape.k), [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      int8_t* q = out.q + m * kp;
      std::fill(q + shape.k, q + kp, int8_t{0});
      out.sum[m] = 0;
      const T* row = x + m * shape.k;
      out.scale[m] = QuantizeRowOn(isa, row, shape.k, bits, q, &out.sum[m]);
    }
  });
}

ffi::Error QuantizeInput(const std::string& op, ffi::ThreadPool& pool, Isa isa, ffi::AnyBuffer x,
                         const Rows& shape, int64_t kp, int64_t bits, QuantizedRows* out) {
  if (bits < 2 || bits > 8) {
    return Invalid(op, "act_bits must be in [2, 8], got " + std::to_string(bits));
  }
  *out = QuantizedRows::Scratch(shape.rows, kp);
  switch (x.element_type()) {
    case ffi::DataType::F32:
      QuantizeAll(pool, isa, static_cast<const float*>(x.untyped_data()), shape, kp, static_cast<int>(bits), *out);
      return ffi::Error::Success();
    case ffi::DataType::BF16:
      QuantizeAll(pool, isa, static_cast<const uint16_t*>(x.untyped_data()), shape, kp, static_cast<int>(bits),
                  *out);
      return ffi::Error::Success();
    default:
      return Invalid(op, "expected x of dtype float32 or bfloat16, got XLA dtype code " +
                             std::to_string(static_cast<int>(x.element_type())));
  }
}

// Copies int8 rows [rows, k] into zero-padded rows [rows, kp] and sums them.
QuantizedRows PadRows(const int8_t* x, const Rows& shape, int64_t kp) {
  QuantizedRows out = QuantizedRows::Scratch(shape.rows, kp);
  std::fill(out.q, out.q + shape.rows * kp, int8_t{0});
  for (int64_t m = 0; m < shape.rows; ++m) {
    int32_t sum = 0;
    for (int64_t i = 0; i < shape.k; ++i) sum += (out.q[m * kp + i] = x[m * shape.k + i]);
    out.sum[m] = sum;
  }
  return out;
}

// In place, columns [n_begin, n_end) of every row: the int32 products that the kernels wrote into
// y's memory become y = (float(acc) * (1 / x_scale[m])) * w_scale[n or 0], exactly as written.
void RescaleInPlace(float* y, const QuantizedRows& xq, const float* w_scale, bool per_tensor, int64_t rows,
                    int64_t n, int64_t n_begin, int64_t n_end) {
  for (int64_t m = 0; m < rows; ++m) {
    const float x_inv = 1.0f / xq.scale[m];
    float* y_m = y + m * n;
    for (int64_t j = n_begin; j < n_end; ++j) {
      int32_t acc;
      std::memcpy(&acc, y_m + j, sizeof(acc));
      y_m[j] = (static_cast<float>(acc) * x_inv) * w_scale[per_tensor ? 0 : j];
    }
  }
}

// The fused ops' last step, done by each parallel chunk on the columns it computed: y, which is
// the memory the int32 products were written to, rescaled in place (RescaleInPlace).
struct Rescale {
  float* y = nullptr;
  const float* w_scale = nullptr;
  bool per_tensor = false;
};

// One ternary product of the same quantized rows: codes w of n output rows, the int32 products
// into acc (rows x n); with rescale.y set, rescaled in place.
struct TernaryProjection {
  const uint8_t* w = nullptr;
  int64_t n = 0;
  int32_t* acc = nullptr;
  Rescale rescale;
};

// Every projection's row groups in tasks of the kernel's unit (TernaryGroupsPerTask), in chunks
// of at least kMinGroupsPerChunk row groups, all of them as one range over the pool, so that
// small projections share the threads; a chunk that spans two projections runs its part of each,
// then rescales the columns it computed.
void RunTernary(ffi::ThreadPool& pool, Isa isa, const QuantizedRows& xq, int64_t rows, int64_t kb,
                const std::vector<TernaryProjection>& projections) {
  const int64_t task = TernaryGroupsPerTask(isa, rows);
  std::vector<int64_t> first_task(projections.size() + 1, 0);
  for (size_t i = 0; i < projections.size(); ++i) {
    first_task[i + 1] = first_task[i] + CeilDiv(CeilDiv(projections[i].n, kRowsPerGroup), task);
  }
  ParallelFor(pool, first_task.back(), CeilDiv(kMinGroupsPerChunk, task), [&](int64_t begin, int64_t end) {
    for (size_t i = 0; i < projections.size(); ++i) {
      const int64_t lo = std::max(begin, first_task[i]), hi = std::min(end, first_task[i + 1]);
      if (lo >= hi) continue;
      const TernaryProjection& p = projections[i];
      const int64_t g_begin = (lo - first_task[i]) * task;
      const int64_t g_end = std::min(CeilDiv(p.n, kRowsPerGroup), (hi - first_task[i]) * task);
      TernaryGemmI32(isa, xq.q, xq.sum, rows, kb, p.w, g_begin, g_end, p.n, p.acc);
      if (p.rescale.y != nullptr) {
        RescaleInPlace(p.rescale.y, xq, p.rescale.w_scale, p.rescale.per_tensor, rows, p.n, g_begin * kRowsPerGroup,
                       std::min(p.n, g_end * kRowsPerGroup));
      }
    }
  });
}

void RunInt8(ffi::ThreadPool& pool, Isa isa, const QuantizedRows& xq, int64_t rows, int64_t kp,
             const int8_t* w, int64_t n, int32_t* acc, const Rescale& rescale = {}) {
  ParallelFor(pool, n, kMinRowsPerChunk, [&](int64_t begin, int64_t end) {
    Int8GemmI32(isa, xq.q, xq.sum, rows, kp, w, begin, end, n, acc);
    if (rescale.y != nullptr) {
      RescaleInPlace(rescale.y, xq, rescale.w_scale, rescale.per_tensor, rows, n, begin, end);
    }
  });
}

// In place, columns [n_begin, n_end) of every row of the float dot products y: y = dot * (1 / x_scale[m]).
void ScaleByInverse(float* y, const float* x_scale, int64_t rows, int64_t n, int64_t n_begin, int64_t n_end) {
  for (int64_t m = 0; m < rows; ++m) {
    const float x_inv = 1.0f / x_scale[m];
    for (int64_t j = n_begin; j < n_end; ++j) y[m * n + j] *= x_inv;
  }
}

// Ternary group-scale dot products into y (rows x n), split over tiles of 16 output rows; with
// x_scale set, each chunk then scales its own columns: y = dot * (1 / x_scale[m]).
void RunTernaryGroup(ffi::ThreadPool& pool, Isa isa, const QuantizedRows& xq, int64_t rows, int64_t kp,
                     const uint8_t* w, const float* w_scale, int64_t group_k, int64_t groups, int64_t n, float* y,
                     const float* x_scale = nullptr) {
  thread_local std::vector<int32_t> x_group_storage;  // read by the pool's threads while this call waits
  x_group_storage.resize(groups * rows);
  TernaryGroupSums(xq.q, rows, kp, group_k, groups, x_group_storage.data());
  const int32_t* x_group = x_group_storage.data();
  constexpr int64_t kMinTilesPerChunk = kMinGroupsPerChunk * kRowsPerGroup / kTileRows;
  ParallelFor(pool, CeilDiv(n, kTileRows), kMinTilesPerChunk, [&](int64_t t_begin, int64_t t_end) {
    TernaryGroupGemmF32(isa, xq.q, x_group, rows, kp, w, w_scale, group_k, groups, t_begin, t_end, n, y);
    if (x_scale != nullptr) ScaleByInverse(y, x_scale, rows, n, t_begin * kTileRows, std::min(n, t_end * kTileRows));
  });
}

// Int4 dot products into y (rows x n), split over output rows; with x_scale set, each chunk then
// scales its own columns: y = dot * (1 / x_scale[m]).
void RunInt4(ffi::ThreadPool& pool, Isa isa, const int8_t* x_q, int64_t rows, int64_t kp, const uint8_t* w,
             const uint16_t* w_scale, int64_t n, float* y, const float* x_scale = nullptr) {
  ParallelFor(pool, n, kMinRowsPerChunk, [&](int64_t begin, int64_t end) {
    Int4GemmF32(isa, x_q, rows, kp, w, w_scale, begin, end, n, y);
    if (x_scale != nullptr) ScaleByInverse(y, x_scale, rows, n, begin, end);
  });
}

// Drops the leading layer axis of a stacked operand: the dimensions of one layer, and its offset.
struct LayerView {
  ffi::AnyBuffer::Dimensions dims;
  int64_t offset = 0;  // elements
};

ffi::Error SelectLayer(const std::string& op, const char* what, ffi::AnyBuffer::Dimensions dims,
                       size_t layer_rank, int64_t layer, LayerView* view) {
  view->dims = dims;
  view->offset = 0;
  if (dims.size() != layer_rank + 1) return ffi::Error::Success();
  if (layer < 0 || layer >= dims[0]) {
    return Invalid(op, std::string("layer ") + std::to_string(layer) + " is outside the " +
                           std::to_string(dims[0]) + " layers of " + what + " " + ShapeString(dims));
  }
  view->dims = ffi::AnyBuffer::Dimensions(dims.begin() + 1, dims.size() - 1);
  int64_t per_layer = 1;
  for (size_t i = 1; i < dims.size(); ++i) per_layer *= dims[i];
  view->offset = layer * per_layer;
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------
// Each weight kind's operands, checked once for its handlers (fused, and integer-only for tests):
// the layout version, the selected layer, the activations' shape against the weights (and their
// scales) and the output, then the kernel path. Every failure names the op and what was expected.

// Which scales a ternary handler takes.
enum class TernaryScales { kNone, kPerRow, kPerGroup };

struct TernaryOperands {
  Rows shape;
  int64_t kb = 0;                   // TQ2B blocks (kNone, kPerRow)
  int64_t kp = 0;                   // TQ2G padded inputs (kPerGroup)
  Isa isa = Isa::kScalar;
  const uint8_t* w = nullptr;       // the selected layer's codes
  const float* w_scale = nullptr;   // and scales: [1] or [N] (kPerRow), [groups, N] (kPerGroup)
  bool per_tensor = false;          // kPerRow with one scale
  int64_t group_k = 0, groups = 0;  // kPerGroup
};

// w_scale is nullptr for kNone.
ffi::Error CheckTernaryOperands(const std::string& op, TernaryScales scales, ffi::AnyBuffer::Dimensions x_dims,
                                ffi::Buffer<ffi::U8> w, const ffi::Buffer<ffi::F32>* w_scale,
                                ffi::Buffer<ffi::S32> layer_buf, ffi::AnyBuffer::Dimensions out_dims, int64_t n,
                                int64_t layout_version, TernaryOperands* out) {
  LayerView w_view, s_view;
  if (auto e = CheckLayoutVersion(op, layout_version); e.failure()) return e;
  if (layer_buf.element_count() != 1) return Invalid(op, "expected a scalar int32 layer index");
  const int64_t layer = layer_buf.typed_data()[0];
  if (auto e = SelectLayer(op, "w", w.dimensions(), 2, layer, &w_view); e.failure()) return e;
  if (scales != TernaryScales::kNone) {
    const size_t scale_rank = scales == TernaryScales::kPerGroup ? 2 : 1;
    if (auto e = SelectLayer(op, "w_scale", w_scale->dimensions(), scale_rank, layer, &s_view); e.failure()) return e;
  }
  if (auto e = CheckActivations(op, x_dims, &out->shape); e.failure()) return e;
  if (scales == TernaryScales::kPerGroup) {
    if (auto e = CheckTernaryTiles(op, w_view.dims, out->shape.k, n, &out->kp); e.failure()) return e;
  } else if (auto e = CheckTernaryWeights(op, w_view.dims, out->shape.k, n, &out->kb); e.failure()) {
    return e;
  }
  if (scales == TernaryScales::kPerRow) {
    if (auto e = CheckScale(op, s_view.dims, n, /*per_tensor_ok=*/true); e.failure()) return e;
    out->per_tensor = s_view.dims[0] == 1;
  } else if (scales == TernaryScales::kPerGroup) {
    if (auto e = CheckGroupScale(op, s_view.dims, out->shape.k, n, &out->group_k, &out->groups); e.failure()) return e;
  }
  if (auto e = CheckOutput(op, x_dims, out_dims, n); e.failure()) return e;
  if (auto e = Select(op, &out->isa); e.failure()) return e;
  out->w = w.typed_data() + w_view.offset;
  if (scales != TernaryScales::kNone) out->w_scale = w_scale->typed_data() + s_view.offset;
  return ffi::Error::Success();
}

// Int8 rows [N, Kp] (and, fused, their scales [N]); int4 rows with their group scales.
struct RowOperands {
  Rows shape;
  int64_t kp = 0, n = 0;
  Isa isa = Isa::kScalar;
};

ffi::Error CheckInt8Operands(const std::string& op, ffi::AnyBuffer::Dimensions x_dims,
                             ffi::AnyBuffer::Dimensions w_dims, const ffi::AnyBuffer::Dimensions* s_dims,
                             ffi::AnyBuffer::Dimensions out_dims, int64_t layout_version, RowOperands* out) {
  if (auto e = CheckLayoutVersion(op, layout_version); e.failure()) return e;
  if (auto e = CheckActivations(op, x_dims, &out->shape); e.failure()) return e;
  if (auto e = CheckInt8Weights(op, w_dims, out->shape.k, &out->kp); e.failure()) return e;
  out->n = w_dims[0];
  if (s_dims != nullptr) {
    if (auto e = CheckScale(op, *s_dims, out->n, /*per_tensor_ok=*/false); e.failure()) return e;
  }
  if (auto e = CheckOutput(op, x_dims, out_dims, out->n); e.failure()) return e;
  return Select(op, &out->isa);
}

ffi::Error CheckInt4Operands(const std::string& op, ffi::AnyBuffer::Dimensions x_dims,
                             ffi::AnyBuffer::Dimensions w_dims, ffi::AnyBuffer::Dimensions s_dims,
                             ffi::AnyBuffer::Dimensions out_dims, int64_t layout_version, RowOperands* out) {
  if (auto e = CheckLayoutVersion(op, layout_version); e.failure()) return e;
  if (auto e = CheckActivations(op, x_dims, &out->shape); e.failure()) return e;
  if (auto e = CheckInt4Weights(op, w_dims, s_dims, out->shape.k, &out->kp); e.failure()) return e;
  out->n = w_dims[0];
  if (auto e = CheckOutput(op, x_dims, out_dims, out->n); e.failure()) return e;
  return Select(op, &out->isa);
}

// ---------------------------------------------------------------------------------------------
// The handlers.

ffi::Error TernaryMatmulImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::U8> w,
                             ffi::Buffer<ffi::F32> w_scale, ffi::Buffer<ffi::S32> layer_buf,
                             ffi::Result<ffi::Buffer<ffi::F32>> y, int64_t n, int64_t act_bits,
                             int64_t layout_version) {
  const std::string op = "bitnet_ternary_matmul";
  TernaryOperands t;
  if (auto e = CheckTernaryOperands(op, TernaryScales::kPerRow, x.dimensions(), w, &w_scale, layer_buf,
                                    y->dimensions(), n, layout_version, &t);
      e.failure())
    return e;
  if (t.shape.rows == 0) return ffi::Error::Success();
  QuantizedRows xq;
  if (auto e = QuantizeInput(op, pool, t.isa, x, t.shape, t.kb * kBlockK, act_bits, &xq); e.failure()) return e;
  // The int32 products go into y's own memory (int32 and float32 have the same size) and are
  // rescaled there.
  float* y_data = y->typed_data();
  RunTernary(pool, t.isa, xq, t.shape.rows, t.kb,
             {{t.w, n, reinterpret_cast<int32_t*>(y_data), {y_data, t.w_scale, t.per_tensor}}});
  return ffi::Error::Success();
}

ffi::Error TernaryMatmulsImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::S32> layer_buf,
                              ffi::RemainingArgs weights, ffi::RemainingRets ys, ffi::Span<const int64_t> ns,
                              int64_t act_bits, int64_t layout_version) {
  const std::string op = "bitnet_ternary_matmuls";
  const size_t p = ns.size();
  if (p < 1 || weights.size() != 2 * p || ys.size() != p) {
    return Invalid(op, "expected (w, w_scale) and an output for each of the " + std::to_string(p) +
                           " projections in `ns`, got " + std::to_string(weights.size()) + " weight operands and " +
                           std::to_string(ys.size()) + " outputs");
  }
  std::vector<TernaryOperands> t(p);
  std::vector<float*> y(p);
  for (size_t i = 0; i < p; ++i) {
    auto w = weights.get<ffi::Buffer<ffi::U8>>(2 * i);
    auto w_scale = weights.get<ffi::Buffer<ffi::F32>>(2 * i + 1);
    auto out = ys.get<ffi::Buffer<ffi::F32>>(i);
    if (!w.has_value() || !w_scale.has_value() || !out.has_value()) {
      return Invalid(op, "projection " + std::to_string(i) + ": expected w uint8, w_scale float32 and a float32 output");
    }
    const std::string op_i = op + " (projection " + std::to_string(i) + ")";
    if (auto e = CheckTernaryOperands(op_i, TernaryScales::kPerRow, x.dimensions(), *w, &*w_scale, layer_buf,
                                      (*out)->dimensions(), ns[i], layout_version, &t[i]);
        e.failure())
      return e;
    y[i] = (*out)->typed_data();
  }
  const TernaryOperands& t0 = t[0];  // the activations' shape, kb and path are every projection's
  if (t0.shape.rows == 0) return ffi::Error::Success();
  QuantizedRows xq;
  if (auto e = QuantizeInput(op, pool, t0.isa, x, t0.shape, t0.kb * kBlockK, act_bits, &xq); e.failure()) return e;
  std::vector<TernaryProjection> projections(p);
  for (size_t i = 0; i < p; ++i) {
    projections[i] = {t[i].w, ns[i], reinterpret_cast<int32_t*>(y[i]), {y[i], t[i].w_scale, t[i].per_tensor}};
  }
  RunTernary(pool, t0.isa, xq, t0.shape.rows, t0.kb, projections);
  return ffi::Error::Success();
}

ffi::Error TernaryMatmulI32Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> x_q, ffi::Buffer<ffi::U8> w,
                                ffi::Buffer<ffi::S32> layer_buf, ffi::Result<ffi::Buffer<ffi::S32>> acc, int64_t n,
                                int64_t layout_version) {
  const std::string op = "bitnet_ternary_matmul_i32";
  TernaryOperands t;
  if (auto e = CheckTernaryOperands(op, TernaryScales::kNone, x_q.dimensions(), w, nullptr, layer_buf,
                                    acc->dimensions(), n, layout_version, &t);
      e.failure())
    return e;
  if (t.shape.rows == 0) return ffi::Error::Success();
  const QuantizedRows xq = PadRows(x_q.typed_data(), t.shape, t.kb * kBlockK);
  RunTernary(pool, t.isa, xq, t.shape.rows, t.kb, {{t.w, n, acc->typed_data(), {}}});
  return ffi::Error::Success();
}

ffi::Error TernaryGroupMatmulImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::U8> w,
                                  ffi::Buffer<ffi::F32> w_scale, ffi::Buffer<ffi::S32> layer_buf,
                                  ffi::Result<ffi::Buffer<ffi::F32>> y, int64_t n, int64_t act_bits,
                                  int64_t layout_version) {
  const std::string op = "bitnet_ternary_group_matmul";
  TernaryOperands t;
  if (auto e = CheckTernaryOperands(op, TernaryScales::kPerGroup, x.dimensions(), w, &w_scale, layer_buf,
                                    y->dimensions(), n, layout_version, &t);
      e.failure())
    return e;
  if (t.shape.rows == 0) return ffi::Error::Success();
  QuantizedRows xq;
  if (auto e = QuantizeInput(op, pool, t.isa, x, t.shape, t.kp, act_bits, &xq); e.failure()) return e;
  RunTernaryGroup(pool, t.isa, xq, t.shape.rows, t.kp, t.w, t.w_scale, t.group_k, t.groups, n, y->typed_data(),
                  xq.scale);
  return ffi::Error::Success();
}

ffi::Error TernaryGroupMatmulDotImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> x_q, ffi::Buffer<ffi::U8> w,
                                     ffi::Buffer<ffi::F32> w_scale, ffi::Buffer<ffi::S32> layer_buf,
                                     ffi::Result<ffi::Buffer<ffi::F32>> dot, int64_t n, int64_t layout_version) {
  const std::string op = "bitnet_ternary_group_matmul_dot";
  TernaryOperands t;
  if (auto e = CheckTernaryOperands(op, TernaryScales::kPerGroup, x_q.dimensions(), w, &w_scale, layer_buf,
                                    dot->dimensions(), n, layout_version, &t);
      e.failure())
    return e;
  if (t.shape.rows == 0) return ffi::Error::Success();
  const QuantizedRows xq = PadRows(x_q.typed_data(), t.shape, t.kp);
  RunTernaryGroup(pool, t.isa, xq, t.shape.rows, t.kp, t.w, t.w_scale, t.group_k, t.groups, n, dot->typed_data());
  return ffi::Error::Success();
}

ffi::Error Int8MatmulImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::S8> w,
                          ffi::Buffer<ffi::F32> w_scale, ffi::Result<ffi::Buffer<ffi::F32>> y,
                          int64_t act_bits, int64_t layout_version) {
  const std::string op = "bitnet_int8_matmul";
  RowOperands r;
  const ffi::AnyBuffer::Dimensions s_dims = w_scale.dimensions();
  if (auto e = CheckInt8Operands(op, x.dimensions(), w.dimensions(), &s_dims, y->dimensions(), layout_version, &r);
      e.failure())
    return e;
  if (r.shape.rows == 0) return ffi::Error::Success();
  QuantizedRows xq;
  if (auto e = QuantizeInput(op, pool, r.isa, x, r.shape, r.kp, act_bits, &xq); e.failure()) return e;
  float* y_data = y->typed_data();
  RunInt8(pool, r.isa, xq, r.shape.rows, r.kp, w.typed_data(), r.n, reinterpret_cast<int32_t*>(y_data),
          {y_data, w_scale.typed_data(), /*per_tensor=*/false});
  return ffi::Error::Success();
}

ffi::Error Int8MatmulI32Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> x_q, ffi::Buffer<ffi::S8> w,
                             ffi::Result<ffi::Buffer<ffi::S32>> acc, int64_t layout_version) {
  const std::string op = "bitnet_int8_matmul_i32";
  RowOperands r;
  if (auto e = CheckInt8Operands(op, x_q.dimensions(), w.dimensions(), nullptr, acc->dimensions(), layout_version, &r);
      e.failure())
    return e;
  if (r.shape.rows == 0) return ffi::Error::Success();
  const QuantizedRows xq = PadRows(x_q.typed_data(), r.shape, r.kp);
  RunInt8(pool, r.isa, xq, r.shape.rows, r.kp, w.typed_data(), r.n, acc->typed_data());
  return ffi::Error::Success();
}

ffi::Error Int4MatmulImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::U8> w,
                          ffi::Buffer<ffi::F16> w_scale, ffi::Result<ffi::Buffer<ffi::F32>> y, int64_t act_bits,
                          int64_t layout_version) {
  const std::string op = "bitnet_int4_matmul";
  RowOperands r;
  if (auto e = CheckInt4Operands(op, x.dimensions(), w.dimensions(), w_scale.dimensions(), y->dimensions(),
                                 layout_version, &r);
      e.failure())
    return e;
  if (r.shape.rows == 0) return ffi::Error::Success();
  QuantizedRows xq;
  if (auto e = QuantizeInput(op, pool, r.isa, x, r.shape, r.kp, act_bits, &xq); e.failure()) return e;
  RunInt4(pool, r.isa, xq.q, r.shape.rows, r.kp, w.typed_data(), reinterpret_cast<const uint16_t*>(w_scale.typed_data()),
          r.n, y->typed_data(), xq.scale);
  return ffi::Error::Success();
}

ffi::Error Int4MatmulDotImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> x_q, ffi::Buffer<ffi::U8> w,
                             ffi::Buffer<ffi::F16> w_scale, ffi::Result<ffi::Buffer<ffi::F32>> dot,
                             int64_t layout_version) {
  const std::string op = "bitnet_int4_matmul_dot";
  RowOperands r;
  if (auto e = CheckInt4Operands(op, x_q.dimensions(), w.dimensions(), w_scale.dimensions(), dot->dimensions(),
                                 layout_version, &r);
      e.failure())
    return e;
  if (r.shape.rows == 0) return ffi::Error::Success();
  const QuantizedRows xq = PadRows(x_q.typed_data(), r.shape, r.kp);
  RunInt4(pool, r.isa, xq.q, r.shape.rows, r.kp, w.typed_data(), reinterpret_cast<const uint16_t*>(w_scale.typed_data()),
          r.n, dot->typed_data());
  return ffi::Error::Success();
}

}  // namespace
}  // namespace bitnet

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    BitnetTernaryMatmul, bitnet::TernaryMatmulImpl,
    ffi::Ffi::Bind()
        .Ctx<ffi::ThreadPool>()
        .Arg<ffi::AnyBuffer>()           // x: activations [..., K], float32 or bfloat16
        .Arg<ffi::Buffer<ffi::U8>>()     // w: packed ternary codes [G, KB * 256] (layout.h)
        .Arg<ffi::Buffer<ffi::F32>>()    // w_scale: [1] (per tensor) or [N] (per output row)
        .Arg<ffi::Buffer<ffi::S32>>()    // layer: int32 scalar, which layer of stacked w / w_scale
        .Ret<ffi::Buffer<ffi::F32>>()    // y: [..., N]
        .Attr<int64_t>("n")              // N, the output features (G * 4 rounds it up)
        .Attr<int64_t>("act_bits")       // bits of the per-row activation quantizer
        .Attr<int64_t>("layout_version"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    BitnetTernaryMatmuls, bitnet::TernaryMatmulsImpl,
    ffi::Ffi::Bind()
        .Ctx<ffi::ThreadPool>()
        .Arg<ffi::AnyBuffer>()           // x: activations [..., K], float32 or bfloat16
        .Arg<ffi::Buffer<ffi::S32>>()    // layer: int32 scalar, which layer of stacked weights
        .RemainingArgs()                 // w_p, w_scale_p for each projection, as for bitnet_ternary_matmul
        .RemainingRets()                 // y_p: float32 [..., N_p]
        .Attr<ffi::Span<const int64_t>>("ns")  // N_p of each projection
        .Attr<int64_t>("act_bits")
        .Attr<int64_t>("layout_version"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    BitnetTernaryMatmulI32, bitnet::TernaryMatmulI32Impl,
    ffi::Ffi::Bind()
        .Ctx<ffi::ThreadPool>()
        .Arg<ffi::Buffer<ffi::S8>>()     // x_q: int8 activations [..., K]
        .Arg<ffi::Buffer<ffi::U8>>()     // w: packed ternary codes [G, KB * 256], or stacked [L, G, KB * 256]
        .Arg<ffi::Buffer<ffi::S32>>()    // layer: int32 scalar, which layer of a stacked w
        .Ret<ffi::Buffer<ffi::S32>>()    // acc: sum_k x_q * t, int32 [..., N]
        .Attr<int64_t>("n")
        .Attr<int64_t>("layout_version"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    BitnetTernaryGroupMatmul, bitnet::TernaryGroupMatmulImpl,
    ffi::Ffi::Bind()
        .Ctx<ffi::ThreadPool>()
        .Arg<ffi::AnyBuffer>()           // x: activations [..., K], float32 or bfloat16
        .Arg<ffi::Buffer<ffi::U8>>()     // w: packed ternary codes [G, KB * 256], or stacked [L, G, KB * 256]
        .Arg<ffi::Buffer<ffi::F32>>()    // w_scale: [K / group, N], or stacked [L, K / group, N]
        .Arg<ffi::Buffer<ffi::S32>>()    // layer: int32 scalar, which layer of stacked w / w_scale
        .Ret<ffi::Buffer<ffi::F32>>()    // y: [..., N]
        .Attr<int64_t>("n")
        .Attr<int64_t>("act_bits")
        .Attr<int64_t>("layout_version"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    BitnetTernaryGroupMatmulDot, bitnet::TernaryGroupMatmulDotImpl,
    ffi::Ffi::Bind()
        .Ctx<ffi::ThreadPool>()
        .Arg<ffi::Buffer<ffi::S8>>()     // x_q: int8 activations [..., K]
        .Arg<ffi::Buffer<ffi::U8>>()     // w: packed ternary codes
        .Arg<ffi::Buffer<ffi::F32>>()    // w_scale: [K / group, N] (or stacked)
        .Arg<ffi::Buffer<ffi::S32>>()    // layer
        .Ret<ffi::Buffer<ffi::F32>>()    // dot: [..., N], gemm.h's order, not scaled by x
        .Attr<int64_t>("n")
        .Attr<int64_t>("layout_version"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    BitnetInt8Matmul, bitnet::Int8MatmulImpl,
    ffi::Ffi::Bind()
        .Ctx<ffi::ThreadPool>()
        .Arg<ffi::AnyBuffer>()           // x: activations [..., K], float32 or bfloat16
        .Arg<ffi::Buffer<ffi::S8>>()     // w: int8 rows [N, Kp], Kp = K rounded up to 64
        .Arg<ffi::Buffer<ffi::F32>>()    // w_scale: [N]
        .Ret<ffi::Buffer<ffi::F32>>()    // y: [..., N]
        .Attr<int64_t>("act_bits")
        .Attr<int64_t>("layout_version"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    BitnetInt8MatmulI32, bitnet::Int8MatmulI32Impl,
    ffi::Ffi::Bind()
        .Ctx<ffi::ThreadPool>()
        .Arg<ffi::Buffer<ffi::S8>>()     // x_q: int8 activations [..., K]
        .Arg<ffi::Buffer<ffi::S8>>()     // w: int8 rows [N, Kp]
        .Ret<ffi::Buffer<ffi::S32>>()    // acc: int32 [..., N]
        .Attr<int64_t>("layout_version"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    BitnetInt4Matmul, bitnet::Int4MatmulImpl,
    ffi::Ffi::Bind()
        .Ctx<ffi::ThreadPool>()
        .Arg<ffi::AnyBuffer>()           // x: activations [..., K], float32 or bfloat16
        .Arg<ffi::Buffer<ffi::U8>>()     // w: int4 codes [N, Kp / 2], I4G (layout.h)
        .Arg<ffi::Buffer<ffi::F16>>()    // w_scale: float16 [N, Kp / 32]
        .Ret<ffi::Buffer<ffi::F32>>()    // y: [..., N]
        .Attr<int64_t>("act_bits")
        .Attr<int64_t>("layout_version"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    BitnetInt4MatmulDot, bitnet::Int4MatmulDotImpl,
    ffi::Ffi::Bind()
        .Ctx<ffi::ThreadPool>()
        .Arg<ffi::Buffer<ffi::S8>>()     // x_q: int8 activations [..., K]
        .Arg<ffi::Buffer<ffi::U8>>()     // w: int4 codes [N, Kp / 2]
        .Arg<ffi::Buffer<ffi::F16>>()    // w_scale: float16 [N, Kp / 32]
        .Ret<ffi::Buffer<ffi::F32>>()    // dot: [..., N], gemm.h's order, not scaled by x
        .Attr<int64_t>("layout_version"));
