"""A ternary matmul for GPUs as a Pallas kernel: 2-bit weights unpacked in registers.

    acc[m, n] = sum_k x_q[m, k] * t[n, k]        (int32, exact)

for int8 activation codes x_q [M, K] and packed ternary weights ([G, B * 256] uint8,
`layout.py`), read once from memory and unpacked on the fly next to the multiply-adds; the XLA
integer path (`ops.ternary_linear` with backend 'xla') leaves the unpacking to XLA instead.
Rescaling stays outside (`quant.rescale`), so the result equals the XLA integer path bit for bit.
The Pallas Triton lowering runs it on NVIDIA GPUs; `interpret=True` runs the same kernel body with
XLA ops anywhere (the tests run it on CPU).

How the packed layout maps onto the kernel. Viewed as [G, B, 4 (r), 64 (i)], byte [g, b, r, i]
holds in bits 2j..2j+1 the code of weight t[4g + r, 256b + 64j + i] (j < 4). With x viewed as
[M, B, 4 (j), 64 (i)], one 256-wide block b contributes, for each row r of the groups and each
bit pair j,

    acc_r[m, g] += sum_i x[m, b, j, i] * (((w[g, b, r, i] >> 2j) & 3) - 1)

a [bm, 64] x [64, bg] product. A program owns `bg` row groups (4 * bg output features), `bm`
rows of x and some of the blocks b; its four accumulators, the output's four interleaved rows,
are its share of out[m, g, r], which XLA adds up. For one row of x the products are int32 vector
multiply-adds (GEMV), for more int8 tensor-core products. What an H200 measured is in
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from bitnet_jax.errors import BitNetError
from bitnet_jax.kernels import layout

# Two kernels. One row of x (decode): int32 vector multiply-adds ([bg, 64] codes times 64
# activations), up to 16 row groups per program. More rows: int8 tensor-core products of
# [bm, 64] x [64, bg], bm = 16 up to 16 rows (batched decode), else 64. Up to 16 rows K is split
# over the grid (one 256-wide block per program for the GEMV, up to 3 for the products), so
# that even a 640 x 2560 matrix spreads over 100 programs: each split writes its own int32
# partial sums and XLA adds them (exact in any order). Above 16 rows the tiles are many enough
# and each program walks all of K.
_GEMV_GROUPS = 16
_DOT_GROUPS = (16, 32, 64)  # the product's N is at least 16
_SMALL_ROWS = 16  # up to this many rows: one 16-row tile, the fewest groups, K split
_DOT_SPLIT_BLOCKS = 3
SERVE_MAX_ROWS = 16  # see `takes`


def _rows_per_program(m: int) -> int:
    return 1 if m == 1 else _SMALL_ROWS if m <= _SMALL_ROWS else 64


def groups_per_program(g: int, m: int) -> int | None:
    """Row groups (4 outputs each) one program computes for M rows of x and a weight of G row
    groups: for one row, the largest power of two up to 16 dividing G; for more, 16, 32 or 64
    (the smallest that divides G up to 16 rows, where more programs help, the largest above), or
    None when none divides G (then the kernel does not take the matrix)."""
    if m == 1:
        return min(g & -g, _GEMV_GROUPS)
    sizes = [s for s in _DOT_GROUPS if g % s == 0]
    if not sizes:
        return None
    return sizes[0] if m <= _SMALL_ROWS else sizes[-1]


def takes(n: int, m: int) -> bool:
    """Whether the 'pallas' serving backend runs a ternary matmul of N outputs on M rows of x on
    this kernel: up to SERVE_MAX_ROWS rows (decode, small batches), where it beat XLA's own fusion
    of the integer path on an H200 (1.3x the decode rate); more rows (prefill) stay on the XLA path,
    which was faster there (benchmarks/RESULTS.md). The kernel itself takes any M."""
    g, _ = layout.packed_ternary_shape(n, 1)
    return m <= SERVE_MAX_ROWS and groups_per_program(g, m) is not None


def ternary_matmul_i32(
    x_q_mk: jax.Array, w_packed: jax.Array, n: int, layer=None, *, interpret: bool = False
) -> jax.Array:
    """Exact int32 products [M, N] of int8 activation codes [M, K] and packed ternary weights
    [G, B * 256] (`layout.pack_ternary` of t [N, K]), or stacked ones [L, G, B * 256] with `layer`
    (an int32 scalar, traced or not) selecting one: sum_k x_q[m, k] * t[n, k].

    Stacked weights are read in place at the layer's offset, as the FFI kernels read them: a
    slice taken outside the kernel would be copied first. M is padded to whole row tiles and K
    to whole 256-wide blocks with zeros (the packed padding holds t = 0, so neither changes a
    sum). Raises `BitNetError` for a matrix whose row groups the kernel cannot tile (`takes`).
    """
    if x_q_mk.ndim != 2 or x_q_mk.dtype != jnp.int8:
        raise BitNetError(f"ternary_matmul_i32: expected int8 activations [M, K]; found {x_q_mk.dtype} {x_q_mk.shape}.")
    m, k = x_q_mk.shape
    w_lgx = w_packed if w_packed.ndim == 3 else w_packed[None]
    _, g, row_bytes = w_lgx.shape
    if (g, row_bytes) != layout.packed_ternary_shape(n, k) or w_packed.dtype != jnp.uint8:
        raise BitNetError(
            f"ternary_matmul_i32: packed weights {w_packed.dtype} {w_packed.shape} do not hold "
            f"[N, K] = [{n}, {k}]; expected uint8 {layout.packed_ternary_shape(n, k)} (or stacked [L, ...])."
        )
    if (w_packed.ndim == 3) != (layer is not None):
        raise BitNetError("ternary_matmul_i32: stacked weights [L, G, X] take a layer index; a single matrix none.")
    bm = _rows_per_program(m)
    bg = groups_per_program(g, m)
    if bg is None:
        raise BitNetError(
            f"ternary_matmul_i32: N = {n} gives {g} row groups of 4, which none of {_DOT_GROUPS} divides "
            "(needed for more than one row of x); use the XLA integer path for this matrix."
        )
    layer_1 = jnp.reshape(jnp.asarray(0 if layer is None else layer, jnp.int32), (1,))
    return _padded_call(x_q_mk, w_lgx, layer_1, n=n, bm=bm, bg=bg, interpret=interpret)


# One jitted function around the pallas_call. Bare, the call broke flax's `nn.scan` over the
# layers on JAX 0.11.2 (an H200, 2026-12-04: "broadcasted variable has a data dependency on the
# scan body" from flax's partial-evaluation check of the body; not on JAX 0.10.2); inside jit, the
# same generate program compiles and gives the XLA integer path's tokens.
@functools.partial(jax.jit, static_argnames=("n", "bm", "bg", "interpret"))
def _padded_call(x_q_mk, w_lgx, layer_1, *, n: int, bm: int, bg: int, interpret: bool):
    m, k = x_q_mk.shape
    layers, g, row_bytes = w_lgx.shape
    blocks = row_bytes // (layout.ROWS_PER_GROUP * layout.BLOCK_BYTES)
    m_tiles = -(-m // bm)
    x_padded = jnp.pad(x_q_mk, ((0, m_tiles * bm - m), (0, blocks * layout.BLOCK_K - k)))
    x_mbji = x_padded.reshape(m_tiles * bm, blocks, 4, layout.BLOCK_BYTES)
    w_lgbri = w_lgx.reshape(layers, g, blocks, layout.ROWS_PER_GROUP, layout.BLOCK_BYTES)
    out_smgr = _call(layers, blocks, bm, bg, m_tiles, g, interpret)(layer_1, x_mbji, w_lgbri)
    out_mgr = jnp.sum(out_smgr, axis=0)  # the splits' partial sums
    return out_mgr.reshape(m_tiles * bm, g * layout.ROWS_PER_GROUP)[:m, :n]


@functools.lru_cache(maxsize=None)
def _call(layers: int, blocks: int, bm: int, bg: int, m_tiles: int, g: int, interpret: bool):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pltriton

    gemv = bm == 1
    # 256-wide blocks of K per program: for the GEMV one; for the products, up to 16 rows the
    # most, up to _DOT_SPLIT_BLOCKS, that divides the blocks evenly; above 16 rows all of them.
    if gemv:
        chunk = 1
    elif bm <= _SMALL_ROWS:
        chunk = max(d for d in range(1, _DOT_SPLIT_BLOCKS + 1) if blocks % d == 0)
    else:
        chunk = blocks
    splits = blocks // chunk

    def kernel(layer_ref, x_ref, w_ref, out_ref):
        # layer_ref [1]; x_ref [bm, B, 4 (j), 64]; w_ref [L, bg, B, 4 (r), 64];
        # out_ref [1, bm, bg, 4 (r)]: this split's partial sums.
        layer = layer_ref[0]
        first = pl.program_id(1) * chunk

        def block(step, accs):
            b = first + step
            x_j = [x_ref[:, b, j, :] for j in range(4)]
            if gemv:
                x_j = [x.astype(jnp.int32) for x in x_j]  # [1, 64]
            new = []
            for r, acc in enumerate(accs):
                w_bytes = w_ref[layer, :, b, r, :]  # [bg, 64]
                for j in range(4):
                    # Shift and mask as uint8 (Triton does only bitwise ops on 8-bit types).
                    codes = (w_bytes >> (2 * j)) & 3
                    if gemv:
                        t = codes.astype(jnp.int32) - 1
                        acc = acc + jnp.sum(x_j[j] * t, axis=1)[None, :]
                    else:
                        t = codes.astype(jnp.int8) - 1
                        acc = acc + jax.lax.dot_general(
                            x_j[j], t, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32
                        )
                new.append(acc)
            return tuple(new)

        zeros = tuple(jnp.zeros((bm, bg), jnp.int32) for _ in range(layout.ROWS_PER_GROUP))
        accs = jax.lax.fori_loop(0, chunk, block, zeros)
        for r, acc in enumerate(accs):
            out_ref[0, :, :, r] = acc

    w_block = (layers, bg, blocks, layout.ROWS_PER_GROUP, layout.BLOCK_BYTES)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((splits, m_tiles * bm, g, layout.ROWS_PER_GROUP), jnp.int32),
        grid=(g // bg, splits, m_tiles),
        in_specs=[
            pl.BlockSpec((1,), lambda gi, ki, mi: (0,)),
            pl.BlockSpec((bm, blocks, 4, layout.BLOCK_BYTES), lambda gi, ki, mi: (mi, 0, 0, 0)),
            pl.BlockSpec(w_block, lambda gi, ki, mi: (0, gi, 0, 0, 0)),
        ],
        out_specs=pl.BlockSpec((1, bm, bg, layout.ROWS_PER_GROUP), lambda gi, ki, mi: (ki, mi, gi, 0)),
        interpret=interpret,
        compiler_params=pltriton.CompilerParams(num_warps=4),
        name="bitnet_ternary_matmul",
    )
