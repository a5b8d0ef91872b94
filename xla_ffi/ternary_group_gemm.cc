// The ternary kernel with a scale per group of G inputs (weight_quant 'group:G'; contract in gemm.h):
// a scalar twin, AVX2 and AVX-512 VNNI on x86-64, and NEON with the dot-product extension on
// aarch64 (plain NEON takes the scalar twin).
//
// A row's dot product is a float sum of exact per-group integer sums times the group's scale. As in
// the int4 kernel, every path keeps the same 8 float lanes, lane l holding the products at
// k % 32 in [4l, 4l + 4) of a group, and adds them in gemm.h's order with no fused multiply-adds
// (this file is built with -ffp-contract=off): the paths agree bit for bit, so a result never
// depends on the CPU, the batch or the thread count.
//
// A group is whole 64-weight strips of a row block (layout.h: the block shifted right by 2j and
// masked holds the codes of k = 64j .. 64j + 63). On AVX2 a strip is two 32-code halves, each a
// maddubs with 32 activations, and one madd of the int16 sums gives the 8 lanes. On AVX-512 a
// strip is one vpdpbusd of 64 codes into 16 int32 lanes, and lanes l and l + 8 add up to lane l.
// With NEON sdot a strip is four 16-code quarters, each 4 lanes of 4 products: quarters 0 and 2
// give lanes 0..3, quarters 1 and 3 lanes 4..7.
// Codes are t + 1, so the integer sums are sum (t + 1) * x; subtracting the lane's sum of x
// (x_lane, computed once per call) leaves sum t * x exactly.
//
// Decode (one activation row) reads the 4 rows of a row group together, front to back, as one
// stream; more activation rows take one weight row at a time with a tile of up to 4 of them, each
// unpacked strip shared by the tile.

#include <algorithm>
#include <cstdint>

#include "cpu_isa.h"
#include "gemm.h"
#include "layout.h"

#if BITNET_JAX_X86_SIMD
#include "x86_simd.h"
#elif BITNET_JAX_ARM_SIMD
#include <arm_neon.h>
#endif

namespace bitnet {

namespace {

constexpr int64_t kStripK = kBlockK / 4;  // weights per strip: a row block shifted by 2j and masked
static_assert(kTernaryGroupAlign == kStripK, "a group is whole strips");
static_assert(kStripK % 32 == 0, "a strip holds whole sets of the 8 lanes of 4 inputs");

// Lane of input k within its group: every path's lane l holds k % 32 in [4l, 4l + 4).
constexpr int LaneOf(int64_t k) { return static_cast<int>((k % 32) / 4); }

// ---------------------------------------------------------------------------------------------
// Scalar twin: the layout and gemm.h's order read literally.

void TernaryGroupScalar(const int8_t* x_q, int64_t rows, int64_t kb, const uint8_t* w, const float* w_scale,
                        int64_t group_k, int64_t groups, int64_t g_begin, int64_t g_end, int64_t n_total,
                        float* dot) {
  const int64_t kp = kb * kBlockK;
  for (int64_t g = g_begin; g < g_end; ++g) {
    for (int64_t r = 0; r < kRowsPerGroup; ++r) {
      const int64_t n = g * kRowsPerGroup + r;
      if (n >= n_total) break;
      for (int64_t m = 0; m < rows; ++m) {
        float lane[kFloatLanes] = {};
        for (int64_t c = 0; c < groups; ++c) {
          int32_t p[kFloatLanes] = {};
          for (int64_t k = c * group_k; k < (c + 1) * group_k; ++k) {
            const uint8_t* block = w + (g * kb + k / kBlockK) * kGroupBlockBytes + r * kBlockBytes;
            const int32_t t = ((block[CodeByte(k % kBlockK)] >> CodeShift(k % kBlockK)) & 3) - 1;
            p[LaneOf(k)] += t * x_q[m * kp + k];
          }
          const float scale = w_scale[c * n_total + n];
          for (int l = 0; l < kFloatLanes; ++l) lane[l] = lane[l] + static_cast<float>(p[l]) * scale;
        }
        dot[m * n_total + n] = SumFloatLanes(lane);
      }
    }
  }
}

#if BITNET_JAX_X86_SIMD || BITNET_JAX_ARM_SIMD

// The operands of one tile: R weight rows of a row group (from row r0) against MT activation rows.
struct GroupTile {
  const int8_t* x;        // the tile's first activation row; rows kp apart
  int64_t kp;
  const int32_t* x_lane;  // the tile's first row of x_lane [rows, groups, 8]
  const uint8_t* w_rows;  // row r0's first block in its row group: w_g + r0 * kBlockBytes
  const float* scale;     // w_scale + n0 (n0 = the tile's first output row); groups n_total apart
  int64_t valid_rows;     // of the R weight rows, those below n_total
  int64_t group_k, groups, n_total;
  float* dot;             // dot + m0 * n_total + n0; rows n_total apart
};

// The tile's scale of weight row r for group c (0 for padding rows, whose outputs are dropped).
inline float ScaleOf(const GroupTile& t, int r, int64_t c) {
  return r < t.valid_rows ? t.scale[c * t.n_total + r] : 0.0f;
}

constexpr int64_t kPrefetchBytes = 2048;

// The row groups [g_begin, g_end) with Tile<R, MT> of a SIMD path: one activation row takes the 4
// weight rows of a group together; more take one weight row at a time, in tiles of up to 4
// activation rows, after prefetching the next group (each pass over a row reads 64 of every 256
// bytes, which the hardware prefetcher does not follow).
template <template <int, int> class Tile>
void TernaryGroupRows(const int8_t* x_q, const int32_t* x_lane, int64_t rows, int64_t kb, const uint8_t* w,
                      const float* w_scale, int64_t group_k, int64_t groups, int64_t g_begin, int64_t g_end,
                      int64_t n_total, float* dot) {
  const int64_t kp = kb * kBlockK;
  for (int64_t g = g_begin; g < g_end; ++g) {
    const uint8_t* w_g = w + g * kb * kGroupBlockBytes;
    const int64_t n0 = g * kRowsPerGroup;
    const int64_t valid = std::min<int64_t>(kRowsPerGroup, n_total - n0);
    if (rows == 1) {
      Tile<kRowsPerGroup, 1>::Run({x_q, kp, x_lane, w_g, w_scale + n0, valid, group_k, groups, n_total, dot + n0});
      continue;
    }
    const uint8_t* next = w_g + kb * kGroupBlockBytes;
    for (int64_t line = 0; line < kb * kGroupBlockBytes; line += 64) __builtin_prefetch(next + line);
    for (int64_t r = 0; r < valid; ++r) {
      for (int64_t m = 0; m < rows; m += 4) {
        const GroupTile t{x_q + m * kp, kp, x_lane + m * groups * kFloatLanes, w_g + r * kBlockBytes,
                          w_scale + n0 + r, 1, group_k, groups, n_total, dot + m * n_total + n0 + r};
        switch (std::min<int64_t>(4, rows - m)) {
          case 1: Tile<1, 1>::Run(t); break;
          case 2: Tile<1, 2>::Run(t); break;
          case 3: Tile<1, 3>::Run(t); break;
          default: Tile<1, 4>::Run(t); break;
        }
      }
    }
  }
}

#endif  // BITNET_JAX_X86_SIMD || BITNET_JAX_ARM_SIMD

#if BITNET_JAX_X86_SIMD

// Strips between two widenings of AVX2's int16 sums: per strip, a lane adds two maddubs results of
// magnitude at most 2 * 2 * 128 = 512.
constexpr int64_t kAvx2WidenStrips = 32;
static_assert(kAvx2WidenStrips * 2 * 512 <= 32768, "int16 partial sums must not overflow");

// gemm.h's step for group c on 8 lanes: lane + float(sum_code_x - x_lane) * scale, where
// sum_code_x holds the lanes' sums of code * x (code = t + 1) and x_lane their sums of x.
BITNET_AVX2_SHARED inline __m256 AddScaledGroup(__m256 lane, __m256i sum_code_x, const int32_t* x_lane, __m256 scale) {
  const __m256i p = _mm256_sub_epi32(sum_code_x, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x_lane)));
  return _mm256_add_ps(lane, _mm256_mul_ps(_mm256_cvtepi32_ps(p), scale));
}

// Each tile output's 8 lanes summed in gemm.h's order into dot (rows below valid_rows only).
template <int R, int MT>
BITNET_AVX2_SHARED inline void StoreDots(const GroupTile& t, const __m256 (&lane)[R][MT]) {
  alignas(32) float lanes[kFloatLanes];
  for (int r = 0; r < R && r < t.valid_rows; ++r)
    for (int mi = 0; mi < MT; ++mi) {
      _mm256_store_ps(lanes, lane[r][mi]);
      t.dot[mi * t.n_total + r] = SumFloatLanes(lanes);
    }
}

template <int R, int MT>
BITNET_AVX2 void GroupTileAvx2(const GroupTile& t) {
  const __m256i mask = _mm256_set1_epi8(3);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i part[R][MT], acc[R][MT];
  __m256 lane[R][MT];
  for (int r = 0; r < R; ++r)
    for (int mi = 0; mi < MT; ++mi) {
      part[r][mi] = acc[r][mi] = _mm256_setzero_si256();
      lane[r][mi] = _mm256_setzero_ps();
    }
  const int64_t strips_per_group = t.group_k / kStripK, strips = t.groups * strips_per_group;
  int64_t c = 0, in_group = 0;
  for (int64_t s0 = 0; s0 < strips; s0 += 4) {
    const uint8_t* block = t.w_rows + (s0 / 4) * kGroupBlockBytes;
    const int8_t* x_b = t.x + (s0 / 4) * kBlockK;
    if (R == kRowsPerGroup) {  // the 4 rows' blocks are one stream (a tile of one row is prefetched by its caller)
      for (int line = 0; line < 4; ++line)
        _mm_prefetch(reinterpret_cast<const char*>(block + kPrefetchBytes + 64 * line), _MM_HINT_T0);
    }
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      if (s0 + j == strips) break;
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        __m256i xv[MT];
        for (int mi = 0; mi < MT; ++mi)
          xv[mi] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x_b + mi * t.kp + kStripK * j + 32 * h));
        for (int r = 0; r < R; ++r) {
          const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + r * kBlockBytes + 32 * h));
          const __m256i codes = _mm256_and_si256(_mm256_srli_epi16(packed, 2 * j), mask);
          for (int mi = 0; mi < MT; ++mi) MaddubsAdd(part[r][mi], codes, xv[mi]);
        }
      }
      const bool group_end = ++in_group == strips_per_group;
      if (group_end || in_group % kAvx2WidenStrips == 0) {
        for (int r = 0; r < R; ++r)
          for (int mi = 0; mi < MT; ++mi) {
            acc[r][mi] = _mm256_add_epi32(acc[r][mi], _mm256_madd_epi16(part[r][mi], ones));
            part[r][mi] = _mm256_setzero_si256();
          }
      }
      if (group_end) {
        for (int r = 0; r < R; ++r) {
          const __m256 scale = _mm256_set1_ps(ScaleOf(t, r, c));
          for (int mi = 0; mi < MT; ++mi) {
            lane[r][mi] = AddScaledGroup(lane[r][mi], acc[r][mi], t.x_lane + (mi * t.groups + c) * kFloatLanes, scale);
            acc[r][mi] = _mm256_setzero_si256();
          }
        }
        ++c;
        in_group = 0;
      }
    }
  }
  StoreDots<R, MT>(t, lane);
}

// More than one activation row: R = 1 weight row (one row's decode takes GroupDecodeAvx512).
template <int R, int MT>
BITNET_AVX512 void GroupTileAvx512(const GroupTile& t) {
  static_assert(R == 1, "the 4 rows of a group at one activation row take GroupDecodeAvx512");
  const __m512i mask = _mm512_set1_epi8(3);
  __m512i acc[R][MT];
  __m256 lane[R][MT];
  for (int r = 0; r < R; ++r)
    for (int mi = 0; mi < MT; ++mi) {
      acc[r][mi] = _mm512_setzero_si512();
      lane[r][mi] = _mm256_setzero_ps();
    }
  const int64_t strips_per_group = t.group_k / kStripK, strips = t.groups * strips_per_group;
  int64_t c = 0, in_group = 0;
  for (int64_t s0 = 0; s0 < strips; s0 += 4) {
    const uint8_t* block = t.w_rows + (s0 / 4) * kGroupBlockBytes;
    const int8_t* x_b = t.x + (s0 / 4) * kBlockK;  // (the caller prefetches the row group)
    __m512i packed[R];
    for (int r = 0; r < R; ++r) packed[r] = _mm512_loadu_si512(block + r * kBlockBytes);
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      if (s0 + j == strips) break;
      __m512i xv[MT];
      for (int mi = 0; mi < MT; ++mi) xv[mi] = _mm512_loadu_si512(x_b + mi * t.kp + kStripK * j);
      for (int r = 0; r < R; ++r) {
        const __m512i codes = _mm512_and_si512(packed[r], mask);
        packed[r] = _mm512_srli_epi16(packed[r], 2);
        for (int mi = 0; mi < MT; ++mi) Dpbusd(acc[r][mi], codes, xv[mi]);
      }
      if (++in_group == strips_per_group) {
        for (int r = 0; r < R; ++r) {
          const __m256 scale = _mm256_set1_ps(ScaleOf(t, r, c));
          for (int mi = 0; mi < MT; ++mi) {
            // Lanes l and l + 8 hold k % 64 in [4l, 4l + 4) and [32 + 4l, 32 + 4l + 4): lane l of gemm.h.
            const __m256i sum8 =
                _mm256_add_epi32(_mm512_castsi512_si256(acc[r][mi]), _mm512_extracti64x4_epi64(acc[r][mi], 1));
            lane[r][mi] = AddScaledGroup(lane[r][mi], sum8, t.x_lane + (mi * t.groups + c) * kFloatLanes, scale);
            acc[r][mi] = _mm512_setzero_si512();
          }
        }
        ++c;
        in_group = 0;
      }
    }
  }
  StoreDots<R, MT>(t, lane);
}

// Decode (one activation row, the 4 rows of a group): as GroupTileAvx512<4, 1>, with each group's
// scaling done on two rows per register. Two rows' 16-lane sums fold into one register (lanes l and
// l + 8 of each row added: its 8 lanes of gemm.h, row a in the low half, row b in the high half),
// so the subtraction, conversion, scaling and addition run once per two rows, and the 4 rows'
// scales come in one load.
BITNET_AVX512 void GroupDecodeAvx512(const GroupTile& t) {
  const __m512i mask = _mm512_set1_epi8(3);
  const __m512i low_pair = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  const __m512i high_pair = _mm512_setr_epi32(2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
  const __mmask8 valid = static_cast<__mmask8>((1u << t.valid_rows) - 1);
  __m512i acc[kRowsPerGroup];
  __m512 lane[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};  // rows (0, 1) and (2, 3)
  for (int r = 0; r < kRowsPerGroup; ++r) acc[r] = _mm512_setzero_si512();
  const int64_t strips_per_group = t.group_k / kStripK, strips = t.groups * strips_per_group;
  int64_t c = 0, in_group = 0;
  for (int64_t s0 = 0; s0 < strips; s0 += 4) {
    const uint8_t* block = t.w_rows + (s0 / 4) * kGroupBlockBytes;
    const int8_t* x_b = t.x + (s0 / 4) * kBlockK;
    for (int line = 0; line < 4; ++line)
      _mm_prefetch(reinterpret_cast<const char*>(block + kPrefetchBytes + 64 * line), _MM_HINT_T0);
    __m512i packed[kRowsPerGroup];
    for (int r = 0; r < kRowsPerGroup; ++r) packed[r] = _mm512_loadu_si512(block + r * kBlockBytes);
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      if (s0 + j == strips) break;
      const __m512i xv = _mm512_loadu_si512(x_b + kStripK * j);
      for (int r = 0; r < kRowsPerGroup; ++r) {
        const __m512i codes = _mm512_and_si512(packed[r], mask);
        packed[r] = _mm512_srli_epi16(packed[r], 2);
        Dpbusd(acc[r], codes, xv);
      }
      if (++in_group == strips_per_group) {
        const __m512i x_lane = _mm512_broadcast_i64x4(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t.x_lane + c * kFloatLanes)));
        const __m512 scales = _mm512_castps128_ps512(_mm_maskz_loadu_ps(valid, t.scale + c * t.n_total));
        for (int pair = 0; pair < 2; ++pair) {
          const __m512i a = acc[2 * pair], b = acc[2 * pair + 1];
          const __m512i sum8 = _mm512_add_epi32(_mm512_shuffle_i64x2(a, b, 0x44), _mm512_shuffle_i64x2(a, b, 0xEE));
          const __m512 scale = _mm512_permutexvar_ps(pair == 0 ? low_pair : high_pair, scales);
          const __m512 p = _mm512_cvtepi32_ps(_mm512_sub_epi32(sum8, x_lane));
          lane[pair] = _mm512_add_ps(lane[pair], _mm512_mul_ps(p, scale));
        }
        for (int r = 0; r < kRowsPerGroup; ++r) acc[r] = _mm512_setzero_si512();
        ++c;
        in_group = 0;
      }
    }
  }
  alignas(64) float lanes[2 * kFloatLanes];
  for (int pair = 0; pair < 2; ++pair) {
    _mm512_store_ps(lanes, lane[pair]);
    for (int half = 0; half < 2; ++half) {
      const int r = 2 * pair + half;
      if (r < t.valid_rows) t.dot[r] = SumFloatLanes(lanes + kFloatLanes * half);
    }
  }
}

template <int R, int MT>
struct Avx2Tile {
  static void Run(const GroupTile& t) { GroupTileAvx2<R, MT>(t); }
};

template <int R, int MT>
struct Avx512Tile {
  static void Run(const GroupTile& t) {
    if constexpr (R == kRowsPerGroup && MT == 1) {
      GroupDecodeAvx512(t);
    } else {
      GroupTileAvx512<R, MT>(t);
    }
  }
};

#elif BITNET_JAX_ARM_SIMD

// GCC 12's arm_neon.h declares vdotq_s32 under this target (gemm_arm.cc says more).
#define BITNET_NEON_DOT __attribute__((target("arch=armv8.2-a+dotprod")))

template <int R, int MT>
BITNET_NEON_DOT void GroupTileNeonDot(const GroupTile& t) {
  const uint8x16_t mask = vdupq_n_u8(3);
  int32x4_t acc[R][MT][2];  // [..][0]: lanes 0..3, [..][1]: lanes 4..7
  float32x4_t lane[R][MT][2];
  for (int r = 0; r < R; ++r)
    for (int mi = 0; mi < MT; ++mi)
      for (int half = 0; half < 2; ++half) {
        acc[r][mi][half] = vdupq_n_s32(0);
        lane[r][mi][half] = vdupq_n_f32(0.0f);
      }
  const int64_t strips_per_group = t.group_k / kStripK, strips = t.groups * strips_per_group;
  int64_t c = 0, in_group = 0;
  for (int64_t s0 = 0; s0 < strips; s0 += 4) {
    const uint8_t* block = t.w_rows + (s0 / 4) * kGroupBlockBytes;
    const int8_t* x_b = t.x + (s0 / 4) * kBlockK;
    if (R == kRowsPerGroup) {
      for (int line = 0; line < 4; ++line) __builtin_prefetch(block + kPrefetchBytes + 64 * line);
    }
    for (int j = 0; j < 4; ++j) {
      if (s0 + j == strips) break;
      const int8x16_t shift = vdupq_n_s8(static_cast<int8_t>(-2 * j));  // a right shift by 2j
      for (int h = 0; h < 4; ++h) {
        int8x16_t xv[MT];
        for (int mi = 0; mi < MT; ++mi) xv[mi] = vld1q_s8(x_b + mi * t.kp + kStripK * j + 16 * h);
        for (int r = 0; r < R; ++r) {
          const uint8x16_t packed = vld1q_u8(block + r * kBlockBytes + 16 * h);
          const int8x16_t codes = vreinterpretq_s8_u8(vandq_u8(vshlq_u8(packed, shift), mask));
          for (int mi = 0; mi < MT; ++mi) acc[r][mi][h & 1] = vdotq_s32(acc[r][mi][h & 1], codes, xv[mi]);
        }
      }
      if (++in_group == strips_per_group) {
        for (int r = 0; r < R; ++r) {
          const float32x4_t scale = vdupq_n_f32(ScaleOf(t, r, c));
          for (int mi = 0; mi < MT; ++mi)
            for (int half = 0; half < 2; ++half) {
              const int32x4_t x_lane = vld1q_s32(t.x_lane + (mi * t.groups + c) * kFloatLanes + 4 * half);
              const int32x4_t p = vsubq_s32(acc[r][mi][half], x_lane);
              lane[r][mi][half] = vaddq_f32(lane[r][mi][half], vmulq_f32(vcvtq_f32_s32(p), scale));
              acc[r][mi][half] = vdupq_n_s32(0);
            }
        }
        ++c;
        in_group = 0;
      }
    }
  }
  float lanes[kFloatLanes];
  for (int r = 0; r < R && r < t.valid_rows; ++r)
    for (int mi = 0; mi < MT; ++mi) {
      vst1q_f32(lanes, lane[r][mi][0]);
      vst1q_f32(lanes + 4, lane[r][mi][1]);
      t.dot[mi * t.n_total + r] = SumFloatLanes(lanes);
    }
}

template <int R, int MT>
struct NeonDotTile {
  static void Run(const GroupTile& t) { GroupTileNeonDot<R, MT>(t); }
};

#endif  // BITNET_JAX_ARM_SIMD

}  // namespace

void TernaryGroupLaneSums(const int8_t* x_q, int64_t rows, int64_t kp, int64_t group_k, int64_t groups,
                          int32_t* x_lane) {
  std::fill(x_lane, x_lane + rows * groups * kFloatLanes, 0);
  for (int64_t m = 0; m < rows; ++m) {
    int32_t* row = x_lane + m * groups * kFloatLanes;
    for (int64_t k = 0; k < groups * group_k; ++k) row[(k / group_k) * kFloatLanes + LaneOf(k)] += x_q[m * kp + k];
  }
}

void TernaryGroupGemmF32(Isa isa, const int8_t* x_q, const int32_t* x_lane, int64_t rows, int64_t kb,
                         const uint8_t* w, const float* w_scale, int64_t group_k, int64_t groups, int64_t g_begin,
                         int64_t g_end, int64_t n_total, float* dot) {
#if BITNET_JAX_X86_SIMD
  if (isa == Isa::kAvx512Vnni) {
    TernaryGroupRows<Avx512Tile>(x_q, x_lane, rows, kb, w, w_scale, group_k, groups, g_begin, g_end, n_total, dot);
    return;
  }
  if (isa == Isa::kAvx2) {
    TernaryGroupRows<Avx2Tile>(x_q, x_lane, rows, kb, w, w_scale, group_k, groups, g_begin, g_end, n_total, dot);
    return;
  }
#elif BITNET_JAX_ARM_SIMD
  if (isa == Isa::kNeonDot) {
    TernaryGroupRows<NeonDotTile>(x_q, x_lane, rows, kb, w, w_scale, group_k, groups, g_begin, g_end, n_total, dot);
    return;
  }
#endif
  // The scalar path, and plain NEON (no 4-way dot product: the scalar twin is as good a start).
  (void)isa;
  (void)x_lane;
  TernaryGroupScalar(x_q, rows, kb, w, w_scale, group_k, groups, g_begin, g_end, n_total, dot);
}

}  // namespace bitnet
