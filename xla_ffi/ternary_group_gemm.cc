// The ternary kernel with a scale per group of G inputs (weight_quant 'group:G'; contract in gemm.h):
// a scalar twin, AVX2 and AVX-512 VNNI on x86-64, and NEON with the dot-product extension on
// aarch64 (plain NEON takes the scalar twin).
//
// A row's dot product is a float sum, group after group, of exact integer group sums times the
// group's scale, with no fused multiply-adds (this file is built with -ffp-contract=off): the paths
// agree bit for bit, so a result never depends on the CPU, the batch or the thread count.
// Codes are t + 1, so the integer sums are sum (t + 1) * x; subtracting the group's sum of x
// (x_group, computed once per call) leaves sum t * x exactly.
//
// GEMV tiles (decode; with sdot also 2-16 rows): a group is whole 64-weight strips
// of a row block (layout.h: the block shifted right by 2j and masked holds the codes of
// k = 64j .. 64j + 63). On AVX2 a strip is two 32-code halves, each a maddubs with 32
// activations; on AVX-512 one vpdpbusd of 64 codes; with NEON sdot four 16-code quarters. Each
// output keeps its integer lanes through a group; at the group's end a tile's (up to) 4 outputs
// are summed across lanes together (integer, so in any order) and scaled in one 4-lane float step.
// One activation row takes the 4 rows of a row group together, front to back, as one stream; more
// activation rows take one weight row at a time with a tile of up to 4 of them. On x86 one
// activation row takes 16 (AVX-512) or 8 (AVX2) output rows at a time instead, transposed in
// registers so that vector lanes are whole outputs (GroupRows16Avx512, GroupGemv8Avx2; on
// AVX-512 up to 4 activation rows so); the 4-row tile serves what is left of a task.
//
// From 2 activation rows on x86 (AVX-512: from 5, and a task's last partial 16-row tile; from 17
// with sdot), panels whose vector lanes are whole outputs,
// so a group's scaling is one subtraction, conversion, multiply and add per register of outputs
// (the GEMV tiles sum each output across lanes at every group's end: with 64-wide groups, at
// every vpdpbusd; at 2-16 rows they took 1.4-3.4x as long as the panels): on AVX-512
// the per-tensor kernel's 32-row panels (gemm_x86.cc's unpacking) with vpdpbusd, on AVX2 panels
// of 16 rows with maddubs (per tensor, AVX2 has no panel path: see gemm_x86.cc), with sdot the
// per-tensor kernel's 16-row panels (gemm_arm.cc's unpacking; plain NEON has none).

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu_isa.h"
#include "gemm.h"
#include "layout.h"
#include "prefetch.h"

#if BITNET_JAX_X86_SIMD || BITNET_JAX_ARM_SIMD
#include "gemm_paths.h"
#include "scratch.h"
#endif
#if BITNET_JAX_X86_SIMD
#include "x86_simd.h"
#elif BITNET_JAX_ARM_SIMD
#include <arm_neon.h>
#endif

namespace bitnet {

namespace {

constexpr int64_t kStripK = kBlockK / 4;  // weights per strip: a row block shifted by 2j and masked
static_assert(kTernaryGroupAlign == kStripK, "a group is whole strips");

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
        float d = 0.0f;
        for (int64_t c = 0; c < groups; ++c) {
          int32_t p = 0;
          for (int64_t k = c * group_k; k < (c + 1) * group_k; ++k) {
            const uint8_t* block = w + (g * kb + k / kBlockK) * kGroupBlockBytes + r * kBlockBytes;
            const int32_t t = ((block[CodeByte(k % kBlockK)] >> CodeShift(k % kBlockK)) & 3) - 1;
            p += t * x_q[m * kp + k];
          }
          d = d + static_cast<float>(p) * w_scale[c * n_total + n];
        }
        dot[m * n_total + n] = d;
      }
    }
  }
}

#if BITNET_JAX_X86_SIMD || BITNET_JAX_ARM_SIMD

// The operands of one GEMV tile: R weight rows of a row group (from row r0) against MT activation
// rows, R * MT <= 4 outputs; output o = r * MT + mi (R or MT is 1).
struct GroupTile {
  const int8_t* x;        // the tile's first activation row; rows kp apart
  int64_t kp;
  const int32_t* x_group; // x_group + m0: group c of the tile's row mi at [c * rows + mi]
  int64_t rows;
  const uint8_t* w_rows;  // row r0's first block in its row group: w_g + r0 * kBlockBytes
  const float* scale;     // w_scale + n0 (n0 = the tile's first output row); groups n_total apart
  int64_t valid_rows;     // of the R weight rows, those below n_total
  int64_t group_k, groups, n_total;
  float* dot;             // dot + m0 * n_total + n0; rows n_total apart
};

constexpr int64_t kPrefetchBytes = 2048;

// The row groups [g_begin, g_end) with Tile<R, MT> of a SIMD path: one activation row takes the 4
// weight rows of a group together; more take one weight row at a time, in tiles of up to 4
// activation rows, after prefetching the next group (each pass over a row reads 64 of every 256
// bytes, which the hardware prefetcher does not follow).
template <template <int, int> class Tile>
void TernaryGroupRows(const int8_t* x_q, const int32_t* x_group, int64_t rows, int64_t kb, const uint8_t* w,
                      const float* w_scale, int64_t group_k, int64_t groups, int64_t g_begin, int64_t g_end,
                      int64_t n_total, float* dot) {
  const int64_t kp = kb * kBlockK;
  constexpr int64_t kScalesPerLine = 64 / sizeof(float);
  for (int64_t g = g_begin; g < g_end; ++g) {
    const uint8_t* w_g = w + g * kb * kGroupBlockBytes;
    const int64_t n0 = g * kRowsPerGroup;
    const int64_t valid = std::min<int64_t>(kRowsPerGroup, n_total - n0);
    // The scales are [groups][n_total]: a row group reads one 16-byte piece of `groups` lines
    // n_total floats apart, too many streams for the hardware prefetcher, and each line serves
    // 4 row groups. Entering a line's first row group, fetch the next lines (for the following 4),
    // if there are outputs there (past the last, the address would lie past w_scale).
    if (n0 % kScalesPerLine == 0 && n0 + kScalesPerLine < n_total) {
      for (int64_t c = 0; c < groups; ++c) __builtin_prefetch(w_scale + c * n_total + n0 + kScalesPerLine);
    }
    if (rows == 1) {
      Tile<kRowsPerGroup, 1>::Run({x_q, kp, x_group, rows, w_g, w_scale + n0, valid, group_k, groups, n_total, dot + n0});
      continue;
    }
    for (int64_t line = 0; line < kb * kGroupBlockBytes; line += 64) PrefetchAt(w_g, kb * kGroupBlockBytes + line);
    for (int64_t r = 0; r < valid; ++r) {
      for (int64_t m = 0; m < rows; m += 4) {
        const GroupTile t{x_q + m * kp, kp, x_group + m, rows, w_g + r * kBlockBytes, w_scale + n0 + r, 1,
                          group_k, groups, n_total, dot + m * n_total + n0 + r};
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

// ---------------------------------------------------------------------------------------------
// Prefill panels: output rows unpacked into vector lanes, so that a register's lanes are whole
// outputs and a group's step is one subtraction, conversion, multiply and add per register of
// outputs. A tile of MT activation rows keeps, per row, integer registers for the group in
// progress; d, each output's float sum, starts at 0 and stays in registers (AVX-512, NEON) or
// goes through dot (AVX2, 16 registers) from group to group, in gemm.h's order either way.

struct GroupPanel {
  const int8_t* x;        // the tile's first activation row; rows kp apart
  int64_t kp;
  const int32_t* x_group; // x_group + m0: group c of the tile's row mi at [c * rows + mi]
  int64_t rows;
  const int8_t* codes_q;  // the unpacked chunk of the panel: [quads][panel rows][4] codes from quad q_base
  int64_t q_base;
  const float* scale;     // w_scale + n0; groups n_total apart
  int64_t n_total;
  int64_t group_q;        // k-quads per group
  int64_t valid;          // the panel's outputs below n_total
  float* dot;             // dot + m0 * n_total + n0; rows n_total apart
};

// K chunk: whole groups of about this many k-quads, whose panel codes (unpacked chunk by chunk)
// and a tile's activations stay in L1 while every tile passes over them (d goes through dot
// between chunks).
constexpr int64_t kGroupPanelChunkQuads = 256;

// Tile<MT>::Run(p, c_begin, c_end) for the MT = mt (1 .. MaxMT) activation rows left.
template <template <int> class Tile, int MaxMT>
inline void RunPanelTile(int64_t mt, const GroupPanel& p, int64_t c_begin, int64_t c_end) {
  if constexpr (MaxMT > 1) {
    if (mt < MaxMT) return RunPanelTile<Tile, MaxMT - 1>(mt, p, c_begin, c_end);
  }
  Tile<MaxMT>::Run(p, c_begin, c_end);
}

// The row groups [g_begin, g_end) in panels of PanelRows output rows, K chunk by K chunk: the
// row blocks under a chunk's groups unpacked by unpack(w, kb, g0, g_end, b_begin, b_end, codes_q)
// into per-thread scratch, then multiplied by tiles of up to TileRows activation rows.
template <int64_t PanelRows, int TileRows, template <int> class Tile, typename Unpack>
void GroupPanels(Unpack unpack, const int8_t* x_q, const int32_t* x_group, int64_t rows, int64_t kb,
                 const uint8_t* w, const float* w_scale, int64_t group_k, int64_t groups, int64_t g_begin,
                 int64_t g_end, int64_t n_total, float* dot) {
  constexpr int64_t kPanelGroups = PanelRows / kRowsPerGroup;
  constexpr int64_t kBlockQuads = kBlockK / 4;
  const int64_t kp = kb * kBlockK, group_q = group_k / 4;
  const int64_t chunk_groups = std::max<int64_t>(1, kGroupPanelChunkQuads / group_q);
  // A chunk's quads may start and end inside a row block (groups of 3 strips, say): one block more.
  const int64_t chunk_blocks = std::min(kb, CeilDiv(chunk_groups * group_q, kBlockQuads) + 1);
  thread_local std::vector<int8_t> codes_storage;
  int8_t* codes_q = CacheLineScratch(codes_storage, PanelRows * 4 * kBlockQuads * chunk_blocks);
  const int64_t n_end = std::min(n_total, g_end * kRowsPerGroup);
  for (int64_t g0 = g_begin; g0 < g_end; g0 += kPanelGroups) {
    const int64_t n0 = g0 * kRowsPerGroup, valid = std::min(PanelRows, n_end - n0);
    for (int64_t c0 = 0; c0 < groups; c0 += chunk_groups) {
      const int64_t c1 = std::min(groups, c0 + chunk_groups);
      const int64_t b_begin = c0 * group_q / kBlockQuads, b_end = CeilDiv(c1 * group_q, kBlockQuads);
      unpack(w, kb, g0, g_end, b_begin, b_end, codes_q);
      // The next chunk's blocks (from this chunk's last: a group may end inside it): this
      // panel's, or the next panel's first.
      if (c1 < groups)
        PrefetchPanelBlocks(w, kb, g0, kPanelGroups, g_end, b_end - 1,
                            CeilDiv(std::min(groups, c1 + chunk_groups) * group_q, kBlockQuads));
      else
        PrefetchPanelBlocks(w, kb, g0 + kPanelGroups, kPanelGroups, g_end, 0,
                            CeilDiv(std::min(groups, chunk_groups) * group_q, kBlockQuads));
      for (int64_t m = 0; m < rows; m += TileRows) {
        const GroupPanel p{x_q + m * kp, kp, x_group + m, rows, codes_q, b_begin * kBlockQuads, w_scale + n0,
                           n_total, group_q, valid, dot + m * n_total + n0};
        RunPanelTile<Tile, TileRows>(std::min<int64_t>(TileRows, rows - m), p, c0, c1);
      }
    }
  }
}

#endif  // BITNET_JAX_X86_SIMD || BITNET_JAX_ARM_SIMD

#if BITNET_JAX_X86_SIMD

// ---------------------------------------------------------------------------------------------
// x86-64 GEMV tiles. Their group step works on 4 outputs in the lanes of one __m128: the 128-bit
// helpers below are inlined by both targets.

// The 8 int32 lanes of each of a, b, c, d summed: [sum a, sum b, sum c, sum d] (exact).
BITNET_AVX2_SHARED inline __m128i Sum4(__m256i a, __m256i b, __m256i c, __m256i d) {
  const __m256i abcd = _mm256_hadd_epi32(_mm256_hadd_epi32(a, b), _mm256_hadd_epi32(c, d));
  return _mm_add_epi32(_mm256_castsi256_si128(abcd), _mm256_extracti128_si256(abcd, 1));
}

// The first `count` of 4 lanes set (count 0..4).
BITNET_AVX2_SHARED inline __m128i FirstLanes(int64_t count) {
  return _mm_cmpgt_epi32(_mm_set1_epi32(static_cast<int32_t>(count)), _mm_setr_epi32(0, 1, 2, 3));
}

// Group c's sums of x for the tile's outputs: one activation row for all 4 weight rows (R = 4),
// or the MT rows' own (R = 1; lanes past MT are not read).
template <int R, int MT>
BITNET_AVX2_SHARED inline __m128i GroupXSums(const GroupTile& t, int64_t c) {
  if constexpr (R > 1) {
    return _mm_set1_epi32(t.x_group[c * t.rows]);
  } else if constexpr (MT == 4) {
    return _mm_loadu_si128(reinterpret_cast<const __m128i*>(t.x_group + c * t.rows));
  } else {
    return _mm_maskload_epi32(t.x_group + c * t.rows, FirstLanes(MT));
  }
}

// Group c's scales for the tile's outputs: the R weight rows' (R = 4; 0 for rows past valid_rows,
// whose outputs are dropped), or the one row's for every activation row (R = 1).
template <int R, int MT>
BITNET_AVX2_SHARED inline __m128 GroupScales(const GroupTile& t, int64_t c, __m128i valid_lanes) {
  if constexpr (R > 1) {
    return _mm_maskload_ps(t.scale + c * t.n_total, valid_lanes);
  } else {
    return _mm_set1_ps(t.scale[c * t.n_total]);
  }
}

// gemm.h's step for group c on the tile's 4 outputs: d + float(sum_code_x - x_sum) * scale, where
// sum_code_x holds the outputs' sums of code * x (code = t + 1) and x_sum their sums of x.
BITNET_AVX2_SHARED inline __m128 AddScaledGroup(__m128 d, __m128i sum_code_x, __m128i x_sum, __m128 scale) {
  return _mm_add_ps(d, _mm_mul_ps(_mm_cvtepi32_ps(_mm_sub_epi32(sum_code_x, x_sum)), scale));
}

// The same step on 8 outputs (the AVX2 tiles whose lanes are whole outputs).
BITNET_AVX2_SHARED inline __m256 AddScaledGroup(__m256 d, __m256i sum_code_x, __m256i x_sum, __m256 scale) {
  return _mm256_add_ps(d, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(sum_code_x, x_sum)), scale));
}

// The tile's outputs (rows below valid_rows) into dot.
template <int R, int MT>
BITNET_AVX2_SHARED inline void StoreDots(const GroupTile& t, __m128 d) {
  alignas(16) float out[4];
  _mm_store_ps(out, d);
  for (int r = 0; r < R && r < t.valid_rows; ++r)
    for (int mi = 0; mi < MT; ++mi) t.dot[mi * t.n_total + r] = out[r * MT + mi];
}

// Strips between two widenings of AVX2's int16 sums: per strip, a lane adds two maddubs results of
// magnitude at most 2 * 2 * 128 = 512.
constexpr int64_t kAvx2WidenStrips = 32;
static_assert(kAvx2WidenStrips * 2 * 512 <= 32768, "int16 partial sums must not overflow");

template <int R, int MT>
BITNET_AVX2 void GroupTileAvx2(const GroupTile& t) {
  static_assert(R * MT <= 4, "a tile's group step takes 4 outputs");
  const __m256i mask = _mm256_set1_epi8(3);
  const __m256i ones = _mm256_set1_epi16(1);
  const __m128i valid_lanes = FirstLanes(t.valid_rows);
  __m256i part[4], acc[4];  // output o = r * MT + mi; those past R * MT stay 0
  for (int o = 0; o < 4; ++o) part[o] = acc[o] = _mm256_setzero_si256();
  __m128 d = _mm_setzero_ps();
  const int64_t strips_per_group = t.group_k / kStripK, strips = t.groups * strips_per_group;
  int64_t c = 0, in_group = 0;
  for (int64_t s0 = 0; s0 < strips; s0 += 4) {
    const uint8_t* block = t.w_rows + (s0 / 4) * kGroupBlockBytes;
    const int8_t* x_b = t.x + (s0 / 4) * kBlockK;
    if (R == kRowsPerGroup) {  // the 4 rows' blocks are one stream (a tile of one row is prefetched by its caller)
      for (int line = 0; line < 4; ++line)
        PrefetchAt(block, kPrefetchBytes + 64 * line);
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
          for (int mi = 0; mi < MT; ++mi) MaddubsAdd(part[r * MT + mi], codes, xv[mi]);
        }
      }
      const bool group_end = ++in_group == strips_per_group;
      if (group_end || in_group % kAvx2WidenStrips == 0) {
        for (int o = 0; o < R * MT; ++o) {
          acc[o] = _mm256_add_epi32(acc[o], _mm256_madd_epi16(part[o], ones));
          part[o] = _mm256_setzero_si256();
        }
      }
      if (group_end) {
        d = AddScaledGroup(d, Sum4(acc[0], acc[1], acc[2], acc[3]), GroupXSums<R, MT>(t, c),
                           GroupScales<R, MT>(t, c, valid_lanes));
        for (int o = 0; o < R * MT; ++o) acc[o] = _mm256_setzero_si256();
        ++c;
        in_group = 0;
      }
    }
  }
  StoreDots<R, MT>(t, d);
}

// The 16 int32 lanes of v added in pairs (l and l + 8) into 8: the same total.
BITNET_AVX512 inline __m256i Fold16(__m512i v) {
  return _mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1));
}

template <int R, int MT>
BITNET_AVX512 void GroupTileAvx512(const GroupTile& t) {
  static_assert(R * MT <= 4, "a tile's group step takes 4 outputs");
  const __m512i mask = _mm512_set1_epi8(3);
  const __m128i valid_lanes = FirstLanes(t.valid_rows);
  __m512i acc[4];  // output o = r * MT + mi; those past R * MT stay 0
  for (int o = 0; o < 4; ++o) acc[o] = _mm512_setzero_si512();
  __m128 d = _mm_setzero_ps();
  const int64_t strips_per_group = t.group_k / kStripK, strips = t.groups * strips_per_group;
  int64_t c = 0, in_group = 0;
  for (int64_t s0 = 0; s0 < strips; s0 += 4) {
    const uint8_t* block = t.w_rows + (s0 / 4) * kGroupBlockBytes;
    const int8_t* x_b = t.x + (s0 / 4) * kBlockK;
    if (R == kRowsPerGroup) {
      for (int line = 0; line < 4; ++line)
        PrefetchAt(block, kPrefetchBytes + 64 * line);
    }
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
        for (int mi = 0; mi < MT; ++mi) Dpbusd(acc[r * MT + mi], codes, xv[mi]);
      }
      if (++in_group == strips_per_group) {
        const __m128i sums = Sum4(Fold16(acc[0]), Fold16(acc[1]), Fold16(acc[2]), Fold16(acc[3]));
        d = AddScaledGroup(d, sums, GroupXSums<R, MT>(t, c), GroupScales<R, MT>(t, c, valid_lanes));
        for (int o = 0; o < R * MT; ++o) acc[o] = _mm512_setzero_si512();
        ++c;
        in_group = 0;
      }
    }
  }
  StoreDots<R, MT>(t, d);
}

// 1-4 activation rows on AVX-512, 16 output rows (4 row groups) a tile, with no horizontal sums:
// the 16 rows' blocks, transposed as 16 x 16 dwords in registers (Transpose16x16), give for each
// dword dw one register holding, at shift 2j, quad 16j + dw of every row, so vpdpbusd with that
// quad of an activation row broadcast accumulates whole outputs in its 16 lanes, and a group's
// step is one subtraction, conversion, multiply and add for 16 outputs. (The 4-row tile sums 4 outputs
// across lanes at every group's end, with 64-wide groups after every 4 vpdpbusd: on an Ice Lake
// Xeon core it took 2.7x the per-tensor kernel's time.) No shifts either: strip j's codes are
// masked in place, code << 2j (at most 2 << 6 = 128, a valid u8), so the strip's sums are 4^j
// times the codes' and leave by one exact arithmetic shift.
constexpr int64_t kTile16Groups = 4;  // row groups per tile
// Scale lines are fetched this many blocks ahead of their group, not a tile ahead: a tile reads
// one line per group, `groups` lines n_total floats apart, and at 2560 outputs (10 KB apart) they
// fall into 2 of the L1's 64 sets, where a tile's worth of them (108 at K = 6912) evict each other.
constexpr int64_t kScaleAheadBlocks = 2;

// A transposed tile's look-ahead at its block b: block b of the next tile's tile_groups row groups
// into L2, and the scale lines of the groups that start kScaleAheadBlocks ahead (this tile's, or the
// next tile's if there is one). A tile's row groups lie one after another, so the tiles are one
// contiguous stream, and fetching the next tile as it lies (tile_groups * kGroupBlockBytes a block,
// one tile ahead) keeps memory reading in order; the tile itself reads its row groups as
// tile_groups interleaved streams, which fetched each kPrefetchBytes ahead into L1 (the earlier
// look-ahead) left a group:64 2B4T token's ternary matmuls at 58-60 ms on one Zen 4 thread,
// against 31-34 so (benchmarks/RESULTS.md).
// Past the task's last tile the lines are another task's or past the array (PrefetchL2At takes
// any address).
// Forced inline: GCC does not inline a function of the default target into the tiles' targets by
// itself, and a call whose only effects are prefetches it finds side-effect free and deletes.
__attribute__((always_inline)) inline void PrefetchTileAhead(const uint8_t* w_t, int64_t kb, int64_t tile_groups,
                                                             int64_t b, const float* w_scale, int64_t n0,
                                                             int64_t n_total, int64_t groups,
                                                             int64_t strips_per_group) {
  const int64_t tile_rows = tile_groups * kRowsPerGroup, block_bytes = tile_groups * kGroupBlockBytes;
  for (int64_t line = 0; line < block_bytes; line += 64) PrefetchL2At(w_t, (kb + b) * block_bytes + line);
  const int64_t s_ahead = b + kScaleAheadBlocks, s_tile = s_ahead / kb, s_block = s_ahead % kb;
  if (s_tile > 0 && n0 + tile_rows >= n_total) return;  // the last tile: no scales past it
  const int64_t s_end = std::min(groups, CeilDiv(4 * (s_block + 1), strips_per_group));
  for (int64_t s = CeilDiv(4 * s_block, strips_per_group); s < s_end; ++s)
    PrefetchAt(w_scale, sizeof(float) * (s * n_total + n0 + s_tile * tile_rows));
}

// Where the whole tiles of tile_groups row groups from g_begin end: within [g_begin, g_end) and
// short of a partial last row group (a transposed tile stores all of its rows). The caller's other
// path takes [that, g_end).
inline int64_t WholeTilesEnd(int64_t g_begin, int64_t g_end, int64_t n_total, int64_t tile_groups) {
  const int64_t last = std::min(g_end, n_total / kRowsPerGroup);
  return last <= g_begin ? g_begin : g_begin + (last - g_begin) / tile_groups * tile_groups;
}

// MT activation rows (x: rows kp apart; x_group: group c of row mi at [c * x_group_stride + mi];
// dot: rows n_total apart) against the tile of row groups g0 .. g0 + 3.
template <int MT>
BITNET_AVX512 void GroupRows16Avx512(const int8_t* x, int64_t kp, const int32_t* x_group, int64_t x_group_stride,
                                     int64_t kb, const uint8_t* w, const float* w_scale, int64_t group_k,
                                     int64_t groups, int64_t g0, int64_t n_total, float* dot) {
  const int64_t n0 = g0 * kRowsPerGroup, strips_per_group = group_k / kStripK, strips = groups * strips_per_group;
  constexpr int kChains = MT == 1 ? 2 : 1;  // vpdpbusd chains per activation row
  const int32_t* x32 = reinterpret_cast<const int32_t*>(x);
  const int64_t kq = kp / 4;                            // quads per activation row
  const uint8_t* w_t = w + g0 * kb * kGroupBlockBytes;  // the tile's row group i: blocks i * kb .. i * kb + kb - 1
  __m512 d[MT];
  __m512i group_acc[MT];
#pragma GCC unroll 4
  for (int mi = 0; mi < MT; ++mi) {
    d[mi] = _mm512_setzero_ps();
    group_acc[mi] = _mm512_setzero_si512();
  }
  int64_t c = 0, in_group = 0;
  for (int64_t b = 0; b < kb; ++b) {
    PrefetchTileAhead(w_t, kb, kTile16Groups, b, w_scale, n0, n_total, groups, strips_per_group);
    __m512i r[16];
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i)
      r[i] = _mm512_loadu_si512(w_t + ((i / kRowsPerGroup) * kb + b) * kGroupBlockBytes +
                                (i % kRowsPerGroup) * kBlockBytes);
    Transpose16x16(r);  // r[dw] lane i: dword dw of row n0 + i's block
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      if (4 * b + j == strips) break;
      const __m512i mask = _mm512_set1_epi8(static_cast<char>(3 << (2 * j)));
      const int64_t q = b * (kBlockK / 4) + 16 * j;  // the strip's first activation quad
      __m512i a[MT][kChains];
#pragma GCC unroll 4
      for (int mi = 0; mi < MT; ++mi)
        for (int ch = 0; ch < kChains; ++ch) a[mi][ch] = _mm512_setzero_si512();
#pragma GCC unroll 16
      for (int dw = 0; dw < 16; ++dw) {
        const __m512i codes = _mm512_and_si512(r[dw], mask);
#pragma GCC unroll 4
        for (int mi = 0; mi < MT; ++mi) DpbusdBroadcast(a[mi][dw % kChains], codes, x32 + mi * kq + q + dw);
      }
#pragma GCC unroll 4
      for (int mi = 0; mi < MT; ++mi) {
        const __m512i strip = kChains == 2 ? _mm512_add_epi32(a[mi][0], a[mi][kChains - 1]) : a[mi][0];
        group_acc[mi] = _mm512_add_epi32(group_acc[mi], _mm512_srai_epi32(strip, 2 * j));
      }
      if (++in_group == strips_per_group) {
        const __m512 scale = _mm512_loadu_ps(w_scale + c * n_total + n0);
#pragma GCC unroll 4
        for (int mi = 0; mi < MT; ++mi) {
          const __m512i x_sum = _mm512_set1_epi32(x_group[c * x_group_stride + mi]);
          const __m512 p = _mm512_cvtepi32_ps(_mm512_sub_epi32(group_acc[mi], x_sum));
          d[mi] = _mm512_add_ps(d[mi], _mm512_mul_ps(p, scale));
          group_acc[mi] = _mm512_setzero_si512();
        }
        ++c;
        in_group = 0;
      }
    }
  }
#pragma GCC unroll 4
  for (int mi = 0; mi < MT; ++mi) _mm512_storeu_ps(dot + mi * n_total + n0, d[mi]);
}

// Up to this many activation rows take the 16-row tiles (16 registers of codes, 3 per activation
// row); more take the panels. One core of the Ice Lake Xeon, group:64, 2560 x 6912: 2 rows 354
// against the panels' 652-748 us, 3 rows 528-552 against 787-1292, 4 rows 612-633 against
// 782-840; from 5 rows level or slower (each further 4 rows transpose the codes again, where the
// panels unpack a chunk once for every tile of rows).
constexpr int64_t kTiles16MaxRows = 4;

// The row groups [g_begin, g_end) by 16-row tiles, all `rows` (1 .. kTiles16MaxRows) in each;
// returns the first row group left (a partial tile at the task's or the matrix's end,
// WholeTilesEnd) for the caller's other path.
int64_t GroupTiles16Avx512(const int8_t* x_q, const int32_t* x_group, int64_t rows, int64_t kb, const uint8_t* w,
                           const float* w_scale, int64_t group_k, int64_t groups, int64_t g_begin, int64_t g_end,
                           int64_t n_total, float* dot) {
  const int64_t kp = kb * kBlockK, g_tiles = WholeTilesEnd(g_begin, g_end, n_total, kTile16Groups);
  for (int64_t g = g_begin; g < g_tiles; g += kTile16Groups) {
    switch (rows) {
      case 1: GroupRows16Avx512<1>(x_q, kp, x_group, rows, kb, w, w_scale, group_k, groups, g, n_total, dot); break;
      case 2: GroupRows16Avx512<2>(x_q, kp, x_group, rows, kb, w, w_scale, group_k, groups, g, n_total, dot); break;
      case 3: GroupRows16Avx512<3>(x_q, kp, x_group, rows, kb, w, w_scale, group_k, groups, g, n_total, dot); break;
      default: GroupRows16Avx512<4>(x_q, kp, x_group, rows, kb, w, w_scale, group_k, groups, g, n_total, dot); break;
    }
  }
  return g_tiles;
}
static_assert(kTiles16MaxRows == 4, "GroupTiles16Avx512 instantiates GroupRows16Avx512 for 1-4 rows");

// The AVX2 form: 8 output rows (2 row groups) a tile, each half block of the 8 rows (8 dwords)
// transposed as 8 x 8 (Transpose8x8): for dword e of the half, one register of quad 16j + 8h + e
// of every row at shift 2j. maddubs with the quad's activations broadcast leaves 2 int16 pair
// sums per output; a strip's 16 quads add up in int16 (16 * 2 * 2 * 128 = 8192 at most) and
// widen once by a madd with ones. (Codes masked in place, as on AVX-512, would overflow maddubs's
// int16 pair sums: 2 * 128 * 128.) 16 registers: 8 of codes, 4 strip sums, mask, activations.
// Each dword register feeds the 4 strips' sums in turn (not one strip's 8 registers in a row), so
// consecutive maddubs add into different sums; and 64-wide groups, where every strip ends a
// group, scale a whole block's 4 strips with no group bookkeeping. Both keep gemm.h's order.
// One Zen 4 core, AVX2, group:64, 2560 x 6912: 345-351 -> 291-293 us from the LLC, 518-539 ->
// 480-486 from memory (the bookkeeping alone was 14% of the first).
constexpr int64_t kGemv8Groups = 2;  // row groups per AVX2 tile

BITNET_AVX2 void GroupGemv8Avx2(const int8_t* x, const int32_t* x_group, int64_t kb, const uint8_t* w,
                                const float* w_scale, int64_t group_k, int64_t groups, int64_t g0, int64_t n_total,
                                float* dot) {
  const int64_t n0 = g0 * kRowsPerGroup, strips_per_group = group_k / kStripK, strips = groups * strips_per_group;
  const int32_t* x32 = reinterpret_cast<const int32_t*>(x);
  const uint8_t* w_t = w + g0 * kb * kGroupBlockBytes;  // the tile's row group i: blocks i * kb .. i * kb + kb - 1
  const __m256i mask = _mm256_set1_epi8(3), ones = _mm256_set1_epi16(1);
  __m256 d = _mm256_setzero_ps();
  __m256i group_acc = _mm256_setzero_si256();
  int64_t c = 0, in_group = 0;
  for (int64_t b = 0; b < kb; ++b) {
    PrefetchTileAhead(w_t, kb, kGemv8Groups, b, w_scale, n0, n_total, groups, strips_per_group);
    __m256i part[4];  // strip j's int16 pair sums
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) part[j] = _mm256_setzero_si256();
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {
      __m256i r[8];
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i)
        r[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(
            w_t + ((i / kRowsPerGroup) * kb + b) * kGroupBlockBytes + (i % kRowsPerGroup) * kBlockBytes + 32 * h));
      Transpose8x8(r);  // r[e] lane i: dword 8h + e of row n0 + i's block
      const int32_t* x_q = x32 + b * (kBlockK / 4) + 8 * h;
#pragma GCC unroll 8
      for (int e = 0; e < 8; ++e) {
        __m256i codes = r[e];
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) {
          MaddubsAdd(part[j], _mm256_and_si256(codes, mask), _mm256_set1_epi32(x_q[16 * j + e]));
          codes = _mm256_srli_epi16(codes, 2);
        }
      }
    }
    if (strips_per_group == 1 && 4 * b + 4 <= strips) {  // four whole 64-wide groups
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        d = AddScaledGroup(d, _mm256_madd_epi16(part[j], ones), _mm256_set1_epi32(x_group[c + j]),
                           _mm256_loadu_ps(w_scale + (c + j) * n_total + n0));
      }
      c += 4;
      continue;
    }
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      if (4 * b + j == strips) break;
      group_acc = _mm256_add_epi32(group_acc, _mm256_madd_epi16(part[j], ones));
      if (++in_group == strips_per_group) {
        d = AddScaledGroup(d, group_acc, _mm256_set1_epi32(x_group[c]), _mm256_loadu_ps(w_scale + c * n_total + n0));
        group_acc = _mm256_setzero_si256();
        ++c;
        in_group = 0;
      }
    }
  }
  _mm256_storeu_ps(dot + n0, d);
}

template <int R, int MT>
struct Avx2Tile {
  static void Run(const GroupTile& t) { GroupTileAvx2<R, MT>(t); }
};

template <int R, int MT>
struct Avx512Tile {
  static void Run(const GroupTile& t) { GroupTileAvx512<R, MT>(t); }
};

// AVX-512: the per-tensor kernel's 32-row panels (UnpackPanelAvx512, gemm_paths.h), two registers
// of 16 outputs; per activation row 2 int32 and 2 float accumulators (tiles of 6 rows: 24
// registers, with 2 of codes and 2 of scales).
constexpr int kAvx512GroupPanelTileRows = 6;

BITNET_AVX512 inline __mmask16 FirstLanes16(int64_t count) {
  return count >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << std::max<int64_t>(count, 0)) - 1);
}

template <int MT>
BITNET_AVX512 void GroupPanelTileAvx512(const GroupPanel& p, int64_t c_begin, int64_t c_end) {
  const __mmask16 valid[2] = {FirstLanes16(p.valid), FirstLanes16(p.valid - 16)};
  __m512 d[MT][2];
#pragma GCC unroll 8
  for (int mi = 0; mi < MT; ++mi)
    for (int h = 0; h < 2; ++h)
      d[mi][h] = c_begin == 0 ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(valid[h], p.dot + mi * p.n_total + 16 * h);
  const int32_t* x32 = reinterpret_cast<const int32_t*>(p.x);
  const int64_t kq = p.kp / 4;  // quads per x row
  for (int64_t c = c_begin; c < c_end; ++c) {
    __m512i acc[MT][2];
#pragma GCC unroll 8
    for (int mi = 0; mi < MT; ++mi) acc[mi][0] = acc[mi][1] = _mm512_setzero_si512();
    for (int64_t q = c * p.group_q; q < (c + 1) * p.group_q; ++q) {
      const __m512i c0 = _mm512_loadu_si512(p.codes_q + (q - p.q_base) * kAvx512PanelRows * 4);
      const __m512i c1 = _mm512_loadu_si512(p.codes_q + (q - p.q_base) * kAvx512PanelRows * 4 + 64);
#pragma GCC unroll 8
      for (int mi = 0; mi < MT; ++mi) {
        const __m512i xv = _mm512_set1_epi32(x32[mi * kq + q]);
        Dpbusd(acc[mi][0], c0, xv);
        Dpbusd(acc[mi][1], c1, xv);
      }
    }
    const __m512 s0 = _mm512_maskz_loadu_ps(valid[0], p.scale + c * p.n_total);
    const __m512 s1 = _mm512_maskz_loadu_ps(valid[1], p.scale + c * p.n_total + 16);
#pragma GCC unroll 8
    for (int mi = 0; mi < MT; ++mi) {
      const __m512i x_sum = _mm512_set1_epi32(p.x_group[c * p.rows + mi]);
      d[mi][0] = _mm512_add_ps(d[mi][0], _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[mi][0], x_sum)), s0));
      d[mi][1] = _mm512_add_ps(d[mi][1], _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[mi][1], x_sum)), s1));
    }
  }
#pragma GCC unroll 8
  for (int mi = 0; mi < MT; ++mi)
    for (int h = 0; h < 2; ++h) _mm512_mask_storeu_ps(p.dot + mi * p.n_total + 16 * h, valid[h], d[mi][h]);
}

template <int MT>
struct GroupPanelTileAvx512Op {
  static void Run(const GroupPanel& p, int64_t c_begin, int64_t c_end) { GroupPanelTileAvx512<MT>(p, c_begin, c_end); }
};

// AVX2: panels of 16 output rows, codes_q [quads][16][4]: a quad's codes are two registers of 8
// outputs (4 codes each). maddubs of codes with 4 broadcast activations gives each output two
// int16 pair sums, added in int16 over at most kAvx2PanelWidenQuads quads (a pair sum is at most
// 2 * 2 * 128 = 512 in magnitude) and widened to int32 by one madd with ones.
constexpr int64_t kAvx2GroupPanelRows = 16;
// From 2 activation rows, on both x86 paths (benchmarks/RESULTS.md: the GEMV tiles were slower at
// every row count from 2 on an Ice Lake Xeon; on AVX-512 the 16-row tiles take 2-4 rows first, the
// panels what they leave). Below these the GEMV tiles' multi-row forms serve, kept for a CPU on
// which they measure faster.
constexpr int64_t kAvx2GroupPanelMinRows = 2;
constexpr int64_t kAvx512GroupPanelMinRows = 2;
constexpr int kAvx2GroupPanelTileRows = 3;  // 3 x (2 int16 + 2 int32) accumulators + 2 codes + 1 activation
constexpr int64_t kAvx2PanelWidenQuads = 32;
static_assert(kAvx2PanelWidenQuads * 512 <= 32768, "int16 pair sums must not overflow");

// As UnpackPanelAvx512 (gemm_x86.cc), for 16 rows: packed dword d of a row block holds, at shift
// 2j, the codes of quad 16j + d of the block; transposing 8 rows' dwords puts dword d of those
// rows in one register. Rows at or past group g_end get code 1 (t = 0).
BITNET_AVX2 void UnpackPanelAvx2(const uint8_t* w, int64_t kb, int64_t g0, int64_t g_end, int64_t b_begin,
                                 int64_t b_end, int8_t* codes_q) {
  const __m256i mask = _mm256_set1_epi8(3);
  for (int64_t b = b_begin; b < b_end; ++b) {
    for (int64_t half = 0; half < kAvx2GroupPanelRows / 8; ++half) {
      for (int64_t dh = 0; dh < 2; ++dh) {  // dwords 8 dh .. 8 dh + 7 of each row's block
        __m256i r[8];
        for (int64_t i = 0; i < 8; ++i) {
          const int64_t pr = 8 * half + i, g = g0 + pr / kRowsPerGroup;
          r[i] = g < g_end ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(
                                 w + (g * kb + b) * kGroupBlockBytes + (pr % kRowsPerGroup) * kBlockBytes + 32 * dh))
                           : _mm256_set1_epi8(0x55);
        }
        Transpose8x8(r);
        for (int j = 0; j < 4; ++j)
          for (int d = 0; d < 8; ++d) {
            const int64_t q = (b - b_begin) * (kBlockK / 4) + 16 * j + 8 * dh + d;
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes_q + (q * kAvx2GroupPanelRows + 8 * half) * 4),
                                _mm256_and_si256(_mm256_srli_epi32(r[d], 2 * j), mask));
          }
      }
    }
  }
}

// The group sums of quads [q_begin, q_end) (at most kAvx2PanelWidenQuads) for MT activation rows
// into part: int16 pair sums, 8 outputs per register.
template <int MT>
BITNET_AVX2 void GroupPanelTileAvx2(const GroupPanel& p, int64_t c_begin, int64_t c_end) {
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i lane_index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i valid[2] = {_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(p.valid)), lane_index),
                            _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(p.valid - 8)), lane_index)};
  const int32_t* x32 = reinterpret_cast<const int32_t*>(p.x);
  const int64_t kq = p.kp / 4;  // quads per x row
  for (int64_t c = c_begin; c < c_end; ++c) {
    __m256i acc[MT][2];
    for (int mi = 0; mi < MT; ++mi) acc[mi][0] = acc[mi][1] = _mm256_setzero_si256();
    for (int64_t q0 = c * p.group_q; q0 < (c + 1) * p.group_q; q0 += kAvx2PanelWidenQuads) {
      const int64_t q_end = std::min((c + 1) * p.group_q, q0 + kAvx2PanelWidenQuads);
      __m256i part[MT][2];
      for (int mi = 0; mi < MT; ++mi) part[mi][0] = part[mi][1] = _mm256_setzero_si256();
      for (int64_t q = q0; q < q_end; ++q) {
        const int8_t* c_q = p.codes_q + (q - p.q_base) * kAvx2GroupPanelRows * 4;
        const __m256i c0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c_q));
        const __m256i c1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c_q + 32));
        for (int mi = 0; mi < MT; ++mi) {
          const __m256i xv = _mm256_set1_epi32(x32[mi * kq + q]);
          MaddubsAdd(part[mi][0], c0, xv);
          MaddubsAdd(part[mi][1], c1, xv);
        }
      }
      for (int mi = 0; mi < MT; ++mi)
        for (int h = 0; h < 2; ++h) acc[mi][h] = _mm256_add_epi32(acc[mi][h], _mm256_madd_epi16(part[mi][h], ones));
    }
    // A whole panel (every panel but a matrix's last, partial one) takes plain loads and stores:
    // a masked store is slow on AMD (one Zen 4 core, 2560 x 6912, 8 rows: 2384-2457 us with masks
    // throughout, 1598-1623 without).
    const bool whole = p.valid == kAvx2GroupPanelRows;
    for (int h = 0; h < 2; ++h) {
      const float* scale_h = p.scale + c * p.n_total + 8 * h;
      const __m256 scale = whole ? _mm256_loadu_ps(scale_h) : _mm256_maskload_ps(scale_h, valid[h]);
      for (int mi = 0; mi < MT; ++mi) {
        float* out = p.dot + mi * p.n_total + 8 * h;
        const __m256 d = c == 0 ? _mm256_setzero_ps() : whole ? _mm256_loadu_ps(out) : _mm256_maskload_ps(out, valid[h]);
        const __m256i x_sum = _mm256_set1_epi32(p.x_group[c * p.rows + mi]);
        const __m256 sum = AddScaledGroup(d, acc[mi][h], x_sum, scale);
        if (whole)
          _mm256_storeu_ps(out, sum);
        else
          _mm256_maskstore_ps(out, valid[h], sum);
      }
    }
  }
}

template <int MT>
struct GroupPanelTileAvx2Op {
  static void Run(const GroupPanel& p, int64_t c_begin, int64_t c_end) { GroupPanelTileAvx2<MT>(p, c_begin, c_end); }
};

#elif BITNET_JAX_ARM_SIMD

// GCC 12's arm_neon.h declares vdotq_s32 under this target (gemm_arm.cc says more).
#define BITNET_NEON_DOT __attribute__((target("arch=armv8.2-a+dotprod")))

template <int R, int MT>
BITNET_NEON_DOT void GroupTileNeonDot(const GroupTile& t) {
  static_assert(R * MT <= 4, "a tile's group step takes 4 outputs");
  const uint8x16_t mask = vdupq_n_u8(3);
  int32x4_t acc[4][2];  // output o = r * MT + mi; two registers of 4 lanes; those past R * MT stay 0
  for (int o = 0; o < 4; ++o) acc[o][0] = acc[o][1] = vdupq_n_s32(0);
  float32x4_t d = vdupq_n_f32(0.0f);
  const int64_t strips_per_group = t.group_k / kStripK, strips = t.groups * strips_per_group;
  int64_t c = 0, in_group = 0;
  for (int64_t s0 = 0; s0 < strips; s0 += 4) {
    const uint8_t* block = t.w_rows + (s0 / 4) * kGroupBlockBytes;
    const int8_t* x_b = t.x + (s0 / 4) * kBlockK;
    if (R == kRowsPerGroup) {
      for (int line = 0; line < 4; ++line) PrefetchAt(block, kPrefetchBytes + 64 * line);
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
          for (int mi = 0; mi < MT; ++mi) acc[r * MT + mi][h & 1] = vdotq_s32(acc[r * MT + mi][h & 1], codes, xv[mi]);
        }
      }
      if (++in_group == strips_per_group) {
        int32x4_t v[4];
        for (int o = 0; o < 4; ++o) v[o] = vaddq_s32(acc[o][0], acc[o][1]);
        const int32x4_t sums = vpaddq_s32(vpaddq_s32(v[0], v[1]), vpaddq_s32(v[2], v[3]));  // exact
        int32_t x_sum[4] = {};
        float scale[4] = {};
        for (int r = 0; r < R; ++r)
          for (int mi = 0; mi < MT; ++mi) {
            x_sum[r * MT + mi] = t.x_group[c * t.rows + mi];
            scale[r * MT + mi] = r < t.valid_rows ? t.scale[c * t.n_total + r] : 0.0f;
          }
        const float32x4_t p = vcvtq_f32_s32(vsubq_s32(sums, vld1q_s32(x_sum)));
        d = vaddq_f32(d, vmulq_f32(p, vld1q_f32(scale)));
        for (int o = 0; o < 4; ++o) acc[o][0] = acc[o][1] = vdupq_n_s32(0);
        ++c;
        in_group = 0;
      }
    }
  }
  float out[4];
  vst1q_f32(out, d);
  for (int r = 0; r < R && r < t.valid_rows; ++r)
    for (int mi = 0; mi < MT; ++mi) t.dot[mi * t.n_total + r] = out[r * MT + mi];
}

template <int R, int MT>
struct NeonDotTile {
  static void Run(const GroupTile& t) { GroupTileNeonDot<R, MT>(t); }
};

// Prefill with sdot: the per-tensor kernel's 16-row panels (UnpackPanelNeonDot, gemm_paths.h),
// whose codes are t itself, so a group's integer sums need no x_sum correction: quad 4i + J of
// the panel is four registers of 4 outputs, times lane J of 16 activations (vdotq_laneq_s32). Per
// activation row 4 int32 and 4 float accumulators (tiles of 3 rows: 24 registers, with 4 of codes
// and 3 of activations).
constexpr int kNeonGroupPanelTileRows = 3;

// The 4 floats at `from` whose outputs 4v .. 4v + 3 lie below `valid` (0 for the others).
BITNET_NEON_DOT inline float32x4_t LoadValid4(const float* from, int v, int64_t valid) {
  if (4 * v + 4 <= valid) return vld1q_f32(from);
  float lanes[4] = {};
  for (int i = 0; 4 * v + i < valid; ++i) lanes[i] = from[i];
  return vld1q_f32(lanes);
}

template <int MT>
BITNET_NEON_DOT void GroupPanelTileNeonDot(const GroupPanel& p, int64_t c_begin, int64_t c_end) {
  float32x4_t d[MT][4];
  for (int mi = 0; mi < MT; ++mi)
    for (int v = 0; v < 4; ++v)
      d[mi][v] = c_begin == 0 ? vdupq_n_f32(0.0f) : LoadValid4(p.dot + mi * p.n_total + 4 * v, v, p.valid);
  for (int64_t c = c_begin; c < c_end; ++c) {
    int32x4_t acc[MT][4];
    for (int mi = 0; mi < MT; ++mi)
      for (int v = 0; v < 4; ++v) acc[mi][v] = vdupq_n_s32(0);
    for (int64_t q = c * p.group_q; q < (c + 1) * p.group_q; q += 4) {  // a group is whole 16-quad strips
      int8x16_t xv[MT];
      for (int mi = 0; mi < MT; ++mi) xv[mi] = vld1q_s8(p.x + mi * p.kp + 4 * q);
      const int8_t* c_q = p.codes_q + (q - p.q_base) * kNeonPanelRows * 4;
      PanelQuadNeonDot<MT, 0>(c_q, xv, acc);
      PanelQuadNeonDot<MT, 1>(c_q + kNeonPanelRows * 4, xv, acc);
      PanelQuadNeonDot<MT, 2>(c_q + 2 * kNeonPanelRows * 4, xv, acc);
      PanelQuadNeonDot<MT, 3>(c_q + 3 * kNeonPanelRows * 4, xv, acc);
    }
    for (int v = 0; v < 4; ++v) {
      const float32x4_t scale = LoadValid4(p.scale + c * p.n_total + 4 * v, v, p.valid);
      for (int mi = 0; mi < MT; ++mi) d[mi][v] = vaddq_f32(d[mi][v], vmulq_f32(vcvtq_f32_s32(acc[mi][v]), scale));
    }
  }
  for (int mi = 0; mi < MT; ++mi)
    for (int v = 0; v < 4; ++v) {
      float* out = p.dot + mi * p.n_total + 4 * v;
      if (4 * v + 4 <= p.valid) {
        vst1q_f32(out, d[mi][v]);
      } else {
        float lanes[4];
        vst1q_f32(lanes, d[mi][v]);
        for (int i = 0; 4 * v + i < p.valid; ++i) out[i] = lanes[i];
      }
    }
}

template <int MT>
struct GroupPanelTileNeonDotOp {
  static void Run(const GroupPanel& p, int64_t c_begin, int64_t c_end) { GroupPanelTileNeonDot<MT>(p, c_begin, c_end); }
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

int64_t TernaryGroupGemmGroupsPerTask(Isa isa, int64_t rows) {
#if BITNET_JAX_X86_SIMD
  if (isa == Isa::kAvx512Vnni) return rows <= kTiles16MaxRows ? kTile16Groups : kAvx512PanelRows / kRowsPerGroup;
  if (isa == Isa::kAvx2 && rows >= kAvx2GroupPanelMinRows) return kAvx2GroupPanelRows / kRowsPerGroup;
  if (isa == Isa::kAvx2 && rows == 1) return kGemv8Groups;
#elif BITNET_JAX_ARM_SIMD
  if (isa == Isa::kNeonDot && rows >= kNeonPanelMinRows) return kNeonPanelRows / kRowsPerGroup;
#endif
  (void)isa;
  (void)rows;
  return 1;
}

void TernaryGroupGemmF32(Isa isa, const int8_t* x_q, const int32_t* x_group, int64_t rows, int64_t kb,
                         const uint8_t* w, const float* w_scale, int64_t group_k, int64_t groups, int64_t g_begin,
                         int64_t g_end, int64_t n_total, float* dot) {
#if BITNET_JAX_X86_SIMD
  if (isa == Isa::kAvx512Vnni) {
    const int64_t g = rows <= kTiles16MaxRows ? GroupTiles16Avx512(x_q, x_group, rows, kb, w, w_scale, group_k,
                                                                   groups, g_begin, g_end, n_total, dot)
                                              : g_begin;
    if (rows >= kAvx512GroupPanelMinRows)
      GroupPanels<kAvx512PanelRows, kAvx512GroupPanelTileRows, GroupPanelTileAvx512Op>(
          UnpackPanelAvx512, x_q, x_group, rows, kb, w, w_scale, group_k, groups, g, g_end, n_total, dot);
    else
      TernaryGroupRows<Avx512Tile>(x_q, x_group, rows, kb, w, w_scale, group_k, groups, g, g_end, n_total, dot);
    return;
  }
  if (isa == Isa::kAvx2 && rows >= kAvx2GroupPanelMinRows) {
    GroupPanels<kAvx2GroupPanelRows, kAvx2GroupPanelTileRows, GroupPanelTileAvx2Op>(
        UnpackPanelAvx2, x_q, x_group, rows, kb, w, w_scale, group_k, groups, g_begin, g_end, n_total, dot);
    return;
  }
  if (isa == Isa::kAvx2) {
    const int64_t g_tiles = rows == 1 ? WholeTilesEnd(g_begin, g_end, n_total, kGemv8Groups) : g_begin;
    for (int64_t g = g_begin; g < g_tiles; g += kGemv8Groups)
      GroupGemv8Avx2(x_q, x_group, kb, w, w_scale, group_k, groups, g, n_total, dot);
    TernaryGroupRows<Avx2Tile>(x_q, x_group, rows, kb, w, w_scale, group_k, groups, g_tiles, g_end, n_total, dot);
    return;
  }
#elif BITNET_JAX_ARM_SIMD
  if (isa == Isa::kNeonDot && rows >= kNeonPanelMinRows) {
    GroupPanels<kNeonPanelRows, kNeonGroupPanelTileRows, GroupPanelTileNeonDotOp>(
        UnpackPanelNeonDot, x_q, x_group, rows, kb, w, w_scale, group_k, groups, g_begin, g_end, n_total, dot);
    return;
  }
  if (isa == Isa::kNeonDot) {
    TernaryGroupRows<NeonDotTile>(x_q, x_group, rows, kb, w, w_scale, group_k, groups, g_begin, g_end, n_total, dot);
    return;
  }
#endif
  // The scalar path, and plain NEON (no 4-way dot product: the scalar twin is as good a start).
  (void)isa;
  (void)x_group;
  TernaryGroupScalar(x_q, rows, kb, w, w_scale, group_k, groups, g_begin, g_end, n_total, dot);
}

}  // namespace bitnet
