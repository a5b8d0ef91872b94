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
// Decode reads the table once per token at memory speed; rows of activations (a batch) share each
// weight row while it is in L1.

#include <algorithm>
#include <vector>

#include "cpu_isa.h"
#include "gemm.h"
#include "layout.h"

#if BITNET_JAX_X86_SIMD
#include <immintrin.h>
#elif BITNET_JAX_ARM_SIMD
#include <arm_neon.h>
#endif

namespace bitnet {

namespace {

constexpr int kLanes = 8;
constexpr int kLaneK = kInt4GroupK / kLanes;  // 4 products per lane and group
static_assert(kLaneK == 4, "a lane is one maddubs + madd pair (AVX2), one sdot lane (NEON)");

// gemm.h's final sum of the 8 lanes.
inline float SumLanes(const float lane[kLanes]) {
  return ((lane[0] + lane[4]) + (lane[2] + lane[6])) + ((lane[1] + lane[5]) + (lane[3] + lane[7]));
}

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
  return SumLanes(lane);
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

BITNET_AVX2_F16C float Int4DotAvx2(const int8_t* x, const int32_t* x_lane8, const uint8_t* w_row,
                                   const uint16_t* s_row, int64_t groups) {
  const __m256i nibble_shift = _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4);
  const __m256i low4 = _mm256_set1_epi8(0x0f);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 lane = _mm256_setzero_ps();
  alignas(32) float scale[8];
  for (int64_t g0 = 0; g0 < groups; g0 += 8) {
    const int64_t count = std::min<int64_t>(8, groups - g0);
    if (count == 8) {
      _mm256_store_ps(scale, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s_row + g0))));
    } else {
      for (int64_t j = 0; j < count; ++j) scale[j] = HalfToFloat(s_row[g0 + j]);
    }
    for (int64_t j = 0; j < count; ++j) {
      const int64_t g = g0 + j;
      const __m256i bytes = _mm256_broadcastsi128_si256(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(w_row + g * kInt4GroupBytes)));
      const __m256i u = _mm256_and_si256(_mm256_srlv_epi32(bytes, nibble_shift), low4);
      const __m256i xg = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + g * kInt4GroupK));
      __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(u, xg), ones);
      p = _mm256_sub_epi32(p, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x_lane8 + g * kLanes)));
      lane = _mm256_add_ps(lane, _mm256_mul_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(scale[j])));
    }
  }
  alignas(32) float lanes[kLanes];
  _mm256_store_ps(lanes, lane);
  return SumLanes(lanes);
}

BITNET_AVX2_F16C void Int4RowsAvx2(const int8_t* x_q, int64_t rows, int64_t kp, const uint8_t* w,
                                   const uint16_t* w_scale, int64_t n_begin, int64_t n_end, int64_t n_total,
                                   float* dot) {
  const int64_t groups = kp / kInt4GroupK;
  // 8 * (sum of x over each lane's 4 inputs), per activation row, group and lane.
  std::vector<int32_t> x_lane8(rows * groups * kLanes);
  for (int64_t m = 0; m < rows; ++m) {
    for (int64_t i = 0; i < groups * kLanes; ++i) {
      const int8_t* xi = x_q + m * kp + i * kLaneK;
      x_lane8[m * groups * kLanes + i] = 8 * (xi[0] + xi[1] + xi[2] + xi[3]);
    }
  }
  for (int64_t n = n_begin; n < n_end; ++n) {
    const uint8_t* w_row = w + n * groups * kInt4GroupBytes;
    if (n + 1 < n_end) _mm_prefetch(reinterpret_cast<const char*>(w_scale + (n + 1) * groups), _MM_HINT_T0);
    for (int64_t m = 0; m < rows; ++m) {
      dot[m * n_total + n] =
          Int4DotAvx2(x_q + m * kp, x_lane8.data() + m * groups * kLanes, w_row, w_scale + n * groups, groups);
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
  return SumLanes(lanes);
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
