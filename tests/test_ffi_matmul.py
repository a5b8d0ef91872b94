"""The serving matmul kernels (xla_ffi/matmul.cc, gemm.cc) against pure-JAX references.

Every kernel path (scalar, AVX2, AVX-512 VNNI, NEON, NEON dot-product, forced with BITNET_JAX_ISA;
those this CPU cannot run are skipped, saying so) must give integer results identical to `jnp.dot`
on unpacked int32 values, on odd shapes: K not a multiple of the 256-wide block, N not a multiple
of the 4-row group, M (rows) on both sides of the 4-row tile and large. The fused float ops must
equal the reference written in the same order (act_quantize, exact integer
dot, * (1 / x_scale) * w_scale) bit for bit.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from resident_memory import resident_mb

from bitnet_jax.errors import BitNetError
from bitnet_jax.kernels import ffi, layout
from bitnet_jax.model import quant
from bitnet_jax.model.quant import act_quantize

# (M, K, N): odd K and N, M around the tile size of 4, and a prefill-sized M.
SHAPES = [
    (1, 1, 1),
    (1, 256, 4),
    (2, 255, 5),
    (3, 257, 7),
    (5, 300, 3),
    (8, 640, 13),
    (9, 1000, 6),
    (17, 777, 17),
    (130, 513, 9),
]


def _ternary(rng, n, k):
    return rng.integers(-1, 2, size=(n, k)).astype(np.int8)


def _int8(rng, *shape):
    return rng.integers(-128, 128, size=shape).astype(np.int8)


def _dot_i32(x_mk, w_nk):
    return jnp.dot(jnp.asarray(x_mk, jnp.int32), jnp.asarray(w_nk, jnp.int32).T)


def test_layout_mirror_matches_the_header():
    assert ffi._ffi_ext.layout() == {
        "version": layout.LAYOUT_VERSION,
        "block_k": layout.BLOCK_K,
        "block_bytes": layout.BLOCK_BYTES,
        "rows_per_group": layout.ROWS_PER_GROUP,
        "tile_rows": layout.TILE_ROWS,
        "tile_chunk_k": layout.TILE_CHUNK_K,
        "tile_align_k": layout.TILE_ALIGN_K,
        "int8_row_align": layout.INT8_ROW_ALIGN,
        "int4_group_k": layout.INT4_GROUP_K,
        "ternary_group_align": layout.TERNARY_GROUP_ALIGN,
    }
    assert "scalar" in ffi.available_isas()


def test_quantizer_eps_mirror_matches_the_header():
    # The activation quantizers divide by max(amax, eps): the kernels and the XLA path (and the
    # fake-quant training model) agree only if they floor at the same float32 value.
    assert np.float32(ffi._ffi_ext.quant_eps()) == np.float32(quant.EPS)


@pytest.mark.parametrize("n,k", [(1, 1), (5, 255), (7, 513), (64, 256)])
def test_pack_ternary_bit_positions_and_round_trip(n, k):
    t = _ternary(np.random.default_rng(n * k), n, k)
    packed = layout.pack_ternary(t)
    assert packed.shape == layout.packed_ternary_shape(n, k) and packed.dtype == np.uint8
    # Read every weight back by the rule written in layout.h, one at a time.
    kb = packed.shape[1] // 256
    for row, col in [(0, 0), (n - 1, k - 1), (n // 2, k // 3), (n - 1, 0)]:
        g, r, b, kk = row // 4, row % 4, col // 256, col % 256
        byte = packed[g, (b * 4 + r) * 64 + kk % 64]
        assert ((int(byte) >> (2 * (kk // 64))) & 3) - 1 == t[row, col]
    assert kb == -(-k // 256)
    np.testing.assert_array_equal(np.asarray(layout.unpack_ternary(packed, n, k)), t)


@pytest.mark.parametrize("n,k", [(1, 1), (5, 255), (17, 513), (32, 64), (40, 1000)])
def test_pack_ternary_tiles_bit_positions_and_round_trip(n, k):
    t = _ternary(np.random.default_rng(n * k + 1), n, k)
    tiles = layout.pack_ternary_tiles(t)
    assert tiles.shape == layout.packed_ternary_tiles_shape(n, k) == (-(-n // 16), -(-k // 64) * 256)
    # Read every weight back by the rule written in layout.h (TQ2G), one at a time.
    for row, col in [(0, 0), (n - 1, k - 1), (n // 2, k // 3), (n - 1, 0), (0, k - 1)]:
        o, c, j, b = row % 16, col // 16, col % 16 // 4, col % 4
        byte = tiles[row // 16, 64 * c + 4 * o + b]
        assert ((int(byte) >> (2 * j)) & 3) - 1 == t[row, col]
    # Padding (rows past N, inputs past K) holds code 1, t = 0.
    codes = np.asarray(layout.unpack_ternary_tiles(tiles, tiles.shape[0] * 16, tiles.shape[1] // 4))
    assert not codes[n:].any() and not codes[:, k:].any()
    np.testing.assert_array_equal(codes[:n, :k], t)
    np.testing.assert_array_equal(layout.repack_ternary_tiles(layout.pack_ternary(t), n, k), tiles)
    np.testing.assert_array_equal(np.asarray(layout.unpack_codes(layout.pack_ternary(t), n, k, False)), t)
    np.testing.assert_array_equal(np.asarray(layout.unpack_codes(tiles, n, k, True)), t)


@pytest.mark.parametrize("groups,n", [(1, 1), (3, 16), (5, 37)])
def test_group_scales_tile_by_the_codes_tiles(groups, n):
    scale = np.random.default_rng(n).normal(size=(groups, n)).astype(np.float32)
    tiles = layout.tile_group_scales(scale)
    assert tiles.shape == layout.group_scales_shape(n, groups) == (-(-n // 16), 16 * groups)
    for c, row in [(0, 0), (groups - 1, n - 1), (groups // 2, n // 2)]:
        assert tiles[row // 16, 16 * c + row % 16] == scale[c, row]
    assert not tiles.reshape(-1, groups, 16)[-1, :, (n - 1) % 16 + 1 :].any()  # 0 past N
    np.testing.assert_array_equal(np.asarray(layout.untile_group_scales(tiles, n)), scale)


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_ternary_i32_equals_reference(isa, m, k, n):
    rng = np.random.default_rng(m * 1000 + k + n)
    t, x = _ternary(rng, n, k), _int8(rng, m, k)
    x[0, 0] = -128  # the corner case of maddubs / sign tricks
    got = jax.jit(lambda x, w: ffi.ternary_matmul_i32(x, w, n))(x, layout.pack_ternary(t))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(_dot_i32(x, t)))


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_int8_i32_equals_reference(isa, m, k, n):
    rng = np.random.default_rng(m * 1000 + k + n + 1)
    w, x = _int8(rng, n, k), _int8(rng, m, k)
    w[0, 0], x[0, 0] = -128, -128  # -128 * -128 overflows int16 tricks
    got = ffi.int8_matmul_i32(x, layout.pack_int8(w))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(_dot_i32(x, w)))


def _ternary_reference(x, t, w_scale, bits=8):
    x_q, x_scale = act_quantize(x, "token", bits)
    acc = _dot_i32(x_q.astype(jnp.int32), t).astype(jnp.float32)
    return (acc * (1 / x_scale)) * w_scale


@pytest.mark.parametrize("m,k,n", [(1, 300, 5), (4, 256, 8), (17, 777, 17)])
@pytest.mark.parametrize("per_row", [False, True])
def test_fused_ternary_matmul_bit_exact(isa, m, k, n, per_row):
    rng = np.random.default_rng(7)
    t = _ternary(rng, n, k)
    x = rng.normal(size=(m, k)).astype(np.float32) * 3
    w_scale = rng.uniform(0.01, 0.1, size=(n if per_row else 1,)).astype(np.float32)
    got = jax.jit(lambda x: ffi.ternary_matmul(x, layout.pack_ternary(t), w_scale, n))(x)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(_ternary_reference(x, t, w_scale)))
    # bf16 activations widen exactly, so they quantize like their float32 values.
    x16 = jnp.asarray(x, jnp.bfloat16)
    got16 = ffi.ternary_matmul(x16, layout.pack_ternary(t), w_scale, n)
    np.testing.assert_array_equal(np.asarray(got16), np.asarray(_ternary_reference(x16, t, w_scale)))


@pytest.mark.parametrize("m", [1, 3, 40])
def test_ternary_matmuls_give_each_projection_the_bits_of_its_own_call(isa, m):
    """Several projections of one x in one call (q, k, v): each output must be exactly what
    `ternary_matmul` gives it, on stacked layers, per-tensor and per-row scales, a projection
    smaller than one task of row groups and one not a whole group, decode and prefill row counts."""
    rng = np.random.default_rng(m)
    k, layers = 700, 3
    projections, tables = [], []
    for n, per_row in ((300, False), (37, True), (6, False), (130, True)):
        t = np.stack([_ternary(rng, n, k) for _ in range(layers)])
        w_scale = rng.uniform(0.01, 0.1, size=(layers, n if per_row else 1)).astype(np.float32)
        projections.append((jnp.stack([layout.pack_ternary(t[i]) for i in range(layers)]), jnp.asarray(w_scale), n))
        tables.append((t, w_scale))
    x = rng.normal(size=(m, k)).astype(np.float32) * 3
    for layer in (0, 2):
        got = jax.jit(lambda x, layer: ffi.ternary_matmuls(x, projections, 8, layer))(x, layer)
        assert len(got) == len(projections)
        for y, (w_packed, w_scale, n), (t, scale) in zip(got, projections, tables):
            alone = ffi.ternary_matmul(x, w_packed, w_scale, n, 8, layer)
            np.testing.assert_array_equal(np.asarray(y), np.asarray(alone))
            np.testing.assert_array_equal(np.asarray(y), np.asarray(_ternary_reference(x, t[layer], scale[layer])))
    # A batch axis under vmap folds into the rows.
    xb = rng.normal(size=(2, m, k)).astype(np.float32)
    batched = jax.vmap(lambda x: ffi.ternary_matmuls(x, projections[:2]))(xb)
    for y, (w_packed, w_scale, n) in zip(batched, projections[:2]):
        np.testing.assert_array_equal(np.asarray(y), np.asarray(ffi.ternary_matmul(xb, w_packed, w_scale, n)))


def test_ternary_matmuls_refuses_projections_that_do_not_fit_x():
    rng = np.random.default_rng(0)
    good = (layout.pack_ternary(_ternary(rng, 8, 256)), jnp.ones((1,), jnp.float32), 8)
    other_k = (layout.pack_ternary(_ternary(rng, 8, 512)), jnp.ones((1,), jnp.float32), 8)
    with pytest.raises(Exception, match=r"bitnet_ternary_matmuls \(projection 1\).*K=256"):
        jax.block_until_ready(ffi.ternary_matmuls(jnp.ones((1, 256)), [good, other_k]))
    with pytest.raises(BitNetError, match="at least one"):
        ffi.ternary_matmuls(jnp.ones((1, 256)), [])


@pytest.mark.parametrize("k", [7, 37, 300])
@pytest.mark.parametrize("bits", [8, 4])
def test_fused_quantization_special_rows_bit_exact(isa, k, bits):
    """The SIMD quantizers (16 and 8 lanes, scalar tails) on rows that take every branch: NaN,
    inf (inf * 0 products: NaN rows, as in the reference), all zero, below the 1e-5 floor, exact .5 ties (half to even),
    huge values; 130 rows so that rows are quantized in parallel chunks and the prefill path runs."""
    rng = np.random.default_rng(k * bits)
    x = rng.normal(size=(130, k)).astype(np.float32) * 5
    x[0, k // 2] = np.nan
    x[1, 0] = np.inf
    x[2, -1] = -np.inf
    x[3] = 0
    x[4] = rng.normal(size=k) * 1e-7
    q_max = 2 ** (bits - 1) - 1
    x[5] = np.resize(np.array([0.5, 1.5, 2.5, -0.5, -2.5, 3.5], np.float32), k)
    x[5, -1] = q_max  # amax = q_max: scale 1, so the ties above stay ties
    x[6] = 3e38
    x[7, ::2] *= 1e30
    t = _ternary(rng, 40, k)
    w_scale = np.array([0.03], np.float32)
    for x in (x, jnp.asarray(x, jnp.bfloat16)):  # bf16 widens exactly: quantized like its f32 values
        got = np.asarray(ffi.ternary_matmul(x, layout.pack_ternary(t), w_scale, 40, act_bits=bits))
        want = np.asarray(_ternary_reference(x, t, w_scale, bits=bits))
        # A row holding NaN is NaN throughout (its scale is NaN). The reference is not used
        # there: XLA:CPU's vectorized max-reduction drops NaN for some lengths (e.g. K=37).
        assert np.isnan(got[0]).all()
        np.testing.assert_array_equal(got[1:], want[1:])


def test_fused_ternary_matmul_act_bits_4():
    rng = np.random.default_rng(3)
    t, x = _ternary(rng, 6, 100), rng.normal(size=(3, 100)).astype(np.float32)
    w_scale = np.array([0.5], np.float32)
    got = ffi.ternary_matmul(x, layout.pack_ternary(t), w_scale, 6, act_bits=4)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(_ternary_reference(x, t, w_scale, bits=4)))


def test_fused_int8_matmul_bit_exact(isa):
    rng = np.random.default_rng(11)
    w = rng.normal(size=(37, 130)).astype(np.float32)
    w8, w_scale = layout.quantize_int8_rows(w)
    x = rng.normal(size=(3, 130)).astype(np.float32)
    got = ffi.int8_matmul(x, layout.pack_int8(w8), w_scale)
    x_q, x_scale = act_quantize(x, "token", 8)
    want = (_dot_i32(x_q.astype(jnp.int32), w8).astype(jnp.float32) * (1 / x_scale)) * w_scale
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # ... and approximates the float product: int8 rounding of x and w, each ~0.5/127 of its
    # row's absmax, leaves errors of a few percent of the typical output.
    exact = x @ w.T
    assert np.max(np.abs(np.asarray(got) - exact)) < 0.05 * np.sqrt(np.mean(exact**2))


def test_batch_axes_and_vmap():
    rng = np.random.default_rng(5)
    t = _ternary(rng, 9, 70)
    packed, w_scale = layout.pack_ternary(t), np.array([0.25], np.float32)
    x = rng.normal(size=(2, 3, 70)).astype(np.float32)
    want = _ternary_reference(x, t, w_scale)
    np.testing.assert_array_equal(np.asarray(ffi.ternary_matmul(x, packed, w_scale, 9)), np.asarray(want))
    by_vmap = jax.vmap(lambda xi: ffi.ternary_matmul(xi, packed, w_scale, 9))(x)
    np.testing.assert_array_equal(np.asarray(by_vmap), np.asarray(want))
    # Weights batched too (one layer per batch element): the same as calling each alone.
    t2 = _ternary(rng, 9, 70)
    packed_2 = np.stack([packed, layout.pack_ternary(t2)])
    both = jax.vmap(lambda xi, wi: ffi.ternary_matmul(xi, wi, w_scale, 9))(x, packed_2)
    np.testing.assert_array_equal(np.asarray(both[1]), np.asarray(_ternary_reference(x[1], t2, w_scale)))
    # Stacked layers: the kernel reads layer i of [L, G, X] in place, as if given that layer alone.
    stacked, scales = np.stack([packed, layout.pack_ternary(t2)]), np.array([[0.25], [0.5]], np.float32)
    one = ffi.ternary_matmul(x, stacked, scales, 9, layer=jnp.int32(1))
    np.testing.assert_array_equal(np.asarray(one), np.asarray(_ternary_reference(x, t2, scales[1])))
    with pytest.raises(Exception, match="layer 2 is outside the 2 layers"):
        ffi.ternary_matmul(x, stacked, scales, 9, layer=2).block_until_ready()
    x_q = jnp.asarray(rng.integers(-128, 128, (3, 70)), jnp.int8)
    np.testing.assert_array_equal(
        np.asarray(ffi.ternary_matmul_i32(x_q, stacked, 9, layer=jnp.int32(1))),
        np.asarray(_dot_i32(x_q.astype(jnp.int32), t2)),
    )
    with pytest.raises(Exception, match="layer -1 is outside the 2 layers"):
        ffi.ternary_matmul_i32(x_q, stacked, 9, layer=-1).block_until_ready()
    # Empty batches pass through.
    assert ffi.ternary_matmul(np.zeros((0, 70), np.float32), packed, w_scale, 9).shape == (0, 9)


def test_bad_inputs_raise_instead_of_crashing(monkeypatch):
    rng = np.random.default_rng(0)
    packed = layout.pack_ternary(_ternary(rng, 8, 300))
    x = np.ones((2, 300), np.float32)
    scale = np.ones((1,), np.float32)
    with pytest.raises(Exception, match=r"packed ternary weights for K=200 .* must be uint8 \[2, 256\]"):
        ffi.ternary_matmul(x[:, :200], packed, scale, 8).block_until_ready()
    with pytest.raises(Exception, match=r"must be uint8 \[3, 512\]"):
        ffi.ternary_matmul(x, packed, scale, 9).block_until_ready()
    with pytest.raises(Exception, match=r"w_scale of shape \[1\] or \[8\]"):
        ffi.ternary_matmul(x, packed, np.ones((3,), np.float32), 8).block_until_ready()
    with pytest.raises(Exception, match="Buffer|dtype|U8|type"):
        ffi.ternary_matmul(x, packed.astype(np.int8), scale, 8).block_until_ready()
    with pytest.raises(BitNetError, match="floating-point"):
        ffi.ternary_matmul(np.ones((2, 300), np.int32), packed, scale, 8)
    stale = layout.LAYOUT_VERSION + 1  # weights from a bitnet_jax newer than this build
    with pytest.raises(Exception, match=f"layout version {stale}.*reads version {layout.LAYOUT_VERSION}.*convert"):
        call = jax.ffi.ffi_call("bitnet_ternary_matmul", jax.ShapeDtypeStruct((2, 8), jnp.float32))
        call(
            x, packed, scale, np.int32(0), n=np.int64(8), act_bits=np.int64(8), layout_version=np.int64(stale)
        ).block_until_ready()
    with pytest.raises(Exception, match=r"act_bits must be in \[2, 8\]"):
        ffi.ternary_matmul(x, packed, scale, 8, act_bits=9).block_until_ready()
    with pytest.raises(Exception, match=r"int8 weights for K=300 inputs must be int8 \[N, 320\]"):
        ffi.int8_matmul(x, np.zeros((4, 300), np.int8), np.ones((4,), np.float32)).block_until_ready()
    monkeypatch.setenv("BITNET_JAX_ISA", "sse9")
    with pytest.raises(Exception, match="BITNET_JAX_ISA=sse9 is not a kernel path"):
        ffi.ternary_matmul(x, packed, scale, 8).block_until_ready()
    with pytest.raises(BitNetError, match="sse9"):
        ffi.selected_isa()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_embed_rows_equals_take(dtype):
    rng = np.random.default_rng(2)
    table = rng.normal(size=(50, 37)).astype(np.float32) * 100
    table[3, :6] = [np.inf, -np.inf, np.nan, 0.0, -0.0, 1e-7]  # specials and an f16 subnormal
    table = jnp.asarray(table, dtype)
    ids = jnp.asarray(rng.integers(0, 50, size=(3, 4)), jnp.int32).at[0, 0].set(3)
    want = np.asarray(jnp.take(table, ids, axis=0).astype(jnp.float32))
    got = jax.jit(ffi.embed_rows)(table, ids)
    np.testing.assert_array_equal(np.asarray(got), want)
    np.testing.assert_array_equal(np.asarray(jax.vmap(ffi.embed_rows, in_axes=(None, 0))(table, ids)), want)
    with pytest.raises(Exception, match="id 50 is outside the table's 50 rows"):
        np.asarray(ffi.embed_rows(table, jnp.asarray([1, 50], jnp.int32)))
    with pytest.raises(BitNetError, match="float32, bfloat16 or float16 table"):
        ffi.embed_rows(jnp.zeros((4, 3), jnp.int8), ids)


def test_zeros_are_zeros_and_resident_only_where_written():
    """`ffi.zeros` (the server's KV pool) gives true zeros of any dtype, in one program with other
    outputs; on Linux its whole pages are handed back to the OS rather than written, so that a
    512 MB buffer adds next to nothing to the resident memory until a step writes to it, and then
    only the pages written. (XLA's own zeros write, and so hold, all 512 MB.) Tolerance: the call
    keeps at most two partial pages per buffer; the rest of the 128 MB allowed is for whatever the
    runtime itself allocates meanwhile, far below the buffer's size."""
    shapes = {
        "i8": jax.ShapeDtypeStruct((3, 5, 7), jnp.int8),
        "f32": jax.ShapeDtypeStruct((4099,), jnp.float32),
        "bf16": jax.ShapeDtypeStruct((2, 3), jnp.bfloat16),
        "none": None,
    }
    made = jax.jit(lambda: ffi.zeros(shapes))()
    assert made["none"] is None
    for name in ("i8", "f32", "bf16"):
        assert made[name].shape == shapes[name].shape and made[name].dtype == shapes[name].dtype
        np.testing.assert_array_equal(np.asarray(made[name].astype(jnp.float32)), 0.0)
    if not sys.platform.startswith("linux"):
        pytest.skip("resident memory is read from /proc (Linux), and pages are handed back there only")
    big = jax.ShapeDtypeStruct((64, 1024, 8192), jnp.int8)  # 512 MiB
    make = jax.jit(lambda: ffi.zeros(big))
    write = jax.jit(lambda x: x.at[3].set(7), donate_argnums=0)  # one 8 MiB slice, in place
    make.lower().compile(), write.lower(big).compile()
    before = resident_mb()
    x = make().block_until_ready()
    assert resident_mb() - before < 128
    x = write(x).block_until_ready()
    assert 8 <= resident_mb() - before < 128 + 8
    assert int(x[3].min()) == 7 and int(x[2].max()) == 0 and int(x[4].max()) == 0
