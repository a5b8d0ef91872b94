// Decode attention kernels (attention_kernel.h): a scalar twin, and AVX2 + FMA on x86-64.
//
// AVX-512 CPUs run the AVX2 kernels (they have AVX2): a chunk is bound by reading its keys and
// values, which wider registers do not speed up. aarch64 and other builds run the scalar twin.
//
// Per chunk, in three passes over the G query heads that share a kv head, so that each key and
// value row is read from memory once and then from L1 for the other heads:
//   1. scores, four slots at a time (four independent FMA chains, one horizontal reduction);
//   2. per head, max, exp(score - max) in place and its sum;
//   3. the exp-weighted values, four slots per load and store of the accumulator.
// An int8 cache (AttendChunkInt8) takes the same passes over its slots widened to float, four rows
// at a time into a buffer in L1, once for all G heads: the same arithmetic on a quarter of the
// bytes.

#include "attention_kernel.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "cpu_isa.h"

#if BITNET_JAX_X86_SIMD
#include <immintrin.h>
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

#define BITNET_AVX2 __attribute__((target("avx2,fma")))

// Lanes [0, count) set (count < 8): the last, partial vector of a row.
BITNET_AVX2 inline __m256i FirstLanes(int64_t count) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(count)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

BITNET_AVX2 inline __m256 ExpAvx2(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(kExpMin));  // a NaN x stays NaN (maxps returns its first operand)
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

// Scores of one query against slots j..j+3 (rows k0, k0 + h, ...), times each slot's scale, into s[0..3].
BITNET_AVX2 inline void Scores4(const float* q, const float* k0, int64_t h, __m128 slot_scales, __m256i tail,
                                float* s) {
  const float *k1 = k0 + h, *k2 = k1 + h, *k3 = k2 + h;
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 8 <= h; i += 8) {
    const __m256 qv = _mm256_loadu_ps(q + i);
    a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + i), a0);
    a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k1 + i), a1);
    a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k2 + i), a2);
    a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k3 + i), a3);
  }
  if (i < h) {
    const __m256 qv = _mm256_maskload_ps(q + i, tail);
    a0 = _mm256_fmadd_ps(qv, _mm256_maskload_ps(k0 + i, tail), a0);
    a1 = _mm256_fmadd_ps(qv, _mm256_maskload_ps(k1 + i, tail), a1);
    a2 = _mm256_fmadd_ps(qv, _mm256_maskload_ps(k2 + i, tail), a2);
    a3 = _mm256_fmadd_ps(qv, _mm256_maskload_ps(k3 + i, tail), a3);
  }
  _mm_storeu_ps(s, _mm_mul_ps(Hsum4(a0, a1, a2, a3), slot_scales));
}

BITNET_AVX2 inline float Score1(const float* q, const float* k, int64_t h, float slot_scale, __m256i tail) {
  __m256 a = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= h; i += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), _mm256_loadu_ps(k + i), a);
  if (i < h) a = _mm256_fmadd_ps(_mm256_maskload_ps(q + i, tail), _mm256_maskload_ps(k + i, tail), a);
  return Hsum(a) * slot_scale;
}

// acc[0, h) += p0 * v0 + p1 * v1 + p2 * v2 + p3 * v3, in that order; rows v0, v0 + h, ...
BITNET_AVX2 inline void Accumulate4(float* acc, const float* v0, int64_t h, const float* p, __m256i tail) {
  const float *v1 = v0 + h, *v2 = v1 + h, *v3 = v2 + h;
  const __m256 p0 = _mm256_broadcast_ss(p), p1 = _mm256_broadcast_ss(p + 1);
  const __m256 p2 = _mm256_broadcast_ss(p + 2), p3 = _mm256_broadcast_ss(p + 3);
  int64_t i = 0;
  for (; i + 8 <= h; i += 8) {
    __m256 a = _mm256_loadu_ps(acc + i);
    a = _mm256_fmadd_ps(p0, _mm256_loadu_ps(v0 + i), a);
    a = _mm256_fmadd_ps(p1, _mm256_loadu_ps(v1 + i), a);
    a = _mm256_fmadd_ps(p2, _mm256_loadu_ps(v2 + i), a);
    a = _mm256_fmadd_ps(p3, _mm256_loadu_ps(v3 + i), a);
    _mm256_storeu_ps(acc + i, a);
  }
  if (i < h) {
    __m256 a = _mm256_maskload_ps(acc + i, tail);
    a = _mm256_fmadd_ps(p0, _mm256_maskload_ps(v0 + i, tail), a);
    a = _mm256_fmadd_ps(p1, _mm256_maskload_ps(v1 + i, tail), a);
    a = _mm256_fmadd_ps(p2, _mm256_maskload_ps(v2 + i, tail), a);
    a = _mm256_fmadd_ps(p3, _mm256_maskload_ps(v3 + i, tail), a);
    _mm256_maskstore_ps(acc + i, tail, a);
  }
}

BITNET_AVX2 inline void Accumulate1(float* acc, const float* v, int64_t h, float p, __m256i tail) {
  const __m256 pv = _mm256_set1_ps(p);
  int64_t i = 0;
  for (; i + 8 <= h; i += 8) _mm256_storeu_ps(acc + i, _mm256_fmadd_ps(pv, _mm256_loadu_ps(v + i), _mm256_loadu_ps(acc + i)));
  if (i < h) {
    const __m256 a = _mm256_fmadd_ps(pv, _mm256_maskload_ps(v + i, tail), _mm256_maskload_ps(acc + i, tail));
    _mm256_maskstore_ps(acc + i, tail, a);
  }
}

// `count` consecutive cache rows of h elements as floats: float rows in place; int8 rows widened
// (exactly) into `widened` [count * h], once for all the query heads that read them.
BITNET_AVX2 inline const float* FloatRows(const float* rows, int64_t, int64_t, float*) { return rows; }
BITNET_AVX2 inline const float* FloatRows(const int8_t* rows, int64_t count, int64_t h, float* widened) {
  const int64_t total = count * h;
  int64_t i = 0;
  for (; i + 8 <= total; i += 8) {
    const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(rows + i));
    _mm256_storeu_ps(widened + i, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes)));
  }
  for (; i < total; ++i) widened[i] = static_cast<float>(rows[i]);
  return widened;
}

// As AttendChunkScalar<T>.
template <typename T>
BITNET_AVX2 void AttendChunkAvx2(const float* q_gh, int64_t g, int64_t h, const T* k_nh, const T* v_nh,
                                 const float* k_scale_n, const float* v_scale_n, int64_t n, float scale,
                                 float* scratch, float* partial) {
  float* max_g = partial;
  float* sum_g = partial + g;
  float* acc_gh = partial + 2 * g;
  const __m256i h_tail = FirstLanes(h % 8);  // lanes of the last, partial vector of a row
  const __m128 scale_v = _mm_set1_ps(scale);
  const int64_t n4 = n / 4 * 4;

  float* widened = scratch + g * kAttentionChunk;  // 4 rows, for an int8 cache

  // 1. Scores.
  for (int64_t j = 0; j < n4; j += 4) {
    const __m128 slot_scales = k_scale_n ? _mm_mul_ps(_mm_loadu_ps(k_scale_n + j), scale_v) : scale_v;
    const float* k4 = FloatRows(k_nh + j * h, 4, h, widened);
    for (int64_t gi = 0; gi < g; ++gi) {
      Scores4(q_gh + gi * h, k4, h, slot_scales, h_tail, scratch + gi * kAttentionChunk + j);
    }
  }
  for (int64_t j = n4; j < n; ++j) {
    const float slot_scale = k_scale_n ? k_scale_n[j] * scale : scale;
    const float* k1 = FloatRows(k_nh + j * h, 1, h, widened);
    for (int64_t gi = 0; gi < g; ++gi) {
      scratch[gi * kAttentionChunk + j] = Score1(q_gh + gi * h, k1, h, slot_scale, h_tail);
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
  std::fill(acc_gh, acc_gh + g * h, 0.0f);
  for (int64_t j = 0; j < n4; j += 4) {
    const float* v4 = FloatRows(v_nh + j * h, 4, h, widened);
    for (int64_t gi = 0; gi < g; ++gi) Accumulate4(acc_gh + gi * h, v4, h, scratch + gi * kAttentionChunk + j, h_tail);
  }
  for (int64_t j = n4; j < n; ++j) {
    const float* v1 = FloatRows(v_nh + j * h, 1, h, widened);
    for (int64_t gi = 0; gi < g; ++gi) Accumulate1(acc_gh + gi * h, v1, h, scratch[gi * kAttentionChunk + j], h_tail);
  }
}

// AVX-512 CPUs take the AVX2 kernels (see the top of this file).
bool UsesAvx2(Isa isa) { return isa == Isa::kAvx2 || isa == Isa::kAvx512Vnni; }

}  // namespace

#endif  // BITNET_JAX_X86_SIMD

void ExpNonPositive(Isa isa, float* x, int64_t n) {
#if BITNET_JAX_X86_SIMD
  if (UsesAvx2(isa)) {
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
  if (UsesAvx2(isa)) {
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
  if (UsesAvx2(isa)) {
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
