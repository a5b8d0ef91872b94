// Ternary and int8 integer matmul kernels: a scalar twin, AVX2 and AVX-512 VNNI.
//
// SIMD functions carry __attribute__((target(...))) so that the library is built for baseline
// x86-64 and still contains the wide paths; SelectIsa (cpu_isa.cc) decides at run time which one
// runs. Activation rows are processed in tiles of up to kMaxTileRows, so the unpacking of a
// weight block (shift + mask) is shared by every activation row of the tile; for decode (rows =
// 1..8) that makes the kernels stream the weights once at memory speed.

#include "gemm.h"

// GCC 12's AVX-512 headers build some results from _mm*_undefined_*() and then warn that they
// "may be used uninitialized"; the warning is about the header, not this code.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <algorithm>
#include <vector>

#include "layout.h"

namespace bitnet {

namespace {

constexpr int kMaxTileRows = 4;
// Activation rows per tile of the prefill kernel: 4 x 6 accumulators + 4 code registers + 1.
constexpr int kPrefillTileRows = 6;

// ---------------------------------------------------------------------------------------------
// Scalar twins: the layout read literally, one weight at a time.

void TernaryScalar(const int8_t* x_q, const int32_t* x_sum, int64_t rows, int64_t kb,
                   const uint8_t* w, int64_t g_begin, int64_t g_end, int64_t n_total,
                   int32_t* acc) {
  const int64_t kp = kb * kBlockK;
  for (int64_t g = g_begin; g < g_end; ++g) {
    const uint8_t* w_g = w + g * kb * kGroupBlockBytes;
    for (int64_t r = 0; r < kRowsPerGroup; ++r) {
      const int64_t n = g * kRowsPerGroup + r;
      if (n >= n_total) break;
      for (int64_t m = 0; m < rows; ++m) {
        const int8_t* x = x_q + m * kp;
        int32_t sum = 0;
        for (int64_t b = 0; b < kb; ++b) {
          const uint8_t* block = w_g + b * kGroupBlockBytes + r * kBlockBytes;
          for (int64_t k = 0; k < kBlockK; ++k) {
            const int32_t code = (block[CodeByte(k)] >> CodeShift(k)) & 3;
            sum += code * x[b * kBlockK + k];
          }
        }
        acc[m * n_total + n] = sum - x_sum[m];  // t = code - 1
      }
    }
  }
}

void Int8Scalar(const int8_t* x_q, int64_t rows, int64_t kp, const int8_t* w, int64_t n_begin,
                int64_t n_end, int64_t n_total, int32_t* acc) {
  for (int64_t n = n_begin; n < n_end; ++n) {
    for (int64_t m = 0; m < rows; ++m) {
      int32_t sum = 0;
      for (int64_t k = 0; k < kp; ++k) sum += int32_t{x_q[m * kp + k]} * int32_t{w[n * kp + k]};
      acc[m * n_total + n] = sum;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// AVX2

#define BITNET_AVX2 __attribute__((target("avx2,fma")))

BITNET_AVX2 inline int32_t HsumAvx2(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(s);
}

// One weight row (every block of row r of group w_g) against MT activation rows. A row block is
// two 32-byte halves; each half, shifted by 2j and masked, holds the codes of 32 consecutive k.
// maddubs(code u8 <= 2, x s8) sums pairs to at most 2 * 2 * 128 = 512 in int16, so the 8
// products of a block add up in int16 without saturation before widening once to int32.
template <int MT>
BITNET_AVX2 void TernaryRowAvx2(const int8_t* x, int64_t kp, const int32_t* x_sum, int64_t kb,
                                const uint8_t* w_row, int32_t* out, int64_t out_stride) {
  const __m256i mask = _mm256_set1_epi8(3);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[MT];
  for (int mi = 0; mi < MT; ++mi) acc[mi] = _mm256_setzero_si256();
  for (int64_t b = 0; b < kb; ++b) {
    const uint8_t* block = w_row + b * kGroupBlockBytes;
    const int8_t* x_b = x + b * kBlockK;
    __m256i part[MT];
    for (int mi = 0; mi < MT; ++mi) part[mi] = _mm256_setzero_si256();
    for (int h = 0; h < 2; ++h) {
      __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 32 * h));
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        const __m256i codes = _mm256_and_si256(packed, mask);
        packed = _mm256_srli_epi16(packed, 2);
        for (int mi = 0; mi < MT; ++mi) {
          const __m256i xv = _mm256_loadu_si256(
              reinterpret_cast<const __m256i*>(x_b + mi * kp + 64 * j + 32 * h));
          part[mi] = _mm256_add_epi16(part[mi], _mm256_maddubs_epi16(codes, xv));
        }
      }
    }
    for (int mi = 0; mi < MT; ++mi) acc[mi] = _mm256_add_epi32(acc[mi], _mm256_madd_epi16(part[mi], ones));
  }
  for (int mi = 0; mi < MT; ++mi) out[mi * out_stride] = HsumAvx2(acc[mi]) - x_sum[mi];
}

template <int MT>
BITNET_AVX2 void TernaryGroupAvx2(const int8_t* x, int64_t kp, const int32_t* x_sum, int64_t kb,
                                  const uint8_t* w_g, int64_t n0, int64_t n_total, int32_t* acc) {
  for (int64_t r = 0; r < kRowsPerGroup && n0 + r < n_total; ++r) {
    TernaryRowAvx2<MT>(x, kp, x_sum, kb, w_g + r * kBlockBytes, acc + n0 + r, n_total);
  }
}

// Int8 x int8 widened to int16 and multiplied with madd: exact for every int8 pair, including
// -128 (the sign/abs tricks of maddubs are not).
template <int MT>
BITNET_AVX2 void Int8RowAvx2(const int8_t* x, int64_t kp, const int8_t* w_row, int32_t* out,
                             int64_t out_stride) {
  __m256i acc[MT];
  for (int mi = 0; mi < MT; ++mi) acc[mi] = _mm256_setzero_si256();
  for (int64_t k = 0; k < kp; k += 16) {
    const __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w_row + k)));
    for (int mi = 0; mi < MT; ++mi) {
      const __m256i xv =
          _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + mi * kp + k)));
      acc[mi] = _mm256_add_epi32(acc[mi], _mm256_madd_epi16(wv, xv));
    }
  }
  for (int mi = 0; mi < MT; ++mi) out[mi * out_stride] = HsumAvx2(acc[mi]);
}

// ---------------------------------------------------------------------------------------------
// AVX-512 VNNI

#define BITNET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

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
  for (int r = 0; r < kRowsPerGroup; ++r)
    for (int mi = 0; mi < MT; ++mi) acc[r][mi] = _mm512_setzero_si512();
  for (int64_t b = 0; b < kb; ++b) {
    const uint8_t* block = w_g + b * kGroupBlockBytes;
    const int8_t* x_b = x + b * kBlockK;
    _mm_prefetch(reinterpret_cast<const char*>(block + 8 * kGroupBlockBytes), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(block + 8 * kGroupBlockBytes + 64), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(block + 8 * kGroupBlockBytes + 128), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(block + 8 * kGroupBlockBytes + 192), _MM_HINT_T0);
    __m512i packed[kRowsPerGroup];
    for (int r = 0; r < kRowsPerGroup; ++r) packed[r] = _mm512_loadu_si512(block + r * kBlockBytes);
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      __m512i xv[MT];
      for (int mi = 0; mi < MT; ++mi) xv[mi] = _mm512_loadu_si512(x_b + mi * kp + 64 * j);
      for (int r = 0; r < kRowsPerGroup; ++r) {
        const __m512i codes = _mm512_and_si512(packed[r], mask);
        packed[r] = _mm512_srli_epi16(packed[r], 2);
        for (int mi = 0; mi < MT; ++mi) acc[r][mi] = _mm512_dpbusd_epi32(acc[r][mi], codes, xv[mi]);
      }
    }
  }
  for (int r = 0; r < kRowsPerGroup && n0 + r < n_total; ++r)
    for (int mi = 0; mi < MT; ++mi)
      acc_out[mi * n_total + n0 + r] = HsumAvx512(acc[r][mi]) - x_sum[mi];
}

// Prefill: with many activation rows, a group's 4 weight rows are unpacked once into int8 codes
// [4][kp] (L1/L2-resident) and every row tile of x reads them with plain loads, so the inner loop
// is loads + vpdpbusd only (the unpacking shifts would otherwise compete for the same ports).
BITNET_AVX512 void UnpackGroupAvx512(const uint8_t* w_g, int64_t kb, int8_t* codes_rk) {
  const __m512i mask = _mm512_set1_epi8(3);
  const int64_t kp = kb * kBlockK;
  for (int64_t b = 0; b < kb; ++b) {
    for (int r = 0; r < kRowsPerGroup; ++r) {
      __m512i packed = _mm512_loadu_si512(w_g + b * kGroupBlockBytes + r * kBlockBytes);
      for (int j = 0; j < 4; ++j) {
        _mm512_storeu_si512(codes_rk + r * kp + b * kBlockK + 64 * j, _mm512_and_si512(packed, mask));
        packed = _mm512_srli_epi16(packed, 2);
      }
    }
  }
}

template <int MT>
BITNET_AVX512 void TernaryCodesAvx512(const int8_t* x, int64_t kp, const int32_t* x_sum,
                                      const int8_t* codes_rk, int64_t n0, int64_t n_total,
                                      int32_t* acc_out) {
  __m512i acc[kRowsPerGroup][MT];
  for (int r = 0; r < kRowsPerGroup; ++r)
    for (int mi = 0; mi < MT; ++mi) acc[r][mi] = _mm512_setzero_si512();
  for (int64_t k = 0; k < kp; k += 64) {
    __m512i codes[kRowsPerGroup];
    for (int r = 0; r < kRowsPerGroup; ++r) codes[r] = _mm512_loadu_si512(codes_rk + r * kp + k);
    for (int mi = 0; mi < MT; ++mi) {
      const __m512i xv = _mm512_loadu_si512(x + mi * kp + k);
      for (int r = 0; r < kRowsPerGroup; ++r) acc[r][mi] = _mm512_dpbusd_epi32(acc[r][mi], codes[r], xv);
    }
  }
  for (int r = 0; r < kRowsPerGroup && n0 + r < n_total; ++r)
    for (int mi = 0; mi < MT; ++mi)
      acc_out[mi * n_total + n0 + r] = HsumAvx512(acc[r][mi]) - x_sum[mi];
}

// Up to 4 int8 rows against MT activation rows. vpdpbusd wants one unsigned operand: use
// x + 128 (x ^ 0x80 as u8, exact for every int8) and subtract 128 * sum_k w[n, k], which a second
// vpdpbusd against a vector of ones accumulates on the side.
template <int MT>
BITNET_AVX512 void Int8RowsAvx512(const int8_t* x, int64_t kp, const int8_t* w, int64_t n0,
                                  int64_t n_rows, int64_t n_total, int32_t* acc_out) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const __m512i ones = _mm512_set1_epi8(1);
  __m512i acc[4][MT];
  __m512i w_sum[4];
  for (int r = 0; r < 4; ++r) {
    w_sum[r] = _mm512_setzero_si512();
    for (int mi = 0; mi < MT; ++mi) acc[r][mi] = _mm512_setzero_si512();
  }
  const int8_t* w_rows[4];
  for (int r = 0; r < 4; ++r) w_rows[r] = w + (n0 + std::min<int64_t>(r, n_rows - 1)) * kp;
  for (int64_t k = 0; k < kp; k += 64) {
    __m512i xv[MT];
    for (int mi = 0; mi < MT; ++mi) xv[mi] = _mm512_xor_si512(_mm512_loadu_si512(x + mi * kp + k), flip);
    for (int r = 0; r < 4; ++r) {
      // Four row streams: prefetch each well ahead, the hardware prefetcher tracks fewer.
      _mm_prefetch(reinterpret_cast<const char*>(w_rows[r] + k + 1024), _MM_HINT_T0);
      const __m512i wv = _mm512_loadu_si512(w_rows[r] + k);
      w_sum[r] = _mm512_dpbusd_epi32(w_sum[r], ones, wv);
      for (int mi = 0; mi < MT; ++mi) acc[r][mi] = _mm512_dpbusd_epi32(acc[r][mi], xv[mi], wv);
    }
  }
  for (int r = 0; r < n_rows; ++r) {
    const int32_t correction = 128 * HsumAvx512(w_sum[r]);
    for (int mi = 0; mi < MT; ++mi)
      acc_out[mi * n_total + n0 + r] = HsumAvx512(acc[r][mi]) - correction;
  }
}

// ---------------------------------------------------------------------------------------------
// Tiling over activation rows: full tiles of kMaxTileRows, then one smaller tile.

template <template <int> class Kernel, int Tile = kMaxTileRows, typename... Args>
void ForRowTiles(int64_t rows, int64_t kp, const int8_t* x_q, const int32_t* x_sum,
                 int32_t* acc, int64_t acc_stride, Args... args) {
  int64_t m = 0;
  for (; m + Tile <= rows; m += Tile)
    Kernel<Tile>::Run(x_q + m * kp, x_sum ? x_sum + m : nullptr, acc + m * acc_stride, args...);
  for (; m + kMaxTileRows <= rows; m += kMaxTileRows)
    Kernel<kMaxTileRows>::Run(x_q + m * kp, x_sum ? x_sum + m : nullptr, acc + m * acc_stride, args...);
  switch (rows - m) {
    case 3: Kernel<3>::Run(x_q + m * kp, x_sum ? x_sum + m : nullptr, acc + m * acc_stride, args...); break;
    case 2: Kernel<2>::Run(x_q + m * kp, x_sum ? x_sum + m : nullptr, acc + m * acc_stride, args...); break;
    case 1: Kernel<1>::Run(x_q + m * kp, x_sum ? x_sum + m : nullptr, acc + m * acc_stride, args...); break;
    default: break;
  }
}

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
struct TernaryCodesTileAvx512 {
  static void Run(const int8_t* x, const int32_t* x_sum, int32_t* acc, int64_t kp,
                  const int8_t* codes_rk, int64_t n0, int64_t n_total) {
    TernaryCodesAvx512<MT>(x, kp, x_sum, codes_rk, n0, n_total, acc);
  }
};

template <int MT>
struct Int8TileAvx2 {
  static void Run(const int8_t* x, const int32_t*, int32_t* acc, int64_t kp, const int8_t* w,
                  int64_t n0, int64_t n_rows, int64_t n_total) {
    for (int64_t r = 0; r < n_rows; ++r) Int8RowAvx2<MT>(x, kp, w + (n0 + r) * kp, acc + n0 + r, n_total);
  }
};

template <int MT>
struct Int8TileAvx512 {
  static void Run(const int8_t* x, const int32_t*, int32_t* acc, int64_t kp, const int8_t* w,
                  int64_t n0, int64_t n_rows, int64_t n_total) {
    Int8RowsAvx512<MT>(x, kp, w, n0, n_rows, n_total, acc);
  }
};

}  // namespace

void TernaryGemmI32(Isa isa, const int8_t* x_q, const int32_t* x_sum, int64_t rows, int64_t kb,
                    const uint8_t* w, int64_t g_begin, int64_t g_end, int64_t n_total,
                    int32_t* acc) {
  const int64_t kp = kb * kBlockK;
  if (isa == Isa::kScalar) {
    TernaryScalar(x_q, x_sum, rows, kb, w, g_begin, g_end, n_total, acc);
    return;
  }
  // Group-major: one group's weights (kb * 256 bytes) stay in L1 while every row tile of x
  // passes over them.
  if (isa == Isa::kAvx512Vnni && rows > kMaxTileRows) {
    std::vector<int8_t> codes_rk(kRowsPerGroup * kp);
    for (int64_t g = g_begin; g < g_end; ++g) {
      UnpackGroupAvx512(w + g * kb * kGroupBlockBytes, kb, codes_rk.data());
      ForRowTiles<TernaryCodesTileAvx512, kPrefillTileRows>(rows, kp, x_q, x_sum, acc, n_total, kp,
                                                            codes_rk.data(), g * kRowsPerGroup, n_total);
    }
    return;
  }
  for (int64_t g = g_begin; g < g_end; ++g) {
    const uint8_t* w_g = w + g * kb * kGroupBlockBytes;
    const int64_t n0 = g * kRowsPerGroup;
    if (isa == Isa::kAvx512Vnni)
      ForRowTiles<TernaryTileAvx512>(rows, kp, x_q, x_sum, acc, n_total, kp, kb, w_g, n0, n_total);
    else
      ForRowTiles<TernaryTileAvx2>(rows, kp, x_q, x_sum, acc, n_total, kp, kb, w_g, n0, n_total);
  }
}

void Int8GemmI32(Isa isa, const int8_t* x_q, int64_t rows, int64_t kp, const int8_t* w,
                 int64_t n_begin, int64_t n_end, int64_t n_total, int32_t* acc) {
  if (isa == Isa::kScalar) {
    Int8Scalar(x_q, rows, kp, w, n_begin, n_end, n_total, acc);
    return;
  }
  for (int64_t n0 = n_begin; n0 < n_end; n0 += 4) {
    const int64_t n_rows = std::min<int64_t>(4, n_end - n0);
    if (isa == Isa::kAvx512Vnni)
      ForRowTiles<Int8TileAvx512>(rows, kp, x_q, nullptr, acc, n_total, kp, w, n0, n_rows, n_total);
    else
      ForRowTiles<Int8TileAvx2>(rows, kp, x_q, nullptr, acc, n_total, kp, w, n0, n_rows, n_total);
  }
}

}  // namespace bitnet
