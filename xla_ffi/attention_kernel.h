// Decode attention kernels behind bitnet_decode_attention (attention.cc): a chunk of cache slots
// attended by the G query heads that share one kv head, and the merge of such chunks.
//
// A query's slots are cut at fixed multiples of kAttentionChunk; each chunk yields a partial
// softmax (its max score, its sum of exp(score - max), its exp-weighted sum of values), and the
// partials of a query are merged in slot order ("flash decoding"). Where the cuts fall depends on
// nothing but the slot index, so a query's result depends on its own inputs alone: not on the
// batch, the other rows' positions, or which thread ran which chunk.
//
// Each kernel has a scalar twin and SIMD versions (AVX2 + FMA, AVX-512 on x86-64) with the same
// contract; `isa` picks one (the caller gets it from SelectIsa). They differ only in float rounding.
#ifndef BITNET_JAX_XLA_FFI_ATTENTION_KERNEL_H_
#define BITNET_JAX_XLA_FFI_ATTENTION_KERNEL_H_

#include <cstdint>

#include "cpu_isa.h"

namespace bitnet {

// Slots per chunk: enough work per chunk that its partial (G * (H + 2) floats) and the merge are
// noise beside reading its keys and values, few enough that a short context still splits over
// threads.
constexpr int64_t kAttentionChunk = 128;

// Floats in one chunk's partial for g query heads of head dim h: max [g], sum [g], acc [g, h].
constexpr int64_t PartialFloats(int64_t g, int64_t h) { return g * (h + 2); }

// AttendChunkInt8 multiplies in integers: each query head, and each head's weights of a chunk,
// are rounded to int16 codes of a step = (largest magnitude) / kInt16Levels. A score's dot product
// of H codes against int8 keys stays within int32 for H <= kInt8MaxExactDim (|code| <= 32767,
// |key| <= 128); a longer head dim takes the float arithmetic of AttendChunk instead.
constexpr int64_t kInt16Levels = 32767;
constexpr int64_t kInt8MaxExactDim = 256;

// A head's query codes are kept in whole 32-lane vectors: h rounded up to a multiple of 32.
constexpr int64_t PaddedDim(int64_t h) { return (h + 31) / 32 * 32; }

// Floats of the scratch buffer AttendChunk and AttendChunkInt8 take: the scores of g heads for a
// chunk and the chunk's slot scales; for AttendChunkInt8 also the heads' query codes, their weight
// codes (two spare for a pair past an odd slot count), and a step per head for each.
constexpr int64_t ScratchFloats(int64_t g, int64_t h) {
  return (g + 1) * kAttentionChunk + g * PaddedDim(h) / 2 + g * (kAttentionChunk + 2) / 2 + 2 * g;
}

// exp(x[i]) in place for n values x[i] <= 0 (scores minus their max): a degree-6 polynomial
// on the reduced argument (Cephes' expf), relative error within 2 ulp (kernel_test checks it).
// Inputs below -87 give exp(-87) ~ 1.6e-38, a normal float: beside a sum of at least 1 (the max
// score's own term) it is far below rounding.
void ExpNonPositive(Isa isa, float* x, int64_t n);

// The partial softmax of one chunk, for g query heads over n slots (1 <= n <= kAttentionChunk):
//   q_gh     float [g, h]: the queries of the g heads that share this kv head
//   k_nh     float [n, h]: keys of the chunk's slots (row stride h)
//   v_nh     float [n, h]: values, the same slots
//   scratch  float [ScratchFloats(g, h)], the caller's (overwritten)
//   partial  float [PartialFloats(g, h)], out: with s_gj = (q_g . k_j) * scale,
//            max_g = max_j s_gj, sum_g = sum_j exp(s_gj - max_g),
//            acc_gh = sum_j exp(s_gj - max_g) * v_jh
void AttendChunk(Isa isa, const float* q_gh, int64_t g, int64_t h, const float* k_nh, const float* v_nh,
                 int64_t n, float scale, float* scratch, float* partial);

// AttendChunk over an int8 cache with a float scale per slot (the cache holds k_scale_n[j] * k_nh[j]
// and v_scale_n[j] * v_nh[j]), its dot products in integers:
//   scores   each head's query q_g is rounded to int16 codes Q_g = round(q_g / a_g), a_g =
//            max_i |q_gi| / kInt16Levels (round half to even; a_g = 0 and Q_g = 0 for a zero
//            query); s_gj = (float(Q_g . k_j) * (k_scale_n[j] * scale)) * a_g, the dot exact in
//            int32;
//   max_g, sum_g as above, over the float weights p_gj = exp(s_gj - max_g);
//   values   w_gj = p_gj * v_scale_n[j], rounded as the queries are: W_gj = round(w_gj / b_g),
//            b_g = max_j w_gj / kInt16Levels; acc_gh = float(sum_j W_gj v_jh) * b_g, exact in int32.
// A code is within half a step of its value: 2^-16 of the head's largest, far below the int8
// cache's own rounding (2^-8 of a slot's largest). Where a query or a chunk's weights are not
// finite, or h > kInt8MaxExactDim, the chunk takes the float arithmetic instead: the dot products
// in float over the exactly widened int8 values, acc_gh = sum_j w_gj * v_jh.
// kt (optional): the chunk's keys as TransposeKeysInt8 writes them, from at least its first n
// slots. The AVX-512 VNNI path then computes the scores with slots in vector lanes (no sums across
// lanes: a prefill chunk's queries share the transposition); the dot products are the same exact
// int32s, so the result is the same bits. Other paths ignore it.
// query_coded: scratch already holds q_gh's codes, from CodeQueriesInt16(isa, q_gh, g, h, scratch)
// having returned true (a query's chunks then code it once; AttendChunkInt8 leaves those codes as
// they are, in either arithmetic).
void AttendChunkInt8(Isa isa, const float* q_gh, int64_t g, int64_t h, const int8_t* k_nh, const int8_t* v_nh,
                     const float* k_scale_n, const float* v_scale_n, int64_t n, float scale, float* scratch,
                     float* partial, const int16_t* kt = nullptr, bool query_coded = false);

// AttendChunkInt8's int16 codes of the g heads of a query, into their place in scratch (float
// [ScratchFloats(g, h)]). False where that query takes the float arithmetic (not finite, or h >
// kInt8MaxExactDim): then AttendChunkInt8 must be called without query_coded.
bool CodeQueriesInt16(Isa isa, const float* q_gh, int64_t g, int64_t h, float* scratch);

// A chunk's int8 keys transposed into int16 pairs of dims: kt[(d * kAttentionChunk + j) * 2 + e] =
// k_nh[j * h + 2d + e] for slots j < n (0 < n <= kAttentionChunk) and 2d + e < h, zero elsewhere,
// over KeyPairs(h) pairs: TransposedKeysElements(h) int16s.
constexpr int64_t KeyPairs(int64_t h) { return (h + 1) / 2; }
constexpr int64_t TransposedKeysElements(int64_t h) { return KeyPairs(h) * kAttentionChunk * 2; }
void TransposeKeysInt8(Isa isa, const int8_t* k_nh, int64_t n, int64_t h, int16_t* kt);

// Whether AttendChunkInt8 on path `isa` reads the kt it is given for head dim h (elsewhere a
// caller need not transpose the keys at all).
constexpr bool ReadsTransposedKeys(Isa isa, int64_t h) {
  return isa == Isa::kAvx512Vnni && h <= kInt8MaxExactDim;
}

// out_gh [g, h] = the softmax-weighted values of a query from the partials of its chunks
// (float [chunks, PartialFloats(g, h)], in slot order), merged in that order.
void MergeChunks(const float* partials, int64_t chunks, int64_t g, int64_t h, float* out_gh);

}  // namespace bitnet

#endif  // BITNET_JAX_XLA_FFI_ATTENTION_KERNEL_H_
