"""generate(): greedy equals recomputing the full forward per token; sampling; bad requests."""

import collections
import dataclasses
import functools
import importlib
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_model import CONFIG

from bitnet_jax import BitNetError, BitNetLM, generate, init_params
from bitnet_jax.model.transformer import KVCache

PARAMS = init_params(CONFIG, seed=7)


_full_forward = jax.jit(lambda ids: BitNetLM(CONFIG).apply({"params": PARAMS}, ids))


def greedy_by_full_forward(prompt, n):
    """Recomputes the whole sequence for every new token (no cache); right-padded to one length,
    which causal attention makes invisible to the real positions."""
    ids = list(prompt)
    for _ in range(n):
        padded = np.zeros((1, CONFIG.max_position_embeddings), np.int32)
        padded[0, : len(ids)] = ids
        logits = _full_forward(jnp.asarray(padded))
        ids.append(int(jnp.argmax(logits[0, len(ids) - 1])))
    return ids[len(prompt) :]


def test_greedy_batch_of_different_lengths_equals_full_forward():
    prompts = [[5, 9, 13, 4, 40, 41, 42], [3], [60, 61, 62, 63]]
    out = generate(CONFIG, PARAMS, prompts, 6)
    assert out.shape == (3, 6) and out.dtype == np.int32
    for row, prompt in zip(out, prompts):
        assert list(row) == greedy_by_full_forward(prompt, 6)


def test_single_prompt_and_array_input():
    expected = greedy_by_full_forward([7, 8, 9], 4)
    assert list(generate(CONFIG, PARAMS, [7, 8, 9], 4)[0]) == expected
    assert list(generate(CONFIG, PARAMS, np.array([[7, 8, 9]]), 4)[0]) == expected


def test_stop_ids_end_a_row_and_fill_it():
    free = generate(CONFIG, PARAMS, [[5, 6]], 8)[0]
    stop = int(free[2])
    out = generate(CONFIG, PARAMS, [[5, 6]], 8, stop_ids=[stop])[0]
    first = list(free).index(stop)
    assert list(out[: first + 1]) == list(free[: first + 1])
    assert np.all(out[first:] == stop)


def test_sampling_is_reproducible_and_restricted():
    kwargs = dict(temperature=1.0, top_k=5, seed=11)
    a = generate(CONFIG, PARAMS, [[5, 6, 7]], 10, **kwargs)
    assert np.array_equal(a, generate(CONFIG, PARAMS, [[5, 6, 7]], 10, **kwargs))
    greedy = generate(CONFIG, PARAMS, [[5, 6, 7]], 10)
    assert np.array_equal(generate(CONFIG, PARAMS, [[5, 6, 7]], 10, temperature=0.7, top_k=1, seed=3), greedy)
    assert np.array_equal(generate(CONFIG, PARAMS, [[5, 6, 7]], 10, temperature=0.7, top_p=1e-6, seed=3), greedy)
    samples = {tuple(generate(CONFIG, PARAMS, [[5, 6, 7]], 10, temperature=2.0, seed=s)[0]) for s in range(4)}
    assert len(samples) > 1


def _argmax_rows() -> np.ndarray:
    """Rows of 1000 whose argmax is a corner: tied maxima, NaNs (one with its sign bit set),
    infinities, zeros of both signs, all -inf."""
    rng = np.random.default_rng(0)
    rows = [rng.standard_normal(1000, np.float32) for _ in range(12)]
    rows[1][[3, 500, 999]] = 9.0  # tied maxima: the first
    rows[2][[10, 700]] = np.nan  # NaNs win, the first of them
    rows[3][[900]] = np.nan
    rows[3][[5]] = np.inf
    rows[4][:] = -np.inf
    rows[5][:] = 0.0
    rows[5][[0, 7]] = [-0.0, 0.0]
    rows[6][[998]] = np.inf
    rows[7][:] = np.round(rows[7])  # many ties
    rows[8][[20, 30]] = [-np.nan, np.nan]  # a NaN with its sign bit set
    rows[9][:] = -np.abs(rows[9])  # all negative: the one nearest zero
    rows[10][:] = -np.inf
    rows[10][[400, 401]] = [-3.0, np.finfo(np.float32).min]
    return np.stack(rows)


def test_greedy_tokens_are_argmax_ties_nans_and_infinities_included():
    """`greedy_tokens` replaces jnp.argmax for speed; it must pick the very same index: the first
    of tied maxima, the first NaN of a row that has any, and -0.0 and 0.0 as equal."""
    from bitnet_jax.serve.generate import greedy_tokens

    logits = _argmax_rows()
    expected = np.asarray(jnp.argmax(logits, axis=-1))
    got = np.asarray(jax.jit(greedy_tokens)(logits))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(expected[1:6], [3, 10, 900, 0, 0])
    assert expected[8] == 20 and expected[10] == 400


def test_ffi_argmax_is_argmax_on_every_path(isa):
    """`greedy_tokens(..., ffi=True)` (`ffi.argmax`, xla_ffi/sampling.cc) picks argmax's index
    too, on each kernel path: the corner rows above; rows of 1 to 20 values with their maximum
    at every place, so that it falls in each vector lane and in the tail past the last whole
    vector, and with tied maxima across lanes (the least index, not the first lane's); a
    vocabulary-sized row; under vmap (a row at a time: scalars), and with more leading axes."""
    from bitnet_jax.kernels import ffi
    from bitnet_jax.serve.generate import greedy_tokens

    argmax = jax.jit(functools.partial(greedy_tokens, ffi=True))
    logits = _argmax_rows()
    np.testing.assert_array_equal(argmax(logits), np.asarray(jnp.argmax(logits, axis=-1)))
    rng = np.random.default_rng(1)
    for v in range(1, 21):
        rows = np.tile(rng.standard_normal(v, np.float32) - 10, (v, 1))
        rows[np.arange(v), np.arange(v)] = 1.0  # row i: its maximum at i
        np.testing.assert_array_equal(argmax(rows), np.arange(v))
        ties = np.zeros((v, v), np.float32)
        ties[np.arange(v)[:, None] <= np.arange(v)[None]] = 2.0  # row i: maxima at i, i + 1, ...
        np.testing.assert_array_equal(argmax(ties), np.arange(v))
    wide = rng.standard_normal((3, 128256), np.float32)
    wide[1, [70000, 9]] = 50.0  # a later lane's tie before an earlier one's
    np.testing.assert_array_equal(argmax(wide), np.asarray(jnp.argmax(wide, axis=-1)))
    np.testing.assert_array_equal(jax.jit(jax.vmap(argmax))(logits), np.asarray(jnp.argmax(logits, axis=-1)))
    assert argmax(logits[3]).shape == ()
    cube = logits[:12].reshape(3, 4, 1000)
    np.testing.assert_array_equal(argmax(cube), np.asarray(jnp.argmax(cube, axis=-1)))
    with pytest.raises(BitNetError, match="argmax"):
        ffi.argmax(jnp.zeros((2, 0)))


def _nucleus_reference(row: np.ndarray, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """Per token, in float64: whether top-p keeps it (the probability of the tokens with a larger
    logit is below top_p) and that probability's distance from top_p."""
    p = np.exp(row.astype(np.float64) - row.max())
    p /= p.sum()
    order = np.argsort(-row, kind="stable")
    strictly_above = np.cumsum(p[order]) - p[order]  # mass before each token in descending order
    # Tied logits share the mass above their group: the first of the group's entries.
    values = row[order]
    first_of_group = np.searchsorted(-values, -values, side="left")
    above = np.empty_like(p)
    above[order] = strictly_above[first_of_group]
    return above < top_p, np.abs(above - top_p)


def test_top_p_filter_keeps_the_nucleus():
    """`top_p_filter` (a bisection over the logits' keys, no sort) keeps exactly the tokens that a
    float64 reference keeps: those whose mass above is below top_p, ties together. Float32 sums
    of a 1000-token row may differ from the exact mass by at most 1000 * 2^-24 ~ 6e-5 of the
    row's total (the worst-case error of summing n terms in float32, whatever the order XLA
    sums in), so a token whose mass above lies within 1e-4 of top_p may go either way; every
    other token must agree, and most tokens are such tokens."""
    from bitnet_jax.serve.generate import top_p_filter

    rng = np.random.default_rng(3)
    rows = [rng.standard_normal(1000) * scale for scale in (0.3, 1.0, 3.0, 10.0, 30.0)]
    rows.append(np.round(rng.standard_normal(1000) * 2) / 2)  # many ties
    with_masked = rng.standard_normal(1000) * 2
    with_masked[rng.random(1000) < 0.5] = -np.inf  # top-k's or a previous filter's cuts
    rows.append(with_masked)
    logits = np.stack(rows).astype(np.float32)
    checked = 0
    for top_p in (1e-6, 0.1, 0.5, 0.9, 0.999):
        got = np.asarray(jax.jit(top_p_filter)(logits, jnp.full(len(rows), top_p, jnp.float32)))
        for row, got_row in zip(logits, got):
            keep, margin = _nucleus_reference(row, top_p)
            sure = margin > 1e-4
            np.testing.assert_array_equal(np.isfinite(got_row)[sure], keep[sure])
            np.testing.assert_array_equal(got_row[np.isfinite(got_row)], row[np.isfinite(got_row)])
            assert np.isfinite(got_row[np.argmax(row)])  # the most probable token is always kept
            checked += sure.sum()
    assert checked > 0.99 * logits.size * 5
    # top_p 1 leaves a row as it is, -inf included; rows take their own top_p.
    mixed = np.asarray(jax.jit(top_p_filter)(logits, jnp.asarray([1.0, 1e-6, 1.0, 0.5, 1.0, 1.0, 1.0])))
    np.testing.assert_array_equal(mixed[[0, 2, 4, 5, 6]], logits[[0, 2, 4, 5, 6]])
    assert np.isfinite(mixed[1]).sum() == 1 and np.isfinite(mixed[1][np.argmax(logits[1])])


def _keeps(cut_b1, ukey_bv) -> np.ndarray:
    return np.asarray(ukey_bv) >= np.asarray(cut_b1)


def test_ffi_cut_keeps_the_top_k_and_then_the_nucleus(isa):
    """`ffi_cut` (xla_ffi/sampling.cc: a radix select over the keys, masses summed in double)
    keeps what a float64 reference keeps: exactly the tokens at or above the k-th largest logit
    (ties and -0.0 / 0.0 alike, k past the vocabulary: all), and among those the nucleus. Its
    masses are its own float32 exp(x - max x): x - max x rounds to half an ulp (for the tokens
    holding any mass, |x - max x| < 32: ~1e-6 of their mass) and its exp adds 2 ulp (and makes
    0 of what lies below exp(-87), which weighs nothing beside the largest token's 1), so a
    cumulative mass within 1e-5 of top_p may go either way, against 1e-4 for the float32
    halvings of `top_p_filter`; every other token must agree. Rows of 1000 tokens (one scaled
    so that most masses are below exp(-87)) and of 2B4T's 128,256 (whose top buckets hold
    thousands of tokens each)."""
    from bitnet_jax.serve.generate import ffi_cut, unsigned_keys

    rng = np.random.default_rng(11)
    rows = [rng.standard_normal(1000) * scale for scale in (0.3, 1.0, 3.0, 30.0)]
    rows.append(np.round(rng.standard_normal(1000) * 2) / 2)  # many ties
    rows.append(np.where(rng.random(1000) < 0.5, -np.inf, rng.standard_normal(1000) * 2))
    rows[0][:40] = -0.0
    rows[0][40:80] = 0.0
    short = np.stack(rows).astype(np.float32)
    long = (rng.standard_normal((2, 128256)) * np.array([[1.0], [4.0]])).astype(np.float32)
    cut = jax.jit(lambda *args: ffi_cut(*args)[0])
    checked = total = 0
    for logits in (short, long):
        b, v = logits.shape
        ukey = unsigned_keys(jnp.asarray(logits))
        for top_k in (0, 1, 7, 40, v // 3, v + 5):
            for top_p in (1e-6, 0.1, 0.5, 0.9, 0.999, 1.0):
                kept = _keeps(cut(ukey, jnp.full(b, top_k, jnp.int32), jnp.full(b, top_p, jnp.float32)), ukey)
                for row, kept_row in zip(logits, kept):
                    in_k = row >= np.sort(row)[-min(top_k, v)] if top_k else np.ones(v, bool)
                    np.testing.assert_array_equal(kept_row & ~in_k, False)  # top-k: exact
                    if top_p == 1.0:
                        np.testing.assert_array_equal(kept_row, in_k)
                        continue
                    keep, margin = _nucleus_reference(np.where(in_k, row, -np.inf), top_p)
                    sure = in_k & (margin > 1e-5)
                    np.testing.assert_array_equal(kept_row[sure], keep[sure])
                    assert kept_row[np.argmax(row)]  # the most probable token is always kept
                    checked += sure.sum()
                    total += in_k.sum()
    assert checked > 0.999 * total


def test_ffi_cut_where_the_masses_are_not_finite(isa):
    """A row with a NaN or an infinite logit has a NaN mass (exp(inf - inf)); the halvings then
    never find the mass below their target and keep only the largest key (the NaNs, or the
    +inf tokens), and so does `ffi_cut`. Its top-k cut still counts keys. Greedy decoding picks
    the same tokens from such rows (`greedy_tokens`)."""
    from bitnet_jax.serve.generate import ffi_cut, top_p_threshold, unsigned_keys

    rng = np.random.default_rng(12)
    rows = rng.standard_normal((3, 500)).astype(np.float32)
    rows[0, [7, 300]] = np.nan
    rows[1, [9, 11]] = np.inf
    rows[2, :] = -np.inf
    rows[2, 5] = 1.0
    ukey = unsigned_keys(jnp.asarray(rows))
    top_p = jnp.full(3, 0.9, jnp.float32)
    cut = jax.jit(lambda *args: ffi_cut(*args)[0])
    got = np.asarray(cut(ukey, jnp.zeros(3, jnp.int32), top_p))
    x = np.where(np.isnan(rows), np.nan, rows)
    e = jnp.exp(jnp.asarray(x) - jnp.max(jnp.asarray(x), axis=-1, keepdims=True))
    np.testing.assert_array_equal(got, np.asarray(jax.jit(top_p_threshold)(e, ukey, top_p)))
    np.testing.assert_array_equal(np.flatnonzero(_keeps(got, ukey)[0]), [7, 300])
    np.testing.assert_array_equal(np.flatnonzero(_keeps(got, ukey)[1]), [9, 11])
    np.testing.assert_array_equal(np.flatnonzero(_keeps(got, ukey)[2]), [5])
    top_3 = np.asarray(cut(ukey, jnp.full(3, 3, jnp.int32), jnp.ones(3, jnp.float32)))
    assert _keeps(top_3, ukey).sum(axis=1).tolist() == [3, 3, 500]  # 2 NaNs and the largest; ties of -inf


def test_ffi_cut_lists_the_kept_tokens():
    """With `kept` = K the kernel also lists each row's kept tokens (key >= its cut), ascending,
    where they are at most K (the rest V) and counts them (K + 1: more): a row cut to a few
    tokens, one that keeps all (no cut), K = 0 (a count only) and K past the vocabulary."""
    from bitnet_jax.serve.generate import ffi_cut, unsigned_keys

    rng = np.random.default_rng(13)
    logits = (rng.standard_normal((3, 700)) * np.array([[8.0], [1.0], [0.5]])).astype(np.float32)
    ukey = unsigned_keys(jnp.asarray(logits))
    top_k, top_p = jnp.array([0, 5, 0], jnp.int32), jnp.array([0.9, 1.0, 1.0], jnp.float32)
    for k in (0, 1, 6, 64, 800):
        cut_b1, (kept_bk, count_b) = jax.jit(ffi_cut, static_argnums=3)(ukey, top_k, top_p, k)
        assert kept_bk.shape == (3, k) and count_b.shape == (3,)
        for row, cut, kept, count in zip(
            np.asarray(ukey), np.asarray(cut_b1), np.asarray(kept_bk), np.asarray(count_b)
        ):
            want = np.flatnonzero(row >= cut[0])
            if len(want) <= k:
                assert count == len(want)
                np.testing.assert_array_equal(kept, np.concatenate([want, np.full(k - len(want), 700)]))
            else:
                assert count == k + 1
    assert int(count_b[1]) == 5 and int(count_b[2]) == 700  # top-k 5; no cut, K = 800 >= V


def test_nucleus_draw_is_the_whole_vocabulary_draw():
    """`nucleus_tokens` (the Gumbel noise of a row's kept tokens alone) draws the token that
    `categorical_tokens` draws over the whole row with the row's other tokens at -inf: the noise of
    each kept token is the same bits at its flat index (`_gumbel_at` against `gumbel_noise`), for
    one key over a batch and a key per row. And `draw_after_cut` falls back to the whole row where
    a row keeps more than K."""
    from bitnet_jax.serve.generate import (
        _gumbel_at,
        categorical_tokens,
        draw_after_cut,
        ffi_cut,
        gumbel_noise,
        key_values,
        nucleus_tokens,
        unsigned_keys,
    )

    rng = np.random.default_rng(14)
    v, k = 5000, 256
    logits = (rng.standard_normal((4, v)) * np.array([[3.0], [4.0], [5.0], [3.5]])).astype(np.float32)
    logits[2, [10, 4000]] = logits[2].max()  # a tie for the largest, kept together
    ukey = unsigned_keys(jnp.asarray(logits))
    cut_b1, (kept_bk, count_b) = ffi_cut(ukey, jnp.array([0, 20, 0, 0], jnp.int32), jnp.full(4, 0.8), k)
    assert np.all(np.asarray(count_b) <= k) and np.all(np.asarray(count_b) >= 2)
    final = jnp.where(ukey < cut_b1, -jnp.inf, key_values(ukey))
    whole = jax.jit(categorical_tokens)
    nucleus = jax.jit(nucleus_tokens)
    for seed in range(40):
        key = jax.random.PRNGKey(seed)
        assert np.array_equal(nucleus(key, final, kept_bk, count_b), whole(key, final)), seed
        for r in range(4):  # a key per row, as the engine draws
            row = nucleus(key, final[r : r + 1], kept_bk[r : r + 1], count_b[r : r + 1])
            assert int(row[0]) == int(whole(key, final[r])), (seed, r)
    # The noise at the kept indices is gumbel_noise's, bit for bit.
    key = jax.random.PRNGKey(3)
    index = np.asarray(kept_bk[1, : int(count_b[1])])
    at = np.asarray(jax.jit(_gumbel_at)(key, jnp.asarray(v + index, jnp.uint32)))  # row 1: flat index v + i
    np.testing.assert_array_equal(at.view(np.uint32), np.asarray(gumbel_noise(key, (4, v)))[1, index].view(np.uint32))
    # A row keeping more than K: the whole-row draw.
    _, wide = ffi_cut(ukey, jnp.zeros(4, jnp.int32), jnp.full(4, 0.999), 2)
    assert np.any(np.asarray(wide[1]) > 2)
    key = jax.random.PRNGKey(5)
    got = jax.jit(draw_after_cut)(key, final, wide)
    assert np.array_equal(got, whole(key, final))


def test_ffi_sampling_cut_refuses_bad_operands():
    from bitnet_jax.kernels import ffi

    keys = jnp.zeros((2, 10), jnp.uint32)
    with pytest.raises(BitNetError, match="kept"):
        ffi.sampling_cut(keys, jnp.zeros(2, jnp.int32), jnp.ones(2), -1)
    with pytest.raises(BitNetError, match="sampling_cut"):
        ffi.sampling_cut(keys.astype(jnp.int32), jnp.zeros(2, jnp.int32), jnp.ones(2))
    with pytest.raises(BitNetError, match="sampling_cut"):
        ffi.sampling_cut(keys, jnp.zeros(3, jnp.int32), jnp.ones(2))
    with pytest.raises(BitNetError, match="sampling_cut"):
        ffi.sampling_cut(keys, jnp.zeros(2, jnp.int32), jnp.ones(3))


def test_gumbel_noise_is_jax_random_gumbel():
    """`gumbel_noise` (the Threefry hash unrolled, so XLA fuses it) gives `jax.random.gumbel`'s
    bits for the same key: whole vocabulary rows, batches and odd shapes, a key per row under
    vmap (as the serving engine draws); a typed key, or JAX's generator configured otherwise,
    it hands to JAX."""
    from bitnet_jax.serve.generate import gumbel_noise

    noise = jax.jit(gumbel_noise, static_argnums=1)
    for seed in range(4):
        key = jax.random.fold_in(jax.random.PRNGKey(seed), 17)
        for shape in [(128256,), (3, 1000), (7,), (2, 5, 33)]:
            want = np.asarray(jax.random.gumbel(key, shape, jnp.float32))
            np.testing.assert_array_equal(np.asarray(noise(key, shape)).view(np.uint32), want.view(np.uint32))
    keys_b2 = jax.random.split(jax.random.PRNGKey(5), 4)
    per_row = jax.jit(jax.vmap(lambda k: gumbel_noise(k, (4000,))))(keys_b2)
    want = jax.vmap(lambda k: jax.random.gumbel(k, (4000,), jnp.float32))(keys_b2)
    np.testing.assert_array_equal(np.asarray(per_row).view(np.uint32), np.asarray(want).view(np.uint32))
    typed = jax.random.key(3)
    np.testing.assert_array_equal(gumbel_noise(typed, (100,)), jax.random.gumbel(typed, (100,), jnp.float32))
    # Another configuration of JAX's generator (other bits from the same key): handed to JAX too.
    key = jax.random.PRNGKey(3)
    with jax.threefry_partitionable(False):
        want = jax.random.gumbel(key, (1000,), jnp.float32)
        np.testing.assert_array_equal(noise(key, (1000,)), want)
    assert not np.array_equal(want, jax.random.gumbel(key, (1000,), jnp.float32))


def test_categorical_tokens_are_jax_random_categorical():
    """`categorical_tokens` draws jax.random.categorical's token from the same key (the same
    Gumbel noise; `greedy_tokens` for its argmax), for a batch and for one row."""
    from bitnet_jax.serve.generate import categorical_tokens

    logits = np.random.default_rng(4).standard_normal((6, 5000)).astype(np.float32) * 4
    logits[2, ::2] = -np.inf
    for seed in range(5):
        key = jax.random.PRNGKey(seed)
        want = jax.random.categorical(key, logits, axis=-1)
        np.testing.assert_array_equal(jax.jit(categorical_tokens)(key, logits), want)
        assert int(jax.jit(categorical_tokens)(key, logits[3])) == int(jax.random.categorical(key, logits[3]))


@pytest.mark.parametrize("path", ["ffi", "callback"])
def test_streaming_callback_sees_every_token_in_order(monkeypatch, path):
    """On CPU a decode step queues its tokens for a Python thread (`kernels.ffi.TokenStream`);
    other platforms stream through io_callback, forced here onto the CPU."""
    import bitnet_jax.serve.generate as generate_module

    monkeypatch.setattr(generate_module, "_stream_path", lambda params: path)
    seen, threads = [], set()

    def on_tokens(tokens_b):
        assert isinstance(tokens_b, np.ndarray) and tokens_b.dtype == np.int32 and tokens_b.shape == (2,)
        time.sleep(0.02)  # slower than a step: the program ends first, the calls must still all be made
        seen.append(tokens_b.copy())
        threads.add(threading.get_ident())

    out = generate(CONFIG, PARAMS, [[5, 6], [7]], 5, on_tokens=on_tokens)
    np.testing.assert_array_equal(np.stack(seen, axis=1), out)  # all delivered before generate returned
    if path == "ffi":  # io_callback may run it on the caller's thread, when XLA runs the program there
        assert threading.get_ident() not in threads


@pytest.mark.parametrize("path", ["ffi", "callback"])
def test_an_exception_in_on_tokens_is_raised_by_generate(monkeypatch, path):
    import bitnet_jax.serve.generate as generate_module

    monkeypatch.setattr(generate_module, "_stream_path", lambda params: path)
    calls = []

    def on_tokens(tokens_b):
        calls.append(tokens_b)
        if len(calls) == 2:
            time.sleep(0.2)  # the program runs on meanwhile: what it pushed is dropped, not delivered
            raise KeyError("the reader went away")

    with pytest.raises(Exception) as raised:
        generate(CONFIG, PARAMS, [[5, 6]], 40, on_tokens=on_tokens)
    assert "the reader went away" in str(raised.value)
    assert len(calls) == 2  # never called again after it raised
    if path == "ffi":
        assert isinstance(raised.value, KeyError)
    seen = []  # the next call streams as usual
    out = generate(CONFIG, PARAMS, [[5, 6]], 4, on_tokens=seen.append)
    np.testing.assert_array_equal(np.stack(seen, axis=1), out)


def test_a_push_after_on_tokens_raised_fails_the_program_and_one_to_no_stream_too():
    from bitnet_jax.kernels.ffi import TokenStream, push_tokens

    push = jax.jit(lambda t: push_tokens(t) or t)
    with pytest.raises(Exception, match="no open stream 987654"):
        jax.block_until_ready(push(jnp.array([987654, 1, 2], jnp.int32)))

    def on_tokens(tokens_b):
        raise KeyError(f"cannot take {tokens_b.tolist()}")

    with pytest.raises(KeyError, match=r"cannot take \[1, 2\]"):
        with TokenStream(987655, on_tokens) as stream:
            jax.block_until_ready(push(jnp.array([987655, 1, 2], jnp.int32)))
            for _ in range(1000):
                if stream.error is None:
                    time.sleep(0.01)
            with pytest.raises(Exception, match=r"consumer stopped: on_tokens raised KeyError.*cannot take \[1, 2\]"):
                jax.block_until_ready(push(jnp.array([987655, 3, 4], jnp.int32)))


@pytest.mark.parametrize(
    "prompts, n, message",
    [
        ([[1] * 60], 10, "context is 64 tokens"),
        ([[1] * 70], 1, "context is 64 tokens"),
        ([[1, 2]], 0, "max_new_tokens"),
        ([[1, 200]], 3, "outside the vocabulary"),
        ([[1, -1]], 3, "outside the vocabulary"),
        ([[]], 3, "empty"),
        ([], 3, "empty"),
    ],
)
def test_bad_requests(prompts, n, message):
    with pytest.raises(BitNetError, match=message):
        generate(CONFIG, PARAMS, prompts, n)


def test_long_prompts_prefill_chunk_by_chunk_and_equal_full_forward(monkeypatch):
    generate_module = importlib.import_module("bitnet_jax.serve.generate")  # bitnet_jax.serve.generate is the function
    monkeypatch.setattr(generate_module, "PREFILL_CHUNK", 16)
    monkeypatch.setattr(generate_module, "_executables", collections.OrderedDict())  # programs of 256-token chunks
    rng = np.random.default_rng(3)
    # Padded to 48 tokens: three chunks; the rows' last tokens fall in the third, first and third.
    prompts = [[int(i) for i in rng.integers(0, CONFIG.vocab_size, n)] for n in (40, 7, 33)]
    out = generate(CONFIG, PARAMS, prompts, 5)
    for row, prompt in zip(out, prompts):
        assert list(row) == greedy_by_full_forward(prompt, 5)


@pytest.mark.parametrize("chunk", [256, 16])
def test_prefill_into_the_whole_cache_equals_prefill_into_the_prompts_slots(monkeypatch, chunk):
    """`prefill_fresh` writes the prompt into a cache as long as the context and attends over the
    prompt's T slots only: bit for bit the logits and cache of a prefill into a T-slot cache that
    is then padded with zeros to the context (what it did before, at the cost of a second cache).
    A prefill that read the whole row would sum its softmax over more slots, and one that sliced
    the wrong slots would see other keys: either changes the bits. (chunk 16: the 48-token prompts
    are prefilled in three chunks, each attending over the same 48 slots.)"""
    generate_module = importlib.import_module("bitnet_jax.serve.generate")
    monkeypatch.setattr(generate_module, "PREFILL_CHUNK", chunk)
    model = BitNetLM(CONFIG)
    rng = np.random.default_rng(5)
    prompt_bt = jnp.asarray(rng.integers(0, CONFIG.vocab_size, (2, 48)), jnp.int32)
    lengths_b = jnp.asarray([48, 29], jnp.int32)
    slots = 80

    @jax.jit
    def padded_prompt_cache(prompt_bt, lengths_b):
        cache = KVCache.zeros(CONFIG, 2, 48)
        logits_bv, cache = generate_module.prefill(model, {"params": PARAMS}, prompt_bt, lengths_b, cache)
        pad = lambda c: jnp.pad(c, [(0, 0)] * 3 + [(0, slots - 48), (0, 0)])
        return logits_bv, jax.tree.map(pad, cache)

    whole = jax.jit(lambda p, n: generate_module.prefill_fresh(model, {"params": PARAMS}, p, n, slots, jnp.float32))
    expected, got = padded_prompt_cache(prompt_bt, lengths_b), whole(prompt_bt, lengths_b)
    assert got[1].k_lbksh.shape[3] == slots
    for e, g in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(e))


def test_attend_slots_must_lie_within_the_cache():
    cache, ids = KVCache.zeros(CONFIG, 1, 16), jnp.zeros((1, 4), jnp.int32)
    apply = lambda **kwargs: BitNetLM(CONFIG).apply({"params": PARAMS}, ids, **kwargs)
    with pytest.raises(ValueError, match="attend_slots=17: expected 1..16"):
        apply(cache=cache, attend_slots=17)
    with pytest.raises(ValueError, match="attend_slots=0: expected 1..16"):
        apply(cache=cache, attend_slots=0)
    with pytest.raises(ValueError, match="attend_slots is for calls with a KV cache"):
        apply(attend_slots=4)


def test_prompt_length_buckets():
    """Prompts up to a chunk pad to one of 10 buckets (each a program that serving keeps loaded, at
    8-11 MB apiece for 2B4T), by less than 16 tokens up to 64 and less than 32 beyond; longer
    ones to whole chunks."""
    from bitnet_jax.serve.generate import PREFILL_CHUNK, padded_prompt_length

    padded = [padded_prompt_length(n) for n in range(1, PREFILL_CHUNK + 1)]
    assert sorted(set(padded)) == [16, 32, 48, 64, 96, 128, 160, 192, 224, 256]
    assert all(0 <= t - n < (16 if n <= 64 else 32) for n, t in enumerate(padded, start=1))
    assert padded == sorted(padded)
    assert [padded_prompt_length(n) for n in (257, 512, 513, 2048)] == [512, 512, 768, 2048]
    # Where chunks of 64 are read in place (`long_prompt_chunk`): a multiple of 64 beyond a chunk.
    assert [padded_prompt_length(n, 64) for n in (200, 257, 300, 320, 321, 2048)] == [224, 320, 320, 320, 384, 2048]


@pytest.mark.parametrize("kv_cache", ["float32", "int8"])
def test_long_prompts_padded_to_64_tokens_keep_the_bits_of_256_token_chunks(monkeypatch, kv_cache):
    """Where the FFI kernel attends a prefill chunk in place (each query reads its own slots, in
    any chunk), `generate` pads a long prompt to a multiple of 64, not 256, and reads it in
    256-token chunks as far as they go, then 64 at a time: a 400-token prompt computes 448 tokens
    (256 + 3 x 64), not 512. Every token's bits are those of 256-token chunks throughout
    (activations quantized per token, exact integer sums, each query's attention over its own
    slots): the logits and the prompt's cache slots of both prefills are equal, and so are the
    greedy replies. Elsewhere (XLA's attention, the kernel's scalar path) chunks stay 256."""
    from bitnet_jax.kernels import ffi
    from bitnet_jax.kernels.ops import ATTENTION_SIMD_ISAS
    from bitnet_jax.model.serving_layers import serving_variables
    from bitnet_jax.serve.pack import pack

    generate_module = importlib.import_module("bitnet_jax.serve.generate")

    config = CONFIG.replace(max_position_embeddings=512)
    packed = pack(config, init_params(config, seed=7))
    _, spec = generate_module.serving_params(config, packed, None, kv_cache)
    dtype = generate_module.kv_cache_dtype(packed, spec)
    assert generate_module.long_prompt_chunk(config, None, jnp.float32) == 256  # training parameters: XLA
    assert generate_module.long_prompt_chunk(config, dataclasses.replace(spec, backend="xla"), dtype) == 256
    if ffi.selected_isa() not in ATTENTION_SIMD_ISAS:
        assert generate_module.long_prompt_chunk(config, spec, dtype) == 256
        pytest.skip(f"the {ffi.selected_isa()} kernel path attends long chunks with XLA's attention")
    assert generate_module.long_prompt_chunk(config, spec, dtype) == 64

    rng = np.random.default_rng(8)
    prompts = [[int(i) for i in rng.integers(3, config.vocab_size, n)] for n in (400, 261)]
    lengths_b = jnp.asarray([400, 261], jnp.int32)
    model, variables = BitNetLM(config, spec), serving_variables(packed)

    def prefilled(t, chunk):
        prompt_bt = np.zeros((2, t), np.int32)
        for row, prompt in zip(prompt_bt, prompts):
            row[: len(prompt)] = prompt
        run = jax.jit(lambda v, p, n: generate_module.prefill_fresh(model, v, p, n, 512, dtype, chunk=chunk))
        return run(variables, jnp.asarray(prompt_bt), lengths_b)

    (logits_64, cache_64), (logits_256, cache_256) = prefilled(448, 64), prefilled(512, 256)
    np.testing.assert_array_equal(np.asarray(logits_64), np.asarray(logits_256))
    for a, b in zip(jax.tree.leaves(cache_64), jax.tree.leaves(cache_256)):
        for row, n in enumerate((400, 261)):  # the slots past a prompt hold its padding's keys
            np.testing.assert_array_equal(np.asarray(a[:, row, :, :n]), np.asarray(b[:, row, :, :n]))

    request = generate_module._Request.make(config, packed, prompts, 5, 0.0, None, None, None, False, None, kv_cache)
    assert request.prompt_bt.shape == (2, 448) and request.static["prefill_chunk"] == 64
    assert generate_module.generate_prompt_length(config, packed, 400, kv_cache=kv_cache) == 448
    assert generate_module.generate_prompt_length(config, packed, 400, backend="xla", kv_cache=kv_cache) == 512
    replies_64 = generate(config, packed, prompts, 5, kv_cache=kv_cache)
    monkeypatch.setattr(generate_module, "long_prompt_chunk", lambda *args: 256)
    np.testing.assert_array_equal(replies_64, generate(config, packed, prompts, 5, kv_cache=kv_cache))
