// The x86-64 paths of the ternary and int8 kernels (gemm.h; the overview is at the top of gemm.cc):
// AVX2 and AVX-512 VNNI, each function with its own target attribute. Decode takes the GEMV tiles
// on both; on AVX-512, 8-16 activation rows the pair tiles and prefill (kPanelMinRows rows and
// more) the unpacked 32-row panels.
// Compiles to nothing off x86-64 (BITNET_JAX_X86_SIMD, cpu_isa.h).

#include "gemm_paths.h"

#include <algorithm>
#include <vector>

#include "cpu_isa.h"
#include "layout.h"
#include "scratch.h"

#if BITNET_JAX_X86_SIMD

#include "x86_simd.h"

namespace bitnet {

namespace {

// How far the AVX-512 4-row tile prefetches along a row group's stream of blocks from 3
// activation rows: 8 blocks, 2 KB (4 and 16 measured no better). At one and two rows it, and the
// AVX2 one-row tile, leave the stream to the hardware prefetcher (TernaryGroupAvx512); the AVX2
// row passes and the pair tiles fetch the next group's lines as they go (TernaryGroupAvx2,
// kPairPassesAhead).
constexpr int64_t kPrefetchBlocks = 8;

// How far ahead the int8 kernels fetch their weight stream, into L2 (PrefetchL2At): at several
// activation rows the core computes while the stream arrives, and 4 KB ahead into L1 left it
// waiting (one Zen 4 core, 2560 x 128256: 4 rows 19.7-20.0 -> 15.3-15.5 ms, 8 rows in
// Int8PairAvx512 31-33 -> 17-19 ms; benchmarks/RESULTS.md). One activation row fetches nothing
// ahead (Int8RowsAvx512, Int8RowOneAvx2): its one stream the hardware prefetcher follows.
constexpr int64_t kInt8PrefetchBytes = 32 * 1024;

// ---------------------------------------------------------------------------------------------
// AVX2

BITNET_AVX2 inline int32_t HsumAvx2(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(s);
}

// part[mi] += the products of one row block with the 256 activations of row mi at x_b. Each
// half of the block, shifted by 2j and masked, holds the codes of 32 consecutive k; one unpack
// serves MT activation rows.
template <int MT>
BITNET_AVX2 inline void RowBlockAvx2(const uint8_t* block, const int8_t* x_b, int64_t kp, __m256i mask,
                                     __m256i (&part)[MT]) {
#pragma GCC unroll 2
  for (int h = 0; h < 2; ++h) {
    __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 32 * h));
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      const __m256i codes = _mm256_and_si256(packed, mask);
      packed = _mm256_srli_epi16(packed, 2);
      for (int mi = 0; mi < MT; ++mi) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x_b + mi * kp + 64 * j + 32 * h));
        MaddubsAdd(part[mi], codes, xv);
      }
    }
  }
}

// One weight row (every block of row r of group w_g) against MT activation rows.
// maddubs(code u8 <= 2, x s8) sums pairs to at most 2 * 2 * 128 = 512 in int16, so the 16
// products of kAvx2RowWidenBlocks blocks add up in int16 without saturation before widening
// once to int32. (Timings: benchmarks/RESULTS.md, "the AVX2 kernel as the peak loop".)
constexpr int64_t kAvx2RowWidenBlocks = 2;
static_assert(kAvx2RowWidenBlocks * 8 * 512 <= 32768, "int16 partial sums must not overflow");

template <int MT>
BITNET_AVX2 void TernaryRowAvx2(const int8_t* x, int64_t kp, const int32_t* x_sum, int64_t kb,
                                const uint8_t* w_row, int32_t* out, int64_t out_stride) {
  const __m256i mask = _mm256_set1_epi8(3);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[MT];
  for (int mi = 0; mi < MT; ++mi) acc[mi] = _mm256_setzero_si256();
  for (int64_t b0 = 0; b0 < kb; b0 += kAvx2RowWidenBlocks) {
    __m256i part[MT];
    for (int mi = 0; mi < MT; ++mi) part[mi] = _mm256_setzero_si256();
#pragma GCC unroll 8
    for (int bb = 0; bb < kAvx2RowWidenBlocks; ++bb) {
      const int64_t b = b0 + bb;
      if (bb == 0 || b < kb) {
        // This row of the next group (kb blocks on), a block at a time (TernaryGroupAvx2).
        if (MT > 2)
          PrefetchAt(w_row, (kb + b) * kGroupBlockBytes);
        else
          PrefetchL2At(w_row, (kb + b) * kGroupBlockBytes);
        RowBlockAvx2<MT>(w_row + b * kGroupBlockBytes, x + b * kBlockK, kp, mask, part);
      }
    }
    for (int mi = 0; mi < MT; ++mi) acc[mi] = _mm256_add_epi32(acc[mi], _mm256_madd_epi16(part[mi], ones));
  }
  for (int mi = 0; mi < MT; ++mi) out[mi * out_stride] = HsumAvx2(acc[mi]) - x_sum[mi];
}

// Decode at one activation row, where the weights must stream at memory speed: the 4 rows of a
// group together, so that the group's blocks are read front to back as one stream (row by row,
// each pass reads 64 of every 256 bytes, which the hardware prefetcher does not follow), and each
// activation vector is loaded once for 4 rows. Nothing is fetched ahead in software: the hardware
// prefetcher follows this stream alone, and faster, as at the AVX-512 tile's one row (one Zen 4
// core from memory without the look-ahead of kPrefetchBlocks: 2560 x 6912 250-268 -> 215-221 us,
// 6912 x 2560 271-283 -> 222-233; the AVX2-forced decode step on one thread 0.97x, on two level;
// benchmarks/RESULTS.md).
// Per row, a block adds 8 maddubs results of magnitude <= 2 * 2 * 128 = 512 to each int16
// lane, so kAvx2WidenBlocks blocks stay within int16 (64 * -512 = -32768, 64 * 508 = 32512)
// before one madd widens them to int32.
constexpr int64_t kAvx2WidenBlocks = 8;
static_assert(kAvx2WidenBlocks * 8 * 512 <= 32768, "int16 partial sums must not overflow");

BITNET_AVX2 void TernaryGroup1Avx2(const int8_t* x, const int32_t* x_sum, int64_t kb,
                                   const uint8_t* w_g, int64_t n0, int64_t n_total, int32_t* out) {
  const __m256i mask = _mm256_set1_epi8(3);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[kRowsPerGroup];
  for (int r = 0; r < kRowsPerGroup; ++r) acc[r] = _mm256_setzero_si256();
  for (int64_t b0 = 0; b0 < kb; b0 += kAvx2WidenBlocks) {
    const int64_t b_end = std::min(kb, b0 + kAvx2WidenBlocks);
    __m256i part[kRowsPerGroup];
    for (int r = 0; r < kRowsPerGroup; ++r) part[r] = _mm256_setzero_si256();
    for (int64_t b = b0; b < b_end; ++b) {
      const uint8_t* block = w_g + b * kGroupBlockBytes;
      const int8_t* x_b = x + b * kBlockK;
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        __m256i packed[kRowsPerGroup];
        for (int r = 0; r < kRowsPerGroup; ++r)
          packed[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + r * kBlockBytes + 32 * h));
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) {
          const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x_b + 64 * j + 32 * h));
#pragma GCC unroll 4
          for (int r = 0; r < kRowsPerGroup; ++r) {
            const __m256i codes = _mm256_and_si256(packed[r], mask);
            packed[r] = _mm256_srli_epi16(packed[r], 2);
            MaddubsAdd(part[r], codes, xv);
          }
        }
      }
    }
    for (int r = 0; r < kRowsPerGroup; ++r) acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(part[r], ones));
  }
  for (int r = 0; r < kRowsPerGroup && n0 + r < n_total; ++r) out[n0 + r] = HsumAvx2(acc[r]) - x_sum[0];
}

template <int MT>
BITNET_AVX2 void TernaryGroupAvx2(const int8_t* x, int64_t kp, const int32_t* x_sum, int64_t kb,
                                  const uint8_t* w_g, int64_t n0, int64_t n_total, int32_t* acc) {
  if constexpr (MT == 1) {
    TernaryGroup1Avx2(x, x_sum, kb, w_g, n0, n_total, acc);
  } else {
    // Row by row, each pass reads 64 of every 256 bytes of the group, which the hardware
    // prefetcher does not follow: each row's pass fetches the same row of the next group (the
    // stream's next kb * 256 bytes; past the weights after the last group: harmless) block by
    // block, into L1 from 3 activation rows and into L2 at 2, whose faster passes need L1's fill
    // buffers for their own loads. One Zen 4 core from memory, against the whole next group
    // fetched into L2 at the tile's start (itself 0.7-0.94x the time of no software fetch):
    // 2560 x 6912 at 3-16 rows 0.80-0.91x, 6912 x 2560 at 2-8 rows 0.77-0.89x (benchmarks/RESULTS.md).
    for (int64_t r = 0; r < kRowsPerGroup && n0 + r < n_total; ++r) {
      TernaryRowAvx2<MT>(x, kp, x_sum, kb, w_g + r * kBlockBytes, acc + n0 + r, n_total);
    }
  }
}

// Int8 x int8 against the int8 rows (the lm_head), widened to int16 and multiplied with madd:
// exact for every int8 pair, including -128 (the sign/abs tricks of maddubs are not). The
// activations are widened once for a share of output rows (Int8RowsGemvAvx2: x16, [rows, kp]; a
// thread's chunk covers thousands of head rows, each as many multiply-adds as x16 has elements),
// so that the inner loop loads them as they are; a tile is R weight rows x MT activation rows:
// per 16 inputs R widening loads of weights, MT loads and R * MT madd. One Zen 4 core, 8 rows:
// 2560 x 256 from L2 108 -> 149 GOPS against one weight row x 4 activation rows widened again for
// every weight row; 2560 x 128256 from memory 61 -> 40-43 ms. The weight stream is fetched into
// L2 ahead (kInt8PrefetchBytes).
template <int R, int MT>
BITNET_AVX2 void Int8BlockAvx2(const int16_t* x16, int64_t kp, const int8_t* w_rows, int32_t* out,
                               int64_t out_stride) {
  __m256i acc[R][MT];
  for (int r = 0; r < R; ++r)
    for (int mi = 0; mi < MT; ++mi) acc[r][mi] = _mm256_setzero_si256();
  for (int64_t k = 0; k < kp; k += 16) {
    __m256i wv[R];
    for (int r = 0; r < R; ++r) {
      if (k % 64 == 0) PrefetchL2At(w_rows + r * kp, k + kInt8PrefetchBytes);
      wv[r] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w_rows + r * kp + k)));
    }
    for (int mi = 0; mi < MT; ++mi) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x16 + mi * kp + k));
      for (int r = 0; r < R; ++r) acc[r][mi] = _mm256_add_epi32(acc[r][mi], _mm256_madd_epi16(wv[r], xv));
    }
  }
  for (int r = 0; r < R; ++r)
    for (int mi = 0; mi < MT; ++mi) out[mi * out_stride + r] = HsumAvx2(acc[r][mi]);
}

// Decode: one weight row against the one widened activation row, 64 inputs a step into four
// sums. One sequential stream that the hardware prefetcher follows: fetching it ahead into L2 in
// software (as Int8BlockAvx2 does) made the 2B4T head slower in the model, as did 4 weight rows a
// tile (four streams) despite being faster from the LLC (benchmarks/RESULTS.md).
BITNET_AVX2 inline int32_t Int8RowOneAvx2(const int16_t* x16, int64_t kp, const int8_t* w_row) {
  static_assert(kInt8RowAlign % 64 == 0, "Kp is whole steps of 64 inputs");
  __m256i sum[4];
  for (int i = 0; i < 4; ++i) sum[i] = _mm256_setzero_si256();
  for (int64_t k = 0; k < kp; k += 64) {
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
      const __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w_row + k + 16 * i)));
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x16 + k + 16 * i));
      sum[i] = _mm256_add_epi32(sum[i], _mm256_madd_epi16(wv, xv));
    }
  }
  return HsumAvx2(_mm256_add_epi32(_mm256_add_epi32(sum[0], sum[1]), _mm256_add_epi32(sum[2], sum[3])));
}

template <int R>
BITNET_AVX2 void Int8BlocksAvx2(const int16_t* x16, int64_t rows, int64_t kp, const int8_t* w_rows, int32_t* out,
                                int64_t out_stride) {
  int64_t m = 0;
  for (; m + 4 <= rows; m += 4) Int8BlockAvx2<R, 4>(x16 + m * kp, kp, w_rows, out + m * out_stride, out_stride);
  switch (rows - m) {
    case 3: Int8BlockAvx2<R, 3>(x16 + m * kp, kp, w_rows, out + m * out_stride, out_stride); break;
    case 2: Int8BlockAvx2<R, 2>(x16 + m * kp, kp, w_rows, out + m * out_stride, out_stride); break;
    case 1: Int8BlockAvx2<R, 1>(x16 + m * kp, kp, w_rows, out + m * out_stride, out_stride); break;
    default: break;
  }
}

// The int8 rows [n_begin, n_end) against `rows` activation rows: pairs of weight rows (and a
// last odd one) against every 4 activation rows in turn, the later passes reading them from L1.
// One activation row (decode) takes Int8RowOneAvx2, row after row.
BITNET_AVX2 void Int8RowsGemvAvx2(const int8_t* x_q, int64_t rows, int64_t kp, const int8_t* w, int64_t n_begin,
                                  int64_t n_end, int64_t n_total, int32_t* acc) {
  thread_local std::vector<int16_t> x16_storage;
  int16_t* x16 = CacheLineScratch(x16_storage, rows * kp);
  for (int64_t i = 0; i < rows * kp; i += 16) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(x16 + i),
                        _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x_q + i))));
  }
  int64_t n0 = n_begin;
  if (rows == 1) {
    for (; n0 < n_end; ++n0) acc[n0] = Int8RowOneAvx2(x16, kp, w + n0 * kp);
    return;
  }
  for (; n0 + 2 <= n_end; n0 += 2) Int8BlocksAvx2<2>(x16, rows, kp, w + n0 * kp, acc + n0, n_total);
  if (n0 < n_end) Int8BlocksAvx2<1>(x16, rows, kp, w + n0 * kp, acc + n0, n_total);
}

// ---------------------------------------------------------------------------------------------
// AVX-512 VNNI

// (GCC 12's HsumAvx512 trips -Wmaybe-uninitialized in its own header.)
BITNET_AVX512 inline int32_t HsumAvx512(__m512i v) {
  const __m256i s = _mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1));
  __m128i t = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, _MM_SHUFFLE(1, 0, 3, 2)));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(t);
}

// All 4 rows of a group against MT activation rows: 4 * MT accumulators. Each 64-byte row block
// is loaded once; shifted by 2j and masked it is the codes of k = 64j..64j+63, multiplied with
// one 64-byte load of activations by vpdpbusd (u8 code x s8 activation, 4-way sums into int32).
template <int MT>
BITNET_AVX512 void TernaryGroupAvx512(const int8_t* x, int64_t kp, const int32_t* x_sum,
                                      int64_t kb, const uint8_t* w_g, int64_t n0, int64_t n_total,
                                      int32_t* acc_out) {
  const __m512i mask = _mm512_set1_epi8(3);
  __m512i acc[kRowsPerGroup][MT];
#pragma GCC unroll 4
  for (int r = 0; r < kRowsPerGroup; ++r)
#pragma GCC unroll 8
    for (int mi = 0; mi < MT; ++mi) acc[r][mi] = _mm512_setzero_si512();
  for (int64_t b = 0; b < kb; ++b) {
    const uint8_t* block = w_g + b * kGroupBlockBytes;
    const int8_t* x_b = x + b * kBlockK;
    // At one and two activation rows the hardware prefetcher follows the stream alone, and
    // faster: one Zen 4 thread, 2B4T decode 27.4-29.6 -> 32.3-33.2 tok/s without this (two
    // threads level); one core, 2 rows of 2560 x 6912 from memory 315-327 -> 243-251 us (6912 x
    // 2560: 355-427 -> 278-306), while 3 rows lost without it (6912 x 2560: 422-438 -> 558-570;
    // benchmarks/RESULTS.md). The AVX2 one-row tile does the same (TernaryGroup1Avx2).
    if (MT > 2)
      for (int line = 0; line < 4; ++line) PrefetchAt(block, kPrefetchBlocks * kGroupBlockBytes + 64 * line);
    __m512i packed[kRowsPerGroup];
    for (int r = 0; r < kRowsPerGroup; ++r) packed[r] = _mm512_loadu_si512(block + r * kBlockBytes);
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      __m512i xv[MT];
      for (int mi = 0; mi < MT; ++mi) xv[mi] = _mm512_loadu_si512(x_b + mi * kp + 64 * j);
      for (int r = 0; r < kRowsPerGroup; ++r) {
        const __m512i codes = _mm512_and_si512(packed[r], mask);
        packed[r] = _mm512_srli_epi16(packed[r], 2);
        for (int mi = 0; mi < MT; ++mi) Dpbusd(acc[r][mi], codes, xv[mi]);
      }
    }
  }
  // Loops of constant length, so that the accumulators can live in registers: with the row test
  // in the loop's condition GCC kept them in memory, loaded and stored at every block (8 rows
  // took 1.3-1.5x as long on an Ice Lake Xeon core).
#pragma GCC unroll 4
  for (int r = 0; r < kRowsPerGroup; ++r) {
    if (n0 + r >= n_total) continue;
#pragma GCC unroll 8
    for (int mi = 0; mi < MT; ++mi) acc_out[mi * n_total + n0 + r] = HsumAvx512(acc[r][mi]) - x_sum[mi];
  }
}

// 5 activation rows take one 4 x 5 tile (20 accumulators) rather than a 4 x 4 and a 4 x 1, which
// read every block twice: one Ice Lake Xeon core, 2560 x 6912, 495-497 -> 401-405 us (LLC),
// 599-635 -> 498-542 (memory). A 4 x 6 tile (24 accumulators, 6 activation registers) spilled
// and was no faster at 6 rows, 6 + 1 slower at 7, so 6 and 7 rows stay 4 + 2 and 4 + 3.
constexpr int kAvx512FiveRowTile = 5;

// 8 activation rows: a row group's rows two at a time, 16 accumulators. An unpacked code register
// feeds 8 vpdpbusd where the 4 x 4 tile's feeds 4, so the mask and shift that unpack it (which
// share vpdpbusd's two ports) cost half as much per multiply-add; the 16 sums leave together
// (Sum16x16). Each pair passes over the chunk's blocks [b_begin, b_end) of its two rows, whose
// lines an earlier pass fetched (kPairPassesAhead). acc_out is set (b_begin = 0: minus x_sum) or
// added to.
constexpr int kPairTileRows = 8;
// How far ahead the pair tiles fetch, in passes over a chunk (half a row group's bytes each): the
// first pair's pass fetching the whole group 8 blocks ahead asked the stream for all of it in
// half the time, then nothing. One Zen 4 core, 8 rows from memory, medians of 8 alternated runs:
// 2560 x 6912 801 -> 734 us, 6912 x 2560 873 -> 820 (2 passes ahead: between the two; fetching
// into L2 only: slower; benchmarks/RESULTS.md).
constexpr int kPairPassesAhead = 3;

BITNET_AVX512 void TernaryPairsAvx512(const int8_t* x, int64_t kp, const int32_t* x_sum, int64_t kb, int64_t b_begin,
                                      int64_t b_end, const uint8_t* w_g, int64_t n0, int64_t n_total,
                                      int32_t* acc_out) {
  constexpr int MT = kPairTileRows;
  const __m512i mask = _mm512_set1_epi8(3);
  for (int pair = 0; pair < 2; ++pair) {
    if (n0 + 2 * pair >= n_total) break;
    __m512i acc[2 * MT];  // output row 2 pair + r, activation row mi: acc[r * MT + mi]
#pragma GCC unroll 16
    for (int o = 0; o < 2 * MT; ++o) acc[o] = _mm512_setzero_si512();
    for (int64_t b = b_begin; b < b_end; ++b) {
      const uint8_t* block = w_g + b * kGroupBlockBytes;
      const int8_t* x_b = x + b * kBlockK;
      // Each pass over the chunk fetches the lines that the pass three after it reads (the task's
      // passes: group g's pair 0, its pair 1, group g + 1's pair 0, ...; the next call takes group
      // g + 1, kb blocks on), so the stream is asked for evenly: 128 bytes a block in either pair.
      {
        const int ahead = pair + kPairPassesAhead;
        const int64_t line = ((ahead / 2) * kb + b) * kGroupBlockBytes + 2 * (ahead % 2) * kBlockBytes;
        PrefetchAt(w_g, line);
        PrefetchAt(w_g, line + kBlockBytes);
      }
      __m512i p0 = _mm512_loadu_si512(block + (2 * pair) * kBlockBytes);
      __m512i p1 = _mm512_loadu_si512(block + (2 * pair + 1) * kBlockBytes);
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        const __m512i c0 = _mm512_and_si512(p0, mask), c1 = _mm512_and_si512(p1, mask);
        p0 = _mm512_srli_epi16(p0, 2);
        p1 = _mm512_srli_epi16(p1, 2);
#pragma GCC unroll 8
        for (int mi = 0; mi < MT; ++mi) {
          const __m512i xv = _mm512_loadu_si512(x_b + mi * kp + 64 * j);
          Dpbusd(acc[mi], c0, xv);
          Dpbusd(acc[MT + mi], c1, xv);
        }
      }
    }
    __m512i sums = Sum16x16(acc);  // lane r * MT + mi (x86_simd.h)
    if (b_begin == 0) {
      const __m256i x_sums = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x_sum));
      sums = _mm512_sub_epi32(sums, _mm512_inserti64x4(_mm512_castsi256_si512(x_sums), x_sums, 1));
    }
    alignas(64) int32_t lanes[2 * MT];
    _mm512_store_si512(lanes, sums);
    for (int r = 0; r < 2 && n0 + 2 * pair + r < n_total; ++r) {
      for (int mi = 0; mi < MT; ++mi) {
        int32_t& out = acc_out[mi * n_total + n0 + 2 * pair + r];
        out = b_begin == 0 ? lanes[r * MT + mi] : out + lanes[r * MT + mi];
      }
    }
  }
}

// Prefill, many activation rows: panels of 32 output rows (8 groups) whose codes are unpacked
// once into the order vpdpbusd wants them: for every k-quad q (k = 4q..4q+3), the 4 codes of each
// of the 32 rows, i.e. two registers of 16 lanes, one output row per lane. The micro-kernel
// broadcasts one quad of activations per x row and accumulates 16 whole outputs per register:
// no horizontal sums, and results leave as vector stores. Per quad step: 2 code loads and MT
// broadcasts feed 2 * MT vpdpbusd.
constexpr int64_t kPanelRows = 32;
constexpr int64_t kPanelGroups = kPanelRows / kRowsPerGroup;
constexpr int kPanelTileRows = 12;  // 2 x 12 accumulators + 2 code registers
// AVX2 has no panel path: both it and the GEMV tiles issue a maddubs and an int16 add per 32
// multiply-adds, and a maddubs panel kernel was no faster (benchmarks/RESULTS.md).
// Fewer activation rows take the GEMV tiles, which need no unpacking (8-16 rows: the pair tiles).
// On the Xeon the 4-row tiles were the faster up to 16 rows, the panels from 24. The pair tiles
// took 0.90-0.92x the panels' time at 24 and 32 rows on one core, but 0.96-1.11x with two threads
// (within that host's noise; benchmarks/RESULTS.md), so the threshold stays.
constexpr int64_t kPanelMinRows = 17;
// K chunk: 32 x 1024 codes + 12 x 1024 activations = 44 KB, within a 48 KB L1.
constexpr int64_t kPanelChunkQuads = 256;

}  // namespace

// codes_q: [(b_end - b_begin) * kBlockK / 4][kPanelRows][4] int8, quads from block b_begin's
// first. Packed dword d of a row block holds, at shift 2j, the codes of quad 16j + d of the block;
// transposing 16 rows' blocks puts dword d of every row in one register, which shifted and masked
// is that quad for 16 output rows. Rows at or past group `g_end` get code 1 (t = 0); their outputs
// are never stored.
static BITNET_AVX512 void UnpackPanelAvx512(const uint8_t* w, int64_t kb, int64_t g0, int64_t g_end, int64_t b_begin,
                                     int64_t b_end, int8_t* codes_q) {
  const __m512i mask = _mm512_set1_epi8(3);
  for (int64_t b = b_begin; b < b_end; ++b) {
    for (int64_t half = 0; half < kPanelRows / 16; ++half) {
      __m512i r[16];
      for (int64_t i = 0; i < 16; ++i) {
        const int64_t pr = 16 * half + i, g = g0 + pr / kRowsPerGroup;
        r[i] = g < g_end ? _mm512_loadu_si512(w + (g * kb + b) * kGroupBlockBytes + (pr % kRowsPerGroup) * kBlockBytes)
                         : _mm512_set1_epi8(0x55);
      }
      Transpose16x16(r);
      for (int j = 0; j < 4; ++j) {
        for (int d = 0; d < 16; ++d) {
          const int64_t q = (b - b_begin) * (kBlockK / 4) + 16 * j + d;
          _mm512_storeu_si512(codes_q + (q * kPanelRows + 16 * half) * 4,
                              _mm512_and_si512(_mm512_srli_epi32(r[d], 2 * j), mask));
        }
      }
    }
  }
}

namespace {

// MT activation rows x one panel, over the k-quads [q_begin, q_end), whose codes codes_q holds:
// acc_out[m, n0 + i] for i < 32 and n0 + i < n_end is set (first K chunk: minus x_sum[m], for
// t = code - 1) or added to.
template <int MT>
BITNET_AVX512 void PanelTileAvx512(const int8_t* x, int64_t kp, const int32_t* x_sum,
                                   const int8_t* codes_q, int64_t q_begin, int64_t q_end, int64_t n0,
                                   int64_t n_end, int64_t n_total, int32_t* acc_out) {
  __m512i acc[MT][2];
#pragma GCC unroll 16
  for (int mi = 0; mi < MT; ++mi) acc[mi][0] = acc[mi][1] = _mm512_setzero_si512();
  const int32_t* x32 = reinterpret_cast<const int32_t*>(x);
  const int64_t kq = kp / 4;  // quads per x row
  for (int64_t q = q_begin; q < q_end; ++q) {
    const __m512i c0 = _mm512_loadu_si512(codes_q + (q - q_begin) * kPanelRows * 4);
    const __m512i c1 = _mm512_loadu_si512(codes_q + (q - q_begin) * kPanelRows * 4 + 64);
#pragma GCC unroll 16
    for (int mi = 0; mi < MT; ++mi) {
      const __m512i xv = _mm512_set1_epi32(x32[mi * kq + q]);
      Dpbusd(acc[mi][0], c0, xv);
      Dpbusd(acc[mi][1], c1, xv);
    }
  }
  const int64_t valid = std::min<int64_t>(kPanelRows, n_end - n0);
  const __mmask16 m0 = valid >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << valid) - 1);
  const __mmask16 m1 = valid >= 32 ? 0xFFFF : valid <= 16 ? 0 : static_cast<__mmask16>((1u << (valid - 16)) - 1);
  const bool first = q_begin == 0;
#pragma GCC unroll 16
  for (int mi = 0; mi < MT; ++mi) {
    int32_t* out = acc_out + mi * n_total + n0;
    const __m512i base0 = first ? _mm512_set1_epi32(-x_sum[mi]) : _mm512_maskz_loadu_epi32(m0, out);
    const __m512i base1 = first ? _mm512_set1_epi32(-x_sum[mi]) : _mm512_maskz_loadu_epi32(m1, out + 16);
    _mm512_mask_storeu_epi32(out, m0, _mm512_add_epi32(acc[mi][0], base0));
    _mm512_mask_storeu_epi32(out + 16, m1, _mm512_add_epi32(acc[mi][1], base1));
  }
}

// Up to 4 int8 weight rows against MT activation rows, one weight row after the other: each row
// is one sequential stream (4 rows side by side, 4 streams 2.5 KB apart, ran at half the speed on
// a Zen 4: benchmarks/RESULTS.md). vpdpbusd wants one unsigned operand: the weights, as
// w ^ 0x80 = w + 128 (exact for every int8), so the sum is sum_k w x + 128 * x_sum[m].
template <int MT>
BITNET_AVX512 void Int8RowsAvx512(const int8_t* x, const int32_t* x_sum, int64_t kp, const int8_t* w,
                                  int64_t n0, int64_t n_rows, int64_t n_total, int32_t* acc_out) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t r = 0; r < n_rows; ++r) {
    const int8_t* w_row = w + (n0 + r) * kp;
    __m512i acc[MT];
    for (int mi = 0; mi < MT; ++mi) acc[mi] = _mm512_setzero_si512();
    for (int64_t k = 0; k < kp; k += 64) {
      // The stream ahead, for several activation rows: there the hardware prefetcher alone
      // left a Zen 4 core waiting. At one row it keeps up by itself, and fetching ahead made the
      // 2B4T head slower (one thread: 14.2-17.0 -> 10.5-10.6 ms without; benchmarks/RESULTS.md).
      // Past the end of the weights it is harmless (a prefetch never faults).
      if (MT > 1) PrefetchL2At(w_row, k + kInt8PrefetchBytes);
      const __m512i wv = _mm512_xor_si512(_mm512_loadu_si512(w_row + k), flip);
      for (int mi = 0; mi < MT; ++mi) Dpbusd(acc[mi], wv, _mm512_loadu_si512(x + mi * kp + k));
    }
    for (int mi = 0; mi < MT; ++mi) acc_out[mi * n_total + n0 + r] = HsumAvx512(acc[mi]) - 128 * x_sum[mi];
  }
}

// ---------------------------------------------------------------------------------------------
// The kernels as tiles for ForRowTiles.

template <int MT>
struct TernaryTileAvx2 {
  static void Run(const int8_t* x, const int32_t* x_sum, int32_t* acc, int64_t kp, int64_t kb,
                  const uint8_t* w_g, int64_t n0, int64_t n_total) {
    TernaryGroupAvx2<MT>(x, kp, x_sum, kb, w_g, n0, n_total, acc);
  }
};

template <int MT>
struct TernaryTileAvx512 {
  static void Run(const int8_t* x, const int32_t* x_sum, int32_t* acc, int64_t kp, int64_t kb,
                  const uint8_t* w_g, int64_t n0, int64_t n_total) {
    TernaryGroupAvx512<MT>(x, kp, x_sum, kb, w_g, n0, n_total, acc);
  }
};

template <int MT>
struct PanelTileAvx512Op {
  static void Run(const int8_t* x, const int32_t* x_sum, int32_t* acc, int64_t kp,
                  const int8_t* codes_q, int64_t q_begin, int64_t q_end, int64_t n0, int64_t n_end,
                  int64_t n_total) {
    PanelTileAvx512<MT>(x, kp, x_sum, codes_q, q_begin, q_end, n0, n_end, n_total, acc);
  }
};

template <int MT>
struct Int8TileAvx512 {
  static void Run(const int8_t* x, const int32_t* x_sum, int32_t* acc, int64_t kp, const int8_t* w,
                  int64_t n0, int64_t n_rows, int64_t n_total) {
    Int8RowsAvx512<MT>(x, x_sum, kp, w, n0, n_rows, n_total, acc);
  }
};

// Batched decode against the int8 rows (the lm_head at 8 or more activation rows): 2 weight rows
// x 8 activation rows, 16 accumulators, so that each loaded vector feeds several vpdpbusd: per 64
// inputs 10 loads and 2 flips for 16 vpdpbusd, where a weight row against 4 activation rows takes
// 5 loads and a flip for 4. One Zen 4 core, 8 rows of 2560 x 256 from L2: 311 -> 405 GOPS (86%
// of its peak). 4 weight rows x 4 activation rows ran at 421 GOPS from L2 but slower than the
// rows kernel from memory (4 streams side by side again). The 16 sums leave together
// (Sum16x16: lane r * 8 + mi).
constexpr int kInt8PairRows = 8;

BITNET_AVX512 void Int8PairAvx512(const int8_t* x, const int32_t* x_sum, int64_t kp, const int8_t* w, int64_t n0,
                                  int64_t n_total, int32_t* acc_out) {
  constexpr int MT = kInt8PairRows;
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512i acc[2 * MT];
#pragma GCC unroll 16
  for (int o = 0; o < 2 * MT; ++o) acc[o] = _mm512_setzero_si512();
  const int8_t* w0 = w + n0 * kp;
  const int8_t* w1 = w0 + kp;
  for (int64_t k = 0; k < kp; k += 64) {
    PrefetchL2At(w0, k + kInt8PrefetchBytes);
    PrefetchL2At(w1, k + kInt8PrefetchBytes);
    const __m512i v0 = _mm512_xor_si512(_mm512_loadu_si512(w0 + k), flip);
    const __m512i v1 = _mm512_xor_si512(_mm512_loadu_si512(w1 + k), flip);
#pragma GCC unroll 8
    for (int mi = 0; mi < MT; ++mi) {
      const __m512i xv = _mm512_loadu_si512(x + mi * kp + k);
      Dpbusd(acc[mi], v0, xv);
      Dpbusd(acc[MT + mi], v1, xv);
    }
  }
  alignas(64) int32_t lanes[2 * MT];
  _mm512_store_si512(lanes, Sum16x16(acc));
  for (int r = 0; r < 2; ++r)
    for (int mi = 0; mi < MT; ++mi) acc_out[mi * n_total + n0 + r] = lanes[r * MT + mi] - 128 * x_sum[mi];
}

// The int8 rows [n_begin, n_end) against kInt8PairRows or more activation rows: pairs of weight
// rows by Int8PairAvx512, each pair against every 8 activation rows in turn (the later passes
// read the pair from L1), the activation rows left (fewer than 8) and a last odd weight row by
// the rows kernel.
void Int8PairsGemv(const int8_t* x_q, const int32_t* x_sum, int64_t rows, int64_t kp, const int8_t* w,
                   int64_t n_begin, int64_t n_end, int64_t n_total, int32_t* acc) {
  int64_t n0 = n_begin;
  for (; n0 + 2 <= n_end; n0 += 2) {
    int64_t m = 0;
    for (; m + kInt8PairRows <= rows; m += kInt8PairRows)
      Int8PairAvx512(x_q + m * kp, x_sum + m, kp, w, n0, n_total, acc + m * n_total);
    if (m < rows)
      ForRowTiles<Int8TileAvx512>(rows - m, kp, x_q + m * kp, x_sum + m, acc + m * n_total, n_total, kp, w, n0,
                                  int64_t{2}, n_total);
  }
  if (n0 < n_end) ForRowTiles<Int8TileAvx512>(rows, kp, x_q, x_sum, acc, n_total, kp, w, n0, n_end - n0, n_total);
}

// The pair tiles' K chunk, in row blocks: a tile's activations (8 rows x 256 bytes a block) stay
// in L1 while the task's row groups pass over them if they fill at most 3/4 of it. On the Ice
// Lake Xeon (48 KB) that is 18 blocks: K = 6912 in two chunks of 14, which ran 6% faster than
// chunks of 9 and 25% faster than the whole 27 (55 KB, read from L2: slower than two 4-row
// tiles). On a Zen 4 (32 KB) 12 blocks: K = 2560 in one chunk (20 KB) rather than two of 5, whose
// weight stream skips half of each row group's bytes on each pass: one core, 8 rows of
// 2560 x 6912 from memory 946-956 -> 759-779 us (K = 6912 in chunks of 9 either way;
// benchmarks/RESULTS.md).
int64_t PairChunkBlocks() {
  return std::max<int64_t>(1, L1DataBytes() * 3 / 4 / (kPairTileRows * kBlockK));
}

// 8 to 16 activation rows on AVX-512: tiles of 8 rows by TernaryPairsAvx512, K in equal chunks of
// at most PairChunkBlocks() row blocks; the rows left (up to 7) by the 4-row tiles.
void TernaryPairsGemv(const int8_t* x_q, const int32_t* x_sum, int64_t rows, int64_t kb, const uint8_t* w,
                      int64_t g_begin, int64_t g_end, int64_t n_total, int32_t* acc) {
  const int64_t kp = kb * kBlockK;
  const int64_t chunk = CeilDiv(kb, CeilDiv(kb, PairChunkBlocks()));
  int64_t m = 0;
  for (; m + kPairTileRows <= rows; m += kPairTileRows) {
    for (int64_t b0 = 0; b0 < kb; b0 += chunk) {
      for (int64_t g = g_begin; g < g_end; ++g) {
        TernaryPairsAvx512(x_q + m * kp, kp, x_sum + m, kb, b0, std::min(kb, b0 + chunk),
                           w + g * kb * kGroupBlockBytes, g * kRowsPerGroup, n_total, acc + m * n_total);
      }
    }
  }
  if (m < rows)
    TernaryGroupsGemv<TernaryTileAvx512>(x_q + m * kp, x_sum + m, rows - m, kb, w, g_begin, g_end, n_total,
                                         acc + m * n_total);
}

}  // namespace

int64_t TernaryGroupsPerTaskX86(Isa isa, int64_t rows) {
  return isa == Isa::kAvx512Vnni && rows >= kPanelMinRows ? kPanelGroups : 1;
}

void TernaryGemmI32X86(Isa isa, const int8_t* x_q, const int32_t* x_sum, int64_t rows, int64_t kb,
                       const uint8_t* w, int64_t g_begin, int64_t g_end, int64_t n_total,
                       int32_t* acc) {
  // Prefill: panel by panel (see PanelTileAvx512).
  if (isa == Isa::kAvx512Vnni && rows >= kPanelMinRows) {
    TernaryPanels<PanelTileAvx512Op, kPanelTileRows, kPanelRows, kPanelChunkQuads>(
        UnpackPanelAvx512, x_q, x_sum, rows, kb, w, g_begin, g_end, n_total, acc);
    return;
  }
  // Decode, and prefill on AVX2: the GEMV tiles.
  if (isa == Isa::kAvx512Vnni && rows >= kPairTileRows)
    TernaryPairsGemv(x_q, x_sum, rows, kb, w, g_begin, g_end, n_total, acc);
  else if (isa == Isa::kAvx512Vnni && rows == kAvx512FiveRowTile)
    TernaryGroupsGemv<TernaryTileAvx512, kAvx512FiveRowTile>(x_q, x_sum, rows, kb, w, g_begin, g_end, n_total, acc);
  else if (isa == Isa::kAvx512Vnni)
    TernaryGroupsGemv<TernaryTileAvx512>(x_q, x_sum, rows, kb, w, g_begin, g_end, n_total, acc);
  else
    TernaryGroupsGemv<TernaryTileAvx2>(x_q, x_sum, rows, kb, w, g_begin, g_end, n_total, acc);
}

void Int8GemmI32X86(Isa isa, const int8_t* x_q, const int32_t* x_sum, int64_t rows, int64_t kp, const int8_t* w,
                    int64_t n_begin, int64_t n_end, int64_t n_total, int32_t* acc) {
  if (isa == Isa::kAvx512Vnni && rows >= kInt8PairRows)
    Int8PairsGemv(x_q, x_sum, rows, kp, w, n_begin, n_end, n_total, acc);
  else if (isa == Isa::kAvx512Vnni)
    Int8RowsGemv<Int8TileAvx512>(x_q, x_sum, rows, kp, w, n_begin, n_end, n_total, acc);
  else
    Int8RowsGemvAvx2(x_q, rows, kp, w, n_begin, n_end, n_total, acc);
}

}  // namespace bitnet

#endif  // BITNET_JAX_X86_SIMD
