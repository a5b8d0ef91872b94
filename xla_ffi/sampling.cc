// bitnet_sampling_cut: where a sampled row's top-k and top-p cuts fall, as one key per row.
//
//   keys    u32 [B, V]   each token's order key: `unsigned_keys` of the row's scaled logits
//                        (bitnet_jax/serve/generate.py: a larger value has a larger key; -0.0 is
//                        0.0; NaN has the largest key)
//   top_k   s32 [B]      keep the k largest keys, and every key equal to the k-th (k > V: V);
//                        k <= 0: no top-k cut
//   top_p   f32 [B]      then keep the fewest largest keys whose mass reaches top_p of the mass
//                        that top-k kept; top_p >= 1 (or NaN): no top-p cut
//   -> cut  u32 [B, 1]   a row keeps the tokens whose key is at least its cut (0: every token)
//   -> kept s32 [B, K]   the indices of the tokens the row keeps, ascending, where they are at
//                        most K (the rest of the row: V); K may be 0
//   -> count s32 [B]     how many the row keeps, where at most K; else K + 1
//
// A row's draw reads only the tokens it keeps; where a top-p or top-k cut leaves few (a trained
// model's nucleus is often a handful of tokens), `kept` lets the caller draw the Gumbel noise for
// those alone rather than for the whole vocabulary (bitnet_jax/serve/generate.py, `nucleus_tokens`).
//
// The cuts are generate.py's `top_k_threshold` and `top_p_threshold`, which find them in XLA by
// 32 halvings of the key range, each a masked sum over the whole row that XLA:CPU writes out
// before summing: 1.4-1.7 ms a row of 128,256 tokens and 10-14 ms for 8 rows on a 2-core Zen 4,
// where a batched decode step of 8 rows takes 65-70 ms. Here each cut is a radix select over the
// keys' digits (11, 11 and 10 bits): a histogram of the top digit (of counts for top-k, of
// masses for top-p) locates the bucket where the cut lies, the row's tokens in that bucket are
// gathered, and the next digit is located among them, and so on: two passes over the row, then
// short ones (0.2-0.45 ms a row, 1.3-2.6 ms for 8 rows on 2 threads, measured while XLA still
// made the masses; a top-p cut now also makes them, below: the whole of sampling at 8 rows
// measured level with that, benchmarks/RESULTS.md).
//
// The top-p cut, exactly: with target = top_p * (the kept tokens' mass), the largest key k such
// that the kept tokens with keys >= k hold at least the target (where rounding of the sums
// leaves none that do, the least key holding mass: every token with mass is kept); the row's
// largest key where the target is not above zero (top_p <= 0, or a NaN mass: the row had a NaN
// or an infinite logit), as the halvings give. Masses are summed in double, so this is the cut of
// exact arithmetic on XLA's masses, except where the target lies within double rounding of a
// cumulative mass; the float32 sums of the halvings can land one key to either side of the
// exact cut where it lies within their rounding (tests/test_generate.py holds both to a float64
// reference on targets away from such ties).
//
// The masses are each token's unnormalized probability, exp(x - max x) of the values the keys
// stand for, computed here (into a row of scratch) by the attention kernels' exp, 2 ulp from exact
// (ExpNonPositive, attention_kernel.h); a mass below exp(-87) of the largest, or of a -inf logit,
// is 0. XLA had computed them into a [B, V] array of the decode step's temporary buffer, beside
// the keys (4 MB at 8 rows of a 128,256-token vocabulary, and a pass over it). A row's max is
// its largest key's value; where that is not finite (a NaN or +inf logit, or every logit -inf),
// exp(x - max) has NaNs, and the row's cut is its largest key, as the halvings make it.
//
// bitnet_argmax: each row's greedy token.
//
//   x       f32 [..., V]  the rows (V >= 1)
//   -> out  s32 [...]     each row's first index of its largest value, NaN counting as larger
//                         than any number (the first NaN, where a row has one) and -0.0 as 0.0:
//                         jnp.argmax's answer, and generate.py's `greedy_tokens`
//
// `greedy_tokens` finds it in XLA by two integer reductions over the values' order keys, which
// XLA:CPU writes out as two [B, V] int32 arrays before reducing (8 MB at 8 rows of a 128,256-
// token vocabulary: the temporary buffer of every decode step, greedy or sampled). Here one pass
// keeps each vector lane's largest key and its first index, then takes the largest among the
// lanes and, of the lanes that hold it, the least index: exact, so every path gives the same.
//
// Rows are independent; they are split over XLA's intra-op pool. A row's cut does not depend on
// the batch or the threads (every sum is in one fixed order); it depends on the CPU only through
// the exp's path (AVX-512, AVX2 or scalar), whose last bits may differ, and so only where the
// target lies within that rounding of a cumulative mass.

#include "sampling.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "attention_kernel.h"
#include "cpu_isa.h"
#include "ffi_util.h"
#include "parallel.h"

#if BITNET_JAX_X86_SIMD
#include "x86_simd.h"
#endif

namespace ffi = xla::ffi;

namespace bitnet {
namespace {

// A key's digits, from the top: 11, 11 and 10 bits. The top digit of a float's key is its sign,
// exponent and 2 bits of mantissa, so a row of logits falls into a few dozen of its buckets.
constexpr int kLevels = 3;
constexpr int kShift[kLevels] = {21, 10, 0};
constexpr int kBuckets = 1 << 11;
// Histogram copies of the pass over the row, token i adding to copy i % kCopies: consecutive
// tokens of one bucket would otherwise wait on each other's read-add-write of the same counter.
constexpr int kCopies = 4;

inline int Digit(uint32_t key, int level) { return static_cast<int>(key >> kShift[level]) & (kBuckets - 1); }

// The float32 value whose order key is `key` (generate.py's `key_values`): -0.0 reads as 0.0,
// every NaN as one NaN. Without a branch, so that loops of it vectorize.
inline float KeyValue(uint32_t key) {
  const int32_t k = static_cast<int32_t>(key ^ 0x80000000u);
  const int32_t bits = k ^ ((k >> 31) & 0x7FFFFFFF);  // negatives: the magnitude bits flipped back
  float x;
  std::memcpy(&x, &bits, sizeof(x));
  return x;
}

// A mass below exp(kLeastExponent) of the row's largest (1) counts as 0, and so does a -inf
// logit's: the exp clamps its argument there (exp(-87) is near the least normal float), and a
// token that far below the largest weighs nothing in a sum beside it.
constexpr float kLeastExponent = -87.0f;

// e[i] = exp(x_i - max_x) for the values x_i of a row's keys, max_x being its largest key's
// value (finite); a block at a time, so that the exponents it zeroes are still at hand in L1.
void Masses(Isa isa, const uint32_t* keys, int64_t v, float max_x, float* e) {
  constexpr int64_t kBlock = 512;
  float d[kBlock];
  for (int64_t i0 = 0; i0 < v; i0 += kBlock) {
    const int64_t n = std::min(kBlock, v - i0);
    for (int64_t j = 0; j < n; ++j) d[j] = KeyValue(keys[i0 + j]) - max_x;
    std::copy(d, d + n, e + i0);
    ExpNonPositive(isa, e + i0, n);  // (clamps below kLeastExponent, which the next loop zeroes)
    for (int64_t j = 0; j < n; ++j) e[i0 + j] = d[j] < kLeastExponent ? 0.0f : e[i0 + j];
  }
}

// The bucket, from the top, at which the weight above it (*above, updated to exclude the bucket)
// plus its own reaches `target` (*above < target on entry). Where none does (rounding of the
// mass sums), the lowest bucket of nonzero weight, so that its tokens are kept. -1 where every
// bucket is empty.
template <typename W>
int Locate(const W* hist, W target, W* above) {
  int last = -1;
  W above_last = *above;
  for (int b = kBuckets - 1; b >= 0; --b) {
    if (hist[b] == 0) continue;  // cannot reach the target where the weight above has not
    if (*above + hist[b] >= target) return b;
    last = b;
    above_last = *above;
    *above += hist[b];
  }
  *above = above_last;
  return last;
}

struct Token {
  uint32_t key;
  float e;
};

// The radix select over a row: the largest key K such that the tokens with keys >= K and >=
// floor weigh at least `target` (weight(e) >= 0 each), digit by digit from the top. `top`: the
// histogram of the top digit, summed in a fixed order. The tokens of the located top bucket are
// gathered into `tokens`, and the lower digits located among them, each level's tokens gathered
// in place from the one before.
template <typename W, typename Weight>
uint32_t Select(const uint32_t* keys, const float* e, int64_t v, uint32_t floor, const W* top, W target,
                const Weight& weight, Token* tokens) {
  W above = 0;
  int b = Locate(top, target, &above);
  if (b < 0) return floor;
  uint32_t key = static_cast<uint32_t>(b) << kShift[0];
  int64_t n = 0;
  for (int64_t i = 0; i < v; ++i) {  // without a branch: the bucket may hold a good share of the row
    tokens[n] = Token{keys[i], e != nullptr ? e[i] : 0.0f};
    n += (Digit(keys[i], 0) == b) & (keys[i] >= floor);
  }
  for (int level = 1; level < kLevels; ++level) {
    W hist[kBuckets] = {};
    for (int64_t j = 0; j < n; ++j) hist[Digit(tokens[j].key, level)] += weight(tokens[j].e);
    b = Locate(hist, target, &above);
    if (b < 0) break;
    key |= static_cast<uint32_t>(b) << kShift[level];
    int64_t kept = 0;
    for (int64_t j = 0; j < n; ++j) {
      tokens[kept] = tokens[j];
      kept += Digit(tokens[j].key, level) == b;
    }
    n = kept;
  }
  return key;
}

// The k-th largest key (1 <= k <= v).
uint32_t KthLargest(const uint32_t* keys, int64_t v, int64_t k, Token* tokens) {
  std::vector<uint32_t> copies(kCopies * kBuckets, 0);
  for (int64_t i = 0; i < v; ++i) ++copies[(i % kCopies) * kBuckets + Digit(keys[i], 0)];
  int64_t top[kBuckets];
  for (int b = 0; b < kBuckets; ++b) {
    top[b] = 0;
    for (int c = 0; c < kCopies; ++c) top[b] += copies[c * kBuckets + b];
  }
  return Select(keys, /*e=*/nullptr, v, /*floor=*/0, top, k, [](float) { return int64_t{1}; }, tokens);
}

// The top-p cut among the tokens whose key is >= floor (the top-k cut), over the row's masses.
uint32_t NucleusCut(Isa isa, const uint32_t* keys, int64_t v, float top_p, uint32_t floor, Token* tokens) {
  uint32_t largest = 0;
  for (int64_t i = 0; i < v; ++i) largest = std::max(largest, keys[i]);
  const float max_x = KeyValue(largest);
  if (!std::isfinite(max_x)) return largest;  // exp(x - max x) has NaNs: no mass to cut by
  thread_local std::vector<float> mass;
  if (static_cast<int64_t>(mass.size()) < v) mass.resize(v);
  float* e = mass.data();
  Masses(isa, keys, v, max_x, e);
  std::vector<double> copies(kCopies * kBuckets, 0.0);
  for (int64_t i = 0; i < v; ++i) {
    copies[(i % kCopies) * kBuckets + Digit(keys[i], 0)] += keys[i] >= floor ? e[i] : 0.0f;
  }
  double top[kBuckets], total = 0.0;
  for (int b = 0; b < kBuckets; ++b) {
    top[b] = 0.0;
    for (int c = 0; c < kCopies; ++c) top[b] += copies[c * kBuckets + b];
    total += top[b];
  }
  const double target = static_cast<double>(top_p) * total;
  if (!(target > 0.0)) return largest;
  return Select(keys, e, v, floor, top, target, [](float m) { return static_cast<double>(m); }, tokens);
}

// The indices of the tokens with key >= cut, ascending, into kept[0, k) (the rest: v), and their
// count, or k + 1 where there are more than k (the scan stops there).
int32_t KeptTokens(const uint32_t* keys, int64_t v, uint32_t cut, int64_t k, int32_t* kept) {
  constexpr int64_t kBlock = 64;  // tokens between checks of the count
  thread_local std::vector<int32_t> found;  // k + 1 slots: the last takes what does not fit
  if (static_cast<int64_t>(found.size()) < k + 1) found.resize(k + 1);
  int64_t n = 0;
  for (int64_t i0 = 0; i0 < v && n <= k; i0 += kBlock) {
    for (int64_t i = i0; i < std::min(v, i0 + kBlock); ++i) {  // without a branch: half a flat row is kept
      found[std::min(n, k)] = static_cast<int32_t>(i);
      n += keys[i] >= cut;
    }
  }
  const int64_t listed = std::min(n, k);
  std::copy(found.begin(), found.begin() + listed, kept);
  std::fill(kept + listed, kept + k, static_cast<int32_t>(v));
  return static_cast<int32_t>(std::min(n, k + 1));
}

uint32_t RowCut(Isa isa, const uint32_t* keys, int64_t v, int32_t top_k, float top_p) {
  thread_local std::vector<Token> tokens;
  if (static_cast<int64_t>(tokens.size()) < v) tokens.resize(v);
  uint32_t cut = 0;
  if (top_k > 0) cut = KthLargest(keys, v, std::min<int64_t>(top_k, v), tokens.data());
  if (top_p < 1.0f) cut = std::max(cut, NucleusCut(isa, keys, v, top_p, cut, tokens.data()));
  return cut;
}

ffi::Error SamplingCutImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::U32> keys, ffi::Buffer<ffi::S32> top_k,
                           ffi::Buffer<ffi::F32> top_p, ffi::Result<ffi::Buffer<ffi::U32>> cut,
                           ffi::Result<ffi::Buffer<ffi::S32>> kept, ffi::Result<ffi::Buffer<ffi::S32>> count) {
  const std::string op = "bitnet_sampling_cut: ";
  const auto dims = keys.dimensions();
  if (dims.size() != 2 || dims[1] < 1 || dims[1] > INT32_MAX) {
    return ffi::Error::InvalidArgument(op + "expected keys [B, V] with 1 <= V < 2^31, got " + ShapeString(dims));
  }
  const int64_t b = dims[0], v = dims[1];
  for (const auto& [name, d] : {std::pair<const char*, ffi::AnyBuffer::Dimensions>{"top_k", top_k.dimensions()},
                                {"top_p", top_p.dimensions()}}) {
    if (d.size() != 1 || d[0] != b) {
      return ffi::Error::InvalidArgument(op + name + " must be [" + std::to_string(b) + "], got " + ShapeString(d));
    }
  }
  const auto c_dims = cut->dimensions();
  if (c_dims.size() != 2 || c_dims[0] != b || c_dims[1] != 1) {
    return ffi::Error::InvalidArgument(op + "the output must be [" + std::to_string(b) + ", 1], got " +
                                       ShapeString(c_dims));
  }
  const auto k_dims = kept->dimensions(), n_dims = count->dimensions();
  if (k_dims.size() != 2 || k_dims[0] != b || n_dims.size() != 1 || n_dims[0] != b) {
    return ffi::Error::InvalidArgument(op + "expected outputs kept [" + std::to_string(b) + ", K] and count [" +
                                       std::to_string(b) + "], got " + ShapeString(k_dims) + " and " +
                                       ShapeString(n_dims));
  }
  const int64_t most = k_dims[1];
  Isa isa;
  std::string isa_error;
  if (!SelectIsa(&isa, &isa_error)) return ffi::Error::InvalidArgument(op + isa_error);
  const uint32_t* key = keys.typed_data();
  const int32_t* k = top_k.typed_data();
  const float* p = top_p.typed_data();
  uint32_t* out = cut->typed_data();
  int32_t* kept_bk = kept->typed_data();
  int32_t* count_b = count->typed_data();
  ParallelFor(pool, b, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      out[r] = RowCut(isa, key + r * v, v, k[r], p[r]);
      count_b[r] = KeptTokens(key + r * v, v, out[r], most, kept_bk + r * most);
    }
  });
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------
// bitnet_argmax

// A float's key in argmax's order as a signed integer: the bits, the magnitude bits of negatives
// flipped; -0.0 as 0.0 and every NaN as the largest key (generate.py's `_order_keys`).
inline int32_t ArgmaxKey(float x) {
  int32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  if (std::isnan(x)) return INT32_MAX;
  return x == 0.0f ? 0 : bits ^ ((bits >> 31) & 0x7FFFFFFF);
}

// The first index of the largest key among x[begin, v), given the best (key, index) before it.
inline int64_t ArgmaxTail(const float* x, int64_t begin, int64_t v, int32_t best, int64_t at) {
  for (int64_t i = begin; i < v; ++i) {
    const int32_t key = ArgmaxKey(x[i]);
    if (key > best) best = key, at = i;
  }
  return at;
}

#if BITNET_JAX_X86_SIMD
// Eight lanes, each keeping its largest key and that key's first index (strictly larger keys
// replace it, so the earliest of equal keys stays); then the largest of the lanes, the least
// index among the lanes holding it, and the tail after the last whole vector.
BITNET_AVX2 int64_t ArgmaxAvx2(const float* x, int64_t v) {
  const __m256i magnitude = _mm256_set1_epi32(0x7FFFFFFF);
  const __m256i eight = _mm256_set1_epi32(8);
  __m256i best = _mm256_set1_epi32(INT32_MIN), at = _mm256_setzero_si256();
  __m256i index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  int64_t i = 0;
  for (; i + 8 <= v; i += 8) {
    const __m256 f = _mm256_loadu_ps(x + i);
    const __m256i bits = _mm256_castps_si256(f);
    __m256i key = _mm256_xor_si256(bits, _mm256_and_si256(_mm256_srai_epi32(bits, 31), magnitude));
    key = _mm256_andnot_si256(_mm256_castps_si256(_mm256_cmp_ps(f, _mm256_setzero_ps(), _CMP_EQ_OQ)), key);
    key = _mm256_blendv_epi8(key, magnitude, _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_UNORD_Q)));
    const __m256i larger = _mm256_cmpgt_epi32(key, best);
    best = _mm256_blendv_epi8(best, key, larger);
    at = _mm256_blendv_epi8(at, index, larger);
    index = _mm256_add_epi32(index, eight);
  }
  alignas(32) int32_t lane_best[8], lane_at[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lane_best), best);
  _mm256_store_si256(reinterpret_cast<__m256i*>(lane_at), at);
  if (i == 0) return ArgmaxTail(x, 1, v, ArgmaxKey(x[0]), 0);  // no whole vector: the lanes hold nothing
  int32_t top = lane_best[0];
  int64_t first = lane_at[0];
  for (int l = 1; l < 8; ++l) {
    if (lane_best[l] > top || (lane_best[l] == top && lane_at[l] < first)) top = lane_best[l], first = lane_at[l];
  }
  return ArgmaxTail(x, i, v, top, first);
}
#endif

int64_t RowArgmax(Isa isa, const float* x, int64_t v) {
#if BITNET_JAX_X86_SIMD
  if (isa == Isa::kAvx2 || isa == Isa::kAvx512Vnni) return ArgmaxAvx2(x, v);
#endif
  (void)isa;
  return ArgmaxTail(x, 1, v, ArgmaxKey(x[0]), 0);
}

ffi::Error ArgmaxImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Result<ffi::Buffer<ffi::S32>> out) {
  const std::string op = "bitnet_argmax: ";
  const auto dims = x.dimensions();
  if (dims.size() < 1 || dims.back() < 1 || dims.back() > INT32_MAX) {
    return ffi::Error::InvalidArgument(op + "expected x [..., V] with 1 <= V < 2^31, got " + ShapeString(dims));
  }
  const auto out_dims = out->dimensions();
  if (out_dims.size() + 1 != dims.size() || !std::equal(out_dims.begin(), out_dims.end(), dims.begin())) {
    return ffi::Error::InvalidArgument(op + "the output must be x's shape without its last axis, " +
                                       ShapeString(dims) + " -> " + ShapeString(out_dims));
  }
  Isa isa;
  std::string isa_error;
  if (!SelectIsa(&isa, &isa_error)) return ffi::Error::InvalidArgument(op + isa_error);
  const int64_t v = dims.back(), rows = static_cast<int64_t>(x.element_count()) / v;
  const float* data = x.typed_data();
  int32_t* token = out->typed_data();
  ParallelFor(pool, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) token[r] = static_cast<int32_t>(RowArgmax(isa, data + r * v, v));
  });
  return ffi::Error::Success();
}

}  // namespace
}  // namespace bitnet

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    BitnetSamplingCut, bitnet::SamplingCutImpl,
    ffi::Ffi::Bind()
        .Ctx<ffi::ThreadPool>()
        .Arg<ffi::Buffer<ffi::U32>>()    // keys: uint32 [B, V], the order keys of the scaled logits
        .Arg<ffi::Buffer<ffi::S32>>()    // top_k: int32 [B], <= 0: no top-k cut
        .Arg<ffi::Buffer<ffi::F32>>()    // top_p: float32 [B], >= 1: no top-p cut
        .Ret<ffi::Buffer<ffi::U32>>()    // cut: uint32 [B, 1], the least key each row keeps
        .Ret<ffi::Buffer<ffi::S32>>()    // kept: int32 [B, K], the kept tokens' indices where at most K
        .Ret<ffi::Buffer<ffi::S32>>());  // count: int32 [B], how many are kept (K + 1: more than K)

XLA_FFI_DEFINE_HANDLER_SYMBOL(BitnetArgmax, bitnet::ArgmaxImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()    // x: float32 [..., V]
                                  .Ret<ffi::Buffer<ffi::S32>>());  // out: int32 [...], each row's argmax
