// The aarch64 paths of the ternary and int8 kernels (gemm.h; the overview is at the top of
// gemm.cc): NEON with the dot-product extension (sdot, under its own target attribute) and plain
// NEON, baseline on every aarch64 core. Decode takes the GEMV tiles on both; prefill with sdot
// (kNeonPanelMinRows activation rows and more) unpacked 16-row panels, plain NEON the GEMV tiles.
// Compiles to nothing off aarch64 (BITNET_JAX_ARM_SIMD, cpu_isa.h).

#include "gemm_paths.h"

#include <algorithm>

#include "cpu_isa.h"
#include "layout.h"

#if BITNET_JAX_ARM_SIMD

#include <arm_neon.h>

namespace bitnet {

namespace {

// ---------------------------------------------------------------------------------------------
// NEON with the dot-product extension (Armv8.2-A sdot)

// GCC 12's arm_neon.h declares vdotq_s32 under the target "arch=armv8.2-a+dotprod", and an
// always-inline intrinsic inlines only into a caller with that target ("+dotprod" alone is
// refused as a target mismatch).
#define BITNET_NEON_DOT __attribute__((target("arch=armv8.2-a+dotprod")))

// All 4 rows of a group against MT activation rows: 4 * MT accumulators. A row block is four
// 16-byte quarters; quarter h shifted right by 2j and masked is the codes of k = 64j + 16h ..
// 64j + 16h + 15, in order. sdot multiplies them (as s8 in 0..2) with 16 activations and adds
// each 4 products into an int32 lane: exact for every int8 activation.
template <int MT>
BITNET_NEON_DOT void TernaryGroupNeonDot(const int8_t* x, int64_t kp, const int32_t* x_sum,
                                         int64_t kb, const uint8_t* w_g, int64_t n0,
                                         int64_t n_total, int32_t* acc_out) {
  const uint8x16_t mask = vdupq_n_u8(3);
  int32x4_t acc[kRowsPerGroup][MT];
  for (int r = 0; r < kRowsPerGroup; ++r)
    for (int mi = 0; mi < MT; ++mi) acc[r][mi] = vdupq_n_s32(0);
  for (int64_t b = 0; b < kb; ++b) {
    const uint8_t* block = w_g + b * kGroupBlockBytes;
    const int8_t* x_b = x + b * kBlockK;
    for (int h = 0; h < 4; ++h) {
      uint8x16_t packed[kRowsPerGroup];
      for (int r = 0; r < kRowsPerGroup; ++r) packed[r] = vld1q_u8(block + r * kBlockBytes + 16 * h);
      // Kept rolled: unrolled, GCC 12 hoists the next steps' loads and spills the 16 accumulators.
#pragma GCC unroll 1
      for (int j = 0; j < 4; ++j) {
        int8x16_t xv[MT];
        for (int mi = 0; mi < MT; ++mi) xv[mi] = vld1q_s8(x_b + mi * kp + 64 * j + 16 * h);
        for (int r = 0; r < kRowsPerGroup; ++r) {
          const int8x16_t codes = vreinterpretq_s8_u8(vandq_u8(packed[r], mask));
          packed[r] = vshrq_n_u8(packed[r], 2);
          for (int mi = 0; mi < MT; ++mi) acc[r][mi] = vdotq_s32(acc[r][mi], codes, xv[mi]);
        }
      }
    }
  }
  for (int r = 0; r < kRowsPerGroup && n0 + r < n_total; ++r)
    for (int mi = 0; mi < MT; ++mi) acc_out[mi * n_total + n0 + r] = vaddvq_s32(acc[r][mi]) - x_sum[mi];
}

// Prefill, many activation rows: panels of 16 output rows (4 groups) whose codes are unpacked once
// into the order of sdot by lane: for every k-quad q (k = 4q..4q+3), t = code - 1 of each of the
// 16 rows, 4 bytes a row, i.e. four registers of 4 rows each. The micro-kernel loads 16
// activations (4 quads) per x row; lane j times the codes of quad 4i + j (vdotq_laneq_s32) adds
// to 4 output rows per register: 16 whole outputs in 4 accumulators per x row, no horizontal
// sums, no x_sum correction (the codes are t itself). Per quad: 4 code loads feed 4 * MT sdot,
// where the GEMV tile spends a mask and a shift per 4 (not timed: no ARM machine here).
constexpr int64_t kNeonPanelRows = 16;
constexpr int64_t kNeonPanelGroups = kNeonPanelRows / kRowsPerGroup;
// From 17 rows, as the AVX-512 panels, where they took over from 4-row GEMV tiles like sdot's
// (measured there; here an assumption).
constexpr int64_t kNeonPanelMinRows = 17;
constexpr int kNeonPanelTileRows = 4;  // 4 x 4 accumulators + 4 code and 4 activation registers
// K chunk: 16 x 1024 codes + 4 x 1024 activations = 20 KB, within a 32 KB L1.
constexpr int64_t kNeonPanelChunkQuads = 256;

}  // namespace

// codes_q: [(b_end - b_begin) * kBlockK / 4][kNeonPanelRows][4] int8, quads from block b_begin's
// first. Byte e of quarter h of a row block, shifted by 2j,
// holds the code of k = 64j + 16h + e: one quarter is quads 16j + 4h .. 16j + 4h + 3 of its row,
// and a 4 x 4 transpose of 32-bit lanes over the group's 4 rows gives each quad's 4 rows. Rows at
// or past group `g_end` get t = 0; their outputs are never stored.
static BITNET_NEON_DOT void UnpackPanelNeonDot(const uint8_t* w, int64_t kb, int64_t g0, int64_t g_end,
                                        int64_t b_begin, int64_t b_end, int8_t* codes_q) {
  const uint8x16_t mask = vdupq_n_u8(3);
  const int8x16_t one = vdupq_n_s8(1);
  for (int64_t pg = 0; pg < kNeonPanelGroups; ++pg) {
    const int64_t g = g0 + pg;
    for (int64_t b = b_begin; b < b_end; ++b) {
      for (int h = 0; h < 4; ++h) {
        uint8x16_t packed[kRowsPerGroup];
        for (int r = 0; r < kRowsPerGroup; ++r) {
          packed[r] = g < g_end ? vld1q_u8(w + (g * kb + b) * kGroupBlockBytes + r * kBlockBytes + 16 * h)
                                : vdupq_n_u8(0x55);  // code 1 everywhere: t = 0
        }
        for (int j = 0; j < 4; ++j) {
          int32x4_t v[kRowsPerGroup];
          for (int r = 0; r < kRowsPerGroup; ++r) {
            v[r] = vreinterpretq_s32_s8(vsubq_s8(vreinterpretq_s8_u8(vandq_u8(packed[r], mask)), one));
            packed[r] = vshrq_n_u8(packed[r], 2);
          }
          const int32x4_t t0 = vtrn1q_s32(v[0], v[1]), t1 = vtrn2q_s32(v[0], v[1]);
          const int32x4_t t2 = vtrn1q_s32(v[2], v[3]), t3 = vtrn2q_s32(v[2], v[3]);
          const auto pair = [](int32x4_t a) { return vreinterpretq_s64_s32(a); };
          const int64x2_t quads[4] = {vtrn1q_s64(pair(t0), pair(t2)), vtrn1q_s64(pair(t1), pair(t3)),
                                      vtrn2q_s64(pair(t0), pair(t2)), vtrn2q_s64(pair(t1), pair(t3))};
          for (int i = 0; i < 4; ++i) {
            const int64_t q = (b - b_begin) * (kBlockK / 4) + 16 * j + 4 * h + i;
            vst1q_s8(codes_q + (q * kNeonPanelRows + kRowsPerGroup * pg) * 4, vreinterpretq_s8_s64(quads[i]));
          }
        }
      }
    }
  }
}

namespace {

// MT activation rows x one panel, over the k-quads [q_begin, q_end) (multiples of 4), whose codes
// codes_q holds: acc_out[m, n0 + i] for i < 16 and n0 + i < n_end is set (the first K chunk) or
// added to.
template <int MT>
BITNET_NEON_DOT void PanelTileNeonDot(const int8_t* x, int64_t kp, const int8_t* codes_q, int64_t q_begin,
                                      int64_t q_end, int64_t n0, int64_t n_end, int64_t n_total, int32_t* acc_out) {
  int32x4_t acc[MT][4];
  for (int mi = 0; mi < MT; ++mi)
    for (int v = 0; v < 4; ++v) acc[mi][v] = vdupq_n_s32(0);
  for (int64_t q = q_begin; q < q_end; q += 4) {
    int8x16_t xv[MT];
    for (int mi = 0; mi < MT; ++mi) xv[mi] = vld1q_s8(x + mi * kp + 4 * q);
    const int8_t* c_q = codes_q + (q - q_begin) * kNeonPanelRows * 4;
    PanelQuadNeonDot<MT, 0>(c_q, xv, acc);
    PanelQuadNeonDot<MT, 1>(c_q + kNeonPanelRows * 4, xv, acc);
    PanelQuadNeonDot<MT, 2>(c_q + 2 * kNeonPanelRows * 4, xv, acc);
    PanelQuadNeonDot<MT, 3>(c_q + 3 * kNeonPanelRows * 4, xv, acc);
  }
  const int64_t valid = std::min<int64_t>(kNeonPanelRows, n_end - n0);
  const bool first = q_begin == 0;
  for (int mi = 0; mi < MT; ++mi) {
    int32_t* out = acc_out + mi * n_total + n0;
    for (int v = 0; v < 4; ++v) {
      if (4 * v + 4 <= valid) {
        const int32x4_t sum = first ? acc[mi][v] : vaddq_s32(acc[mi][v], vld1q_s32(out + 4 * v));
        vst1q_s32(out + 4 * v, sum);
      } else {
        int32_t lanes[4];
        vst1q_s32(lanes, acc[mi][v]);
        for (int64_t i = 4 * v; i < valid; ++i) out[i] = first ? lanes[i - 4 * v] : out[i] + lanes[i - 4 * v];
      }
    }
  }
}

// Up to 4 int8 rows against MT activation rows, 16 k at a time. sdot is signed x signed, so
// every int8 pair (-128 * -128 included) multiplies exactly; 4 products fit an int32 lane.
template <int MT>
BITNET_NEON_DOT void Int8RowsNeonDot(const int8_t* x, int64_t kp, const int8_t* w, int64_t n0,
                                     int64_t n_rows, int64_t n_total, int32_t* acc_out) {
  int32x4_t acc[4][MT];
  for (int r = 0; r < 4; ++r)
    for (int mi = 0; mi < MT; ++mi) acc[r][mi] = vdupq_n_s32(0);
  const int8_t* w_rows[4];
  for (int r = 0; r < 4; ++r) w_rows[r] = w + (n0 + std::min<int64_t>(r, n_rows - 1)) * kp;
  for (int64_t k = 0; k < kp; k += 16) {
    int8x16_t xv[MT];
    for (int mi = 0; mi < MT; ++mi) xv[mi] = vld1q_s8(x + mi * kp + k);
    for (int r = 0; r < 4; ++r) {
      const int8x16_t wv = vld1q_s8(w_rows[r] + k);
      for (int mi = 0; mi < MT; ++mi) acc[r][mi] = vdotq_s32(acc[r][mi], wv, xv[mi]);
    }
  }
  for (int r = 0; r < n_rows; ++r)
    for (int mi = 0; mi < MT; ++mi) acc_out[mi * n_total + n0 + r] = vaddvq_s32(acc[r][mi]);
}

// ---------------------------------------------------------------------------------------------
// Plain NEON (Armv8.0 Advanced SIMD, every aarch64 core): widening multiplies instead of sdot.

// One weight row against MT activation rows, the codes unpacked as in TernaryGroupNeonDot.
// smlal adds code * x (|.| <= 256) into int16 lanes: each lane takes 32 products per block,
// at most 8192 in size, then widens once per block into int32 (sadalp).
template <int MT>
void TernaryRowNeon(const int8_t* x, int64_t kp, const int32_t* x_sum, int64_t kb,
                    const uint8_t* w_row, int32_t* out, int64_t out_stride) {
  const uint8x16_t mask = vdupq_n_u8(3);
  int32x4_t acc[MT];
  for (int mi = 0; mi < MT; ++mi) acc[mi] = vdupq_n_s32(0);
  for (int64_t b = 0; b < kb; ++b) {
    const uint8_t* block = w_row + b * kGroupBlockBytes;
    const int8_t* x_b = x + b * kBlockK;
    int16x8_t part[MT];
    for (int mi = 0; mi < MT; ++mi) part[mi] = vdupq_n_s16(0);
    for (int h = 0; h < 4; ++h) {
      uint8x16_t packed = vld1q_u8(block + 16 * h);
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        const int8x16_t codes = vreinterpretq_s8_u8(vandq_u8(packed, mask));
        packed = vshrq_n_u8(packed, 2);
        for (int mi = 0; mi < MT; ++mi) {
          const int8x16_t xv = vld1q_s8(x_b + mi * kp + 64 * j + 16 * h);
          part[mi] = vmlal_s8(part[mi], vget_low_s8(codes), vget_low_s8(xv));
          part[mi] = vmlal_high_s8(part[mi], codes, xv);
        }
      }
    }
    for (int mi = 0; mi < MT; ++mi) acc[mi] = vpadalq_s16(acc[mi], part[mi]);
  }
  for (int mi = 0; mi < MT; ++mi) out[mi * out_stride] = vaddvq_s32(acc[mi]) - x_sum[mi];
}

template <int MT>
void TernaryGroupNeon(const int8_t* x, int64_t kp, const int32_t* x_sum, int64_t kb,
                      const uint8_t* w_g, int64_t n0, int64_t n_total, int32_t* acc) {
  for (int64_t r = 0; r < kRowsPerGroup && n0 + r < n_total; ++r) {
    TernaryRowNeon<MT>(x, kp, x_sum, kb, w_g + r * kBlockBytes, acc + n0 + r, n_total);
  }
}

// Int8 x int8 into int16 products (smull: exact, -128 * -128 = 16384 included), added pairwise
// into int32 (sadalp) before two of them could overflow int16.
template <int MT>
void Int8RowNeon(const int8_t* x, int64_t kp, const int8_t* w_row, int32_t* out, int64_t out_stride) {
  int32x4_t acc[MT];
  for (int mi = 0; mi < MT; ++mi) acc[mi] = vdupq_n_s32(0);
  for (int64_t k = 0; k < kp; k += 16) {
    const int8x16_t wv = vld1q_s8(w_row + k);
    for (int mi = 0; mi < MT; ++mi) {
      const int8x16_t xv = vld1q_s8(x + mi * kp + k);
      acc[mi] = vpadalq_s16(acc[mi], vmull_s8(vget_low_s8(wv), vget_low_s8(xv)));
      acc[mi] = vpadalq_s16(acc[mi], vmull_high_s8(wv, xv));
    }
  }
  for (int mi = 0; mi < MT; ++mi) out[mi * out_stride] = vaddvq_s32(acc[mi]);
}

// ---------------------------------------------------------------------------------------------
// The kernels as tiles for ForRowTiles.

template <int MT>
struct TernaryTileNeonDot {
  static void Run(const int8_t* x, const int32_t* x_sum, int32_t* acc, int64_t kp, int64_t kb,
                  const uint8_t* w_g, int64_t n0, int64_t n_total) {
    TernaryGroupNeonDot<MT>(x, kp, x_sum, kb, w_g, n0, n_total, acc);
  }
};

template <int MT>
struct TernaryTileNeon {
  static void Run(const int8_t* x, const int32_t* x_sum, int32_t* acc, int64_t kp, int64_t kb,
                  const uint8_t* w_g, int64_t n0, int64_t n_total) {
    TernaryGroupNeon<MT>(x, kp, x_sum, kb, w_g, n0, n_total, acc);
  }
};

template <int MT>
struct PanelTileNeonDotOp {
  static void Run(const int8_t* x, const int32_t*, int32_t* acc, int64_t kp, const int8_t* codes_q,
                  int64_t q_begin, int64_t q_end, int64_t n0, int64_t n_end, int64_t n_total) {
    PanelTileNeonDot<MT>(x, kp, codes_q, q_begin, q_end, n0, n_end, n_total, acc);
  }
};

template <int MT>
struct Int8TileNeonDot {
  static void Run(const int8_t* x, const int32_t*, int32_t* acc, int64_t kp, const int8_t* w,
                  int64_t n0, int64_t n_rows, int64_t n_total) {
    Int8RowsNeonDot<MT>(x, kp, w, n0, n_rows, n_total, acc);
  }
};

template <int MT>
struct Int8TileNeon {
  static void Run(const int8_t* x, const int32_t*, int32_t* acc, int64_t kp, const int8_t* w,
                  int64_t n0, int64_t n_rows, int64_t n_total) {
    for (int64_t r = 0; r < n_rows; ++r) Int8RowNeon<MT>(x, kp, w + (n0 + r) * kp, acc + n0 + r, n_total);
  }
};

}  // namespace

int64_t TernaryGroupsPerTaskArm(Isa isa, int64_t rows) {
  return isa == Isa::kNeonDot && rows >= kNeonPanelMinRows ? kNeonPanelGroups : 1;
}

void TernaryGemmI32Arm(Isa isa, const int8_t* x_q, const int32_t* x_sum, int64_t rows, int64_t kb,
                       const uint8_t* w, int64_t g_begin, int64_t g_end, int64_t n_total,
                       int32_t* acc) {
  // Prefill with sdot: panel by panel (see PanelTileNeonDot).
  if (isa == Isa::kNeonDot && rows >= kNeonPanelMinRows) {
    TernaryPanels<PanelTileNeonDotOp, kNeonPanelTileRows, kNeonPanelRows, kNeonPanelChunkQuads>(
        UnpackPanelNeonDot, x_q, x_sum, rows, kb, w, g_begin, g_end, n_total, acc);
    return;
  }
  if (isa == Isa::kNeonDot)
    TernaryGroupsGemv<TernaryTileNeonDot>(x_q, x_sum, rows, kb, w, g_begin, g_end, n_total, acc);
  else
    TernaryGroupsGemv<TernaryTileNeon>(x_q, x_sum, rows, kb, w, g_begin, g_end, n_total, acc);
}

void Int8GemmI32Arm(Isa isa, const int8_t* x_q, const int32_t* x_sum, int64_t rows, int64_t kp, const int8_t* w,
                    int64_t n_begin, int64_t n_end, int64_t n_total, int32_t* acc) {
  if (isa == Isa::kNeonDot)
    Int8RowsGemv<Int8TileNeonDot>(x_q, x_sum, rows, kp, w, n_begin, n_end, n_total, acc);
  else
    Int8RowsGemv<Int8TileNeon>(x_q, x_sum, rows, kp, w, n_begin, n_end, n_total, acc);
}

}  // namespace bitnet

#endif  // BITNET_JAX_ARM_SIMD
