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
//
// An int8 cache takes the same three passes in integers (AttendChunkInt8, attention_kernel.h):
// int16 codes of the queries and of the weights against the int8 values widened to int16
// (vpmaddwd on AVX2, vpdpwssd on AVX-512 VNNI), about half the instructions of the float passes
// (on a Zen 4 core 34-43 -> 18-19 ns a slot for 4 heads of 128). Pass 3 also prefetches the
// keys of the chunk after this one in the cache, which a long context reads next: one core's
// stream from memory otherwise stalls the arithmetic it no longer hides. Given the chunk's keys
// transposed (a prefill chunk's queries share them: attention.cc), the AVX-512 VNNI scores pass
// holds 16 slots in a register's lanes and needs no sums across lanes (ScoresBlockTransposed).

#include "attention_kernel.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

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

// Pass 2 for one head's n scores at p, every path's in its own registers: *max = their max,
// p[j] = exp(p[j] - max) and *sum = their sum; then, with v_scale_n (an int8 cache), each weight
// times its value row's scale (the sum stays the exps').
void SoftmaxWeightsScalar(float* p, int64_t n, const float* v_scale_n, float* max, float* sum) {
  const float m = *std::max_element(p, p + n);
  float total = 0.0f;
  for (int64_t j = 0; j < n; ++j) total += (p[j] = ExpScalar(p[j] - m));
  *max = m;
  *sum = total;
  if (v_scale_n) {
    for (int64_t j = 0; j < n; ++j) p[j] *= v_scale_n[j];
  }
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
    SoftmaxWeightsScalar(scratch + gi * kAttentionChunk, n, v_scale_n, max_g + gi, sum_g + gi);
  }
  std::fill(acc_gh, acc_gh + g * h, 0.0f);
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t gi = 0; gi < g; ++gi) {
      const float p = scratch[gi * kAttentionChunk + j];
      for (int64_t i = 0; i < h; ++i) acc_gh[gi * h + i] += p * static_cast<float>(v_nh[j * h + i]);
    }
  }
}


// ---------------------------------------------------------------------------------------------
// AttendChunkInt8's integer arithmetic (attention_kernel.h): the parts it keeps in the caller's
// scratch, and the scalar twin.

constexpr float kLevels = static_cast<float>(kInt16Levels);
// Weight codes per head: a chunk's slots and a zero pair past an odd count.
constexpr int64_t kWeightStride = kAttentionChunk + 2;

struct Int8Parts {
  float* p;            // [g, kAttentionChunk]: scores, then the weights w_gj
  float* slot_scales;  // [kAttentionChunk]: k_scale_n[j] * scale
  int16_t* q;          // [g, PaddedDim(h)]: query codes, zero past h
  int16_t* w;          // [g, kWeightStride]: weight codes
  float* q_step;       // [g]
  float* w_step;       // [g]
};

// The parts within ScratchFloats(g, h) floats at scratch (the code arrays' sizes are whole floats).
Int8Parts CarveInt8Parts(float* scratch, int64_t g, int64_t h) {
  Int8Parts parts;
  parts.p = scratch;
  parts.slot_scales = scratch + g * kAttentionChunk;
  parts.q = reinterpret_cast<int16_t*>(scratch + (g + 1) * kAttentionChunk);
  parts.w = parts.q + g * PaddedDim(h);
  parts.q_step = reinterpret_cast<float*>(parts.w + g * kWeightStride);
  parts.w_step = parts.q_step + g;
  return parts;
}

// codes[i] = round(x[i] / step) for i < n, half to even, step = max|x| / kLevels (0, and zero
// codes, for a zero x), and zeros on to `padded`. False, with nothing written, where x is not
// finite. Every path computes the same codes: one product x[i] * (kLevels / max) rounded.
bool QuantizeInt16Scalar(const float* x, int64_t n, int64_t padded, int16_t* codes, float* step) {
  float m = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    if (!std::isfinite(x[i])) return false;
    m = std::max(m, std::abs(x[i]));
  }
  std::fill(codes, codes + padded, int16_t{0});
  *step = m / kLevels;
  if (m == 0.0f) return true;
  const float inv = kLevels / m;
  for (int64_t i = 0; i < n; ++i) codes[i] = static_cast<int16_t>(std::nearbyint(x[i] * inv));
  return true;
}

// CodeQueriesInt16's arithmetic, with a path's QuantizeInt16 per head.
template <typename Quantize>
bool CodeQueries(Quantize quantize, const float* q_gh, int64_t g, int64_t h, float* scratch) {
  if (h > kInt8MaxExactDim) return false;
  const Int8Parts parts = CarveInt8Parts(scratch, g, h);
  const int64_t hp = PaddedDim(h);
  for (int64_t gi = 0; gi < g; ++gi) {
    if (!quantize(q_gh + gi * h, h, hp, parts.q + gi * hp, parts.q_step + gi)) return false;
  }
  return true;
}

void AttendChunkInt8Scalar(const float* q_gh, int64_t g, int64_t h, const int8_t* k_nh, const int8_t* v_nh,
                           const float* k_scale_n, const float* v_scale_n, int64_t n, float scale, float* scratch,
                           float* partial, bool query_coded) {
  const auto in_float = [&] {
    AttendChunkScalar(q_gh, g, h, k_nh, v_nh, k_scale_n, v_scale_n, n, scale, scratch, partial);
  };
  if (!query_coded && !CodeQueries(QuantizeInt16Scalar, q_gh, g, h, scratch)) return in_float();
  const Int8Parts parts = CarveInt8Parts(scratch, g, h);
  const int64_t hp = PaddedDim(h);
  float* max_g = partial;
  float* sum_g = partial + g;
  float* acc_gh = partial + 2 * g;
  for (int64_t j = 0; j < n; ++j) {
    const float slot_scale = k_scale_n[j] * scale;
    for (int64_t gi = 0; gi < g; ++gi) {
      int32_t dot = 0;
      for (int64_t i = 0; i < h; ++i) dot += int32_t{parts.q[gi * hp + i]} * k_nh[j * h + i];
      parts.p[gi * kAttentionChunk + j] = (static_cast<float>(dot) * slot_scale) * parts.q_step[gi];
    }
  }
  for (int64_t gi = 0; gi < g; ++gi) {
    float* p = parts.p + gi * kAttentionChunk;
    SoftmaxWeightsScalar(p, n, v_scale_n, max_g + gi, sum_g + gi);
    if (!QuantizeInt16Scalar(p, n, kWeightStride, parts.w + gi * kWeightStride, parts.w_step + gi)) {
      return in_float();
    }
  }
  for (int64_t gi = 0; gi < g; ++gi) {
    const int16_t* w = parts.w + gi * kWeightStride;
    for (int64_t i = 0; i < h; ++i) {
      int32_t dot = 0;
      for (int64_t j = 0; j < n; ++j) dot += int32_t{w[j]} * v_nh[j * h + i];
      acc_gh[gi * h + i] = static_cast<float>(dot) * parts.w_step[gi];
    }
  }
}

}  // namespace

#if BITNET_JAX_X86_SIMD

namespace {

// The SIMD paths' kernels share names and are told apart by their first parameter, an empty tag:
// AttendChunkSimd<Path> calls ScoreHeads<GB>(Path(), ...) and the rest for either path.
struct Avx2Path {};
struct Avx512Path {};

// ---------------------------------------------------------------------------------------------
// AVX2 + FMA

// While pass 1 reads `slots` key rows from k_rows: the value rows of the same slots (v_rows), and
// the key rows 16 slots on (possibly past the chunk, or the cache: PrefetchL2At takes any
// address). Both SIMD paths' pass 1. Into L2, as the values pass fetches the next chunk's keys:
// fetched into L1, a chunk's 32 KB held the L1's few miss buffers against the kernel's own loads
// (one Zen 4 core, benchmarks/attention_chunk.cc over 2048 chunks from memory: 21.3-21.8 -> 19.3-19.8
// ns a slot; from L2 level; `decode_attention.py --context 2048` on one thread 7.4-7.8 -> 6.9-7.2 ms).
template <typename T>
inline void PrefetchSlotRows(const T* v_rows, const T* k_rows, int64_t slots, int64_t h) {
  const int64_t bytes = slots * h * static_cast<int64_t>(sizeof(T));
  for (int64_t b = 0; b < bytes; b += 64) {
    PrefetchL2At(v_rows, b);
    PrefetchL2At(k_rows, 16 * h * static_cast<int64_t>(sizeof(T)) + b);
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

// The largest of a's lanes, taken in lane order with std::max.
BITNET_AVX2 inline float Hmax(__m256 a) {
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, a);
  float m = lanes[0];
  for (int l = 1; l < 8; ++l) m = std::max(m, lanes[l]);
  return m;
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

// SoftmaxWeightsScalar in 8-lane vectors.
BITNET_AVX2 void SoftmaxWeights(Avx2Path, float* p, int64_t n, const float* v_scale_n, float* max, float* sum) {
  const __m256i n_tail = FirstLanes(n % 8);
  // The max in vectors, as the AVX-512 path takes it (std::max_element, a compare and a branch a
  // score, was half of this pass: a Zen 4 core, 4 heads of 128, 22.4 -> 20.6 ns a slot in all).
  __m256 max_v = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) max_v = _mm256_max_ps(max_v, _mm256_loadu_ps(p + j));
  float m = Hmax(max_v);
  for (; j < n; ++j) m = std::max(m, p[j]);
  const __m256 m_v = _mm256_set1_ps(m);
  __m256 total = _mm256_setzero_ps();
  for (j = 0; j + 8 <= n; j += 8) {
    const __m256 e = ExpAvx2(_mm256_sub_ps(_mm256_loadu_ps(p + j), m_v));
    total = _mm256_add_ps(total, e);
    _mm256_storeu_ps(p + j, v_scale_n ? _mm256_mul_ps(e, _mm256_loadu_ps(v_scale_n + j)) : e);
  }
  if (j < n) {
    const __m256 e = ExpAvx2(_mm256_sub_ps(_mm256_maskload_ps(p + j, n_tail), m_v));
    total = _mm256_add_ps(total, _mm256_and_ps(e, _mm256_castsi256_ps(n_tail)));
    _mm256_maskstore_ps(p + j, n_tail, v_scale_n ? _mm256_mul_ps(e, _mm256_maskload_ps(v_scale_n + j, n_tail)) : e);
  }
  *max = m;
  *sum = Hsum(total);
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
BITNET_AVX2 void ScoreHeads(Avx2Path, const float* q, int64_t h, const T* k_nh, const float* slot_scales, int64_t n,
                                float* p, const T* v_prefetch) {
  const __m256i tail = FirstLanes(h % 8);  // lanes of the last, partial vector of a row
  int64_t j = 0;
  for (; j + 2 <= n; j += 2) {
    if (v_prefetch) PrefetchSlotRows(v_prefetch + j * h, k_nh + j * h, 2, h);
    ScoresBlock<GB, 2>(q, k_nh + j * h, h, slot_scales + j, tail, p + j);
  }
  if (j < n) ScoresBlock<GB, 1>(q, k_nh + j * h, h, slot_scales + j, tail, p + j);
}

template <int GB, typename T>
BITNET_AVX2 void WeightValues(Avx2Path, const float* p, int64_t h, const T* v_nh, int64_t n, float* acc_gh) {
  const __m256i tail = FirstLanes(h % 8);
  const int64_t h8 = h / 8 * 8;
  int64_t i0 = 0;
  for (; i0 + 16 <= h8; i0 += 16) ValuesBlock<GB, 2, false>(p, v_nh, h, n, i0, tail, acc_gh);
  if (i0 < h8) ValuesBlock<GB, 1, false>(p, v_nh, h, n, i0, tail, acc_gh);
  if (h8 < h) ValuesBlock<GB, 1, true>(p, v_nh, h, n, h8, tail, acc_gh);
}

// ---------------------------------------------------------------------------------------------
// AVX2: AttendChunkInt8's integer arithmetic in vpmaddwd (int16 pairs into int32 lanes, then an
// add). Against the float kernel it widens the int8 cache to int16 in one instruction per 16
// values (to float: two per 8) and does 16 multiply-adds in two instructions, as an FMA does.
//   scores: 4 heads x 2 slots of int32 accumulators, reduced 4 at a time (Hsum4Int);
//   values: two slots' values interleaved in int16 pairs against each head's broadcast pair of
//           weight codes; 4 heads x 16 elements of accumulators kept over the chunk.
// The blocks are forced inline, as the AVX-512 ones below: GCC left the score block a call per
// slot pair (a Zen 4 core, AVX2, 4 heads of 128 from L2: 23.1-23.2 -> 22.1-22.3 ns a slot).
#define BITNET_AVX2_INLINE BITNET_AVX2 __attribute__((always_inline)) inline

// QuantizeInt16Scalar in 8-lane vectors: the same codes and step.
BITNET_AVX2 bool QuantizeInt16(Avx2Path, const float* x, int64_t n, int64_t padded, int16_t* codes, float* step) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 m = _mm256_setzero_ps(), zero_if_finite = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v));
    zero_if_finite = _mm256_add_ps(zero_if_finite, _mm256_mul_ps(v, _mm256_setzero_ps()));  // inf * 0, NaN: NaN
  }
  float max = Hmax(m), zero = Hsum(zero_if_finite);  // lanes of magnitudes from 0: max >= 0
  for (; i < n; ++i) {
    zero += x[i] * 0.0f;
    max = std::max(max, std::abs(x[i]));
  }
  if (zero != 0.0f) return false;
  *step = max / kLevels;
  const __m256 inv = _mm256_set1_ps(max == 0.0f ? 0.0f : kLevels / max);
  std::fill(codes, codes + padded, int16_t{0});
  i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i), inv));
    const __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i + 8), inv));
    // packs works within 128-bit lanes: a0-3 b0-3 a4-7 b4-7, put in order.
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), _MM_SHUFFLE(3, 1, 2, 0));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes + i), packed);
  }
  for (; i < n; ++i) codes[i] = static_cast<int16_t>(_mm_cvtss_si32(_mm_mul_ss(_mm_set_ss(x[i]), _mm256_castps256_ps128(inv))));
  return true;
}

// 16 int8 values at row as int16 lanes; PART: the first `count` (< 16), the others zero.
template <bool PART>
BITNET_AVX2 inline __m256i Widen16(const int8_t* row, int64_t count) {
  if (!PART) return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row)));
  alignas(16) int8_t part[16] = {};
  std::memcpy(part, row, static_cast<size_t>(count));
  return _mm256_cvtepi8_epi16(_mm_load_si128(reinterpret_cast<const __m128i*>(part)));
}

// The four int32 horizontal sums {sum(a), sum(b), sum(c), sum(d)}.
BITNET_AVX2 inline __m128i Hsum4Int(__m256i a, __m256i b, __m256i c, __m256i d) {
  const __m256i abcd = _mm256_hadd_epi32(_mm256_hadd_epi32(a, b), _mm256_hadd_epi32(c, d));
  return _mm_add_epi32(_mm256_castsi256_si128(abcd), _mm256_extracti128_si256(abcd, 1));
}

// Scores of GB heads (codes q, stride hp) against JS slots (rows k, k + h), as AttendChunkInt8
// says, into s[hd * kAttentionChunk + js].
template <int GB, int JS>
BITNET_AVX2_INLINE void ScoresBlockInt16Avx2(const int16_t* q, int64_t hp, const int8_t* k, int64_t h,
                                             const float* slot_scales, const float* q_step, float* s) {
  __m256i acc[GB][JS];
#pragma GCC unroll 4
  for (int hd = 0; hd < GB; ++hd)
#pragma GCC unroll 2
    for (int js = 0; js < JS; ++js) acc[hd][js] = _mm256_setzero_si256();
  const int64_t h16 = h / 16 * 16;
  for (int64_t i = 0; i < h; i += 16) {
    __m256i kw[JS];
#pragma GCC unroll 2
    for (int js = 0; js < JS; ++js) kw[js] = i < h16 ? Widen16<false>(k + js * h + i, 16) : Widen16<true>(k + js * h + i, h - i);
#pragma GCC unroll 4
    for (int hd = 0; hd < GB; ++hd) {
      const __m256i qv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + hd * hp + i));
#pragma GCC unroll 2
      for (int js = 0; js < JS; ++js) acc[hd][js] = _mm256_add_epi32(acc[hd][js], _mm256_madd_epi16(qv, kw[js]));
    }
  }
  if constexpr (GB == 4 && JS == 2) {
    // Lane hd: head hd's dot with slot js.
    const __m128i dot0 = Hsum4Int(acc[0][0], acc[1][0], acc[2][0], acc[3][0]);
    const __m128i dot1 = Hsum4Int(acc[0][1], acc[1][1], acc[2][1], acc[3][1]);
    const __m128 steps = _mm_loadu_ps(q_step);
    alignas(16) float s0[4], s1[4];
    _mm_store_ps(s0, _mm_mul_ps(_mm_mul_ps(_mm_cvtepi32_ps(dot0), _mm_set1_ps(slot_scales[0])), steps));
    _mm_store_ps(s1, _mm_mul_ps(_mm_mul_ps(_mm_cvtepi32_ps(dot1), _mm_set1_ps(slot_scales[1])), steps));
    for (int hd = 0; hd < 4; ++hd) {
      s[hd * kAttentionChunk] = s0[hd];
      s[hd * kAttentionChunk + 1] = s1[hd];
    }
  } else {
#pragma GCC unroll 4
    for (int hd = 0; hd < GB; ++hd)
#pragma GCC unroll 2
      for (int js = 0; js < JS; ++js) {
        const __m128i sum4 = Hsum4Int(acc[hd][js], _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256());
        const float dot = static_cast<float>(_mm_cvtsi128_si32(sum4));
        s[hd * kAttentionChunk + js] = (dot * slot_scales[js]) * q_step[hd];
      }
  }
}

template <int GB>
BITNET_AVX2 void ScoreHeadsInt16(Avx2Path, const int16_t* q, int64_t hp, const int8_t* k_nh, int64_t h,
                                     const float* slot_scales, const float* q_step, int64_t n, float* p,
                                     const int8_t* v_prefetch) {
  int64_t j = 0;
  for (; j + 2 <= n; j += 2) {
    if (v_prefetch) PrefetchSlotRows(v_prefetch + j * h, k_nh + j * h, 2, h);
    ScoresBlockInt16Avx2<GB, 2>(q, hp, k_nh + j * h, h, slot_scales + j, q_step, p + j);
  }
  if (j < n) ScoresBlockInt16Avx2<GB, 1>(q, hp, k_nh + j * h, h, slot_scales + j, q_step, p + j);
}

// acc_gh[hd * h + i] = float(sum_j w[hd * kWeightStride + j] * v[j, i]) * w_step[hd] for GB heads
// and the 16 elements from i0 (PART: the first h - i0 of them), in slot pairs.
template <int GB, bool PART>
BITNET_AVX2_INLINE void ValuesBlockInt16Avx2(const int16_t* w, const int8_t* v, int64_t h, int64_t n, int64_t i0,
                                             const float* w_step, const int8_t* k_prefetch, float* acc_gh) {
  __m256i acc[GB][2];
#pragma GCC unroll 4
  for (int hd = 0; hd < GB; ++hd) acc[hd][0] = acc[hd][1] = _mm256_setzero_si256();
  const int64_t count = h - i0;
  for (int64_t j = 0; j < n; j += 2) {
    if (k_prefetch) {
      for (int64_t b = 0; b < 2 * h; b += 64) PrefetchL2At(k_prefetch, j * h + b);
    }
    // Lanes of lo: elements 0-3 and 8-11 as (v[j], v[j + 1]) pairs; hi: 4-7 and 12-15.
    const int8_t* row = v + j * h + i0;
    const __m256i a = Widen16<PART>(row, count);
    const __m256i b = j + 1 < n ? Widen16<PART>(row + h, count) : _mm256_setzero_si256();  // past an odd count: 0
    const __m256i lo = _mm256_unpacklo_epi16(a, b), hi = _mm256_unpackhi_epi16(a, b);
#pragma GCC unroll 4
    for (int hd = 0; hd < GB; ++hd) {
      int32_t pair;
      std::memcpy(&pair, w + hd * kWeightStride + j, sizeof(pair));
      const __m256i wv = _mm256_set1_epi32(pair);
      acc[hd][0] = _mm256_add_epi32(acc[hd][0], _mm256_madd_epi16(lo, wv));
      acc[hd][1] = _mm256_add_epi32(acc[hd][1], _mm256_madd_epi16(hi, wv));
    }
  }
#pragma GCC unroll 4
  for (int hd = 0; hd < GB; ++hd) {
    const __m256 step = _mm256_set1_ps(w_step[hd]);
    const __m256 x0 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_permute2x128_si256(acc[hd][0], acc[hd][1], 0x20)), step);
    const __m256 x1 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_permute2x128_si256(acc[hd][0], acc[hd][1], 0x31)), step);
    float* out = acc_gh + hd * h + i0;
    if (PART) {
      alignas(32) float part[16];
      _mm256_store_ps(part, x0);
      _mm256_store_ps(part + 8, x1);
      std::memcpy(out, part, static_cast<size_t>(count) * sizeof(float));
    } else {
      _mm256_storeu_ps(out, x0);
      _mm256_storeu_ps(out + 8, x1);
    }
  }
}

template <int GB>
BITNET_AVX2 void WeightValuesInt16(Avx2Path, const int16_t* w, const int8_t* v_nh, int64_t h, int64_t n,
                                       const float* w_step, const int8_t* k_prefetch, float* acc_gh) {
  const int64_t h16 = h / 16 * 16;
  int64_t i0 = 0;
  for (; i0 < h16; i0 += 16, k_prefetch = nullptr)
    ValuesBlockInt16Avx2<GB, false>(w, v_nh, h, n, i0, w_step, k_prefetch, acc_gh);
  if (h16 < h) ValuesBlockInt16Avx2<GB, true>(w, v_nh, h, n, h16, w_step, k_prefetch, acc_gh);
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

// SoftmaxWeightsScalar in 16-lane vectors.
BITNET_AVX512 void SoftmaxWeights(Avx512Path, float* p, int64_t n, const float* v_scale_n, float* max, float* sum) {
  const __mmask16 n_tail = FirstLanes16(n % 16);
  const int64_t n16 = n / 16 * 16;
  __m512 m_v = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < n16; j += 16) m_v = _mm512_max_ps(m_v, _mm512_loadu_ps(p + j));
  if (n16 < n) m_v = _mm512_mask_max_ps(m_v, n_tail, m_v, _mm512_maskz_loadu_ps(n_tail, p + n16));
  const float m = _mm512_reduce_max_ps(m_v);
  m_v = _mm512_set1_ps(m);
  __m512 total = _mm512_setzero_ps();
  for (int64_t j = 0; j < n16; j += 16) {
    __m512 e = Exp16(_mm512_sub_ps(_mm512_loadu_ps(p + j), m_v));
    total = _mm512_add_ps(total, e);
    if (v_scale_n) e = _mm512_mul_ps(e, _mm512_loadu_ps(v_scale_n + j));
    _mm512_storeu_ps(p + j, e);
  }
  if (n16 < n) {
    __m512 e = Exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(n_tail, p + n16), m_v));
    total = _mm512_add_ps(total, _mm512_maskz_mov_ps(n_tail, e));
    if (v_scale_n) e = _mm512_mul_ps(e, _mm512_maskz_loadu_ps(n_tail, v_scale_n + n16));
    _mm512_mask_storeu_ps(p + n16, n_tail, e);
  }
  *max = m;
  *sum = _mm512_reduce_add_ps(total);
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

// ScoreHeads(Avx2Path) in 16-float registers, 4 slots at a time.
template <int GB, typename T>
BITNET_AVX512 void ScoreHeads(Avx512Path, const float* q, int64_t h, const T* k_nh, const float* slot_scales, int64_t n,
                                float* p, const T* v_prefetch) {
  const __mmask16 tail = FirstLanes16(h % 16);
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    if (v_prefetch) PrefetchSlotRows(v_prefetch + j * h, k_nh + j * h, 4, h);
    ScoresBlock16<GB, 4>(q, k_nh + j * h, h, slot_scales + j, tail, p + j);
  }
  for (; j < n; ++j) ScoresBlock16<GB, 1>(q, k_nh + j * h, h, slot_scales + j, tail, p + j);
}

template <int GB, typename T>
BITNET_AVX512 void WeightValues(Avx512Path, const float* p, int64_t h, const T* v_nh, int64_t n, float* acc_gh) {
  const __mmask16 tail = FirstLanes16(h % 16);
  const int64_t h16 = h / 16 * 16;
  int64_t i0 = 0;
  for (; i0 + 64 <= h16; i0 += 64) ValuesBlock16<GB, 4, false>(p, v_nh, h, n, i0, tail, acc_gh);
  for (; i0 + 16 <= h16; i0 += 16) ValuesBlock16<GB, 1, false>(p, v_nh, h, n, i0, tail, acc_gh);
  if (h16 < h) ValuesBlock16<GB, 1, true>(p, v_nh, h, n, h16, tail, acc_gh);
}

BITNET_AVX512 void ExpNonPositive16(float* x, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(x + i, Exp16(_mm512_loadu_ps(x + i)));
  if (i < n) {
    const __mmask16 tail = FirstLanes16(n - i);
    _mm512_mask_storeu_ps(x + i, tail, Exp16(_mm512_maskz_loadu_ps(tail, x + i)));
  }
}


// ---------------------------------------------------------------------------------------------
// AVX-512 VNNI: AttendChunkInt8's integer arithmetic (attention_kernel.h) in vpdpwssd, the dot
// products of int16 pairs. Against the float kernels above it skips widening the int8 cache to
// float (the codes widen to int16, one instruction per 32) and does 32 multiply-adds an
// instruction where an FMA does 16 (8 in AVX2).
//   scores: 4 heads x 4 slots of int32 accumulators over the head dim, summed together (Sum16x16);
//   values: two slots' values interleaved in int16 pairs against each head's two weight codes,
//           broadcast; 4 heads x 64 elements of accumulators kept over the chunk.

// QuantizeInt16Scalar in 16-lane vectors: the same codes and step.
BITNET_AVX512 bool QuantizeInt16(Avx512Path, const float* x, int64_t n, int64_t padded, int16_t* codes, float* step) {
  __m512 m = _mm512_setzero_ps(), zero_if_finite = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __m512 v = _mm512_maskz_loadu_ps(FirstLanes16(std::min<int64_t>(16, n - i)), x + i);
    m = _mm512_max_ps(m, _mm512_abs_ps(v));
    zero_if_finite = _mm512_add_ps(zero_if_finite, _mm512_mul_ps(v, _mm512_setzero_ps()));  // inf * 0, NaN: NaN
  }
  if (_mm512_reduce_add_ps(zero_if_finite) != 0.0f) return false;
  const float max = _mm512_reduce_max_ps(m);
  *step = max / kLevels;
  const __m512 inv = _mm512_set1_ps(max == 0.0f ? 0.0f : kLevels / max);
  for (int64_t i = 0; i < padded; i += 16) {
    const __mmask16 lanes = FirstLanes16(std::clamp<int64_t>(n - i, 0, 16));
    const __m512i c = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(lanes, x + i), inv));
    _mm256_mask_storeu_epi16(codes + i, FirstLanes16(std::min<int64_t>(16, padded - i)), _mm512_cvtsepi32_epi16(c));
  }
  return true;
}

// 32 int8 values at row as int16 lanes; PART: the lanes of `tail`, the others zero.
// Lanes [0, h % 32) set: the last, partial block of 32 elements of a row of h.
inline __mmask32 Int16RowTail(int64_t h) { return static_cast<__mmask32>((uint64_t{1} << (h % 32)) - 1); }

template <bool PART>
BITNET_AVX512_INLINE __m512i Widen32(const int8_t* row, __mmask32 tail) {
  return _mm512_cvtepi8_epi16(PART ? _mm256_maskz_loadu_epi8(tail, row)
                                   : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row)));
}

// acc[hd * JS + js] += the products of 32 query codes of head hd (q + hd * hp) and key values of
// slot js (k + js * h), in int16 pairs.
template <int GB, int JS, bool PART>
BITNET_AVX512_INLINE void ScoresStepInt16(const int16_t* q, int64_t hp, const int8_t* k, int64_t h, __mmask32 tail,
                                          __m512i* acc) {
  __m512i kw[JS];
#pragma GCC unroll 4
  for (int js = 0; js < JS; ++js) kw[js] = Widen32<PART>(k + js * h, tail);
#pragma GCC unroll 4
  for (int hd = 0; hd < GB; ++hd) {
    const __m512i qv = _mm512_loadu_si512(q + hd * hp);
#pragma GCC unroll 4
    for (int js = 0; js < JS; ++js) Dpwssd(acc[hd * JS + js], qv, kw[js]);
  }
}

// Scores of GB heads (codes q, stride hp) against JS slots (rows k, k + h, ...), as
// AttendChunkInt8 says, into s[hd * kAttentionChunk + js].
template <int GB, int JS>
BITNET_AVX512_INLINE void ScoresBlockInt16(const int16_t* q, int64_t hp, const int8_t* k, int64_t h,
                                           const float* slot_scales, const float* q_step, __m512 q_step_4x4,
                                           __mmask32 tail, float* s) {
  __m512i acc[GB * JS];
#pragma GCC unroll 16
  for (int a = 0; a < GB * JS; ++a) acc[a] = _mm512_setzero_si512();
  const int64_t h32 = h / 32 * 32;
  for (int64_t i = 0; i < h32; i += 32) ScoresStepInt16<GB, JS, false>(q + i, hp, k + i, h, tail, acc);
  if (h32 < h) ScoresStepInt16<GB, JS, true>(q + h32, hp, k + h32, h, tail, acc);
  if constexpr (GB == 4 && JS == 4) {
    // Lane 4 * hd + js: head hd's score of slot js.
    const __m512 dots = _mm512_cvtepi32_ps(Sum16x16(acc));
    const __m512 scores =
        _mm512_mul_ps(_mm512_mul_ps(dots, _mm512_broadcast_f32x4(_mm_loadu_ps(slot_scales))), q_step_4x4);
    _mm_storeu_ps(s, _mm512_castps512_ps128(scores));
    _mm_storeu_ps(s + kAttentionChunk, _mm512_extractf32x4_ps(scores, 1));
    _mm_storeu_ps(s + 2 * kAttentionChunk, _mm512_extractf32x4_ps(scores, 2));
    _mm_storeu_ps(s + 3 * kAttentionChunk, _mm512_extractf32x4_ps(scores, 3));
  } else {
#pragma GCC unroll 4
    for (int hd = 0; hd < GB; ++hd)
#pragma GCC unroll 4
      for (int js = 0; js < JS; ++js) {
        const float dot = static_cast<float>(_mm512_reduce_add_epi32(acc[hd * JS + js]));
        s[hd * kAttentionChunk + js] = (dot * slot_scales[js]) * q_step[hd];
      }
  }
}

template <int GB>
BITNET_AVX512 void ScoreHeadsInt16(Avx512Path, const int16_t* q, int64_t hp, const int8_t* k_nh, int64_t h,
                                   const float* slot_scales, const float* q_step, int64_t n, float* p,
                                   const int8_t* v_prefetch) {
  const __mmask32 tail = Int16RowTail(h);
  // Lane 4 * hd + js: q_step[hd] (4 heads).
  const __m512 q_step_4x4 =
      GB == 4 ? _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3),
                                      _mm512_castps128_ps512(_mm_loadu_ps(q_step)))
              : _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    if (v_prefetch) PrefetchSlotRows(v_prefetch + j * h, k_nh + j * h, 4, h);
    ScoresBlockInt16<GB, 4>(q, hp, k_nh + j * h, h, slot_scales + j, q_step, q_step_4x4, tail, p + j);
  }
  for (; j < n; ++j) ScoresBlockInt16<GB, 1>(q, hp, k_nh + j * h, h, slot_scales + j, q_step, q_step_4x4, tail, p + j);
}

// acc_gh[hd * h + i] = float(sum_j w[hd * kWeightStride + j] * v[j, i]) * w_step[hd] for GB heads
// and the IB * 32 elements from i0 (PART: one partial block, the row's last), in slot pairs: GB *
// 2 * IB accumulators in registers over the chunk.
template <int GB, int IB, bool PART>
BITNET_AVX512_INLINE void ValuesBlockInt16(const int16_t* w, const int8_t* v, int64_t h, int64_t n, int64_t i0,
                                           __mmask32 tail, const float* w_step, const int8_t* k_prefetch,
                                           float* acc_gh) {
  __m512i acc[GB][2 * IB];
#pragma GCC unroll 4
  for (int hd = 0; hd < GB; ++hd)
#pragma GCC unroll 4
    for (int a = 0; a < 2 * IB; ++a) acc[hd][a] = _mm512_setzero_si512();
  for (int64_t j = 0; j < n; j += 2) {
    if (k_prefetch) {
      for (int64_t b = 0; b < 2 * h; b += 64) PrefetchL2At(k_prefetch, j * h + b);
    }
    // Lanes of lo: elements 8L + (0..3) of 128-bit lane L as (v[j], v[j + 1]) pairs; hi: 8L + (4..7).
    __m512i lo[IB], hi[IB];
#pragma GCC unroll 2
    for (int ib = 0; ib < IB; ++ib) {
      const int8_t* row = v + j * h + i0 + 32 * ib;
      const __m512i a = Widen32<PART>(row, tail);
      const __m512i b = j + 1 < n ? Widen32<PART>(row + h, tail) : _mm512_setzero_si512();  // past an odd count: 0
      lo[ib] = _mm512_unpacklo_epi16(a, b);
      hi[ib] = _mm512_unpackhi_epi16(a, b);
    }
#pragma GCC unroll 4
    for (int hd = 0; hd < GB; ++hd) {
      const int32_t* pair = reinterpret_cast<const int32_t*>(w + hd * kWeightStride + j);
#pragma GCC unroll 2
      for (int ib = 0; ib < IB; ++ib) {
        DpwssdBroadcast(acc[hd][2 * ib], lo[ib], pair);
        DpwssdBroadcast(acc[hd][2 * ib + 1], hi[ib], pair);
      }
    }
  }
  // Back in element order: elements 0-15 of a block from lanes 0-7 of lo and hi, 16-31 from 8-15.
  const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i second = _mm512_add_epi32(first, _mm512_set1_epi32(8));
#pragma GCC unroll 4
  for (int hd = 0; hd < GB; ++hd) {
    const __m512 step = _mm512_set1_ps(w_step[hd]);
#pragma GCC unroll 2
    for (int ib = 0; ib < IB; ++ib) {
      const __m512i l = acc[hd][2 * ib], r = acc[hd][2 * ib + 1];
      const __m512 x0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_permutex2var_epi32(l, first, r)), step);
      const __m512 x1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_permutex2var_epi32(l, second, r)), step);
      float* out = acc_gh + hd * h + i0 + 32 * ib;
      if (PART) {
        _mm512_mask_storeu_ps(out, static_cast<__mmask16>(tail), x0);
        _mm512_mask_storeu_ps(out + 16, static_cast<__mmask16>(tail >> 16), x1);
      } else {
        _mm512_storeu_ps(out, x0);
        _mm512_storeu_ps(out + 16, x1);
      }
    }
  }
}

template <int GB>
BITNET_AVX512 void WeightValuesInt16(Avx512Path, const int16_t* w, const int8_t* v_nh, int64_t h, int64_t n,
                                     const float* w_step, const int8_t* k_prefetch, float* acc_gh) {
  const __mmask32 tail = Int16RowTail(h);
  const int64_t h32 = h / 32 * 32;
  int64_t i0 = 0;
  for (; i0 + 64 <= h32; i0 += 64, k_prefetch = nullptr)
    ValuesBlockInt16<GB, 2, false>(w, v_nh, h, n, i0, tail, w_step, k_prefetch, acc_gh);
  for (; i0 < h32; i0 += 32, k_prefetch = nullptr)
    ValuesBlockInt16<GB, 1, false>(w, v_nh, h, n, i0, tail, w_step, k_prefetch, acc_gh);
  if (h32 < h) ValuesBlockInt16<GB, 1, true>(w, v_nh, h, n, h32, tail, w_step, k_prefetch, acc_gh);
}

// Prefill: scores from the chunk's keys transposed (TransposeKeysInt8), 16 slots in a register's
// lanes, so that vpdpwssd with a head's query pair broadcast accumulates 16 whole scores: no sums
// across lanes. GB heads x JB registers of slots from slot j0.
template <int GB, int JB>
BITNET_AVX512_INLINE void ScoresBlockTransposed(const int16_t* q, int64_t hp, const int16_t* kt, int64_t pairs,
                                                const float* slot_scales, const float* q_step, int64_t j0, float* s) {
  __m512i acc[GB][JB];
#pragma GCC unroll 4
  for (int hd = 0; hd < GB; ++hd)
#pragma GCC unroll 4
    for (int jb = 0; jb < JB; ++jb) acc[hd][jb] = _mm512_setzero_si512();
  for (int64_t d = 0; d < pairs; ++d) {
    __m512i kv[JB];
#pragma GCC unroll 4
    for (int jb = 0; jb < JB; ++jb) kv[jb] = _mm512_loadu_si512(kt + (d * kAttentionChunk + j0 + 16 * jb) * 2);
#pragma GCC unroll 4
    for (int hd = 0; hd < GB; ++hd) {
      const int32_t* pair = reinterpret_cast<const int32_t*>(q + hd * hp + 2 * d);
#pragma GCC unroll 4
      for (int jb = 0; jb < JB; ++jb) DpwssdBroadcast(acc[hd][jb], kv[jb], pair);
    }
  }
#pragma GCC unroll 4
  for (int jb = 0; jb < JB; ++jb) {
    const __m512 scales = _mm512_loadu_ps(slot_scales + j0 + 16 * jb);
#pragma GCC unroll 4
    for (int hd = 0; hd < GB; ++hd) {
      const __m512 scores = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(acc[hd][jb]), scales),
                                          _mm512_set1_ps(q_step[hd]));
      _mm512_storeu_ps(s + hd * kAttentionChunk + j0 + 16 * jb, scores);
    }
  }
}

template <int GB>
BITNET_AVX512 void ScoreHeadsTransposed(const int16_t* q, int64_t hp, const int16_t* kt, int64_t h,
                                        const float* slot_scales, const float* q_step, int64_t n, float* p) {
  const int64_t pairs = KeyPairs(h), vecs = (n + 15) / 16;
  int64_t v = 0;
  for (; v + 4 <= vecs; v += 4) ScoresBlockTransposed<GB, 4>(q, hp, kt, pairs, slot_scales, q_step, 16 * v, p);
  switch (vecs - v) {
    case 3: ScoresBlockTransposed<GB, 3>(q, hp, kt, pairs, slot_scales, q_step, 16 * v, p); break;
    case 2: ScoresBlockTransposed<GB, 2>(q, hp, kt, pairs, slot_scales, q_step, 16 * v, p); break;
    case 1: ScoresBlockTransposed<GB, 1>(q, hp, kt, pairs, slot_scales, q_step, 16 * v, p); break;
    default: break;
  }
}

// TransposeKeysInt8 in 16 x 16 dword blocks: 16 slots' rows widened to int16 (16 dword pairs
// each), transposed so that each register holds one pair of every slot.
BITNET_AVX512 void TransposeKeys16(const int8_t* k_nh, int64_t n, int64_t h, int16_t* kt) {
  const int64_t pairs = KeyPairs(h);
  for (int64_t j0 = 0; j0 < kAttentionChunk; j0 += 16) {
    for (int64_t d0 = 0; d0 < pairs; d0 += 16) {
      const int64_t count = std::min<int64_t>(32, h - 2 * d0);  // the rows' elements in this block
      const __mmask32 lanes = static_cast<__mmask32>((uint64_t{1} << count) - 1);
      __m512i r[16];
      for (int64_t i = 0; i < 16; ++i) {
        const int64_t j = j0 + i;
        r[i] = j < n ? _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(lanes, k_nh + j * h + 2 * d0))
                     : _mm512_setzero_si512();
      }
      Transpose16x16(r);
      for (int64_t i = 0; i < 16 && d0 + i < pairs; ++i)
        _mm512_storeu_si512(kt + ((d0 + i) * kAttentionChunk + j0) * 2, r[i]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Both SIMD paths: the passes of a chunk, whichever path's kernels (Path: Avx2Path or
// Avx512Path) do the arithmetic. This code only carves the scratch and walks the heads, so
// it is built for the baseline target and calls the path's kernels, each built for its own.

// f(std::integral_constant<int, GB>(), g0) for the heads [g0, g0 + GB) of each block of up to 4.
template <typename F>
inline void ForHeadBlocks(int64_t g, F f) {
  for (int64_t g0 = 0; g0 < g; g0 += 4) {
    switch (std::min<int64_t>(4, g - g0)) {
      case 4: f(std::integral_constant<int, 4>(), g0); break;
      case 3: f(std::integral_constant<int, 3>(), g0); break;
      case 2: f(std::integral_constant<int, 2>(), g0); break;
      default: f(std::integral_constant<int, 1>(), g0); break;
    }
  }
}

// As AttendChunkScalar<T>; the heads in blocks of up to 4.
template <typename Path, typename T>
void AttendChunkSimd(const float* q_gh, int64_t g, int64_t h, const T* k_nh, const T* v_nh, const float* k_scale_n,
                     const float* v_scale_n, int64_t n, float scale, float* scratch, float* partial) {
  float* max_g = partial;
  float* sum_g = partial + g;
  float* acc_gh = partial + 2 * g;

  // 1. Scores. The slots' scales (times 1 / sqrt(h)) first, into the scratch row after the scores.
  float* slot_scales = scratch + g * kAttentionChunk;
  for (int64_t j = 0; j < n; ++j) slot_scales[j] = k_scale_n ? k_scale_n[j] * scale : scale;
  ForHeadBlocks(g, [&](auto gb, int64_t g0) {
    const T* v_prefetch = g0 == 0 ? v_nh : nullptr;  // the first block of heads prefetches
    ScoreHeads<decltype(gb)::value>(Path(), q_gh + g0 * h, h, k_nh, slot_scales, n, scratch + g0 * kAttentionChunk,
                                    v_prefetch);
  });

  // 2. Max, exp(score - max) in place, sum; then the weights times each value row's scale.
  for (int64_t gi = 0; gi < g; ++gi) {
    SoftmaxWeights(Path(), scratch + gi * kAttentionChunk, n, v_scale_n, max_g + gi, sum_g + gi);
  }

  // 3. Weighted values.
  ForHeadBlocks(g, [&](auto gb, int64_t g0) {
    WeightValues<decltype(gb)::value>(Path(), scratch + g0 * kAttentionChunk, h, v_nh, n, acc_gh + g0 * h);
  });
}

// The path's QuantizeInt16 as a plain function, for CodeQueries.
template <typename Path>
bool PathQuantize(const float* x, int64_t n, int64_t padded, int16_t* codes, float* step) {
  return QuantizeInt16(Path(), x, n, padded, codes, step);
}

// As AttendChunkInt8Scalar: the passes in integers, or in floats (AttendChunkSimd) where a head
// is too long for exact int32 sums or a row has no finite int16 codes.
template <typename Path>
void AttendChunkInt8Simd(const float* q_gh, int64_t g, int64_t h, const int8_t* k_nh, const int8_t* v_nh,
                         const float* k_scale_n, const float* v_scale_n, int64_t n, float scale, float* scratch,
                         float* partial, const int16_t* kt, bool query_coded) {
  const auto in_float = [&] {
    AttendChunkSimd<Path>(q_gh, g, h, k_nh, v_nh, k_scale_n, v_scale_n, n, scale, scratch, partial);
  };
  if (!query_coded && !CodeQueries(PathQuantize<Path>, q_gh, g, h, scratch)) return in_float();
  const Int8Parts parts = CarveInt8Parts(scratch, g, h);
  const int64_t hp = PaddedDim(h);
  float* max_g = partial;
  float* sum_g = partial + g;
  float* acc_gh = partial + 2 * g;

  // 1. Scores. From transposed keys, every 16-slot register of the chunk's first n slots is
  // computed whole: the scales past n are zeros (the scores there are never read).
  for (int64_t j = 0; j < n; ++j) parts.slot_scales[j] = k_scale_n[j] * scale;
  if (kt != nullptr) std::fill(parts.slot_scales + n, parts.slot_scales + kAttentionChunk, 0.0f);
  ForHeadBlocks(g, [&](auto gb, int64_t g0) {
    if constexpr (std::is_same_v<Path, Avx512Path>) {
      if (kt != nullptr) {
        ScoreHeadsTransposed<decltype(gb)::value>(parts.q + g0 * hp, hp, kt, h, parts.slot_scales, parts.q_step + g0,
                                                  n, parts.p + g0 * kAttentionChunk);
        return;
      }
    }
    const int8_t* v_prefetch = g0 == 0 ? v_nh : nullptr;
    ScoreHeadsInt16<decltype(gb)::value>(Path(), parts.q + g0 * hp, hp, k_nh, h, parts.slot_scales,
                                         parts.q_step + g0, n, parts.p + g0 * kAttentionChunk, v_prefetch);
  });

  // 2. Max, exp(score - max), sum; the weights times each value row's scale, and their codes.
  for (int64_t gi = 0; gi < g; ++gi) {
    float* p = parts.p + gi * kAttentionChunk;
    SoftmaxWeights(Path(), p, n, v_scale_n, max_g + gi, sum_g + gi);
    if (!QuantizeInt16(Path(), p, n, kWeightStride, parts.w + gi * kWeightStride, parts.w_step + gi)) return in_float();
  }

  // 3. Weighted values. The first block of heads prefetches the keys of the chunk that follows in
  // the cache (the next chunk of this query's head, in a long context), while this one computes.
  const int8_t* k_next = n == kAttentionChunk ? k_nh + n * h : nullptr;
  ForHeadBlocks(g, [&](auto gb, int64_t g0) {
    WeightValuesInt16<decltype(gb)::value>(Path(), parts.w + g0 * kWeightStride, v_nh, h, n, parts.w_step + g0,
                                           g0 == 0 ? k_next : nullptr, acc_gh + g0 * h);
  });
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
    AttendChunkSimd<Avx512Path>(q_gh, g, h, k_nh, v_nh, nullptr, nullptr, n, scale, scratch, partial);
    return;
  }
  if (isa == Isa::kAvx2) {
    AttendChunkSimd<Avx2Path>(q_gh, g, h, k_nh, v_nh, nullptr, nullptr, n, scale, scratch, partial);
    return;
  }
#endif
  (void)isa;
  AttendChunkScalar(q_gh, g, h, k_nh, v_nh, nullptr, nullptr, n, scale, scratch, partial);
}

void AttendChunkInt8(Isa isa, const float* q_gh, int64_t g, int64_t h, const int8_t* k_nh, const int8_t* v_nh,
                     const float* k_scale_n, const float* v_scale_n, int64_t n, float scale, float* scratch,
                     float* partial, const int16_t* kt, bool query_coded) {
#if BITNET_JAX_X86_SIMD
  if (isa == Isa::kAvx512Vnni) {
    AttendChunkInt8Simd<Avx512Path>(q_gh, g, h, k_nh, v_nh, k_scale_n, v_scale_n, n, scale, scratch, partial, kt,
                                    query_coded);
    return;
  }
  if (isa == Isa::kAvx2) {
    AttendChunkInt8Simd<Avx2Path>(q_gh, g, h, k_nh, v_nh, k_scale_n, v_scale_n, n, scale, scratch, partial, nullptr,
                                  query_coded);
    return;
  }
#endif
  (void)kt;
  (void)isa;
  AttendChunkInt8Scalar(q_gh, g, h, k_nh, v_nh, k_scale_n, v_scale_n, n, scale, scratch, partial, query_coded);
}

bool CodeQueriesInt16(Isa isa, const float* q_gh, int64_t g, int64_t h, float* scratch) {
#if BITNET_JAX_X86_SIMD
  if (isa == Isa::kAvx512Vnni) return CodeQueries(PathQuantize<Avx512Path>, q_gh, g, h, scratch);
  if (isa == Isa::kAvx2) return CodeQueries(PathQuantize<Avx2Path>, q_gh, g, h, scratch);
#endif
  (void)isa;
  return CodeQueries(QuantizeInt16Scalar, q_gh, g, h, scratch);
}

void TransposeKeysInt8(Isa isa, const int8_t* k_nh, int64_t n, int64_t h, int16_t* kt) {
#if BITNET_JAX_X86_SIMD
  if (isa == Isa::kAvx512Vnni) {
    TransposeKeys16(k_nh, n, h, kt);
    return;
  }
#endif
  (void)isa;
  for (int64_t d = 0; d < KeyPairs(h); ++d)
    for (int64_t j = 0; j < kAttentionChunk; ++j)
      for (int64_t e = 0; e < 2; ++e)
        kt[(d * kAttentionChunk + j) * 2 + e] = j < n && 2 * d + e < h ? k_nh[j * h + 2 * d + e] : 0;
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
