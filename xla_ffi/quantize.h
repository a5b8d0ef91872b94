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

#include "cpu_isa.h"

#if BITNET_JAX_X86_SIMD
#include <immintrin.h>
#elif BITNET_JAX_ARM_SIMD
#include <arm_neon.h>
#endif

namespace bitnet {

// The scale floor; model/quant.py EPS mirrors it (tests/test_ffi_matmul.py checks the two agree).
constexpr float kQuantEps = 1e-5f;

inline float LoadF32(const float* p, int64_t i) { return p[i]; }

// bfloat16 is the high half of a float32: widening is exact.
inline float LoadF32(const uint16_t* p, int64_t i) {
  const uint32_t bits = static_cast<uint32_t>(p[i]) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// The steps for one element: x * scale clamped and rounded (0 for NaN). Clamping before
// rounding equals clamping after (the bounds are integers) and keeps the conversion in range.
inline int8_t QuantizeOne(float v, float q_min, float q_max) {
  if (std::isnan(v)) return 0;  // XLA converts NaN to 0.
  v = v < q_min ? q_min : (v > q_max ? q_max : v);
  return static_cast<int8_t>(std::nearbyint(v));
}

inline float RowScale(float amax, bool has_nan, int bits) {
  const float q_max = static_cast<float>((1 << (bits - 1)) - 1);
  if (has_nan) amax = NAN;  // jnp.max / jnp.maximum propagate NaN.
  return q_max / (amax > kQuantEps || std::isnan(amax) ? amax : kQuantEps);
}

// The scalar steps over x[begin..k): |x| folded into *amax and *has_nan ...
template <typename T>
void AbsMaxSteps(const T* x, int64_t begin, int64_t k, float* amax, bool* has_nan) {
  for (int64_t i = begin; i < k; ++i) {
    const float a = std::fabs(LoadF32(x, i));
    *has_nan |= std::isnan(a);
    *amax = a > *amax ? a : *amax;
  }
}

// ... and x * scale quantized into q[begin..k), returning the sum of those q.
template <typename T>
int32_t QuantizeSteps(const T* x, int64_t begin, int64_t k, float scale, int bits, int8_t* q) {
  const float q_max = static_cast<float>((1 << (bits - 1)) - 1), q_min = -q_max - 1.0f;
  int32_t sum = 0;
  for (int64_t i = begin; i < k; ++i) sum += (q[i] = QuantizeOne(LoadF32(x, i) * scale, q_min, q_max));
  return sum;
}

// Quantizes x[0..k) into q[0..k); returns the scale (x ~= q / scale) and adds sum_k q to *q_sum.
template <typename T>
float QuantizeRow(const T* x, int64_t k, int bits, int8_t* q, int32_t* q_sum) {
  float amax = 0.0f;
  bool has_nan = false;
  AbsMaxSteps(x, 0, k, &amax, &has_nan);
  const float scale = RowScale(amax, has_nan, bits);
  *q_sum += QuantizeSteps(x, 0, k, scale, bits, q);
  return scale;
}

#if BITNET_JAX_X86_SIMD

// GCC 12's AVX-512 headers build some results from _mm*_undefined_*() and then warn that they are
// (maybe) used uninitialized; the warning is about the header, not this code. Silenced for these
// functions only, as every includer gets them.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// The same quantizer, 16 (AVX-512) or 8 (AVX2) floats at a time, with identical results: the
// products are the same float32 multiplications, cvtps2dq rounds to nearest-even as nearbyint
// does in the default mode, and NaN is handled as above (a NaN row quantizes to zeros with a NaN
// scale; a NaN product, inf * 0, to 0). The last k % width elements take the scalar steps.
#define BITNET_QUANT_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))
#define BITNET_QUANT_AVX2 __attribute__((target("avx2,fma")))

BITNET_QUANT_AVX512 inline __m512 Load16(const float* p) { return _mm512_loadu_ps(p); }
BITNET_QUANT_AVX512 inline __m512 Load16(const uint16_t* p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
BITNET_QUANT_AVX2 inline __m256 Load8(const float* p) { return _mm256_loadu_ps(p); }
BITNET_QUANT_AVX2 inline __m256 Load8(const uint16_t* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

template <typename T>
BITNET_QUANT_AVX512 float QuantizeRowAvx512(const T* x, int64_t k, int bits, int8_t* q, int32_t* q_sum) {
  const int64_t body = k - k % 16;
  __m512 vmax = _mm512_setzero_ps();
  __mmask16 nan = 0;
  for (int64_t i = 0; i < body; i += 16) {
    const __m512 a = _mm512_abs_ps(Load16(x + i));
    nan |= _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q);
    vmax = _mm512_max_ps(vmax, a);  // (a NaN lane is recorded in `nan` instead)
  }
  float amax = _mm512_reduce_max_ps(vmax);
  bool has_nan = nan != 0;
  AbsMaxSteps(x, body, k, &amax, &has_nan);
  const float scale = RowScale(amax, has_nan, bits);
  const float q_max = static_cast<float>((1 << (bits - 1)) - 1), q_min = -q_max - 1.0f;
  const __m512 vscale = _mm512_set1_ps(scale), lo = _mm512_set1_ps(q_min), hi = _mm512_set1_ps(q_max);
  __m512i vsum = _mm512_setzero_si512();
  for (int64_t i = 0; i < body; i += 16) {
    const __m512 v = _mm512_mul_ps(Load16(x + i), vscale);
    const __mmask16 ordered = _mm512_cmp_ps_mask(v, v, _CMP_ORD_Q);
    const __m512 clamped = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
    const __m512i qi = _mm512_maskz_mov_epi32(ordered, _mm512_cvtps_epi32(clamped));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i), _mm512_cvtepi32_epi8(qi));
    vsum = _mm512_add_epi32(vsum, qi);
  }
  int32_t sum = _mm512_reduce_add_epi32(vsum);
  sum += QuantizeSteps(x, body, k, scale, bits, q);
  *q_sum += sum;
  return scale;
}

BITNET_QUANT_AVX2 inline float HmaxAvx2(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

template <typename T>
BITNET_QUANT_AVX2 float QuantizeRowAvx2(const T* x, int64_t k, int bits, int8_t* q, int32_t* q_sum) {
  const int64_t body = k - k % 8;
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 vmax = _mm256_setzero_ps(), nan = _mm256_setzero_ps();
  for (int64_t i = 0; i < body; i += 8) {
    const __m256 a = _mm256_and_ps(Load8(x + i), abs_mask);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(a, a, _CMP_UNORD_Q));
    vmax = _mm256_max_ps(vmax, a);
  }
  float amax = HmaxAvx2(vmax);
  bool has_nan = _mm256_movemask_ps(nan) != 0;
  AbsMaxSteps(x, body, k, &amax, &has_nan);
  const float scale = RowScale(amax, has_nan, bits);
  const float q_max = static_cast<float>((1 << (bits - 1)) - 1), q_min = -q_max - 1.0f;
  const __m256 vscale = _mm256_set1_ps(scale), lo = _mm256_set1_ps(q_min), hi = _mm256_set1_ps(q_max);
  __m256i vsum = _mm256_setzero_si256();
  for (int64_t i = 0; i < body; i += 8) {
    const __m256 v = _mm256_mul_ps(Load8(x + i), vscale);
    const __m256i ordered = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_ORD_Q));
    const __m256 clamped = _mm256_min_ps(_mm256_max_ps(v, lo), hi);
    const __m256i qi = _mm256_and_si256(ordered, _mm256_cvtps_epi32(clamped));
    // int32 -> int8 (values are in range): two saturating packs, then the 8 bytes in order.
    const __m128i w16 = _mm_packs_epi32(_mm256_castsi256_si128(qi), _mm256_extracti128_si256(qi, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q + i), _mm_packs_epi16(w16, w16));
    vsum = _mm256_add_epi32(vsum, qi);
  }
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(vsum), _mm256_extracti128_si256(vsum, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
  int32_t sum = _mm_cvtsi128_si32(s);
  sum += QuantizeSteps(x, body, k, scale, bits, q);
  *q_sum += sum;
  return scale;
}

#pragma GCC diagnostic pop

// QuantizeRow on kernel path `isa` (every path gives the same results).
template <typename T>
float QuantizeRowOn(Isa isa, const T* x, int64_t k, int bits, int8_t* q, int32_t* q_sum) {
  switch (isa) {
    case Isa::kAvx512Vnni: return QuantizeRowAvx512(x, k, bits, q, q_sum);
    case Isa::kAvx2: return QuantizeRowAvx2(x, k, bits, q, q_sum);
    case Isa::kScalar:
    case Isa::kNeon:
    case Isa::kNeonDot:  // not in this build (IsaBuilt)
      break;
  }
  return QuantizeRow(x, k, bits, q, q_sum);
}

#elif BITNET_JAX_ARM_SIMD

// The same quantizer, 8 floats (two NEON registers) at a time, with identical results: the same
// float32 multiplications, fcvtns rounds to nearest-even as nearbyint does in the default mode,
// and NaN is handled as above: fmax / fmin keep a NaN product (inf * 0, or any in a NaN row) and
// fcvtns converts it to 0, as XLA does. Both NEON paths use it: the dot-product extension has
// nothing to add here. The last k % 8 elements take the scalar steps.
inline float32x4_t Load4(const float* p) { return vld1q_f32(p); }
inline float32x4_t Load4(const uint16_t* p) {
  return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(p), 16));
}

template <typename T>
float QuantizeRowNeon(const T* x, int64_t k, int bits, int8_t* q, int32_t* q_sum) {
  const int64_t body = k - k % 8;
  float32x4_t vmax = vdupq_n_f32(0.0f);
  for (int64_t i = 0; i < body; i += 4) vmax = vmaxq_f32(vmax, vabsq_f32(Load4(x + i)));
  // fmax and fmaxv return NaN when an operand is NaN: a NaN in the body makes amax, hence the
  // scale, NaN (RowScale); the scalar steps over the tail record theirs in has_nan.
  float amax = vmaxvq_f32(vmax);
  bool has_nan = false;
  AbsMaxSteps(x, body, k, &amax, &has_nan);
  const float scale = RowScale(amax, has_nan, bits);
  const float q_max = static_cast<float>((1 << (bits - 1)) - 1), q_min = -q_max - 1.0f;
  const float32x4_t vscale = vdupq_n_f32(scale), lo = vdupq_n_f32(q_min), hi = vdupq_n_f32(q_max);
  int32x4_t vsum = vdupq_n_s32(0);
  for (int64_t i = 0; i < body; i += 8) {
    int32x4_t qi[2];
    for (int half = 0; half < 2; ++half) {
      const float32x4_t v = vmulq_f32(Load4(x + i + 4 * half), vscale);
      qi[half] = vcvtnq_s32_f32(vminq_f32(vmaxq_f32(v, lo), hi));
      vsum = vaddq_s32(vsum, qi[half]);
    }
    // int32 -> int8 (values are in range): two narrowing moves, 8 bytes in order.
    vst1_s8(q + i, vmovn_s16(vcombine_s16(vmovn_s32(qi[0]), vmovn_s32(qi[1]))));
  }
  int32_t sum = vaddvq_s32(vsum);
  sum += QuantizeSteps(x, body, k, scale, bits, q);
  *q_sum += sum;
  return scale;
}

// QuantizeRow on kernel path `isa` (every path gives the same results).
template <typename T>
float QuantizeRowOn(Isa isa, const T* x, int64_t k, int bits, int8_t* q, int32_t* q_sum) {
  if (isa == Isa::kNeon || isa == Isa::kNeonDot) return QuantizeRowNeon(x, k, bits, q, q_sum);
  return QuantizeRow(x, k, bits, q, q_sum);
}

#else  // neither x86-64 nor aarch64

// The scalar steps are the only quantizer in this build (AvailableIsas is {kScalar}).
template <typename T>
float QuantizeRowOn(Isa, const T* x, int64_t k, int bits, int8_t* q, int32_t* q_sum) {
  return QuantizeRow(x, k, bits, q, q_sum);
}

#endif

}  // namespace bitnet

#endif  // BITNET_JAX_XLA_FFI_QUANTIZE_H_
