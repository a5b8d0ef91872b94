// Packed weight formats of bitnet_jax serving parameters: declared here once, mirrored by
// bitnet_jax/kernels/layout.py (which checks its constants against `_ffi_ext.layout()` at test time).
// Nothing else packs or unpacks.
//
// The layout version, kLayoutVersion, names all of them together: version 2 moved the weights of
// group-scale models from TQ2B to TQ2G; TQ2B, I8R and I4G are as in version 1.
//
// Ternary weights t[N, K] in {-1, 0, +1}, 2 bits per weight, with a scale per tensor or per output
// row ("TQ2B" layout):
//   * a code is t + 1 in {0, 1, 2}; 3 never occurs. Unsigned codes let both AVX2
//     (`maddubs(code_u8, x_s8)`) and AVX-512 VNNI (`vpdpbusd(code_u8, x_s8)`) multiply them with
//     int8 activations exactly over the full int8 range, and sum_k t*x = sum_k code*x - sum_k x.
//   * K is padded with t = 0 up to Kp = kBlockK * KB; N up to Np = kRowsPerGroup * G.
//   * A row block is kBlockBytes bytes holding kBlockK weights: byte i has the code of
//     k = 64*j + i in bits 2j..2j+1 (j = 0..3). Shifting a 64-byte block right by 2j and masking
//     with 3 gives the codes of k = 64j .. 64j+63 in natural order: one AVX-512 register, or two
//     AVX2 registers, each multiplied with a contiguous run of activations.
//   * Rows are grouped by kRowsPerGroup and interleaved block by block, so a GEMV streams one
//     contiguous array: packed[g, b, r, i] = byte i of block b of row 4g + r, stored as uint8
//     [G, KB * kGroupBlockBytes].
//   * The scale of row n is w_scale[n] (per channel) or w_scale[0] (per tensor):
//     W[n, k] ~= t[n, k] * w_scale.
//
// Ternary weights with a scale per group of inputs (weight_quant 'group:G'), "TQ2G" layout (in
// layout version 2; version 1 packed them as TQ2B), tiles of 16 outputs whose vector lanes are
// whole outputs:
//   * codes t + 1 as in TQ2B; K padded with t = 0 up to Kp, a multiple of kTileAlignK = 64 (a
//     group is whole 64-input strips); N up to Np, a multiple of kTileRows = 16.
//   * Tile i holds outputs 16i .. 16i + 15, chunk c of a tile their inputs 16c .. 16c + 15 in
//     kTileChunkBytes = 64 bytes: byte 4o + b holds the code of output 16i + o, input 16c + 4j + b
//     in bits 2j..2j+1 (j = 0..3). A chunk shifted right by 2j and masked with 3 holds in 32-bit
//     lane o the 4 codes of output o for inputs 16c + 4j .. 16c + 4j + 3: one 4-way multiply-add
//     (vpdpbusd, maddubs, sdot) with 4 activations broadcast to every lane.
//   * A tile's chunks are contiguous, tiles one after the other: uint8 [Np / 16, Kp * 4].
//   * The scales are the tiles' too, float32 [Np / 16, (K / G) * 16]: tile i's 16 scales of group c
//     at [i, 16c .. 16c + 15] (0 past N), so that a tile reads its codes and its scales as two
//     contiguous streams: W[16i + o, k] ~= t[16i + o, k] * w_scale[i, 16 (k / G) + o].
//
// Int8 weights w[N, K] (the lm_head), "I8R" layout: row-major int8 [N, Kp8] with K
// padded with zeros up to a multiple of kInt8RowAlign, one float32 scale per row; values in
// [-127, 127] (symmetric: w[n, k] ~= w8[n, k] * w_scale[n]).
//
// Int4 weights w[N, K] (the 4-bit lm_head), "I4G" layout: K padded with zeros up to
// Kp, a multiple of kInt4GroupK = 32; a scale per row and group of 32 inputs.
//   * q[n, k] in [-7, 7] (symmetric), stored as the nibble u = q + 8 in [1, 15] (padding: 8).
//   * Row n is Kp / 2 bytes, uint8 [N, Kp / 2]; group g (weights 32g .. 32g + 31) is bytes
//     16g .. 16g + 15, byte i holding weight 32g + i in its low nibble and 32g + 16 + i in its
//     high nibble. A 16-byte load, masked and shifted, gives the group's 32 nibbles in k order.
//   * w_scale float16 [N, Kp / 32]: w[n, k] ~= q[n, k] * w_scale[n, k / 32].
#ifndef BITNET_JAX_XLA_FFI_LAYOUT_H_
#define BITNET_JAX_XLA_FFI_LAYOUT_H_

#include <cstdint>

namespace bitnet {

constexpr int64_t kLayoutVersion = 2;

constexpr int64_t kCodesPerByte = 4;
constexpr int64_t kBlockK = 256;
constexpr int64_t kBlockBytes = kBlockK / kCodesPerByte;
constexpr int64_t kRowsPerGroup = 4;
constexpr int64_t kGroupBlockBytes = kRowsPerGroup * kBlockBytes;
constexpr int64_t kTileRows = 16;
constexpr int64_t kTileChunkK = 16;
constexpr int64_t kTileChunkBytes = kTileRows * kTileChunkK / kCodesPerByte;
constexpr int64_t kTileAlignK = 64;
constexpr int64_t kInt8RowAlign = 64;
constexpr int64_t kInt4GroupK = 32;
constexpr int64_t kInt4GroupBytes = kInt4GroupK / 2;

static_assert(kBlockBytes == 64,
              "a row block must be one 512-bit register (two 256-bit ones): the kernels load it whole");
static_assert(kBlockK == kBlockBytes * kCodesPerByte, "4 codes of 2 bits per byte");
static_assert(kGroupBlockBytes == 256, "4 interleaved row blocks");
static_assert(kTileChunkBytes == 64, "a TQ2G chunk is one 512-bit register (two 256-bit ones, four 128-bit ones)");
static_assert(kTileAlignK % kTileChunkK == 0, "Kp is whole chunks");
static_assert(kInt8RowAlign % 64 == 0, "int8 rows are read in whole 512-bit registers");
static_assert(kInt4GroupBytes == 16, "an int4 group is one 128-bit load");

// The code of weight k of a row block (k in [0, kBlockK)) is at byte k % 64, bits 2 * (k / 64).
constexpr int64_t CodeByte(int64_t k) { return k % kBlockBytes; }
constexpr int CodeShift(int64_t k) { return static_cast<int>(2 * (k / kBlockBytes)); }

constexpr int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The reference packer (the C++ tests use it; Python packs with bitnet_jax/kernels/layout.py):
// t_nk int8 [n, k] in {-1, 0, 1} -> out uint8 [CeilDiv(n, 4), CeilDiv(k, 256) * 256].
inline void PackTernary(const int8_t* t_nk, int64_t n, int64_t k, uint8_t* out) {
  const int64_t kb = CeilDiv(k, kBlockK);
  const int64_t groups = CeilDiv(n, kRowsPerGroup);
  for (int64_t i = 0; i < groups * kb * kGroupBlockBytes; ++i) out[i] = 0x55;  // every code 1: t = 0
  for (int64_t row = 0; row < n; ++row) {
    const int64_t g = row / kRowsPerGroup, r = row % kRowsPerGroup;
    for (int64_t col = 0; col < k; ++col) {
      const int64_t b = col / kBlockK, kk = col % kBlockK;
      uint8_t& byte = out[(g * kb + b) * kGroupBlockBytes + r * kBlockBytes + CodeByte(kk)];
      const int shift = CodeShift(kk);
      byte = static_cast<uint8_t>((byte & ~(3 << shift)) | ((t_nk[row * k + col] + 1) << shift));
    }
  }
}

// TQ2G: the bytes of one tile for Kp padded inputs, and the byte and bits of the code of output
// o (0 .. 15) of a tile, input k (0 .. Kp - 1), from the tile's first byte.
constexpr int64_t TernaryTileKp(int64_t k) { return CeilDiv(k, kTileAlignK) * kTileAlignK; }
constexpr int64_t TernaryTileBytes(int64_t kp) { return kp / kTileChunkK * kTileChunkBytes; }
constexpr int64_t TileCodeByte(int64_t o, int64_t k) { return k / kTileChunkK * kTileChunkBytes + 4 * o + k % 4; }
constexpr int TileCodeShift(int64_t k) { return static_cast<int>(2 * (k % kTileChunkK / 4)); }

// The reference TQ2G packer (the C++ tests use it; Python packs with layout.py's pack_ternary_tiles):
// t_nk int8 [n, k] in {-1, 0, 1} -> out uint8 [CeilDiv(n, 16), TernaryTileBytes(TernaryTileKp(k))].
inline void PackTernaryTiles(const int8_t* t_nk, int64_t n, int64_t k, uint8_t* out) {
  const int64_t tile_bytes = TernaryTileBytes(TernaryTileKp(k));
  const int64_t tiles = CeilDiv(n, kTileRows);
  for (int64_t i = 0; i < tiles * tile_bytes; ++i) out[i] = 0x55;  // every code 1: t = 0
  for (int64_t row = 0; row < n; ++row) {
    uint8_t* tile = out + row / kTileRows * tile_bytes;
    for (int64_t col = 0; col < k; ++col) {
      uint8_t& byte = tile[TileCodeByte(row % kTileRows, col)];
      const int shift = TileCodeShift(col);
      byte = static_cast<uint8_t>((byte & ~(3 << shift)) | ((t_nk[row * k + col] + 1) << shift));
    }
  }
}

// The weight of byte `byte`'s nibble `high` (0 or 1) in an I4G row: q = nibble - 8.
constexpr int Int4Weight(uint8_t byte, int high) { return ((byte >> (4 * high)) & 15) - 8; }

// The reference packer of I4G codes (the C++ tests use it; Python packs with layout.py):
// q_nk int8 [n, k] in [-7, 7] -> out uint8 [n, CeilDiv(k, 32) * 16].
inline void PackInt4(const int8_t* q_nk, int64_t n, int64_t k, uint8_t* out) {
  const int64_t row_bytes = CeilDiv(k, kInt4GroupK) * kInt4GroupBytes;
  for (int64_t i = 0; i < n * row_bytes; ++i) out[i] = 0x88;  // q = 0 in both nibbles
  for (int64_t row = 0; row < n; ++row) {
    for (int64_t col = 0; col < k; ++col) {
      const int64_t g = col / kInt4GroupK, i = col % kInt4GroupK;
      uint8_t& byte = out[row * row_bytes + g * kInt4GroupBytes + i % kInt4GroupBytes];
      const int shift = 4 * static_cast<int>(i / kInt4GroupBytes);
      byte = static_cast<uint8_t>((byte & ~(15 << shift)) | ((q_nk[row * k + col] + 8) << shift));
    }
  }
}

}  // namespace bitnet

#endif  // BITNET_JAX_XLA_FFI_LAYOUT_H_
