// The int4 lm_head kernel (I4G layout, layout.h; contract in gemm.h): a scalar twin, AVX2 (+F16C)
// on x86-64 and NEON (with the dot-product extension) on aarch64.
//
// A row's dot product is a float sum of per-group integer sums times the group's float16 scale.
// Every path keeps the same 8 float lanes, each the exact sum of 4 neighbouring products per group,
// and adds them in the order gemm.h states, with no fused multiply-adds (this file is built with
// -ffp-contract=off): the paths agree bit for bit, so a result never depends on the CPU, the batch
// or the thread count. 8 lanes of 4 products is what one AVX2 `maddubs` + `madd` pair, and two
// NEON `sdot`s, produce from a group's 32 bytes.
//
// Decode streams the table once per token; up to 4 activation rows (a batch) share each unpacked
// weight group.

#include <algorithm>
#include <vector>

#include "cpu_isa.h"
#include "float16.h"
#include "gemm.h"
#include "layout.h"
#include "prefetch.h"

#if BITNET_JAX_X86_SIMD
#include <immintrin.h>
#elif BITNET_JAX_ARM_SIMD
#include <arm_neon.h>
#endif

namespace bitnet {

namespace {

constexpr int kLanes = kFloatLanes;
constexpr int kLaneK = kInt4GroupK / kLanes;  // 4 products per lane and group
static_assert(kLaneK == 4, "a lane is one maddubs + madd pair (AVX2), one sdot lane (NEON)");

// ---------------------------------------------------------------------------------------------
// Scalar twin: the layout read literally.
float Int4DotScalar(const int8_t* x, const uint8_t* w_row, const uint16_t* s_row, int64_t groups) {
  float lane[kLanes] = {};
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* bytes = w_row + g * kInt4GroupBytes;
    const int8_t* xg = x + g * kInt4GroupK;
    const float scale = HalfToFloat(s_row[g]);
    for (int l = 0; l < kLanes; ++l) {
      int32_t p = 0;
      for (int j = 0; j < kLaneK; ++j) {
        const int i = kLaneK * l + j;  // weight 32g + i: byte i % 16, high nibble iff i >= 16
        p += Int4Weight(bytes[i % kInt4GroupBytes], i / kInt4GroupBytes) * xg[i];
      }
      lane[l] = lane[l] + static_cast<float>(p) * scale;
    }
  }
  return SumFloatLanes(lane);
}

void Int4RowsScalar(const int8_t* x_q, int64_t rows, int64_t kp, const uint8_t* w, const uint16_t* w_scale,
                    int64_t n_begin, int64_t n_end, int64_t n_total, float* dot) {
  const int64_t groups = kp / kInt4GroupK;
  for (int64_t n = n_begin; n < n_end; ++n) {
    for (int64_t m = 0; m < rows; ++m) {
      dot[m * n_total + n] = Int4DotScalar(x_q + m * kp, w + n * groups * kInt4GroupBytes, w_scale + n * groups, groups);
    }
  }
}

}  // namespace

#if BITNET_JAX_X86_SIMD

namespace {

// ---------------------------------------------------------------------------------------------
// AVX2: a group is one broadcast 16-byte load; shifting the upper 128 bits right by 4 and masking
// gives its 32 nibbles u = q + 8 in k order; maddubs(u, x) + madd(., 1) gives the 8 lanes of
// sum u * x, and subtracting 8 * (the lane's sum of x), computed once per activation row, leaves
// sum q * x exactly (|u * x| <= 15 * 128: no int16 saturation).
#define BITNET_AVX2_F16C __attribute__((target("avx2,f16c")))

// One weight row against a tile of MT activation rows: each weight group is unpacked once for the
// MT rows. Rows are read one after another, front to back, so the weights form one sequential
// stream (two rows interleaved ran at half speed on Zen 3: short interleaved streams defeat the
// hardware prefetcher), helped by a software prefetch kPrefetchBytes ahead.
constexpr int64_t kPrefetchBytes = 2048;

template <int MT>
BITNET_AVX2_F16C void Int4TileAvx2(const int8_t* x, int64_t kp, const int32_t* x_lane8, const uint8_t* w_row,
                                   const float* scale_row, int64_t groups, float* dot, int64_t dot_stride) {
  const __m256i nibble_shift = _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4);
  const __m256i low4 = _mm256_set1_epi8(0x0f);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 lane[MT];
  for (int m = 0; m < MT; ++m) lane[m] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* bytes = w_row + g * kInt4GroupBytes;
    if ((g & 3) == 0) PrefetchAt(bytes, kPrefetchBytes);
    const __m256i u = _mm256_and_si256(
        _mm256_srlv_epi32(_mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes))),
                          nibble_shift),
        low4);
    const __m256 s = _mm256_broadcast_ss(scale_row + g);
    // Unrolled: the accumulators must stay in registers (a loop would index them in memory).
#pragma GCC unroll 4
    for (int m = 0; m < MT; ++m) {
      const __m256i xg = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + m * kp + g * kInt4GroupK));
      __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(u, xg), ones);
      p = _mm256_sub_epi32(p, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x_lane8 + (m * groups + g) * kLanes)));
      lane[m] = _mm256_add_ps(lane[m], _mm256_mul_ps(_mm256_cvtepi32_ps(p), s));
    }
  }
  alignas(32) float lanes[kLanes];
  for (int m = 0; m < MT; ++m) {
    _mm256_store_ps(lanes, lane[m]);
    dot[m * dot_stride] = SumFloatLanes(lanes);
  }
}

// Float16 scales [count] as float32 (exact).
BITNET_AVX2_F16C void HalvesToFloatsF16c(const uint16_t* h, int64_t count, float* out) {
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i))));
  }
  for (; i < count; ++i) out[i] = HalfToFloat(h[i]);
}

BITNET_AVX2_F16C void Int4RowsAvx2(const int8_t* x_q, int64_t rows, int64_t kp, const uint8_t* w,
                                   const uint16_t* w_scale, int64_t n_begin, int64_t n_end, int64_t n_total,
                                   float* dot) {
  constexpr int64_t kTileRows = 4;  // activation rows per tile: 4 accumulators, 13 registers in all
  const int64_t groups = kp / kInt4GroupK;
  // 8 * (sum of x over each lane's 4 inputs), per activation row, group and lane.
  std::vector<int32_t> x_lane8(rows * groups * kLanes);
  for (int64_t m = 0; m < rows; ++m) {
    for (int64_t i = 0; i < groups * kLanes; ++i) {
      const int8_t* xi = x_q + m * kp + i * kLaneK;
      x_lane8[m * groups * kLanes + i] = 8 * (xi[0] + xi[1] + xi[2] + xi[3]);
    }
  }
  std::vector<float> scale_row(groups);  // the row's float16 scales, widened once for every tile
  for (int64_t n = n_begin; n < n_end; ++n) {
    const uint8_t* w_row = w + n * groups * kInt4GroupBytes;
    HalvesToFloatsF16c(w_scale + n * groups, groups, scale_row.data());
    for (int64_t m = 0; m < rows; m += kTileRows) {
      const int8_t* x = x_q + m * kp;
      const int32_t* xl = x_lane8.data() + m * groups * kLanes;
      float* out = dot + m * n_total + n;
      switch (std::min(kTileRows, rows - m)) {
        case 1: Int4TileAvx2<1>(x, kp, xl, w_row, scale_row.data(), groups, out, n_total); break;
        case 2: Int4TileAvx2<2>(x, kp, xl, w_row, scale_row.data(), groups, out, n_total); break;
        case 3: Int4TileAvx2<3>(x, kp, xl, w_row, scale_row.data(), groups, out, n_total); break;
        default: Int4TileAvx2<4>(x, kp, xl, w_row, scale_row.data(), groups, out, n_total); break;
      }
    }
  }
}

}  // namespace

void Int4GemmF32(Isa isa, const int8_t* x_q, int64_t rows, int64_t kp, const uint8_t* w, const uint16_t* w_scale,
                 int64_t n_begin, int64_t n_end, int64_t n_total, float* dot) {
  // AVX-512 machines run the AVX2 path: a 512-bit version would need 16 lanes, another order.
  if (isa == Isa::kAvx2 || isa == Isa::kAvx512Vnni) {
    Int4RowsAvx2(x_q, rows, kp, w, w_scale, n_begin, n_end, n_total, dot);
  } else {
    Int4RowsScalar(x_q, rows, kp, w, w_scale, n_begin, n_end, n_total, dot);
  }
}

#elif BITNET_JAX_ARM_SIMD

namespace {

// ---------------------------------------------------------------------------------------------
// NEON with sdot: the group's nibbles become signed q = u - 8 (low nibbles: weights 0..15, high:
// 16..31), and one sdot per 16 bytes gives 4 lanes of 4 exact products each: lanes 0..3 from the
// low nibbles, 4..7 from the high ones, gemm.h's lanes.
#define BITNET_NEON_DOT __attribute__((target("arch=armv8.2-a+dotprod")))

BITNET_NEON_DOT float Int4DotNeonDot(const int8_t* x, const uint8_t* w_row, const uint16_t* s_row, int64_t groups) {
  const uint8x16_t low4 = vdupq_n_u8(0x0f);
  const int8x16_t eight = vdupq_n_s8(8);
  float32x4_t lane_lo = vdupq_n_f32(0.0f), lane_hi = vdupq_n_f32(0.0f);
  for (int64_t g = 0; g < groups; ++g) {
    const uint8x16_t bytes = vld1q_u8(w_row + g * kInt4GroupBytes);
    const int8x16_t q_lo = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(bytes, low4)), eight);
    const int8x16_t q_hi = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(bytes, 4)), eight);
    const int32x4_t p_lo = vdotq_s32(vdupq_n_s32(0), q_lo, vld1q_s8(x + g * kInt4GroupK));
    const int32x4_t p_hi = vdotq_s32(vdupq_n_s32(0), q_hi, vld1q_s8(x + g * kInt4GroupK + 16));
    const float32x4_t scale = vdupq_n_f32(HalfToFloat(s_row[g]));
    lane_lo = vaddq_f32(lane_lo, vmulq_f32(vcvtq_f32_s32(p_lo), scale));
    lane_hi = vaddq_f32(lane_hi, vmulq_f32(vcvtq_f32_s32(p_hi), scale));
  }
  float lanes[kLanes];
  vst1q_f32(lanes, lane_lo);
  vst1q_f32(lanes + 4, lane_hi);
  return SumFloatLanes(lanes);
}

}  // namespace

void Int4GemmF32(Isa isa, const int8_t* x_q, int64_t rows, int64_t kp, const uint8_t* w, const uint16_t* w_scale,
                 int64_t n_begin, int64_t n_end, int64_t n_total, float* dot) {
  if (isa != Isa::kNeonDot) {  // plain NEON has no 4-way dot product: the scalar twin is as good a start
    Int4RowsScalar(x_q, rows, kp, w, w_scale, n_begin, n_end, n_total, dot);
    return;
  }
  const int64_t groups = kp / kInt4GroupK;
  for (int64_t n = n_begin; n < n_end; ++n) {
    for (int64_t m = 0; m < rows; ++m) {
      dot[m * n_total + n] =
          Int4DotNeonDot(x_q + m * kp, w + n * groups * kInt4GroupBytes, w_scale + n * groups, groups);
    }
  }
}

#else

void Int4GemmF32(Isa, const int8_t* x_q, int64_t rows, int64_t kp, const uint8_t* w, const uint16_t* w_scale,
                 int64_t n_begin, int64_t n_end, int64_t n_total, float* dot) {
  Int4RowsScalar(x_q, rows, kp, w, w_scale, n_begin, n_end, n_total, dot);
}

#endif

}  // namespace bitnet
