// Decode attention kernels (attention_kernel.h): a scalar twin, AVX2 + FMA and AVX-512 on x86-64.
//
// The AVX-512 kernels are the AVX2 ones in 16-float registers. Where they pay depends on the CPU
// (faster on an Ice Lake Xeon, slower on a Zen 4, which splits 512-bit operations in two), so the
// caller picks the path (attention.cc, by CpuRuns512AtFullWidth); `isa` here is obeyed as given.
// aarch64 and other builds run the scalar twin.
//
// Per chunk, in three passes over the G query heads that share a kv head, in blocks of up to 4
// heads, so that each key and value vector is read (and, from an int8 cache, widened exactly to
// float) once per block of heads, its products accumulating in registers:
//   1. scores: 4 heads x 2 slots of accumulators, one horizontal reduction per score;
//   2. per head, max, exp(score - max) in place and its sum;
//   3. the exp-weighted values: 4 heads x 16 elements of accumulators, kept in registers over
//      the chunk's slots.
// While pass 1 reads the keys, it prefetches the chunk's value rows (pass 3 reads them 16
// elements of every row at a time, a stride the hardware prefetcher follows too late) and the
// key rows 16 slots ahead. (Measurements: benchmarks/RESULTS.md, benchmarks/decode_attention.py.)

#include "attention_kernel.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "cpu_isa.h"
#include "prefetch.h"

#if BITNET_JAX_X86_SIMD
#include "x86_simd.h"
#endif

namespace bitnet {

namespace {

// exp (Cephes' expf): x = n ln2 + r with n = round(x / ln2) and |r| <= ln2 / 2, ln2 split into
// a short high part (n * kLn2Hi is exact) and a correction; e^r by its degree-6 polynomial.
constexpr float kExpMin = -87.0f;  // 2^n stays a normal float (n >= -126)
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f;
constexpr float kLn2Lo = -2.12194440e-4f;
constexpr float kExpP0 = 1.9875691500e-4f, kExpP1 = 1.3981999507e-3f, kExpP2 = 8.3334519073e-3f,
                kExpP3 = 4.1665795894e-2f, kExpP4 = 1.6666665459e-1f, kExpP5 = 5.0000001201e-1f;

// ---------------------------------------------------------------------------------------------
// Scalar twins

float ExpScalar(float x) {
  if (std::isnan(x)) return x;  // NaN in, NaN out (and no float -> int conversion of a NaN)
  x = std::max(x, kExpMin);
  const float n = std::floor(x * kLog2e + 0.5f);
  const float r = (x - n * kLn2Hi) - n * kLn2Lo;
  float y = kExpP0;
  y = y * r + kExpP1;
  y = y * r + kExpP2;
  y = y * r + kExpP3;
  y = y * r + kExpP4;
  y = y * r + kExpP5;
  y = (y * (r * r) + r) + 1.0f;
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;  // 2^n
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return y * two_n;
}

// T is the cache's element type: float, or int8_t with per-slot scales (k_scale_n, v_scale_n;
// null for float). Slots are widened exactly to float; the scales enter as AttendChunkInt8 says.
template <typename T>
void AttendChunkScalar(const float* q_gh, int64_t g, int64_t h, const T* k_nh, const T* v_nh, const float* k_scale_n,
                       const float* v_scale_n, int64_t n, float scale, float* scratch, float* partial) {
  float* max_g = partial;
  float* sum_g = partial + g;
  float* acc_gh = partial + 2 * g;
  for (int64_t j = 0; j < n; ++j) {
    const float slot_scale = k_scale_n ? k_scale_n[j] * scale : scale;
    for (int64_t gi = 0; gi < g; ++gi) {
      float dot = 0.0f;
      for (int64_t i = 0; i < h; ++i) dot += q_gh[gi * h + i] * static_cast<float>(k_nh[j * h + i]);
      scratch[gi * kAttentionChunk + j] = dot * slot_scale;
    }
  }
  for (int64_t gi = 0; gi < g; ++gi) {
    float* p = scratch + gi * kAttentionChunk;
    const float m = *std::max_element(p, p + n);
    float sum = 0.0f;
    for (int64_t j = 0; j < n; ++j) sum += (p[j] = ExpScalar(p[j] - m));
    max_g[gi] = m;
    sum_g[gi] = sum;
    if (v_scale_n) {
      for (int64_t j = 0; j < n; ++j) p[j] *= v_scale_n[j];
    }
  }
  std::fill(acc_gh, acc_gh + g * h, 0.0f);
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t gi = 0; gi < g; ++gi) {
      const float p = scratch[gi * kAttentionChunk + j];
      for (int64_t i = 0; i < h; ++i) acc_gh[gi * h + i] += p * static_cast<float>(v_nh[j * h + i]);
    }
  }
}

}  // namespace

#if BITNET_JAX_X86_SIMD

namespace {

// ---------------------------------------------------------------------------------------------
// AVX2 + FMA

// While pass 1 reads `slots` key rows from k_rows: the value rows of the same slots (v_rows), and
// the key rows 16 slots on (possibly past the chunk, or the cache: PrefetchAt). Both SIMD paths'
// pass 1.
template <typename T>
inline void PrefetchSlotRows(const T* v_rows, const T* k_rows, int64_t slots, int64_t h) {
  const int64_t bytes = slots * h * static_cast<int64_t>(sizeof(T));
  for (int64_t b = 0; b < bytes; b += 64) {
    PrefetchAt(v_rows, b);
    PrefetchAt(k_rows, 16 * h * static_cast<int64_t>(sizeof(T)) + b);
  }
}

// Lanes [0, count) set (count < 8): the last, partial vector of a row.
BITNET_AVX2 inline __m256i FirstLanes(int64_t count) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(count)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

BITNET_AVX2 inline __m256 ExpAvx2(__m256 x) {
  // Where an operand is NaN, maxps returns its second one: x, so that a NaN x stays NaN.
  x = _mm256_max_ps(_mm256_set1_ps(kExpMin), x);
  const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(kLog2e), _mm256_set1_ps(0.5f)));
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
  __m256 y = _mm256_set1_ps(kExpP0);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(kExpP1));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(kExpP2));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(kExpP3));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(kExpP4));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(kExpP5));
  y = _mm256_add_ps(_mm256_fmadd_ps(y, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
  const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(two_n));
}

BITNET_AVX2 inline float Hsum(__m256 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The four horizontal sums {sum(a), sum(b), sum(c), sum(d)}.
BITNET_AVX2 inline __m128 Hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 abcd = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

BITNET_AVX2 void ExpNonPositiveAvx2(float* x, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, ExpAvx2(_mm256_loadu_ps(x + i)));
  if (i < n) {
    const __m256i mask = FirstLanes(n - i);
    _mm256_maskstore_ps(x + i, mask, ExpAvx2(_mm256_maskload_ps(x + i, mask)));
  }
}

// Eight cache elements from row + i as floats: float rows as they are, int8 rows widened exactly.
BITNET_AVX2 inline __m256 Load8(const float* row) { return _mm256_loadu_ps(row); }
BITNET_AVX2 inline __m256 Load8(const int8_t* row) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row))));
}
// The same for the last, partial vector of a row (lanes of `tail` set, the others zero), reading
// only its own elements.
BITNET_AVX2 inline __m256 LoadPart(const float* row, __m256i tail) { return _mm256_maskload_ps(row, tail); }
BITNET_AVX2 inline __m256 LoadPart(const int8_t* row, __m256i tail) {
  alignas(32) float part[8];
  for (int i = 0; i < 8; ++i) part[i] = 0.0f;
  const int valid = _mm256_movemask_ps(_mm256_castsi256_ps(tail));  // lanes 0 .. valid-1: a run of ones
  for (int i = 0; (valid >> i) & 1; ++i) part[i] = static_cast<float>(row[i]);
  return _mm256_load_ps(part);
}

// Scores of GB heads (rows q, q + h, ...) against JS slots (rows k, k + h, ...) into
// s[hd * kAttentionChunk + js], times each slot's scale: GB * JS accumulators in registers, so
// each widened key vector serves GB heads and each query vector JS slots.
template <int GB, int JS, typename T>
BITNET_AVX2 inline void ScoresBlock(const float* q, const T* k, int64_t h, const float* slot_scales, __m256i tail,
                                    float* s) {
  __m256 acc[GB][JS];
#pragma GCC unroll 4
  for (int hd = 0; hd < GB; ++hd)
#pragma GCC unroll 2
    for (int js = 0; js < JS; ++js) acc[hd][js] = _mm256_setzero_ps();
  const int64_t h8 = h / 8 * 8;
  for (int64_t i = 0; i < h8; i += 8) {
    __m256 kv[JS];
#pragma GCC unroll 2
    for (int js = 0; js < JS; ++js) kv[js] = Load8(k + js * h + i);
#pragma GCC unroll 4
    for (int hd = 0; hd < GB; ++hd) {
      const __m256 qv = _mm256_loadu_ps(q + hd * h + i);
#pragma GCC unroll 2
      for (int js = 0; js < JS; ++js) acc[hd][js] = _mm256_fmadd_ps(qv, kv[js], acc[hd][js]);
    }
  }
  if (h8 < h) {
#pragma GCC unroll 4
    for (int hd = 0; hd < GB; ++hd) {
      const __m256 qv = _mm256_maskload_ps(q + hd * h + h8, tail);
#pragma GCC unroll 2
      for (int js = 0; js < JS; ++js)
        acc[hd][js] = _mm256_fmadd_ps(qv, LoadPart(k + js * h + h8, tail), acc[hd][js]);
    }
  }
#pragma GCC unroll 4
  for (int hd = 0; hd < GB; ++hd)
#pragma GCC unroll 2
    for (int js = 0; js < JS; ++js) s[hd * kAttentionChunk + js] = Hsum(acc[hd][js]) * slot_scales[js];
}

// acc[hd * h + i] = sum_j p[hd * kAttentionChunk + j] * v[j, i] over the chunk's n slots, in
// slot order, for GB heads and the IB * 8 elements from i0 (PART: one partial vector, the
// row's last): GB * IB accumulators stay in registers for the whole chunk, and each widened
// value vector serves GB heads.
template <int GB, int IB, bool PART, typename T>
BITNET_AVX2 inline void ValuesBlock(const float* p, const T* v, int64_t h, int64_t n, int64_t i0, __m256i tail,
                                    float* acc_gh) {
  __m256 acc[GB][IB];
#pragma GCC unroll 4
  for (int hd = 0; hd < GB; ++hd)
#pragma GCC unroll 2
    for (int ib = 0; ib < IB; ++ib) acc[hd][ib] = _mm256_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    __m256 vv[IB];
#pragma GCC unroll 2
    for (int ib = 0; ib < IB; ++ib) vv[ib] = PART ? LoadPart(v + j * h + i0, tail) : Load8(v + j * h + i0 + 8 * ib);
#pragma GCC unroll 4
    for (int hd = 0; hd < GB; ++hd) {
      const __m256 pv = _mm256_broadcast_ss(p + hd * kAttentionChunk + j);
#pragma GCC unroll 2
      for (int ib = 0; ib < IB; ++ib) acc[hd][ib] = _mm256_fmadd_ps(pv, vv[ib], acc[hd][ib]);
    }
  }
#pragma GCC unroll 4
  for (int hd = 0; hd < GB; ++hd)
#pragma GCC unroll 2
    for (int ib = 0; ib < IB; ++ib) {
      if (PART)
        _mm256_maskstore_ps(acc_gh + hd * h + i0, tail, acc[hd][ib]);
      else
        _mm256_storeu_ps(acc_gh + hd * h + i0 + 8 * ib, acc[hd][ib]);
    }
}

// Passes 1 and 3 for a block of GB heads: q, p (their scratch rows) and acc_gh point at its first.
// Pass 1 prefetches when v_prefetch is set (the value rows, read next by pass 3).
template <int GB, typename T>
BITNET_AVX2 void ScoreHeadsAvx2(const float* q, int64_t h, const T* k_nh, const float* slot_scales, int64_t n,
                                __m256i tail, float* p, const T* v_prefetch) {
  int64_t j = 0;
  for (; j + 2 <= n; j += 2) {
    if (v_prefetch) PrefetchSlotRows(v_prefetch + j * h, k_nh + j * h, 2, h);
    ScoresBlock<GB, 2>(q, k_nh + j * h, h, slot_scales + j, tail, p + j);
  }
  if (j < n) ScoresBlock<GB, 1>(q, k_nh + j * h, h, slot_scales + j, tail, p + j);
}

template <int GB, typename T>
BITNET_AVX2 void WeightValuesAvx2(const float* p, int64_t h, const T* v_nh, int64_t n, __m256i tail, float* acc_gh) {
  const int64_t h8 = h / 8 * 8;
  int64_t i0 = 0;
  for (; i0 + 16 <= h8; i0 += 16) ValuesBlock<GB, 2, false>(p, v_nh, h, n, i0, tail, acc_gh);
  if (i0 < h8) ValuesBlock<GB, 1, false>(p, v_nh, h, n, i0, tail, acc_gh);
  if (h8 < h) ValuesBlock<GB, 1, true>(p, v_nh, h, n, h8, tail, acc_gh);
}

// As AttendChunkScalar<T>; the heads in blocks of up to 4.
template <typename T>
BITNET_AVX2 void AttendChunkAvx2(const float* q_gh, int64_t g, int64_t h, const T* k_nh, const T* v_nh,
                                 const float* k_scale_n, const float* v_scale_n, int64_t n, float scale,
                                 float* scratch, float* partial) {
  float* max_g = partial;
  float* sum_g = partial + g;
  float* acc_gh = partial + 2 * g;
  const __m256i h_tail = FirstLanes(h % 8);  // lanes of the last, partial vector of a row

  // 1. Scores. The slots' scales (times 1 / sqrt(h)) first, into the scratch row after the scores.
  float* slot_scales = scratch + g * kAttentionChunk;
  for (int64_t j = 0; j < n; ++j) slot_scales[j] = k_scale_n ? k_scale_n[j] * scale : scale;
  for (int64_t g0 = 0; g0 < g; g0 += 4) {
    const float* q = q_gh + g0 * h;
    float* p = scratch + g0 * kAttentionChunk;
    const T* v_prefetch = g0 == 0 ? v_nh : nullptr;  // the first block of heads prefetches
    switch (std::min<int64_t>(4, g - g0)) {
      case 4: ScoreHeadsAvx2<4>(q, h, k_nh, slot_scales, n, h_tail, p, v_prefetch); break;
      case 3: ScoreHeadsAvx2<3>(q, h, k_nh, slot_scales, n, h_tail, p, v_prefetch); break;
      case 2: ScoreHeadsAvx2<2>(q, h, k_nh, slot_scales, n, h_tail, p, v_prefetch); break;
      default: ScoreHeadsAvx2<1>(q, h, k_nh, slot_scales, n, h_tail, p, v_prefetch); break;
    }
  }

  // 2. Max, exp(score - max) in place, sum; then the weights times each value row's scale.
  const __m256i n_tail = FirstLanes(n % 8);
  for (int64_t gi = 0; gi < g; ++gi) {
    float* p = scratch + gi * kAttentionChunk;
    const float m = *std::max_element(p, p + n);
    const __m256 m_v = _mm256_set1_ps(m);
    __m256 sum = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
      const __m256 e = ExpAvx2(_mm256_sub_ps(_mm256_loadu_ps(p + j), m_v));
      _mm256_storeu_ps(p + j, e);
      sum = _mm256_add_ps(sum, e);
    }
    if (j < n) {
      const __m256 e = ExpAvx2(_mm256_sub_ps(_mm256_maskload_ps(p + j, n_tail), m_v));
      _mm256_maskstore_ps(p + j, n_tail, e);
      sum = _mm256_add_ps(sum, _mm256_and_ps(e, _mm256_castsi256_ps(n_tail)));
    }
    max_g[gi] = m;
    sum_g[gi] = Hsum(sum);
    if (v_scale_n) {
      for (j = 0; j < n; ++j) p[j] *= v_scale_n[j];
    }
  }

  // 3. Weighted values.
  for (int64_t g0 = 0; g0 < g; g0 += 4) {
    const float* p = scratch + g0 * kAttentionChunk;
    float* acc = acc_gh + g0 * h;
    switch (std::min<int64_t>(4, g - g0)) {
      case 4: WeightValuesAvx2<4>(p, h, v_nh, n, h_tail, acc); break;
      case 3: WeightValuesAvx2<3>(p, h, v_nh, n, h_tail, acc); break;
      case 2: WeightValuesAvx2<2>(p, h, v_nh, n, h_tail, acc); break;
      default: WeightValuesAvx2<1>(p, h, v_nh, n, h_tail, acc); break;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// AVX-512: the AVX2 kernel's passes in 16-float registers. The scores of a block of 4 heads and
// 4 slots are 16 accumulators, summed together into one vector (Sum16x16, x86_simd.h) rather than one by one.
// The blocks are forced inline: GCC left them as calls, their accumulators passing through memory
// (25 against 29-39 ns a slot on an Ice Lake core, benchmarks/RESULTS.md).
#define BITNET_AVX512_INLINE BITNET_AVX512 __attribute__((always_inline)) inline

// Lanes [0, count) of a 16-lane vector.
inline __mmask16 FirstLanes16(int64_t count) { return static_cast<__mmask16>((1u << count) - 1); }

BITNET_AVX512 inline __m512 Exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(kExpMin), x);  // as ExpAvx2: a NaN x stays NaN
  const __m512 n = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(kLog2e), _mm512_set1_ps(0.5f)),
                                        _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  __m512 y = _mm512_set1_ps(kExpP0);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(kExpP1));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(kExpP2));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(kExpP3));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(kExpP4));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(kExpP5));
  y = _mm512_add_ps(_mm512_fmadd_ps(y, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
  const __m512i two_n = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(y, _mm512_castsi512_ps(two_n));
}

BITNET_AVX512 inline __m512 Load16(const float* row) { return _mm512_loadu_ps(row); }
BITNET_AVX512 inline __m512 Load16(const int8_t* row) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row))));
}
// Lanes of `tail` from row, the others zero; a masked load reads only its lanes' bytes.
BITNET_AVX512 inline __m512 LoadPart16(const float* row, __mmask16 tail) { return _mm512_maskz_loadu_ps(tail, row); }
BITNET_AVX512 inline __m512 LoadPart16(const int8_t* row, __mmask16 tail) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(tail, row)));
}

// ScoresBlock in 16-float registers. A block of 4 heads x 4 slots (2B4T's G = 4) is summed by
// Sum16x16; others one accumulator at a time.
template <int GB, int JS, typename T>
BITNET_AVX512_INLINE void ScoresBlock16(const float* q, const T* k, int64_t h, const float* slot_scales, __mmask16 tail,
                                         float* s) {
  __m512 acc[GB * JS];
#pragma GCC unroll 16
  for (int a = 0; a < GB * JS; ++a) acc[a] = _mm512_setzero_ps();
  const int64_t h16 = h / 16 * 16;
  for (int64_t i = 0; i < h16; i += 16) {
    __m512 kv[JS];
#pragma GCC unroll 4
    for (int js = 0; js < JS; ++js) kv[js] = Load16(k + js * h + i);
#pragma GCC unroll 4
    for (int hd = 0; hd < GB; ++hd) {
      const __m512 qv = _mm512_loadu_ps(q + hd * h + i);
#pragma GCC unroll 4
      for (int js = 0; js < JS; ++js) acc[hd * JS + js] = _mm512_fmadd_ps(qv, kv[js], acc[hd * JS + js]);
    }
  }
  if (h16 < h) {
#pragma GCC unroll 4
    for (int hd = 0; hd < GB; ++hd) {
      const __m512 qv = _mm512_maskz_loadu_ps(tail, q + hd * h + h16);
#pragma GCC unroll 4
      for (int js = 0; js < JS; ++js)
        acc[hd * JS + js] = _mm512_fmadd_ps(qv, LoadPart16(k + js * h + h16, tail), acc[hd * JS + js]);
    }
  }
  if constexpr (GB == 4 && JS == 4) {
    // Lane 4 * hd + js: head hd's score of slot js.
    const __m512 scores =
        _mm512_mul_ps(Sum16x16(acc), _mm512_broadcast_f32x4(_mm_loadu_ps(slot_scales)));
    _mm_storeu_ps(s, _mm512_castps512_ps128(scores));
    _mm_storeu_ps(s + kAttentionChunk, _mm512_extractf32x4_ps(scores, 1));
    _mm_storeu_ps(s + 2 * kAttentionChunk, _mm512_extractf32x4_ps(scores, 2));
    _mm_storeu_ps(s + 3 * kAttentionChunk, _mm512_extractf32x4_ps(scores, 3));
  } else {
#pragma GCC unroll 4
    for (int hd = 0; hd < GB; ++hd)
#pragma GCC unroll 4
      for (int js = 0; js < JS; ++js)
        s[hd * kAttentionChunk + js] = _mm512_reduce_add_ps(acc[hd * JS + js]) * slot_scales[js];
  }
}

// ValuesBlock in 16-float registers: GB heads x IB * 16 elements from i0.
template <int GB, int IB, bool PART, typename T>
BITNET_AVX512_INLINE void ValuesBlock16(const float* p, const T* v, int64_t h, int64_t n, int64_t i0, __mmask16 tail,
                                         float* acc_gh) {
  __m512 acc[GB][IB];
#pragma GCC unroll 4
  for (int hd = 0; hd < GB; ++hd)
#pragma GCC unroll 4
    for (int ib = 0; ib < IB; ++ib) acc[hd][ib] = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    __m512 vv[IB];
#pragma GCC unroll 4
    for (int ib = 0; ib < IB; ++ib) vv[ib] = PART ? LoadPart16(v + j * h + i0, tail) : Load16(v + j * h + i0 + 16 * ib);
#pragma GCC unroll 4
    for (int hd = 0; hd < GB; ++hd) {
      const __m512 pv = _mm512_set1_ps(p[hd * kAttentionChunk + j]);
#pragma GCC unroll 4
      for (int ib = 0; ib < IB; ++ib) acc[hd][ib] = _mm512_fmadd_ps(pv, vv[ib], acc[hd][ib]);
    }
  }
#pragma GCC unroll 4
  for (int hd = 0; hd < GB; ++hd)
#pragma GCC unroll 4
    for (int ib = 0; ib < IB; ++ib) {
      if (PART)
        _mm512_mask_storeu_ps(acc_gh + hd * h + i0, tail, acc[hd][ib]);
      else
        _mm512_storeu_ps(acc_gh + hd * h + i0 + 16 * ib, acc[hd][ib]);
    }
}

// ScoreHeadsAvx2 in 16-float registers, 4 slots at a time.
template <int GB, typename T>
BITNET_AVX512 void ScoreHeads16(const float* q, int64_t h, const T* k_nh, const float* slot_scales, int64_t n,
                                __mmask16 tail, float* p, const T* v_prefetch) {
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    if (v_prefetch) PrefetchSlotRows(v_prefetch + j * h, k_nh + j * h, 4, h);
    ScoresBlock16<GB, 4>(q, k_nh + j * h, h, slot_scales + j, tail, p + j);
  }
  for (; j < n; ++j) ScoresBlock16<GB, 1>(q, k_nh + j * h, h, slot_scales + j, tail, p + j);
}

template <int GB, typename T>
BITNET_AVX512 void WeightValues16(const float* p, int64_t h, const T* v_nh, int64_t n, __mmask16 tail,
                                  float* acc_gh) {
  const int64_t h16 = h / 16 * 16;
  int64_t i0 = 0;
  for (; i0 + 64 <= h16; i0 += 64) ValuesBlock16<GB, 4, false>(p, v_nh, h, n, i0, tail, acc_gh);
  for (; i0 + 16 <= h16; i0 += 16) ValuesBlock16<GB, 1, false>(p, v_nh, h, n, i0, tail, acc_gh);
  if (h16 < h) ValuesBlock16<GB, 1, true>(p, v_nh, h, n, h16, tail, acc_gh);
}

// As AttendChunkAvx2, in 16-float registers.
template <typename T>
BITNET_AVX512 void AttendChunkAvx512(const float* q_gh, int64_t g, int64_t h, const T* k_nh, const T* v_nh,
                                     const float* k_scale_n, const float* v_scale_n, int64_t n, float scale,
                                     float* scratch, float* partial) {
  float* max_g = partial;
  float* sum_g = partial + g;
  float* acc_gh = partial + 2 * g;
  const __mmask16 h_tail = FirstLanes16(h % 16);

  float* slot_scales = scratch + g * kAttentionChunk;
  for (int64_t j = 0; j < n; ++j) slot_scales[j] = k_scale_n ? k_scale_n[j] * scale : scale;
  for (int64_t g0 = 0; g0 < g; g0 += 4) {
    const float* q = q_gh + g0 * h;
    float* p = scratch + g0 * kAttentionChunk;
    const T* v_prefetch = g0 == 0 ? v_nh : nullptr;
    switch (std::min<int64_t>(4, g - g0)) {
      case 4: ScoreHeads16<4>(q, h, k_nh, slot_scales, n, h_tail, p, v_prefetch); break;
      case 3: ScoreHeads16<3>(q, h, k_nh, slot_scales, n, h_tail, p, v_prefetch); break;
      case 2: ScoreHeads16<2>(q, h, k_nh, slot_scales, n, h_tail, p, v_prefetch); break;
      default: ScoreHeads16<1>(q, h, k_nh, slot_scales, n, h_tail, p, v_prefetch); break;
    }
  }

  const __mmask16 n_tail = FirstLanes16(n % 16);
  const int64_t n16 = n / 16 * 16;
  for (int64_t gi = 0; gi < g; ++gi) {
    float* p = scratch + gi * kAttentionChunk;
    __m512 m_v = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t j = 0; j < n16; j += 16) m_v = _mm512_max_ps(m_v, _mm512_loadu_ps(p + j));
    if (n16 < n) m_v = _mm512_mask_max_ps(m_v, n_tail, m_v, _mm512_maskz_loadu_ps(n_tail, p + n16));
    const float m = _mm512_reduce_max_ps(m_v);
    m_v = _mm512_set1_ps(m);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < n16; j += 16) {
      __m512 e = Exp16(_mm512_sub_ps(_mm512_loadu_ps(p + j), m_v));
      sum = _mm512_add_ps(sum, e);
      if (v_scale_n) e = _mm512_mul_ps(e, _mm512_loadu_ps(v_scale_n + j));
      _mm512_storeu_ps(p + j, e);
    }
    if (n16 < n) {
      __m512 e = Exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(n_tail, p + n16), m_v));
      sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(n_tail, e));
      if (v_scale_n) e = _mm512_mul_ps(e, _mm512_maskz_loadu_ps(n_tail, v_scale_n + n16));
      _mm512_mask_storeu_ps(p + n16, n_tail, e);
    }
    max_g[gi] = m;
    sum_g[gi] = _mm512_reduce_add_ps(sum);
  }

  for (int64_t g0 = 0; g0 < g; g0 += 4) {
    const float* p = scratch + g0 * kAttentionChunk;
    float* acc = acc_gh + g0 * h;
    switch (std::min<int64_t>(4, g - g0)) {
      case 4: WeightValues16<4>(p, h, v_nh, n, h_tail, acc); break;
      case 3: WeightValues16<3>(p, h, v_nh, n, h_tail, acc); break;
      case 2: WeightValues16<2>(p, h, v_nh, n, h_tail, acc); break;
      default: WeightValues16<1>(p, h, v_nh, n, h_tail, acc); break;
    }
  }
}

BITNET_AVX512 void ExpNonPositive16(float* x, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(x + i, Exp16(_mm512_loadu_ps(x + i)));
  if (i < n) {
    const __mmask16 tail = FirstLanes16(n - i);
    _mm512_mask_storeu_ps(x + i, tail, Exp16(_mm512_maskz_loadu_ps(tail, x + i)));
  }
}

}  // namespace

#endif  // BITNET_JAX_X86_SIMD

void ExpNonPositive(Isa isa, float* x, int64_t n) {
#if BITNET_JAX_X86_SIMD
  if (isa == Isa::kAvx512Vnni) {
    ExpNonPositive16(x, n);
    return;
  }
  if (isa == Isa::kAvx2) {
    ExpNonPositiveAvx2(x, n);
    return;
  }
#endif
  (void)isa;
  for (int64_t i = 0; i < n; ++i) x[i] = ExpScalar(x[i]);
}

void AttendChunk(Isa isa, const float* q_gh, int64_t g, int64_t h, const float* k_nh, const float* v_nh,
                 int64_t n, float scale, float* scratch, float* partial) {
#if BITNET_JAX_X86_SIMD
  if (isa == Isa::kAvx512Vnni) {
    AttendChunkAvx512(q_gh, g, h, k_nh, v_nh, nullptr, nullptr, n, scale, scratch, partial);
    return;
  }
  if (isa == Isa::kAvx2) {
    AttendChunkAvx2(q_gh, g, h, k_nh, v_nh, nullptr, nullptr, n, scale, scratch, partial);
    return;
  }
#endif
  (void)isa;
  AttendChunkScalar(q_gh, g, h, k_nh, v_nh, nullptr, nullptr, n, scale, scratch, partial);
}

void AttendChunkInt8(Isa isa, const float* q_gh, int64_t g, int64_t h, const int8_t* k_nh, const int8_t* v_nh,
                     const float* k_scale_n, const float* v_scale_n, int64_t n, float scale, float* scratch,
                     float* partial) {
#if BITNET_JAX_X86_SIMD
  if (isa == Isa::kAvx512Vnni) {
    AttendChunkAvx512(q_gh, g, h, k_nh, v_nh, k_scale_n, v_scale_n, n, scale, scratch, partial);
    return;
  }
  if (isa == Isa::kAvx2) {
    AttendChunkAvx2(q_gh, g, h, k_nh, v_nh, k_scale_n, v_scale_n, n, scale, scratch, partial);
    return;
  }
#endif
  (void)isa;
  AttendChunkScalar(q_gh, g, h, k_nh, v_nh, k_scale_n, v_scale_n, n, scale, scratch, partial);
}

// Every path: a few operations per head and chunk, beside the chunk's G * n * H of AttendChunk.
void MergeChunks(const float* partials, int64_t chunks, int64_t g, int64_t h, float* out_gh) {
  const int64_t stride = PartialFloats(g, h);
  for (int64_t gi = 0; gi < g; ++gi) {
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t c = 0; c < chunks; ++c) m = std::max(m, partials[c * stride + gi]);
    float sum = 0.0f;
    float* out = out_gh + gi * h;
    std::fill(out, out + h, 0.0f);
    for (int64_t c = 0; c < chunks; ++c) {
      const float* partial = partials + c * stride;
      const float w = std::exp(partial[gi] - m);  // exactly 1 for the chunk that holds the max
      sum += partial[g + gi] * w;
      const float* acc = partial + 2 * g + gi * h;
      for (int64_t i = 0; i < h; ++i) out[i] += acc[i] * w;
    }
    const float inv = 1.0f / sum;
    for (int64_t i = 0; i < h; ++i) out[i] *= inv;
  }
}

}  // namespace bitnet
