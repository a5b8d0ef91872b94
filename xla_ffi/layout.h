// Packed weight formats of bitnet_jax serving parameters: declared here once, mirrored by
// bitnet_jax/kernels/layout.py (which checks its constants against `_ffi_ext.layout()` at test time).
// Nothing else packs or unpacks.
//
// Ternary weights t[N, K] in {-1, 0, +1}, 2 bits per weight ("TQ2B" layout, version 1):
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
// Int8 weights w[N, K] (the lm_head), "I8R" layout, version 1: row-major int8 [N, Kp8] with K
// padded with zeros up to a multiple of kInt8RowAlign, one float32 scale per row; values in
// [-127, 127] (symmetric: w[n, k] ~= w8[n, k] * w_scale[n]).
//
// Int4 weights w[N, K] (the 4-bit lm_head), "I4G" layout, version 1: K padded with zeros up to
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

constexpr int64_t kLayoutVersion = 1;

constexpr int64_t kCodesPerByte = 4;
constexpr int64_t kBlockK = 256;
constexpr int64_t kBlockBytes = kBlockK / kCodesPerByte;
constexpr int64_t kRowsPerGroup = 4;
constexpr int64_t kGroupBlockBytes = kRowsPerGroup * kBlockBytes;
constexpr int64_t kInt8RowAlign = 64;
constexpr int64_t kInt4GroupK = 32;
constexpr int64_t kInt4GroupBytes = kInt4GroupK / 2;

static_assert(kBlockBytes == 64,
              "a row block must be one 512-bit register (two 256-bit ones): the kernels load it whole");
static_assert(kBlockK == kBlockBytes * kCodesPerByte, "4 codes of 2 bits per byte");
static_assert(kGroupBlockBytes == 256, "4 interleaved row blocks");
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
