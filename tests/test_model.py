"""BitNetLM against a float64 numpy reference written here, and its masking / caching paths."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_quant import ref_act, ref_weight

from bitnet_jax import BitNetConfig, BitNetLM, KVCache, init_params
from bitnet_jax.model.layers import dot_f32

CONFIG = BitNetConfig.preset(
    "tiny",
    vocab_size=97,
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=2,
    num_attention_heads=6,
    num_key_value_heads=2,
    max_position_embeddings=64,
    initializer_range=0.3,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def numpy_forward(config, params, ids):
    """A straightforward float64 transcription of the BitNet b1.58 decoder, one token row at a time."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    n, k, h = config.num_attention_heads, config.num_key_value_heads, config.head_dim

    def norm(x, w):
        return w * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + config.rms_norm_eps)

    def linear(x, kernel):
        if config.weight_quant == "none":
            return x @ kernel
        return ref_act(x, config.act_quant, config.act_bits) @ ref_weight(kernel, config.weight_quant)

    def rope(x):  # x: [T, heads, h]
        t = np.arange(x.shape[0])[:, None]
        inv = 1.0 / config.rope_theta ** (np.arange(0, h, 2) / h)
        ang = np.concatenate([t * inv, t * inv], axis=-1)[:, None, :]
        rot = np.concatenate([-x[..., h // 2 :], x[..., : h // 2]], axis=-1)
        return x * np.cos(ang) + rot * np.sin(ang)

    x = p["embed_tokens"]["embedding"][ids]
    T = len(ids)
    for i in range(config.num_hidden_layers):
        layer = jax.tree.map(lambda a: a[i], p["layers"])
        att, mlp = layer["self_attn"], layer["mlp"]
        y = norm(x, layer["input_layernorm"]["weight"])
        q = rope(linear(y, att["q_proj"]["kernel"]).reshape(T, n, h))
        kk = rope(linear(y, att["k_proj"]["kernel"]).reshape(T, k, h))
        v = linear(y, att["v_proj"]["kernel"]).reshape(T, k, h)
        out = np.zeros((T, n, h))
        for head in range(n):
            kv = head // (n // k)
            s = q[:, head] @ kk[:, kv].T / np.sqrt(h)
            s = np.where(np.tril(np.ones((T, T))) > 0, s, -np.inf)
            a = np.exp(s - s.max(-1, keepdims=True))
            out[:, head] = (a / a.sum(-1, keepdims=True)) @ v[:, kv]
        out = norm(out.reshape(T, n * h), att["attn_sub_norm"]["weight"])
        x = x + linear(out, att["o_proj"]["kernel"])
        y = norm(x, layer["post_attention_layernorm"]["weight"])
        gate, up = linear(y, mlp["gate_proj"]["kernel"]), linear(y, mlp["up_proj"]["kernel"])
        x = x + linear(norm(np.maximum(gate, 0) ** 2 * up, mlp["ffn_sub_norm"]["weight"]), mlp["down_proj"]["kernel"])
    x = norm(x, p["norm"]["weight"])
    head = p["embed_tokens"]["embedding"].T if config.tie_word_embeddings else p["lm_head"]["kernel"]
    return x @ head


def _random_norms(params, seed=0):
    """Norm weights are ones at init; randomize them so that the test notices a misplaced norm."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, a: (
            a * (1 + 0.2 * rng.standard_normal(a.shape)).astype(np.float32) if path[-1].key == "weight" else a
        ),
        params,
    )


@pytest.mark.parametrize(
    "changes",
    [
        {"weight_quant": "none", "act_quant": "none"},
        {},
        {"tie_word_embeddings": False, "weight_quant": "channel"},
        {"weight_quant": "group:16", "act_quant": "tensor", "act_bits": 4},
    ],
)
def test_forward_matches_numpy_reference(changes):
    config = CONFIG.replace(**changes)
    params = _random_norms(init_params(config, seed=1))
    ids = np.random.default_rng(0).integers(0, config.vocab_size, size=(1, 11))
    logits = BitNetLM(config).apply({"params": params}, jnp.asarray(ids, jnp.int32))
    assert logits.shape == (1, 11, config.vocab_size) and logits.dtype == jnp.float32
    ref = numpy_forward(config, params, ids[0])
    if config.weight_quant == "none":
        np.testing.assert_allclose(np.asarray(logits[0]), ref, rtol=1e-4, atol=1e-4)
    else:
        # float32 vs float64 can flip an int8 rounding at a .5 boundary; judge by relative error.
        err = np.linalg.norm(np.asarray(logits[0]) - ref) / np.linalg.norm(ref)
        assert err < 2e-3, err
        assert np.mean(np.argmax(logits[0], -1) == np.argmax(ref, -1)) >= 0.9


def test_cache_prefill_and_decode_equal_full_forward():
    params = init_params(CONFIG, seed=2)
    model = BitNetLM(CONFIG)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, CONFIG.vocab_size, size=(2, 9)), jnp.int32)
    full = model.apply({"params": params}, ids)
    cache = KVCache.zeros(CONFIG, 2, 16)
    logits, cache = model.apply({"params": params}, ids[:, :5], cache=cache)
    np.testing.assert_allclose(logits, full[:, :5], rtol=1e-5, atol=1e-5)
    for t in range(5, 9):
        positions = jnp.full((2, 1), t, jnp.int32)
        logits, cache = model.apply({"params": params}, ids[:, t : t + 1], positions_bt=positions, cache=cache)
        np.testing.assert_allclose(logits[:, 0], full[:, t], rtol=1e-5, atol=1e-5)


def test_segment_ids_isolate_packed_documents():
    params = init_params(CONFIG, seed=3)
    model = BitNetLM(CONFIG)
    a, b = jnp.arange(3, 10, dtype=jnp.int32), jnp.arange(20, 25, dtype=jnp.int32)
    packed = jnp.concatenate([a, b])[None]
    segments = jnp.asarray([[1] * 7 + [2] * 5], jnp.int32)
    positions = jnp.asarray([list(range(7)) + list(range(5))], jnp.int32)
    out = model.apply({"params": params}, packed, segment_ids_bt=segments, positions_bt=positions)
    np.testing.assert_allclose(out[0, :7], model.apply({"params": params}, a[None])[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[0, 7:], model.apply({"params": params}, b[None])[0], rtol=1e-5, atol=1e-5)


def test_attention_mask_ignores_left_padding():
    params = init_params(CONFIG, seed=4)
    model = BitNetLM(CONFIG)
    ids = jnp.arange(5, 12, dtype=jnp.int32)[None]
    padded = jnp.concatenate([jnp.zeros((1, 3), jnp.int32), ids], axis=1)
    mask = jnp.asarray([[0, 0, 0] + [1] * 7])
    positions = jnp.asarray([[0, 0, 0] + list(range(7))])
    out = model.apply({"params": params}, padded, attention_mask_bt=mask, positions_bt=positions)
    np.testing.assert_allclose(out[0, 3:], model.apply({"params": params}, ids)[0], rtol=1e-5, atol=1e-5)


def test_logits_index_selects_rows():
    params = init_params(CONFIG, seed=5)
    model = BitNetLM(CONFIG)
    ids = jnp.asarray(np.random.default_rng(2).integers(0, CONFIG.vocab_size, size=(3, 6)), jnp.int32)
    full = model.apply({"params": params}, ids)
    index = jnp.asarray([5, 0, 3])
    picked = model.apply({"params": params}, ids, logits_index_b=index)
    np.testing.assert_allclose(picked, full[jnp.arange(3), index], rtol=1e-6, atol=1e-6)


def test_params_are_stacked_per_layer():
    params = init_params(CONFIG)
    assert params["layers"]["self_attn"]["q_proj"]["kernel"].shape == (2, 48, 48)
    assert params["layers"]["self_attn"]["k_proj"]["kernel"].shape == (2, 48, 16)
    assert params["layers"]["mlp"]["down_proj"]["kernel"].shape == (2, 80, 48)
    assert "lm_head" not in params


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cache_free_attention_equals_grouped_einsums(dtype):
    """Training attention (no cache) is `jax.nn.dot_product_attention` (a fused kernel where the
    backend has one); it must equal the explicit grouped-query einsums with a float32 softmax (the
    cache path's math, written out here in numpy-order float32) under causal, padding and segment
    masks. Bounds, from what may differ between two correct implementations:
      float32: the order of each output's T-term sum and where the 1/sqrt(H) scale is applied,
        each within a few float32 roundings of the largest term: 8 * T * eps32 * max|v|.
      bfloat16: q.k is rounded to bfloat16 (relative 2^-8) wherever the scale is applied, which moves
        each softmax weight by up to 2 * 2^-8 * max|score|; probabilities and the output are rounded
        to bfloat16 once more (2^-8 each): (2 * 2^-8 * max|score| + 2 * 2^-8) * max|v|."""
    from bitnet_jax.model.transformer import build_attention_mask, grouped_attention

    rng = np.random.default_rng(11)
    b, t, n, k, h = 2, 37, 8, 2, 16
    q, keys, values = (jnp.asarray(rng.standard_normal((b, t, heads, h)), dtype) for heads in (n, k, k))
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    padding = jnp.asarray(rng.random((b, t)) > 0.2, jnp.int32).at[:, 0].set(1)
    segments = jnp.asarray(np.sort(rng.integers(0, 3, (b, t)), axis=1))
    mask = build_attention_mask(positions, padding, segments, None)
    out, cache = grouped_attention(q, keys, values, positions, mask, None, 0)
    assert cache is None and out.shape == (b, t, n, h) and out.dtype == dtype

    qf, kf, vf = (np.asarray(a, np.float32) for a in (q, keys, values))
    scores = np.einsum("btkgh,bskh->bkgts", qf.reshape(b, t, k, n // k, h), kf) / np.sqrt(h)
    # A query whose every key is masked (a padded position opening a segment) spreads its weight
    # evenly, as the model's finite mask value does; rows with a key get exactly 0 on masked ones.
    scores = np.where(np.asarray(mask)[:, None, None], scores, -1e30)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    want = np.einsum("bkgts,bskh->btkgh", probs, vf).reshape(b, t, n, h)
    v_max = np.abs(vf).max()
    if dtype == jnp.float32:
        bound = 8 * t * np.finfo(np.float32).eps * v_max
    else:
        score_max = np.abs(np.where(np.asarray(mask)[:, None, None], scores, 0)).max()
        bound = (2 * 2**-8 * score_max + 2 * 2**-8) * v_max
    np.testing.assert_allclose(np.asarray(out, np.float32), want, rtol=0, atol=bound)


@pytest.mark.parametrize("w_in_axis", [0, 1])  # a kernel [I, O]; the tied embedding [V, D]
def test_bf16_dot_f32_is_float32_sums(w_in_axis):
    """`dot_f32` of bf16 operands accumulates and returns float32: against the same products of
    the bf16 values in float64, only the float32 sums may differ (at most n * 2^-24 * sum |a b|
    over the n terms), far inside the 2^-8 that a result rounded to bf16 would be off by. Its
    gradients take the output's gradient rounded to bf16 (as BitLinear's backward does) and
    return the operands' bf16: the sums' bound plus bf16's unit roundoff, 2^-8 relative."""
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.normal(size=(3, 5, 64)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(64, 97) if w_in_axis == 0 else (97, 64)), jnp.bfloat16)
    g = rng.normal(size=(3, 5, 97)).astype(np.float32)
    y, vjp = jax.vjp(lambda x, w: dot_f32(x, w, w_in_axis), x, w)
    dx, dw = vjp(jnp.asarray(g))
    assert y.dtype == jnp.float32 and dx.dtype == dw.dtype == jnp.bfloat16

    as64 = lambda a: np.asarray(jnp.asarray(a, jnp.bfloat16).astype(jnp.float32), np.float64)
    x64, g64 = as64(x).reshape(15, 64), as64(g).reshape(15, 97)
    w_io = as64(w) if w_in_axis == 0 else as64(w).T
    dw_io = np.asarray(dw, np.float64) if w_in_axis == 0 else np.asarray(dw, np.float64).T
    checks = (
        (np.asarray(y, np.float64).reshape(15, 97), x64, w_io, 0.0),
        (np.asarray(dx, np.float64).reshape(15, 64), g64, w_io.T, 2.0**-8),
        (dw_io, x64.T, g64, 2.0**-8),
    )
    for got, a, b, last_rounding in checks:
        want = a @ b
        bound = a.shape[1] * 2.0**-24 * (np.abs(a) @ np.abs(b)) + last_rounding * np.abs(want)
        assert np.all(np.abs(got - want) <= bound + 1e-30)


@pytest.mark.parametrize("w_in_axis", [0, 1])
def test_dot_f32_writes_no_transpose(w_in_axis):
    """Forward and backward contract the operands as they lie: a transpose written in front of a
    dot makes XLA:CPU run a bfloat16 product in float32 (benchmarks/dot_layouts.py)."""
    x = jnp.ones((2, 3, 64), jnp.bfloat16)
    w = jnp.ones((64, 97) if w_in_axis == 0 else (97, 64), jnp.bfloat16)
    loss = lambda x, w: jnp.sum(dot_f32(x, w, w_in_axis))
    text = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(x, w).as_text()
    assert len(re.findall(r"stablehlo\.dot_general", text)) == 3
    assert "stablehlo.transpose" not in text


def test_bf16_model_logits_are_not_rounded_to_bf16():
    """Under bf16 compute the tied head's logits keep float32 sums (Embed.attend rounded them to bf16)."""
    from bitnet_jax.train.step import compute_params

    params = compute_params(init_params(CONFIG, seed=2), jnp.bfloat16)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, CONFIG.vocab_size, size=(2, 9)), jnp.int32)
    logits = np.asarray(BitNetLM(CONFIG).apply({"params": params}, ids))
    as_bf16 = np.asarray(jnp.asarray(logits).astype(jnp.bfloat16).astype(jnp.float32))
    assert np.mean(as_bf16 != logits) > 0.5
