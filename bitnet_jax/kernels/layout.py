"""The packed weight formats of serving parameters: the Python mirror of `xla_ffi/layout.h`.

`layout.h` is the one declaration; this module mirrors its constants (a test checks them against
the compiled extension) and is the only Python code that packs or unpacks. Summary:

Ternary weights t [N, K] in {-1, 0, +1}, 2 bits each, as uint8 [G, KB * 256]
(G = ceil(N / 4) row groups, KB = ceil(K / 256) blocks, padding holds t = 0):
  packed[g, b, r, i] (flattened over b, r, i) = sum_j (t[4g + r, 256b + 64j + i] + 1) << 2j
for r < 4, i < 64, j < 4. Shifting a 64-byte row block right by 2j and masking with 3 gives the
codes of 64 consecutive weights, which is what the SIMD loops multiply with a 64-byte run of
activations; rows are interleaved in groups of 4 so a GEMV streams one contiguous array.

Ternary weights of group-scale models (weight_quant 'group:G'), "TQ2G": tiles of 16 outputs, as
uint8 [T, Kp * 4] (T = ceil(N / 16) tiles, K padded with t = 0 to Kp, a multiple of 64):
  packed[t, 64c + 4o + b] = sum_j (t[16t + o, 16c + 4j + b] + 1) << 2j
for o < 16, b < 4, j < 4: a 64-byte chunk shifted right by 2j and masked with 3 holds, in 32-bit
lane o, output o's codes for 4 consecutive inputs, so the kernels' vector lanes are whole outputs
and a group's scale is one multiply per register of outputs. Their scales are tiled alike, float32
[T, C * 16] with tile t's 16 scales of group c at [t, 16c .. 16c + 15] (0 past N), so that a tile
reads its codes and its scales as two contiguous streams (`tile_group_scales`; the training side
and the exporters see [C, N]). (Layout version 1 packed these models as above, TQ2B, with [C, N]
scales; `repack_ternary_tiles` and `tile_group_scales` convert.)

Int8 weights (the lm_head) w8 [N, K] as int8 [N, Kp8] with K zero-padded to a multiple of 64,
values in [-127, 127], one float32 scale per row.

Int4 weights (the 4-bit lm_head) q [N, K] in [-7, 7] as uint8 [N, Kp4 / 2], K zero-padded to a
multiple of 32, with a float16 scale per row and group of 32 inputs ([N, Kp4 / 32]):
  packed[n, 16c + i] = (q[n, 32c + i] + 8) | (q[n, 32c + 16 + i] + 8) << 4    (i < 16)

Axis letters: N output features, K input features, G row groups, B blocks along K, T tiles of 16
outputs; C counts a tile's chunks of 16 inputs in its codes, groups of inputs in its scales.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from bitnet_jax.errors import BitNetError

LAYOUT_VERSION = 2  # 2: group-scale models in TQ2G tiles (version 1: TQ2B, like the others)
BLOCK_K = 256  # weights per row block
BLOCK_BYTES = 64  # bytes per row block (4 codes per byte)
ROWS_PER_GROUP = 4  # rows interleaved block by block
TILE_ROWS = 16  # TQ2G: outputs per tile
TILE_CHUNK_K = 16  # inputs per 64-byte chunk of a tile
TILE_ALIGN_K = 64  # TQ2G rows are padded to a multiple of this
INT8_ROW_ALIGN = 64  # int8 rows are padded to a multiple of this
INT4_GROUP_K = 32  # inputs per int4 scale; int4 rows are padded to a multiple of this
TERNARY_GROUP_ALIGN = 64  # group:G models take the FFI kernel when G is a multiple of this (whole strips)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def packed_ternary_shape(n: int, k: int) -> tuple[int, int]:
    """Shape of the packed uint8 array holding ternary weights [N, K]."""
    return _ceil_div(n, ROWS_PER_GROUP), _ceil_div(k, BLOCK_K) * ROWS_PER_GROUP * BLOCK_BYTES


def pack_ternary(t_nk) -> np.ndarray:
    """Ternary weights [N, K] (values in {-1, 0, 1}, any numeric dtype) -> packed uint8 [G, B*256]."""
    t_nk = _checked_ternary(t_nk, "pack_ternary")
    n, k = t_nk.shape
    g, row_bytes = packed_ternary_shape(n, k)
    kb = row_bytes // (ROWS_PER_GROUP * BLOCK_BYTES)
    codes = np.ones((g * ROWS_PER_GROUP, kb * BLOCK_K), np.uint8)  # code 1 is t = 0
    codes[:n, :k] = (t_nk + 1).astype(np.uint8)
    # [row = 4g + r, k = 256b + 64j + i] -> [g, b, r, i, j]
    codes_gbrij = codes.reshape(g, ROWS_PER_GROUP, kb, 4, BLOCK_BYTES).transpose(0, 2, 1, 4, 3)
    shifts_j = np.arange(4, dtype=np.uint8) * 2
    packed_gbri = np.bitwise_or.reduce(codes_gbrij << shifts_j, axis=-1).astype(np.uint8)
    return packed_gbri.reshape(g, row_bytes)


def unpack_ternary(packed_gx, n: int, k: int, dtype=jnp.int8):
    """Packed uint8 [G, B*256] -> ternary weights [N, K] of `dtype`. jnp ops: works inside jit."""
    packed_gx = jnp.asarray(packed_gx)
    g, row_bytes = packed_gx.shape
    kb = row_bytes // (ROWS_PER_GROUP * BLOCK_BYTES)
    packed_gbri = packed_gx.reshape(g, kb, ROWS_PER_GROUP, BLOCK_BYTES)
    codes_gbrij = jnp.stack([(packed_gbri >> (2 * j)) & 3 for j in range(4)], axis=-1)
    # [g, b, r, i, j] -> [4g + r, 256b + 64j + i]
    codes_nk = codes_gbrij.transpose(0, 2, 1, 4, 3).reshape(g * ROWS_PER_GROUP, kb * BLOCK_K)
    return (codes_nk[:n, :k].astype(jnp.int8) - 1).astype(dtype)


def packed_ternary_tiles_shape(n: int, k: int) -> tuple[int, int]:
    """Shape of the TQ2G uint8 array holding the ternary weights [N, K] of a group-scale model."""
    return _ceil_div(n, TILE_ROWS), _ceil_div(k, TILE_ALIGN_K) * TILE_ALIGN_K * 4


def packed_shape(n: int, k: int, grouped: bool) -> tuple[int, int]:
    """The packed shape of ternary weights [N, K]: TQ2G tiles for a model with group scales
    (`grouped`), TQ2B otherwise."""
    return packed_ternary_tiles_shape(n, k) if grouped else packed_ternary_shape(n, k)


def _checked_ternary(t_nk, what: str) -> np.ndarray:
    t_nk = np.asarray(t_nk)
    if t_nk.ndim != 2:
        raise BitNetError(f"{what}: expected weights [N, K]; found shape {t_nk.shape}.")
    if not np.all(np.isin(t_nk, (-1, 0, 1))):
        raise BitNetError(
            f"{what}: expected values in {{-1, 0, 1}}; quantize the weights first "
            "(bitnet_jax.model.quant.weight_quantize)."
        )
    return t_nk


def pack_ternary_tiles(t_nk) -> np.ndarray:
    """Ternary weights [N, K] (values in {-1, 0, 1}) -> TQ2G tiles uint8 [T, Kp * 4]."""
    t_nk = _checked_ternary(t_nk, "pack_ternary_tiles")
    n, k = t_nk.shape
    tiles, tile_bytes = packed_ternary_tiles_shape(n, k)
    chunks = tile_bytes // (TILE_ROWS * 4)
    codes = np.ones((tiles * TILE_ROWS, chunks * TILE_CHUNK_K), np.uint8)  # code 1 is t = 0
    codes[:n, :k] = (t_nk + 1).astype(np.uint8)
    # [row = 16t + o, k = 16c + 4j + b] -> [t, c, o, b, j]
    codes_tcobj = codes.reshape(tiles, TILE_ROWS, chunks, 4, 4).transpose(0, 2, 1, 4, 3)
    shifts_j = np.arange(4, dtype=np.uint8) * 2
    return np.bitwise_or.reduce(codes_tcobj << shifts_j, axis=-1).astype(np.uint8).reshape(tiles, tile_bytes)


def unpack_ternary_tiles(packed_tx, n: int, k: int, dtype=jnp.int8):
    """TQ2G tiles uint8 [T, Kp * 4] -> ternary weights [N, K] of `dtype`. jnp ops: works inside jit."""
    packed_tx = jnp.asarray(packed_tx)
    tiles, tile_bytes = packed_tx.shape
    chunks = tile_bytes // (TILE_ROWS * 4)
    packed_tcob = packed_tx.reshape(tiles, chunks, TILE_ROWS, 4)
    codes_tcobj = jnp.stack([(packed_tcob >> (2 * j)) & 3 for j in range(4)], axis=-1)
    # [t, c, o, b, j] -> [16t + o, 16c + 4j + b]
    codes_nk = codes_tcobj.transpose(0, 2, 1, 4, 3).reshape(tiles * TILE_ROWS, chunks * TILE_CHUNK_K)
    return (codes_nk[:n, :k].astype(jnp.int8) - 1).astype(dtype)


def tile_group_scales(scale_cn) -> np.ndarray:
    """Group scales [C, N] (C groups of inputs) -> TQ2G's float32 [T, C * 16], zeros past N."""
    scale_cn = np.asarray(scale_cn, np.float32)
    c, n = scale_cn.shape
    tiles = _ceil_div(n, TILE_ROWS)
    padded = np.zeros((c, tiles * TILE_ROWS), np.float32)
    padded[:, :n] = scale_cn
    return np.ascontiguousarray(padded.reshape(c, tiles, TILE_ROWS).transpose(1, 0, 2).reshape(tiles, c * TILE_ROWS))


def untile_group_scales(scale_tx, n: int):
    """TQ2G scales [T, C * 16] -> [C, N]. jnp ops: works inside jit."""
    scale_tx = jnp.asarray(scale_tx)
    tiles, width = scale_tx.shape
    c = width // TILE_ROWS
    return scale_tx.reshape(tiles, c, TILE_ROWS).transpose(1, 0, 2).reshape(c, tiles * TILE_ROWS)[:, :n]


def group_scales_shape(n: int, groups: int) -> tuple[int, int]:
    """Shape of the TQ2G scales of N outputs with `groups` groups of inputs."""
    return _ceil_div(n, TILE_ROWS), groups * TILE_ROWS


def unpack_codes(packed, n: int, k: int, grouped: bool, dtype=jnp.int8):
    """Ternary weights [N, K] from a model's packed codes: TQ2G tiles for a model with group
    scales (`grouped`), TQ2B otherwise. jnp ops: works inside jit."""
    return unpack_ternary_tiles(packed, n, k, dtype) if grouped else unpack_ternary(packed, n, k, dtype)


def repack_ternary_tiles(packed_gx, n: int, k: int) -> np.ndarray:
    """TQ2B [G, B * 256] (how layout version 1 packed every ternary weight) -> TQ2G tiles: what a
    group-scale model's packed weights become when a version-1 folder is loaded."""
    return pack_ternary_tiles(np.asarray(unpack_ternary(packed_gx, n, k)))


def pack_int8(w8_nk) -> np.ndarray:
    """Int8 weights [N, K] -> int8 [N, Kp] with K zero-padded to a multiple of INT8_ROW_ALIGN."""
    w8_nk = np.asarray(w8_nk)
    if w8_nk.ndim != 2 or w8_nk.dtype != np.int8:
        raise BitNetError(f"pack_int8: expected int8 weights [N, K]; found {w8_nk.dtype} {w8_nk.shape}.")
    n, k = w8_nk.shape
    out = np.zeros((n, _ceil_div(k, INT8_ROW_ALIGN) * INT8_ROW_ALIGN), np.int8)
    out[:, :k] = w8_nk
    return out


def unpack_int8(w8_nkp, k: int):
    """int8 [N, Kp] -> int8 [N, K] (drops the padding). jnp ops: works inside jit."""
    return jnp.asarray(w8_nkp)[:, :k]


def quantize_int8_rows(w_nk) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row int8 quantization: (w8 [N, K] in [-127, 127], scale [N]), w ~= w8 * scale."""
    w_nk = np.asarray(w_nk, np.float32)
    amax_n = np.max(np.abs(w_nk), axis=1)
    scale_n = np.where(amax_n > 0, amax_n / 127.0, 1.0).astype(np.float32)
    w8_nk = np.clip(np.rint(w_nk / scale_n[:, None]), -127, 127).astype(np.int8)
    return w8_nk, scale_n


def int4_row_bytes(k: int) -> int:
    """Bytes of one packed int4 row of K weights."""
    return _ceil_div(k, INT4_GROUP_K) * INT4_GROUP_K // 2


def pack_int4(q_nk) -> np.ndarray:
    """Int4 codes [N, K] (int8 values in [-7, 7]) -> uint8 [N, Kp / 2] (I4G, K padded with zeros to a
    multiple of INT4_GROUP_K)."""
    q_nk = np.asarray(q_nk)
    if q_nk.ndim != 2 or q_nk.dtype != np.int8 or (q_nk.size and (q_nk.min() < -7 or q_nk.max() > 7)):
        raise BitNetError(f"pack_int4: expected int8 codes [N, K] in [-7, 7]; found {q_nk.dtype} {q_nk.shape}.")
    n, k = q_nk.shape
    kp = _ceil_div(k, INT4_GROUP_K) * INT4_GROUP_K
    u_ncj = np.full((n, kp), 8, np.uint8)
    u_ncj[:, :k] = q_nk + 8
    u_ncj = u_ncj.reshape(n, kp // INT4_GROUP_K, 2, INT4_GROUP_K // 2)  # [n, group, nibble, byte]
    return (u_ncj[:, :, 0] | (u_ncj[:, :, 1] << 4)).reshape(n, kp // 2)


def unpack_int4(packed_nb, k: int):
    """uint8 [N, Kp / 2] -> int8 codes [N, K]. jnp ops: works inside jit (and on any leading axes)."""
    packed_nb = jnp.asarray(packed_nb)
    lead, row_bytes = packed_nb.shape[:-1], packed_nb.shape[-1]
    bytes_ncb = packed_nb.reshape(*lead, row_bytes // (INT4_GROUP_K // 2), 1, INT4_GROUP_K // 2)
    u_ncjb = jnp.concatenate([bytes_ncb & 15, bytes_ncb >> 4], axis=-2)  # low nibbles first
    return (u_ncjb.reshape(*lead, 2 * row_bytes)[..., :k].astype(jnp.int8) - 8).astype(jnp.int8)


def quantize_int4_groups(w_nk) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int4 quantization per row and group of INT4_GROUP_K inputs: (q [N, K] int8 in
    [-7, 7], scale float16 [N, Kp / 32]), w ~= q * scale. Each scale is absmax / 7 rounded to
    float16 first, and the codes are rounded against that stored scale."""
    w_nk = np.asarray(w_nk, np.float32)
    n, k = w_nk.shape
    kp = _ceil_div(k, INT4_GROUP_K) * INT4_GROUP_K
    w_ncg = np.zeros((n, kp), np.float32)
    w_ncg[:, :k] = w_nk
    w_ncg = w_ncg.reshape(n, kp // INT4_GROUP_K, INT4_GROUP_K)
    amax_nc = np.max(np.abs(w_ncg), axis=-1)
    if not np.all(np.isfinite(amax_nc)) or np.max(amax_nc, initial=0.0) / 7 > np.finfo(np.float16).max:
        raise BitNetError(
            "quantize_int4_groups: weights must be finite and below 7 * 65504 in magnitude (float16 scales); "
            "use an int8 lm_head for this model."
        )
    scale_nc = (amax_nc / 7).astype(np.float16)
    s32_nc = scale_nc.astype(np.float32)[..., None]
    safe = np.where(s32_nc > 0, s32_nc, 1.0)
    q_ncg = np.where(s32_nc > 0, np.clip(np.rint(w_ncg / safe), -7, 7), 0).astype(np.int8)
    return q_ncg.reshape(n, kp)[:, :k], scale_nc
