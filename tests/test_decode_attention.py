"""The decode attention kernel (xla_ffi/attention.cc, `ffi.decode_attention`) against the XLA
attention of model/transformer.py, on every kernel path this CPU runs (forced with
BITNET_JAX_ISA; the others are skipped, saying why): odd head dims, grouped heads, several
chunks of 128 slots merged, positions at 0, S - 1 and around chunk edges, a nonzero layer, rows
with nothing to attend. A row's output must be the same bits alone or in any batch, with any
cache row, with its slots in pages anywhere in the cache, and on one thread or two. Bad input is
an error, never a read out of bounds. The same for an int8 cache with per-slot scales
(`KVCache.zeros(..., dtype=jnp.int8)`), against the XLA attention over its dequantized values,
within the rounding of the kernel's int16 codes of queries and weights as well (`tolerance`).
"""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitnet_jax.errors import BitNetError
from bitnet_jax.kernels import ffi
from bitnet_jax.kernels.ops import ATTENTION_SIMD_ISAS, FFI_ATTENTION_MAX_T
from bitnet_jax.model.transformer import _MASKED, KVCache, grouped_attention, quantize_kv

U = 2.0**-24  # float32's unit roundoff

# (H, G, K, B, T, S): head dims 64, 128, 80 and 76 (not a whole number of 8-float vectors); 1, 2
# and 4 query heads per kv head; up to 600 slots (5 chunks of 128); one query per row and four.
SHAPES = [
    (64, 1, 2, 1, 1, 600),
    (128, 4, 2, 3, 4, 600),
    (80, 2, 3, 2, 4, 300),
    (76, 4, 1, 3, 1, 513),
    (128, 2, 1, 2, 1, 129),
]
LAYERS = 3
LAYER = 2


def _inputs(h, g, k, b, t, s, seed=0):
    rng = np.random.default_rng(seed)
    q_btnh = rng.standard_normal((b, t, k * g, h), np.float32)
    k_lbksh = rng.standard_normal((LAYERS, b, k, s, h), np.float32)
    v_lbksh = rng.standard_normal((LAYERS, b, k, s, h), np.float32)
    return q_btnh, k_lbksh, v_lbksh


def _positions(b, t, s, seed=0):
    """Per row and query, first S - 1 (every chunk), 0, the edges of the 128-slot chunks and -1
    (nothing to attend), then random ones."""
    special = [s - 1, 0, 129, -1, 127, 128, 255, 256]
    rng = np.random.default_rng(seed + 1)
    picks = [p for p in special if p < s] + list(rng.integers(0, s, b * t))
    return np.asarray(picks[: b * t], np.int32).reshape(b, t)


def xla_attention(q_btnh, k_lbksh, v_lbksh, layer, positions_bt, rows_b):
    """The XLA path of `grouped_attention` on a cache: every slot of the layer scored, masked to
    slot <= position, softmax, weighted values; rows with a negative position zeroed (the kernel's
    contract; the mask alone would average every slot there)."""
    keys, values = k_lbksh[layer][rows_b], v_lbksh[layer][rows_b]  # [B, K, S, H]
    b, t, n, h = q_btnh.shape
    k, s = keys.shape[1], keys.shape[2]
    scores_bkgts = jnp.einsum("btkgh,bksh->bkgts", q_btnh.reshape(b, t, k, n // k, h), keys) * (h**-0.5)
    mask_bts = jnp.arange(s)[None, None, :] <= positions_bt[:, :, None]
    probs_bkgts = jax.nn.softmax(jnp.where(mask_bts[:, None, None], scores_bkgts, _MASKED), axis=-1)
    out_btnh = jnp.einsum("bkgts,bksh->btkgh", probs_bkgts, values).reshape(b, t, n, h)
    return jnp.where(positions_bt[:, :, None, None] >= 0, out_btnh, 0.0)


def tolerance(q_btnh, k_lbksh, v_lbksh, layer, positions_bt, rows_b, int8_cache=None):
    """Per output element, the float32 rounding allowed between the kernel and the XLA path.

    Each side, first order in u = 2^-24: a score (a dot of H products, scaled) is off by at most
    (H + 1) u a_j, a_j = H^-0.5 sum_i |q_i k_ji| <= A; subtracting the max (and, for the kernel,
    merging chunk maxima) and the exp add at most 4uA + 3u, so each weight exp(s_j - max) has a
    relative error d <= (H + 5) u A + 3u. The sums of weights and of weighted values have at most
    S + 1 terms in sequence (S the cache slots: XLA adds the masked zeros too), and the division
    rounds once: |out - exact| <= (2d + (2S + 5) u) sum_j p_j |v_j|. Two sides: twice that.
    The order of the sums differs between the sides, so nothing tighter holds on every CPU.

    `int8_cache`: (value codes [L, Bc, K, S, H], value scales [L, Bc, K, S]) where the kernel
    reads an int8 cache, XLA their float32 product (k_lbksh, v_lbksh here). The kernel scales a
    score in two roundings (k_scale * H^-0.5, then the product: one more than a float cache) and a
    weight by v_scale in one; XLA's dequantized keys and values are each one rounding off the exact
    scale * code, which moves a score by at most uA and a value by u|v|. So d grows by 2u + uA on
    either side. And the kernel alone multiplies in integers (attention_kernel.h, AttendChunkInt8):
    it rounds a head's query to int16 codes of step max|q| / 32767, each within 0.51 steps (half a
    step and one float rounding of at most 32767u), which moves a score by at most 0.51 step
    H^-0.5 sum_i |k_ji| and a weight by twice the largest such move, relatively; it rounds a
    chunk's weights w_j = p_j v_scale_j the same way, which moves an output by at most 0.51 / 32767
    max_j(P_j v_scale_j) sum_j |code_j| per chunk of 128 slots (P the normalized weights).
    """
    q, keys, values = (np.asarray(x, np.float64) for x in (q_btnh, k_lbksh[layer][rows_b], v_lbksh[layer][rows_b]))
    if int8_cache is not None:
        v_codes, v_scales = (np.asarray(x, np.float64)[layer][rows_b] for x in int8_cache)
    b, t, n, h = q.shape
    k, s = keys.shape[1], keys.shape[2]
    tol = np.zeros(q.shape)
    for bi, ti, ni in np.ndindex(b, t, n):
        last = positions_bt[bi, ti]
        if last < 0:
            continue
        keys_sh, values_sh = keys[bi, ni // (n // k), : last + 1], values[bi, ni // (n // k), : last + 1]
        scores = keys_sh @ q[bi, ti, ni] / np.sqrt(h)
        a_max = np.max(np.abs(keys_sh) @ np.abs(q[bi, ti, ni])) / np.sqrt(h)
        p = np.exp(scores - scores.max())
        p /= p.sum()
        d = (h + 5) * U * a_max + 3 * U + (2 * U + U * a_max if int8_cache is not None else 0.0)
        tol[bi, ti, ni] = 2 * (2 * d + (2 * s + 5) * U) * (p @ np.abs(values_sh))
        if int8_cache is not None:
            q_step = np.max(np.abs(q[bi, ti, ni])) / 32767
            score_move = 0.51 * q_step * np.max(np.abs(keys_sh).sum(axis=1)) / np.sqrt(h)
            tol[bi, ti, ni] += 2 * 2 * score_move * (p @ np.abs(values_sh))
            codes_sh = np.abs(v_codes[bi, ni // (n // k), : last + 1])
            weights = p * v_scales[bi, ni // (n // k), : last + 1]
            for first in range(0, last + 1, 128):
                chunk = slice(first, first + 128)
                tol[bi, ti, ni] += 0.51 / 32767 * weights[chunk].max() * codes_sh[chunk].sum(axis=0)
    return tol


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "H{}-G{}-K{}-B{}-T{}-S{}".format(*s))
def test_matches_xla_attention(isa, shape):
    h, g, k, b, t, s = shape
    q, k_cache, v_cache = _inputs(*shape)
    positions = _positions(b, t, s)
    rows = np.arange(b)
    got = np.asarray(jax.jit(ffi.decode_attention)(q, k_cache, v_cache, LAYER, positions))
    want = np.asarray(xla_attention(q, k_cache, v_cache, LAYER, positions, rows))
    tol = tolerance(q, k_cache, v_cache, LAYER, positions, rows)
    _assert_within(got, want, tol)
    assert np.all(got[positions < 0] == 0)


def _assert_within(got, want, tol):
    excess = np.abs(got - want) - tol
    worst = np.unravel_index(np.argmax(excess), excess.shape)
    assert np.all(excess <= 0), (
        f"{np.sum(excess > 0)} of {excess.size} outputs outside the rounding bound; worst at [b, t, n, h] = "
        f"{worst}: got {got[worst]}, want {want[worst]}, bound {tol[worst]:.3g}"
    )


def test_batch_invariance(isa):
    """A row's output is the same bits alone, beside other rows at other positions, at another
    index of the batch, and reading another row of a larger cache (`cache_rows_b`)."""
    h, g, k, s = 128, 4, 2, 600
    q, k_cache, v_cache = _inputs(h, g, k, 3, 2, s, seed=7)
    positions = np.array([[300, 301], [5, 599], [-1, 130]], np.int32)
    call = jax.jit(ffi.decode_attention)
    batch = np.asarray(call(q, k_cache, v_cache, LAYER, positions))
    for row in range(3):
        one = slice(row, row + 1)
        alone = np.asarray(call(q[one], k_cache[:, one], v_cache[:, one], LAYER, positions[one]))
        assert alone.tobytes() == batch[row : row + 1].tobytes(), f"row {row} alone differs from row {row} in the batch"
    # Rows reversed and each reading its own cache row through cache_rows_b.
    reversed_out = np.asarray(call(q[::-1], k_cache, v_cache, LAYER, positions[::-1], np.array([2, 1, 0], np.int32)))
    assert reversed_out[::-1].tobytes() == batch.tobytes()


def _paged(cache_lbks_, page_len, order):
    """A contiguous cache [L, B, K, S, ...] cut into pages of page_len slots, stored in the rows
    of a pool in the shuffled `order` (page j of row b: pool row order[b * P + j]), behind one
    scratch row of other values. Returns (pool [L, 1 + B * P, K, page_len, ...], pages [B, P])."""
    layers, b, k, s = cache_lbks_.shape[:4]
    p = s // page_len
    pages = cache_lbks_.reshape((layers, b, k, p, page_len) + cache_lbks_.shape[4:]).swapaxes(2, 3)
    pages = pages.reshape((layers, b * p, k, page_len) + cache_lbks_.shape[4:])
    pool = np.full((layers, 1 + b * p) + pages.shape[2:], 7, cache_lbks_.dtype)
    pool[:, 1 + order] = pages
    return pool, (1 + order).reshape(b, p).astype(np.int32)


@pytest.mark.parametrize("cache", ["float32", "int8"])
def test_paged_cache_gives_the_same_bits(isa, cache):
    """A paged cache (slot s of row b at slot s % S of pool row pages[b, s // S]) gives the bits
    of the same slots in one row each, whatever the order of the pages in the pool: each chunk
    of 128 slots lies in one page and the chunks are merged in slot order."""
    h, g, k, b, t, s, page_len = 128, 4, 2, 3, 2, 512, 128
    q, k_cache, v_cache = _inputs(h, g, k, b, t, s, seed=11)
    positions = np.array([[511, 0], [128, 300], [-1, 255]], np.int32)
    order = np.random.default_rng(5).permutation(b * s // page_len)
    call = jax.jit(ffi.decode_attention)
    if cache == "float32":
        want = np.asarray(call(q, k_cache, v_cache, LAYER, positions))
        (k_pool, pages), (v_pool, _) = _paged(k_cache, page_len, order), _paged(v_cache, page_len, order)
        got = np.asarray(call(q, k_pool, v_pool, LAYER, positions, cache_pages_bp=pages))
    else:
        k_q, v_q, k_scale, v_scale = _int8_cache(k_cache, v_cache)
        want = np.asarray(call(q, k_q, v_q, LAYER, positions, None, k_scale, v_scale))
        pools = [_paged(x, page_len, order)[0] for x in (k_q, v_q, k_scale, v_scale)]
        pages = _paged(k_q, page_len, order)[1]
        got = np.asarray(call(q, pools[0], pools[1], LAYER, positions, None, pools[2], pools[3], cache_pages_bp=pages))
    assert got.tobytes() == want.tobytes()
    # And the XLA attention over the same pages (`KVCache.layer` gathers them) agrees with the
    # kernel within float32 rounding, as on a contiguous cache.
    if cache == "float32":
        keys, values = KVCache(jnp.asarray(k_pool), jnp.asarray(v_pool)).layer(LAYER, jnp.asarray(pages))
        assert keys.shape == (b, k, s, h)
        np.testing.assert_array_equal(np.asarray(keys), k_cache[LAYER])
        np.testing.assert_array_equal(np.asarray(values), v_cache[LAYER])


@pytest.mark.parametrize("cache", ["float32", "int8"])
@pytest.mark.parametrize("k", [1, 2])
def test_prefill_chunk_gives_each_query_the_bits_it_gets_alone(isa, cache, k):
    """The kernel splits its work two ways: a prefill chunk's many (query, kv head) outputs one
    task each, which attends over the output's chunks of 128 slots in order and merges them; a
    decode step's few outputs one task per chunk, merged in a second pass (attention.cc). Each
    query of a 256-query chunk (512 outputs: the first way on up to 128 threads) must get the
    bits it gets alone (2 outputs: the second way on any number of threads). On AVX-512 VNNI over
    an int8 cache the chunk's queries score from keys their threads transposed, kept from one of a
    thread's tasks to its next within a call, the single queries from the keys as they lie: so the
    chunk runs on a layer, another, and the first again, and a thread that scored from another
    call's keys would fail this (where it shows depends on which threads take which tasks: one
    and two kv heads give it two chances; each caught it when the kept keys ignored the call)."""
    h, g, t, s = 128, 4, 256, 700
    q, k_cache, v_cache = _inputs(h, g, k, 1, t, s, seed=9)
    positions = (150 + 2 * np.arange(t, dtype=np.int32))[None]  # 150..660: 2 to 6 chunks
    positions[0, 7] = -1  # nothing to attend
    caches = (k_cache, v_cache) if cache == "float32" else _int8_cache(k_cache, v_cache)
    call = jax.jit(
        lambda q, positions, layer: ffi.decode_attention(q, caches[0], caches[1], layer, positions, None, *caches[2:])
    )
    for layer in (LAYER, 0, LAYER):
        chunk = np.asarray(call(q, positions, layer))
        for ti in (0, 7, 52, 53, 180, 255):  # positions 150, -1, 254, 256 (a chunk's first slot), 510, 660
            alone = np.asarray(call(q[:, ti : ti + 1], positions[:, ti : ti + 1], layer))
            assert alone.tobytes() == chunk[:, ti : ti + 1].tobytes(), (
                f"layer {layer}: query {ti} alone differs from query {ti} in the chunk"
            )


def test_paged_cache_bad_input_is_an_error():
    q, k_cache, v_cache = _inputs(64, 2, 2, 2, 1, 256)
    positions = np.array([[3], [200]], np.int32)
    call = jax.jit(ffi.decode_attention)
    pages = np.array([[0, 1], [1, 0]], np.int32)
    with pytest.raises(BitNetError, match="cache_rows_b or cache_pages_bp, not both"):
        call(q, k_cache, v_cache, 0, positions, np.array([0, 1], np.int32), cache_pages_bp=pages)
    with pytest.raises(BitNetError, match="cache_pages_bp of shape \\[B, P\\]"):
        call(q, k_cache, v_cache, 0, positions, cache_pages_bp=pages[0])
    for cache_pages, pos, message in [
        (np.array([[0, 1], [1, 2]], np.int32), positions, "pages\\[1, 1\\] = 2 is outside the cache's 2 rows"),
        (pages, np.array([[3], [512]], np.int32), "position 512 of query \\[1, 0\\] is past its row's 512 slots"),
    ]:
        with pytest.raises(Exception, match=message):
            jax.block_until_ready(call(q, k_cache, v_cache, 0, pos, cache_pages_bp=cache_pages))
    # Pages must hold whole chunks of 128 slots (the kernel's unit of work and of summation).
    with pytest.raises(Exception, match="pages of a multiple of 128 slots"):
        jax.block_until_ready(
            call(q, k_cache[:, :, :, :200], v_cache[:, :, :, :200], 0, positions, cache_pages_bp=pages)
        )


# Writes the kernel's output on fixed inputs to argv[1]; with argv[2] == "1", on one CPU only.
_THREADS_SCRIPT = textwrap.dedent("""
    import os, sys
    if sys.argv[2] == "1":
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # before JAX: XLA sizes its pool from it
    import numpy as np, jax
    from bitnet_jax.kernels import ffi
    rng = np.random.default_rng(3)
    q = rng.standard_normal((2, 4, 8, 128), np.float32)
    k, v = (rng.standard_normal((2, 2, 2, 700, 128), np.float32) for _ in range(2))
    positions = np.array([[699, 600, 256, 3], [100, 128, 0, 511]], np.int32)
    np.save(sys.argv[1], np.asarray(jax.jit(ffi.decode_attention)(q, k, v, 1, positions)))
""")


def test_same_bits_on_one_thread_and_all(tmp_path):
    """The chunks of a row are merged in slot order whichever thread computed them: a run
    restricted to one CPU gives the bits of a run on all of them."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("this process may use one CPU only: nothing to compare a one-thread run with")
    script = tmp_path / "threads.py"
    script.write_text(_THREADS_SCRIPT)
    outputs = {}
    for cpus in ("1", "all"):
        outputs[cpus] = tmp_path / f"{cpus}.npy"
        run = subprocess.run([sys.executable, str(script), str(outputs[cpus]), cpus], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
    assert np.load(outputs["1"]).tobytes() == np.load(outputs["all"]).tobytes()


def _int8_cache(k_lbksh, v_lbksh):
    """(codes, codes, scales, scales) of a float cache, as `KVCache.write` quantizes each slot."""
    (k_q, k_scale), (v_q, v_scale) = (quantize_kv(jnp.swapaxes(x, 2, 3)) for x in (k_lbksh, v_lbksh))
    return (
        np.asarray(jnp.swapaxes(k_q, 2, 3)),
        np.asarray(jnp.swapaxes(v_q, 2, 3)),
        np.asarray(jnp.swapaxes(k_scale, 2, 3)),
        np.asarray(jnp.swapaxes(v_scale, 2, 3)),
    )


def _dequantized(codes, scales):
    """The float32 values XLA attends over (`KVCache.layer`): one rounding off scale * code."""
    return codes.astype(np.float32) * scales[..., None]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "H{}-G{}-K{}-B{}-T{}-S{}".format(*s))
def test_int8_cache_matches_xla_attention(isa, shape):
    h, g, k, b, t, s = shape
    q, k_cache, v_cache = _inputs(*shape)
    k_q, v_q, k_scale, v_scale = _int8_cache(k_cache, v_cache)
    positions = _positions(b, t, s)
    rows = np.arange(b)
    got = np.asarray(jax.jit(ffi.decode_attention)(q, k_q, v_q, LAYER, positions, None, k_scale, v_scale))
    keys, values = _dequantized(k_q, k_scale), _dequantized(v_q, v_scale)
    want = np.asarray(xla_attention(q, keys, values, LAYER, positions, rows))
    _assert_within(got, want, tolerance(q, keys, values, LAYER, positions, rows, int8_cache=(v_q, v_scale)))
    assert np.all(got[positions < 0] == 0)


def test_int8_cache_batch_invariance(isa):
    """As test_batch_invariance, on an int8 cache."""
    q, k_cache, v_cache = _inputs(128, 4, 2, 3, 2, 600, seed=8)
    k_q, v_q, k_scale, v_scale = _int8_cache(k_cache, v_cache)
    positions = np.array([[300, 301], [5, 599], [-1, 130]], np.int32)
    call = jax.jit(ffi.decode_attention)
    batch = np.asarray(call(q, k_q, v_q, LAYER, positions, None, k_scale, v_scale))
    for row in range(3):
        one = slice(row, row + 1)
        k_one, v_one, k_scale_one, v_scale_one = (x[:, one] for x in (k_q, v_q, k_scale, v_scale))
        alone = np.asarray(call(q[one], k_one, v_one, LAYER, positions[one], None, k_scale_one, v_scale_one))
        assert alone.tobytes() == batch[row : row + 1].tobytes(), f"row {row} alone differs from row {row} in the batch"
    rows = np.array([2, 1, 0], np.int32)
    reversed_out = np.asarray(call(q[::-1], k_q, v_q, LAYER, positions[::-1], rows, k_scale, v_scale))
    assert reversed_out[::-1].tobytes() == batch.tobytes()


def test_quantize_kv():
    """Codes in [-127, 127] with the head's absmax at +-127, each value within half a step of
    scale * code (the rounding; plus float32 rounding of x / scale, a few ulps of 127), an all-zero
    head exactly zero, and a head's scale independent of the others."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 4, 72), np.float32) * rng.uniform(0.01, 100, (2, 3, 4, 1)).astype(np.float32)
    x[1, 2, 3] = 0.0
    codes, scale = (np.asarray(a) for a in quantize_kv(jnp.asarray(x)))
    assert codes.dtype == np.int8 and scale.dtype == np.float32 and scale.shape == (2, 3, 4)
    np.testing.assert_array_equal(np.max(np.abs(codes.astype(np.int32)), axis=-1)[scale > 0], 127)
    step_error = np.abs(codes * scale[..., None].astype(np.float64) - x) / np.where(scale > 0, scale, 1)[..., None]
    assert np.all(step_error <= 0.5 + 128 * 4 * U)
    assert scale[1, 2, 3] == 0 and np.all(codes[1, 2, 3] == 0)
    one_head = np.asarray(quantize_kv(jnp.asarray(x[:1, :1, :1]))[0])
    np.testing.assert_array_equal(one_head, codes[:1, :1, :1])


def test_int8_kv_cache_layout():
    from bitnet_jax import BitNetConfig

    config = BitNetConfig(
        vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    f32, int8 = (KVCache.zeros(config, 2, 40, dtype) for dtype in (jnp.float32, jnp.int8))
    assert not f32.quantized and f32.k_scale_lbks is None
    assert int8.quantized and int8.k_lbksh.dtype == jnp.int8 and int8.k_scale_lbks.shape == (3, 2, 2, 40)
    nbytes = lambda cache: sum(x.nbytes for x in jax.tree.leaves(cache))
    # Codes a quarter of float32's bytes; one float32 scale per slot and kv head beside H codes.
    assert nbytes(int8) == nbytes(f32) // 4 + 2 * 3 * 2 * 2 * 40 * 4


def _cache_step(backend, q, k_new, v_new, positions, cache, layer):
    mask = jnp.arange(cache.k_lbksh.shape[3])[None, None, :] <= positions[:, :, None]
    return grouped_attention(q, k_new, v_new, positions, mask, cache, layer, backend=backend)


@pytest.mark.parametrize("int8_cache", [False, True], ids=["f32-cache", "int8-cache"])
@pytest.mark.parametrize("t", [1, 4, 40])
def test_model_attention_takes_the_kernel_on_ffi(t, int8_cache):
    """`grouped_attention` with a cache on the FFI backend: the same cache write, the kernel's
    attention (a custom call, no slice of the layer) within rounding of the XLA path, also for a
    position past the cache (a batching server's idle row), which attends every slot on both.
    (t = 40: a prefill chunk, which takes the kernel on its SIMD paths only.)"""
    if t > FFI_ATTENTION_MAX_T and ffi.selected_isa() not in ATTENTION_SIMD_ISAS:
        pytest.skip(f"the kernel path here, {ffi.selected_isa()}, leaves prefill chunks to XLA")
    h, g, k, b, s = 64, 2, 2, 3, 40
    q, k_cache, v_cache = _inputs(h, g, k, b, t, s, seed=5)
    rng = np.random.default_rng(6)
    k_new, v_new = (rng.standard_normal((b, t, k, h), np.float32) for _ in range(2))
    positions = np.array([[3], [s - t], [s + 5]], np.int32) + np.arange(t, dtype=np.int32)
    cache = KVCache(k_cache, v_cache) if not int8_cache else KVCache(*_int8_cache(k_cache, v_cache))
    args = (q, k_new, v_new, positions, cache, LAYER)
    step = jax.jit(_cache_step, static_argnums=0)
    got, got_cache = step("ffi", *args)
    want, want_cache = step("xla", *args)
    for a, b_ in zip(jax.tree.leaves(got_cache), jax.tree.leaves(want_cache), strict=True):
        assert np.asarray(a).tobytes() == np.asarray(b_).tobytes()
    clamped = np.minimum(positions, s - 1)
    if int8_cache:
        keys, values = (_dequantized(np.asarray(c), np.asarray(sc)) for c, sc in zip(want_cache[:2], want_cache[2:]))
        tol = tolerance(q, keys, values, LAYER, clamped, np.arange(b), int8_cache=(want_cache[1], want_cache[3]))
    else:
        tol = tolerance(q, *want_cache[:2], LAYER, clamped, np.arange(b))
    _assert_within(np.asarray(got), np.asarray(want), tol)
    ffi_hlo, xla_hlo = step.lower("ffi", *args).as_text(), step.lower("xla", *args).as_text()
    assert "bitnet_decode_attention" in ffi_hlo and "dynamic_slice" not in ffi_hlo  # the layer read in place
    assert "bitnet_decode_attention" not in xla_hlo and "dynamic_slice" in xla_hlo


def test_prefill_chunks_take_the_kernel_on_its_simd_paths(isa):
    """More than FFI_ATTENTION_MAX_T queries per row (a prefill chunk) attend with the kernel where
    it has SIMD code, and as XLA's matmul over the [T, S] square where it would run its scalar
    twin; decode steps take the kernel on every path."""
    for t, kernel in [(FFI_ATTENTION_MAX_T + 1, isa in ATTENTION_SIMD_ISAS), (1, True)]:
        q, k_cache, v_cache = _inputs(64, 1, 1, 1, t, 64)
        k_new = np.zeros((1, t, 1, 64), np.float32)
        positions = np.arange(t, dtype=np.int32)[None]
        # A new function each time, so that no trace made under another BITNET_JAX_ISA is reused.
        step = jax.jit(lambda *args: _cache_step("ffi", *args))
        hlo = step.lower(q, k_new, k_new, positions, KVCache(k_cache, v_cache), 0).as_text()
        assert ("bitnet_decode_attention" in hlo) == kernel, (isa, t)


def test_bad_input_is_an_error():
    q, k_cache, v_cache = _inputs(64, 2, 2, 2, 1, 50)
    positions = np.array([[3], [49]], np.int32)
    with pytest.raises(BitNetError, match="expected float32 q_btnh"):
        ffi.decode_attention(q.astype(np.float16), k_cache, v_cache, 0, positions)
    with pytest.raises(BitNetError, match="caches k, v"):
        ffi.decode_attention(q, k_cache, v_cache[:, :, :, :10], 0, positions)
    with pytest.raises(BitNetError, match="multiple of the K kv heads"):
        ffi.decode_attention(q[:, :, :3], k_cache, v_cache, 0, positions)
    with pytest.raises(BitNetError, match="positions_bt of shape"):
        ffi.decode_attention(q, k_cache, v_cache, 0, positions[:, 0])
    with pytest.raises(BitNetError, match="pass cache_rows_b"):
        ffi.decode_attention(np.concatenate([q, q, q]), k_cache, v_cache, 0, np.concatenate([positions] * 3))
    k_q, v_q, k_scale, v_scale = _int8_cache(k_cache, v_cache)
    with pytest.raises(BitNetError, match="an int8 cache needs k_scale_lbks"):
        ffi.decode_attention(q, k_q, v_q, 0, positions)
    with pytest.raises(BitNetError, match="both float32, or both int8"):
        ffi.decode_attention(q, k_q, v_cache, 0, positions, None, k_scale, v_scale)
    with pytest.raises(BitNetError, match="expected float32 scales of shape"):
        ffi.decode_attention(q, k_q, v_q, 0, positions, None, k_scale[..., :10], v_scale)
    # Values only known at run time (traced): checked by the kernel.
    call = jax.jit(ffi.decode_attention)
    for layer, pos, rows, message in [
        (LAYERS, positions, None, "layer 3 is outside the cache's 3 layers"),
        (-1, positions, None, "layer -1 is outside"),
        (0, np.array([[3], [50]], np.int32), None, "position 50 of query \\[1, 0\\] is past its row's 50 slots"),
        (0, positions, np.array([0, 2], np.int32), "pages\\[1, 0\\] = 2 is outside the cache's 2 rows"),
    ]:
        with pytest.raises(Exception, match=message):
            jax.block_until_ready(call(q, k_cache, v_cache, layer, pos, rows))
