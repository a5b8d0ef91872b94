// Inside the ternary and int8 kernels of gemm.h: what gemm.cc (the scalar twins and the entry
// points) shares with the SIMD files gemm_x86.cc and gemm_arm.cc. Not part of the public API.
#ifndef BITNET_JAX_XLA_FFI_GEMM_PATHS_H_
#define BITNET_JAX_XLA_FFI_GEMM_PATHS_H_

#include <algorithm>
#include <cstdint>
#include <vector>

#include <unistd.h>

#include "cpu_isa.h"
#include "layout.h"
#include "prefetch.h"
#include "scratch.h"

#if BITNET_JAX_ARM_SIMD
#include <arm_neon.h>
#endif

namespace bitnet {

// Unnamed, as when the kernels shared one file: each SIMD file gets its own ForRowTiles, local to
// it, whose instantiations (each called once) the compiler inlines into the entry points.
namespace {

// ---------------------------------------------------------------------------------------------
// Tiling over activation rows (SIMD paths): full tiles of kMaxTileRows, then one smaller tile.

constexpr int kMaxTileRows = 4;

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

// ---------------------------------------------------------------------------------------------
// The GEMV loops over output rows, with an architecture's tiles (each SIMD file picks its tile
// per path and calls these).

// Ternary, group-major: one group's weights (kb * 256 bytes) stay in L1 while every row tile of
// x passes over them. Tile<MT>::Run(x, x_sum, acc, kp, kb, w_g, n0, n_total) multiplies the group
// at w_g (output rows n0..n0+3) with MT activation rows. Where the rows' activations outgrow L1
// (past 3/4 of it), group after group would read them all again from L2, 16 bytes of activations
// per byte of codes at 4 rows a tile: the groups then go in blocks of kGroupsBlockBytes of codes,
// which stay in L2 while each row tile passes over the whole block with its activations in L1.
// (One Zen 4 core, AVX2: 2560 x 6912 at 16-128 rows 0.89-0.91x the time, 6912 x 2560 at 6-128
// rows 0.87-0.93x; blocks of 128 or 512 KB the same; AVX-512 at 6-7 rows level; RESULTS.md.)
constexpr int64_t kGroupsBlockBytes = 256 * 1024;

// This CPU's L1 data cache (32 KB where the OS does not say).
inline int64_t L1DataBytes() {
  static const int64_t bytes = [] {
    const long l1 = sysconf(_SC_LEVEL1_DCACHE_SIZE);
    return l1 > 0 ? int64_t{l1} : int64_t{32 * 1024};
  }();
  return bytes;
}

template <template <int> class Tile>
struct OverGroups {
  // Tile<MT> over the groups [g0, g1).
  template <int MT>
  struct Op {
    static void Run(const int8_t* x, const int32_t* x_sum, int32_t* acc, int64_t kp, int64_t kb, const uint8_t* w,
                    int64_t g0, int64_t g1, int64_t n_total) {
      for (int64_t g = g0; g < g1; ++g)
        Tile<MT>::Run(x, x_sum, acc, kp, kb, w + g * kb * kGroupBlockBytes, g * kRowsPerGroup, n_total);
    }
  };
};

template <template <int> class Tile, int TileRows = kMaxTileRows>
void TernaryGroupsGemv(const int8_t* x_q, const int32_t* x_sum, int64_t rows, int64_t kb, const uint8_t* w,
                       int64_t g_begin, int64_t g_end, int64_t n_total, int32_t* acc) {
  const int64_t kp = kb * kBlockK;
  const int64_t block = rows > TileRows && rows * kp > L1DataBytes() * 3 / 4
                            ? std::max<int64_t>(1, kGroupsBlockBytes / (kb * kGroupBlockBytes))
                            : 1;  // group by group, every row tile over each
  for (int64_t g0 = g_begin; g0 < g_end; g0 += block) {
    ForRowTiles<OverGroups<Tile>::template Op, TileRows>(rows, kp, x_q, x_sum, acc, n_total, kp, kb, w, g0,
                                                          std::min(g_end, g0 + block), n_total);
  }
}

// Panels read their row groups' codes block by block, one stream per group (8 streams kb * 256
// bytes apart), which the hardware prefetcher does not keep ahead of: the codes of groups
// [g0, min(g0 + groups, g_end)), row blocks [b_begin, b_end) are fetched while the tiles work on
// the chunk before, into L2: a burst of up to 128 lines fetched into L1 held the fill buffers the
// tiles' loads wait on (one Zen 4 core from memory, 2560 x 6912: group:64 at 8 rows 1417-1442 ->
// 1202-1241 us, AVX2 at 2 rows 1296-1320 -> 936-942; per-tensor prefill at 128 rows 408-412 ->
// 417-423 GOPS).
inline void PrefetchPanelBlocks(const uint8_t* w, int64_t kb, int64_t g0, int64_t groups, int64_t g_end,
                                int64_t b_begin, int64_t b_end) {
  for (int64_t g = g0; g < std::min(g0 + groups, g_end); ++g) {
    for (int64_t line = 0; line < (b_end - b_begin) * kGroupBlockBytes; line += 64)
      PrefetchL2At(w, (g * kb + b_begin) * kGroupBlockBytes + line);
  }
}

// Ternary prefill by panels of PanelRows output rows (whole groups) from group g_begin, K in
// chunks of ChunkQuads k-quads (whole row blocks): each chunk of a panel is unpacked by
// `unpack(w, kb, g0, g_end, b_begin, b_end, codes_q)` into per-thread scratch in the order the
// architecture's tile wants, then multiplied with every row tile of x by
// Tile<MT>::Run(x, x_sum, acc, kp, codes_q, q_begin, q_end, n0, n_end, n_total) (codes_q holds
// the quads [q_begin, q_end)). The chunk's codes are written and read back in L1, where a whole
// panel's (32 rows x 6912 inputs: 221 KB) went out to L2 and back (group scales on one Ice Lake
// core: 0.77x the time at 2 rows, 0.89x at 8, level at 128).
template <template <int> class Tile, int TileRows, int64_t PanelRows, int64_t ChunkQuads, typename Unpack>
void TernaryPanels(Unpack unpack, const int8_t* x_q, const int32_t* x_sum, int64_t rows, int64_t kb,
                   const uint8_t* w, int64_t g_begin, int64_t g_end, int64_t n_total, int32_t* acc) {
  constexpr int64_t kGroups = PanelRows / kRowsPerGroup;
  constexpr int64_t kBlockQuads = kBlockK / 4;
  static_assert(ChunkQuads % kBlockQuads == 0, "a chunk is whole row blocks");
  const int64_t kp = kb * kBlockK;
  thread_local std::vector<int8_t> codes_storage;
  int8_t* codes_q = CacheLineScratch(codes_storage, PanelRows * 4 * std::min(ChunkQuads, kp / 4));
  const int64_t n_end = std::min(n_total, g_end * kRowsPerGroup);
  for (int64_t g0 = g_begin; g0 < g_end; g0 += kGroups) {
    for (int64_t q0 = 0; q0 < kp / 4; q0 += ChunkQuads) {
      const int64_t q1 = std::min(kp / 4, q0 + ChunkQuads);
      unpack(w, kb, g0, g_end, q0 / kBlockQuads, q1 / kBlockQuads, codes_q);
      if (q1 < kp / 4)  // the next chunk: this panel's, or the next panel's first
        PrefetchPanelBlocks(w, kb, g0, kGroups, g_end, q1 / kBlockQuads, std::min(kp / 4, q1 + ChunkQuads) / kBlockQuads);
      else
        PrefetchPanelBlocks(w, kb, g0 + kGroups, kGroups, g_end, 0, std::min(kp / 4, ChunkQuads) / kBlockQuads);
      ForRowTiles<Tile, TileRows>(rows, kp, x_q, x_sum, acc, n_total, kp, codes_q, q0, q1, g0 * kRowsPerGroup,
                                  n_end, n_total);
    }
  }
}

// Int8, 4 output rows at a time: Tile<MT>::Run(x, x_sum, acc, kp, w, n0, n_rows, n_total).
template <template <int> class Tile>
void Int8RowsGemv(const int8_t* x_q, const int32_t* x_sum, int64_t rows, int64_t kp, const int8_t* w,
                  int64_t n_begin, int64_t n_end, int64_t n_total, int32_t* acc) {
  for (int64_t n0 = n_begin; n0 < n_end; n0 += 4) {
    const int64_t n_rows = std::min<int64_t>(4, n_end - n0);
    ForRowTiles<Tile>(rows, kp, x_q, x_sum, acc, n_total, kp, w, n0, n_rows, n_total);
  }
}

#if BITNET_JAX_ARM_SIMD
// The sdot panels' step (gemm_arm.cc's UnpackPanelNeonDot layout): quad 4i + J of a panel (codes at
// c_q: four registers of 4 output rows) times lane J of each activation row's 16 bytes (xv[mi],
// quads 4i .. 4i + 3), into 4 accumulators of 4 outputs per activation row.
template <int MT, int J>
__attribute__((target("arch=armv8.2-a+dotprod"))) inline void PanelQuadNeonDot(const int8_t* c_q,
                                                                               const int8x16_t (&xv)[MT],
                                                                               int32x4_t (&acc)[MT][4]) {
  int8x16_t c[4];
  for (int v = 0; v < 4; ++v) c[v] = vld1q_s8(c_q + 16 * v);
  for (int mi = 0; mi < MT; ++mi)
    for (int v = 0; v < 4; ++v) acc[mi][v] = vdotq_laneq_s32(acc[mi][v], c[v], xv[mi], J);
}
#endif

}  // namespace

// ---------------------------------------------------------------------------------------------
// Each architecture's entry points, which gemm.h's TernaryGroupsPerTask, TernaryGemmI32 and
// Int8GemmI32 call with the same arguments and contracts once `isa` is a SIMD path this build
// holds (the scalar twins, in gemm.cc, take kScalar and every path IsaBuilt says is absent).

#if BITNET_JAX_X86_SIMD
// gemm_x86.cc; isa is kAvx2 or kAvx512Vnni (TernaryGroupsPerTaskX86: any isa).
int64_t TernaryGroupsPerTaskX86(Isa isa, int64_t rows);
void TernaryGemmI32X86(Isa isa, const int8_t* x_q, const int32_t* x_sum, int64_t rows, int64_t kb,
                       const uint8_t* w, int64_t g_begin, int64_t g_end, int64_t n_total,
                       int32_t* acc);
void Int8GemmI32X86(Isa isa, const int8_t* x_q, const int32_t* x_sum, int64_t rows, int64_t kp, const int8_t* w,
                    int64_t n_begin, int64_t n_end, int64_t n_total, int32_t* acc);
#elif BITNET_JAX_ARM_SIMD
// gemm_arm.cc; isa is kNeon or kNeonDot (TernaryGroupsPerTaskArm: any isa).
int64_t TernaryGroupsPerTaskArm(Isa isa, int64_t rows);
void TernaryGemmI32Arm(Isa isa, const int8_t* x_q, const int32_t* x_sum, int64_t rows, int64_t kb,
                       const uint8_t* w, int64_t g_begin, int64_t g_end, int64_t n_total,
                       int32_t* acc);
void Int8GemmI32Arm(Isa isa, const int8_t* x_q, const int32_t* x_sum, int64_t rows, int64_t kp, const int8_t* w,
                    int64_t n_begin, int64_t n_end, int64_t n_total, int32_t* acc);
#endif

}  // namespace bitnet

#endif  // BITNET_JAX_XLA_FFI_GEMM_PATHS_H_
