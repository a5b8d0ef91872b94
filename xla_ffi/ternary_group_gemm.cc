// The ternary kernel with a scale per group of G inputs (weight_quant 'group:G'; contract in
// gemm.h) on the tiled layout (TQ2G, layout.h): a scalar twin, AVX2 and AVX-512 VNNI on x86-64,
// and NEON with the dot-product extension on aarch64 (plain NEON takes the scalar twin).
//
// A row's dot product is a float sum, group after group, of exact integer group sums times the
// group's scale, with no fused multiply-adds (this file is built with -ffp-contract=off): the paths
// agree bit for bit, so a result never depends on the CPU, the batch or the thread count.
// Codes are t + 1, so the integer sums are sum (t + 1) * x; subtracting the group's sum of x
// (x_group, computed once per call) leaves sum t * x exactly.
//
// In TQ2G a 64-byte chunk holds 16 outputs' codes for 16 inputs, and shifted right by 2j and masked
// with 3, each 32-bit lane holds one output's codes for 4 consecutive inputs. So a vector lane is a
// whole output from the start: a chunk is 4 multiply-adds (vpdpbusd, maddubs, sdot) against 4
// broadcast activations per activation row, and a group's end is one subtraction (or an accumulator
// started at minus the group's sum), conversion, multiply and add per register of 16 (AVX-512), 8
// (AVX2) or 4 (NEON) outputs. Every path runs one kernel for every batch size: a tile of 16 outputs
// against up to R activation rows at a time, over the whole of K; the tile's codes (4 * Kp bytes)
// stay in L1/L2 while the next R rows pass over them, and its scales, 16 a group, are a second
// contiguous stream. (The TQ2B group kernel this replaced summed 16 int32 lanes per output at every
// group's end, through a 16 x 16 transpose that was a third of its instructions, and read the
// scales from [K / G, N]: one line from each of `groups` rows per 16 outputs; benchmarks/RESULTS.md
// has both measured.)

#include <algorithm>
#include <cstdint>

#include "cpu_isa.h"
#include "gemm.h"
#include "layout.h"
#include "prefetch.h"

#if BITNET_JAX_X86_SIMD
#include "x86_simd.h"
#elif BITNET_JAX_ARM_SIMD
#include <arm_neon.h>
#endif

namespace bitnet {

namespace {

static_assert(kTernaryGroupAlign % kTileChunkK == 0 && kTileAlignK == kTernaryGroupAlign,
              "a group is whole 64-input strips of whole chunks");

// ---------------------------------------------------------------------------------------------
// Scalar twin: the layout and gemm.h's order read literally.

void TernaryGroupScalar(const int8_t* x_q, int64_t rows, int64_t kp, const uint8_t* w, const float* w_scale,
                        int64_t group_k, int64_t groups, int64_t t_begin, int64_t t_end, int64_t n_total,
                        float* dot) {
  const int64_t tile_bytes = TernaryTileBytes(kp);
  for (int64_t t = t_begin; t < t_end; ++t) {
    const uint8_t* w_t = w + t * tile_bytes;
    for (int64_t o = 0; o < kTileRows; ++o) {
      const int64_t n = t * kTileRows + o;
      if (n >= n_total) break;
      for (int64_t m = 0; m < rows; ++m) {
        float d = 0.0f;
        for (int64_t c = 0; c < groups; ++c) {
          int32_t p = 0;
          for (int64_t k = c * group_k; k < (c + 1) * group_k; ++k) {
            const int32_t code = (w_t[TileCodeByte(o, k)] >> TileCodeShift(k)) & 3;
            p += (code - 1) * x_q[m * kp + k];
          }
          d = d + static_cast<float>(p) * w_scale[(t * groups + c) * kTileRows + o];
        }
        dot[m * n_total + n] = d;
      }
    }
  }
}

#if BITNET_JAX_X86_SIMD || BITNET_JAX_ARM_SIMD

// One tile of 16 outputs against R activation rows, over all of K.
struct GroupTile {
  const int8_t* x;         // the first of the R activation rows; rows kp apart
  int64_t kp;
  const int32_t* x_group;  // x_group + m0: row r's sum over group c at [c * rows + r]
  int64_t rows;
  const uint8_t* w;        // the tile's first chunk
  const float* scale;      // the tile's scales: group c's 16 at [16c]
  int64_t n_total;         // dot's row stride
  int64_t group_chunks;    // chunks per group (a multiple of 4)
  int64_t groups;
  int64_t valid;           // the tile's outputs below n_total, 1 .. 16
  float* dot;              // dot + m0 * n_total + n0; rows n_total apart
};

// Kernel<r>::Run(tile) for the r = 1 .. MaxR activation rows left.
template <template <int> class Kernel, int MaxR>
inline void RunTile(int64_t r, const GroupTile& tile) {
  if constexpr (MaxR > 1) {
    if (r < MaxR) return RunTile<Kernel, MaxR - 1>(r, tile);
  }
  Kernel<MaxR>::Run(tile);
}

// The tiles [t_begin, t_end), each against the activation rows MaxR at a time. A tile's codes and
// its scales are two contiguous streams.
template <template <int> class Kernel, int MaxR>
void GroupTiles(const int8_t* x_q, const int32_t* x_group, int64_t rows, int64_t kp, const uint8_t* w,
                const float* w_scale, int64_t group_k, int64_t groups, int64_t t_begin, int64_t t_end,
                int64_t n_total, float* dot) {
  const int64_t tile_bytes = TernaryTileBytes(kp);
  for (int64_t t = t_begin; t < t_end; ++t) {
    const int64_t n0 = t * kTileRows;
    for (int64_t m = 0; m < rows; m += MaxR) {
      const GroupTile tile{x_q + m * kp, kp, x_group + m, rows, w + t * tile_bytes, w_scale + t * groups * kTileRows,
                           n_total, group_k / kTileChunkK, groups, std::min(kTileRows, n_total - n0),
                           dot + m * n_total + n0};
      RunTile<Kernel, MaxR>(std::min<int64_t>(MaxR, rows - m), tile);
    }
  }
}

#endif  // BITNET_JAX_X86_SIMD || BITNET_JAX_ARM_SIMD

#if BITNET_JAX_X86_SIMD

// From 2 activation rows the x86 tiles fetch both streams ahead in software: a chunk's codes
// kGroupPrefetchBytes on (into the next tile at a tile's end), a group's scales as far ahead in
// time. The hardware prefetcher alone kept up with one row, whose chunks go at memory speed, but
// not with several, which ask for the stream faster in a single pass: one Zen 4 core from memory
// (ternary_one_core, COPIES=32), AVX-512 at 2-8 rows 0.67-0.84x the time, 16 rows 0.88x; AVX2
// at 2-16 rows 0.72-0.92x; at one row it was slower (1.18x, AVX-512) and stays without
// (benchmarks/RESULTS.md). The NEON tiles are unmeasured and unchanged.
constexpr int kGroupPrefetchMinRows = 2;
constexpr int64_t kGroupPrefetchBytes = 2048;

// At tile t's group c: the scales its stream reaches kGroupPrefetchBytes of codes later (a group's
// 16 scales, 64 bytes, go with its group_chunks chunks of 64 bytes of codes).
inline void PrefetchScalesAhead(const GroupTile& t, int64_t c) {
  PrefetchAt(t.scale, static_cast<int64_t>(sizeof(float)) * c * kTileRows + kGroupPrefetchBytes / t.group_chunks);
}

// ---------------------------------------------------------------------------------------------
// AVX-512 VNNI: a chunk is one register of 16 outputs x 16 inputs. With 1 or 2 activation rows
// each row keeps 4 accumulators, one per 2-bit field, masked in place (field j holds 4^j * code,
// at most 128, so vpdpbusd's unsigned operand still takes it), so that the 4 multiply-adds of a
// chunk are independent and the loop streams at memory speed; the group's sum is then
// a0 + a1 / 4 + a2 / 16 + a3 / 64, exact (each a_j is a multiple of 4^j). From 3 rows the fields
// are shifted down first and each row keeps one accumulator: 3 shifts and 4 masks a chunk serve
// all R rows' 4R multiply-adds, and the R rows' chains hide vpdpbusd's latency.

// Activation rows a tile takes at once: each keeps a row pointer for its broadcasts, and past 6
// GCC runs out of general registers and spills them (2560 x 6912 at 128 rows, 2 threads of the
// Zen 4 from the LLC: 8 rows 1.35x the time of the TQ2B panels, 7 rows 1.15x, 6 rows 0.98-1.01x,
// 5 rows 1.04x, 4 rows 1.05x).
constexpr int kAvx512MaxRows = 6;

template <int R>
BITNET_AVX512 void GroupTileAvx512(const GroupTile& t) {
  constexpr bool kFields = R <= 2;
  constexpr int kAcc = kFields ? 4 : 1;
  const __mmask16 valid = static_cast<__mmask16>((1u << t.valid) - 1);
  const __m512i mask3 = _mm512_set1_epi8(3);
  __m512 d[R];
  for (int r = 0; r < R; ++r) d[r] = _mm512_setzero_ps();
  const uint8_t* w = t.w;
  const int32_t* x = reinterpret_cast<const int32_t*>(t.x);  // quads: x[r * kp / 4 + k / 4]
  const int64_t row_quads = t.kp / 4;
  for (int64_t c = 0; c < t.groups; ++c) {
    __m512i acc[R][kAcc];
    for (int r = 0; r < R; ++r)
      for (int a = 0; a < kAcc; ++a) acc[r][a] = _mm512_setzero_si512();
    if (R >= kGroupPrefetchMinRows) PrefetchScalesAhead(t, c);
    for (int64_t i = 0; i < t.group_chunks; ++i, w += kTileChunkBytes) {
      if (R >= kGroupPrefetchMinRows) PrefetchAt(w, kGroupPrefetchBytes);
      const __m512i v = _mm512_loadu_si512(w);
      const int32_t* xq = x + (c * t.group_chunks + i) * (kTileChunkK / 4);
      if constexpr (kFields) {
        const __m512i f0 = _mm512_and_si512(v, mask3), f1 = _mm512_and_si512(v, _mm512_slli_epi16(mask3, 2)),
                      f2 = _mm512_and_si512(v, _mm512_slli_epi16(mask3, 4)),
                      f3 = _mm512_and_si512(v, _mm512_slli_epi16(mask3, 6));
#pragma GCC unroll 2
        for (int r = 0; r < R; ++r) {
          DpbusdBroadcast(acc[r][0], f0, xq + r * row_quads + 0);
          DpbusdBroadcast(acc[r][1], f1, xq + r * row_quads + 1);
          DpbusdBroadcast(acc[r][2], f2, xq + r * row_quads + 2);
          DpbusdBroadcast(acc[r][3], f3, xq + r * row_quads + 3);
        }
      } else {
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) {
          const __m512i codes = _mm512_and_si512(_mm512_srli_epi16(v, 2 * j), mask3);
#pragma GCC unroll 8
          for (int r = 0; r < R; ++r) DpbusdBroadcast(acc[r][0], codes, xq + r * row_quads + j);
        }
      }
    }
    const __m512 s = _mm512_loadu_ps(t.scale + c * kTileRows);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      __m512i p = acc[r][0];
      if constexpr (kFields) {
        p = _mm512_add_epi32(_mm512_add_epi32(p, _mm512_srai_epi32(acc[r][1], 2)),
                             _mm512_add_epi32(_mm512_srai_epi32(acc[r][2], 4), _mm512_srai_epi32(acc[r][3], 6)));
      }
      p = _mm512_sub_epi32(p, _mm512_set1_epi32(t.x_group[c * t.rows + r]));
      d[r] = _mm512_add_ps(d[r], _mm512_mul_ps(_mm512_cvtepi32_ps(p), s));
    }
  }
  for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(t.dot + r * t.n_total, valid, d[r]);
}

template <int R>
struct GroupTileAvx512Op {
  static void Run(const GroupTile& t) { GroupTileAvx512<R>(t); }
};

// ---------------------------------------------------------------------------------------------
// AVX2: a tile is two halves of 8 outputs (32 bytes of each chunk), taken together, so that the
// tile streams once and each broadcast activation feeds both. maddubs sums pairs of code * x into
// int16 lanes, which add up over a 64-input strip (at most 16 pairs of |2 * 128 * 2| = 512: 8192)
// before one madd with ones widens them to int32. d, each output's float sum, stays in registers
// to the tile's end: through dot (a load, add and store of each half at every group's end, as this
// kernel first did) one Zen 4 core took 1.33x the time at one row, 1.13x at 2 rows and 1.22x at
// 128 (2560 x 6912 from the LLC, benchmarks/ternary_one_core.cc; benchmarks/RESULTS.md).

// Activation rows a tile takes at once (the same core and shape, with d in registers: 4 rows
// 0.94x the time of 3 rows a tile at 4 rows, the same at 8 to 128 rows; 5 rows the same as 4;
// 6 rows spill, 1.5-1.7x).
constexpr int kAvx2MaxRows = 4;

// Outputs 8h .. 8h + 7 of the tile's row r, of which t.valid - 8h are real (the rest is neither
// read nor written). Whole halves go without masks (vmaskmovps is slow on AMD).
BITNET_AVX2 inline void StoreHalf(const GroupTile& t, int r, int h, __m256 v) {
  float* out = t.dot + r * t.n_total + 8 * h;
  if (t.valid >= 8 * h + 8) return _mm256_storeu_ps(out, v);
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, v);
  for (int64_t i = 0; i < t.valid - 8 * h; ++i) out[i] = lanes[i];
}

template <int R>
BITNET_AVX2 void GroupTileAvx2(const GroupTile& t) {
  // One row: fields 0 and 2 shifted to the bottom, 1 and 3 to bits 2-3 (4 * code), so a half is
  // one shift and 4 masks rather than 3 and 4; the products of 4 * code add up in strip4 (16
  // pairs of at most |2 * 8 * 128|: 16384), and acc holds 4 times the sum, divided at the end
  // (one Zen 4 core from the LLC: 0.94x the time of shifting every field down; at 2 rows, 1.03x).
  constexpr bool kFields = R == 1;
  constexpr int kScale = kFields ? 4 : 1;
  const __m256i mask3 = _mm256_set1_epi8(3), mask12 = _mm256_set1_epi8(12), ones = _mm256_set1_epi16(1),
                fours = _mm256_set1_epi16(4);
  const int32_t* x = reinterpret_cast<const int32_t*>(t.x);
  const int64_t row_quads = t.kp / 4;
  const uint8_t* w = t.w;
  __m256 d[R][2];  // [row][half]
  for (int r = 0; r < R; ++r) d[r][0] = d[r][1] = _mm256_setzero_ps();
  for (int64_t c = 0; c < t.groups; ++c) {
    __m256i acc[R][2];  // from minus the group's sum of x (codes are t + 1), times kScale
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_set1_epi32(-kScale * t.x_group[c * t.rows + r]);
    if (R >= kGroupPrefetchMinRows) PrefetchScalesAhead(t, c);
    for (int64_t i = 0; i < t.group_chunks; i += 4) {
      __m256i strip[R][2], strip4[R][2];
      for (int r = 0; r < R; ++r) strip[r][0] = strip[r][1] = strip4[r][0] = strip4[r][1] = _mm256_setzero_si256();
#pragma GCC unroll 4
      for (int64_t ii = 0; ii < 4; ++ii, w += kTileChunkBytes) {
        if (R >= kGroupPrefetchMinRows) PrefetchAt(w, kGroupPrefetchBytes);
        __m256i v[2], v4[2];
        for (int h = 0; h < 2; ++h) {
          v[h] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32 * h));
          if constexpr (kFields) v4[h] = _mm256_srli_epi16(v[h], 4);
        }
        const int32_t* xq = x + (c * t.group_chunks + i + ii) * (kTileChunkK / 4);
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) {
          __m256i codes[2];
          for (int h = 0; h < 2; ++h) {
            codes[h] = kFields ? _mm256_and_si256(j < 2 ? v[h] : v4[h], j % 2 ? mask12 : mask3)
                               : _mm256_and_si256(_mm256_srli_epi16(v[h], 2 * j), mask3);
          }
#pragma GCC unroll 4
          for (int r = 0; r < R; ++r) {
            const __m256i xb = _mm256_set1_epi32(xq[r * row_quads + j]);
            __m256i(&into)[2] = kFields && j % 2 ? strip4[r] : strip[r];
            MaddubsAdd(into[0], codes[0], xb);
            MaddubsAdd(into[1], codes[1], xb);
          }
        }
      }
      for (int r = 0; r < R; ++r)
        for (int h = 0; h < 2; ++h) {
          __m256i sum = _mm256_madd_epi16(strip[r][h], kFields ? fours : ones);
          if constexpr (kFields) sum = _mm256_add_epi32(sum, _mm256_madd_epi16(strip4[r][h], ones));
          acc[r][h] = _mm256_add_epi32(acc[r][h], sum);
        }
    }
    for (int h = 0; h < 2; ++h) {
      const __m256 s = _mm256_loadu_ps(t.scale + c * kTileRows + 8 * h);
      for (int r = 0; r < R; ++r) {
        const __m256i p = kFields ? _mm256_srai_epi32(acc[r][h], 2) : acc[r][h];
        d[r][h] = _mm256_add_ps(d[r][h], _mm256_mul_ps(_mm256_cvtepi32_ps(p), s));
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int h = 0; h < 2; ++h) StoreHalf(t, r, h, d[r][h]);
}

template <int R>
struct GroupTileAvx2Op {
  static void Run(const GroupTile& t) { GroupTileAvx2<R>(t); }
};

#endif  // BITNET_JAX_X86_SIMD

#if BITNET_JAX_ARM_SIMD

// ---------------------------------------------------------------------------------------------
// NEON with sdot: a tile is four quarters of 4 outputs (16 bytes of each chunk), one after the
// other; a chunk's quarter, shifted by 2j and masked, is 4 outputs' codes for inputs 4j .. 4j + 3,
// against lane j of the chunk's 16 activations (vdotq_laneq_s32).

#define BITNET_NEON_DOT __attribute__((target("arch=armv8.2-a+dotprod")))

constexpr int kNeonMaxRows = 2;

template <int R>
BITNET_NEON_DOT void GroupTileNeonDot(const GroupTile& t) {
  const uint8x16_t mask3 = vdupq_n_u8(3);
  for (int64_t q = 0; 4 * q < t.valid; ++q) {
    const int64_t valid = std::min<int64_t>(4, t.valid - 4 * q);
    float32x4_t d[R];
    for (int r = 0; r < R; ++r) d[r] = vdupq_n_f32(0.0f);
    const uint8_t* w = t.w + 16 * q;
    for (int64_t c = 0; c < t.groups; ++c) {
      int32x4_t acc[R];
      for (int r = 0; r < R; ++r) acc[r] = vdupq_n_s32(0);
      for (int64_t i = 0; i < t.group_chunks; ++i, w += kTileChunkBytes) {
        const uint8x16_t v = vld1q_u8(w);
        const int8x16_t c0 = vreinterpretq_s8_u8(vandq_u8(v, mask3));
        const int8x16_t c1 = vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(v, 2), mask3));
        const int8x16_t c2 = vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(v, 4), mask3));
        const int8x16_t c3 = vreinterpretq_s8_u8(vshrq_n_u8(v, 6));
        const int64_t k = (c * t.group_chunks + i) * kTileChunkK;
        for (int r = 0; r < R; ++r) {
          const int8x16_t xv = vld1q_s8(t.x + r * t.kp + k);
          acc[r] = vdotq_laneq_s32(acc[r], c0, xv, 0);
          acc[r] = vdotq_laneq_s32(acc[r], c1, xv, 1);
          acc[r] = vdotq_laneq_s32(acc[r], c2, xv, 2);
          acc[r] = vdotq_laneq_s32(acc[r], c3, xv, 3);
        }
      }
      const float32x4_t s = vld1q_f32(t.scale + c * kTileRows + 4 * q);
      for (int r = 0; r < R; ++r) {
        const int32x4_t p = vsubq_s32(acc[r], vdupq_n_s32(t.x_group[c * t.rows + r]));
        d[r] = vaddq_f32(d[r], vmulq_f32(vcvtq_f32_s32(p), s));
      }
    }
    for (int r = 0; r < R; ++r) {
      float lanes[4];
      vst1q_f32(lanes, d[r]);
      for (int64_t i = 0; i < valid; ++i) t.dot[r * t.n_total + 4 * q + i] = lanes[i];
    }
  }
}

template <int R>
struct GroupTileNeonDotOp {
  static void Run(const GroupTile& t) { GroupTileNeonDot<R>(t); }
};

#endif  // BITNET_JAX_ARM_SIMD

}  // namespace

void TernaryGroupSums(const int8_t* x_q, int64_t rows, int64_t kp, int64_t group_k, int64_t groups,
                      int32_t* x_group) {
  for (int64_t c = 0; c < groups; ++c)
    for (int64_t m = 0; m < rows; ++m) {
      int32_t sum = 0;
      for (int64_t k = c * group_k; k < (c + 1) * group_k; ++k) sum += x_q[m * kp + k];
      x_group[c * rows + m] = sum;
    }
}

void TernaryGroupGemmF32(Isa isa, const int8_t* x_q, const int32_t* x_group, int64_t rows, int64_t kp,
                         const uint8_t* w, const float* w_scale, int64_t group_k, int64_t groups, int64_t t_begin,
                         int64_t t_end, int64_t n_total, float* dot) {
#if BITNET_JAX_X86_SIMD
  if (isa == Isa::kAvx512Vnni) {
    GroupTiles<GroupTileAvx512Op, kAvx512MaxRows>(x_q, x_group, rows, kp, w, w_scale, group_k, groups, t_begin,
                                                  t_end, n_total, dot);
    return;
  }
  if (isa == Isa::kAvx2) {
    GroupTiles<GroupTileAvx2Op, kAvx2MaxRows>(x_q, x_group, rows, kp, w, w_scale, group_k, groups, t_begin, t_end,
                                              n_total, dot);
    return;
  }
#elif BITNET_JAX_ARM_SIMD
  if (isa == Isa::kNeonDot) {
    GroupTiles<GroupTileNeonDotOp, kNeonMaxRows>(x_q, x_group, rows, kp, w, w_scale, group_k, groups, t_begin,
                                                 t_end, n_total, dot);
    return;
  }
#endif
  // The scalar path, and plain NEON (no 4-way dot product: the scalar twin is as good a start).
  (void)isa;
  (void)x_group;
  TernaryGroupScalar(x_q, rows, kp, w, w_scale, group_k, groups, t_begin, t_end, n_total, dot);
}

}  // namespace bitnet
