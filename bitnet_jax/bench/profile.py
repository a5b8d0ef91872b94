"""`bench generate --profile`: where a decoded token's time goes.

Each piece of one decode step is jitted alone and timed alone, on the model's own functions, the
benchmark's (random) weights and the cache shape of its `generate` program, at the mean position
of the timed decode steps:

  ternary matmuls   every BitLinear of every layer (`ops.ternary_linear` on the stacked weights);
                    the activation quantization is inside: the kernels fuse it
  lm_head           the model's head on the final hidden state (`Int8Embed` / `Int4Embed.attend`, or the float table)
  attention         every layer's cache write, scores, mask, softmax and weighted values
                    (`transformer.grouped_attention`), and the mask
  norms and RoPE    every RMSNorm (4 per layer and the final one) and RoPE of queries and keys

"rest" is the measured decode step minus these: the embedding lookup, residual adds, the FFN's
activation, sampling, the decode loop and streaming, and whatever the pieces cost differently alone
than inside the step (caches, fusion, a dispatch per timed call). It can come out negative; it is
printed as measured, never clipped.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

PIECES = ("ternary matmuls", "lm_head", "attention", "norms and RoPE")


@dataclasses.dataclass(frozen=True)
class DecodeProfile:
    position: int  # the decode position profiled (the mean of the timed steps)
    cache_slots: int  # the cache length of the generate program (XLA's attention reads every slot)
    step_ms: float  # the measured decode step: 1000 / decode tok/s
    pieces_ms: dict  # {piece: median ms per token}, in PIECES order
    rest_ms: float  # step_ms - the pieces


def _median_ms(fn, args, repeats: int, carry: tuple[int, int] | None = None) -> float:
    """Median ms of fn(*args) after a warm-up (compile) call; with `carry` = (i, j), output i is fed
    back as argument j (a donated cache, updated in place as the decode loop does)."""
    import jax

    args = list(args)
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        if i:
            times.append(time.perf_counter() - start)
        if carry is not None:
            args[carry[1]] = out[carry[0]]
    return float(np.median(times)) * 1e3


def _chained(x, y):
    """x, made to depend on y: each timed call's input on the previous call's output (0 * y is not
    simplified away for floats), so the calls run one after another, as in the step, and none is
    dead code."""
    return x + 0.0 * y.reshape(-1)[0].astype(x.dtype)


def ternary_matmuls_ms(config, params, spec, rows: int, repeats: int, rng: np.random.Generator) -> float:
    """Median ms of every BitLinear of every layer of packed `params` (`ops.ternary_linear` on the
    stacked weights, in one jitted scan over the layers) on `rows` activation rows (random, from
    `rng`); `spec` the ServingSpec they serve with."""
    import jax
    import jax.numpy as jnp

    from bitnet_jax.kernels import ops

    layers_l = jnp.arange(config.num_hidden_layers, dtype=jnp.int32)
    linears = [(block, name, kn) for block, names in config.linear_shapes.items() for name, kn in names.items()]
    packed = {(b, m): params["layers"][b][m] for b, m, _ in linears}

    @jax.jit
    def ternary(packed, inputs):
        def layer(y, index):
            for block, name, (k_in, n_out) in linears:
                p = packed[(block, name)]
                x = _chained(inputs[k_in], y)
                y = ops.ternary_linear(x, p["w_packed"], p["w_scale"], n_out, spec.act_bits, spec.backend, index)
            return y.reshape(-1)[:1], None  # a carry of one shape from layer to layer

        return jax.lax.scan(layer, jnp.zeros((1,), jnp.float32), layers_l)[0]

    inputs = {k_in: jnp.asarray(rng.standard_normal((rows, k_in), np.float32)) for _, _, (k_in, _) in linears}
    return _median_ms(ternary, (packed, inputs), repeats)


def profile_decode(
    config, params, *, position: int, cache_slots: int, step_ms: float, repeats: int = 10, kv_cache: str | None = None
) -> DecodeProfile:
    """Times each piece of a decode step of packed `params` (see the module docstring)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from bitnet_jax.model.layers import RMSNorm
    from bitnet_jax.model.serving_layers import TABLES, table_kind
    from bitnet_jax.model.transformer import KVCache, apply_rope, build_attention_mask, grouped_attention
    from bitnet_jax.serve.generate import kv_cache_dtype, serving_params

    _, spec = serving_params(config, params, None, kv_cache)
    c = config
    n, k, h, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.hidden_size
    layers_l = jnp.arange(c.num_hidden_layers, dtype=jnp.int32)
    positions_b1 = jnp.full((1, 1), position, jnp.int32)
    rng = np.random.default_rng(0)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32))
    pieces = {"ternary matmuls": ternary_matmuls_ms(c, params, spec, 1, repeats, rng)}

    head_table = params.get("lm_head", params["embed_tokens"])
    kind = table_kind(head_table)
    if kind is not None:
        head = lambda table, x: TABLES[kind](c.vocab_size, d, spec).apply({"params": table}, x, method="attend")
    elif "embedding" in head_table:
        head = lambda table, x: nn.Embed(c.vocab_size, d).apply({"params": table}, x, method="attend")
    else:
        head = lambda table, x: nn.Dense(c.vocab_size, use_bias=False).apply({"params": table}, x)
    pieces["lm_head"] = _median_ms(jax.jit(head), (head_table, normal(1, d)), repeats)

    cache = KVCache.zeros(c, 1, cache_slots, dtype=kv_cache_dtype(params, spec))

    def attention(q_b1nh, kv_b1kh, cache):
        mask_b1s = build_attention_mask(positions_b1, None, None, cache)

        def layer(carry, index):
            q, cache_kv = carry
            out_b1nh, cache_kv = grouped_attention(
                q, kv_b1kh, kv_b1kh, positions_b1, mask_b1s, cache_kv, index, backend=spec.backend
            )
            return (_chained(q, out_b1nh), cache_kv), None

        (q, cache), _ = jax.lax.scan(layer, (q_b1nh, cache), layers_l)
        return q, cache

    attention = jax.jit(attention, donate_argnums=2)  # the cache is written in place, as in the loop
    pieces["attention"] = _median_ms(attention, (normal(1, 1, n, h), normal(1, 1, k, h), cache), repeats, carry=(1, 2))
    del cache

    norm = lambda weight, x: RMSNorm(c.rms_norm_eps).apply({"params": {"weight": weight}}, x)
    layer_params = params["layers"]
    norm_weights = {
        "input": layer_params["input_layernorm"]["weight"],
        "post": layer_params["post_attention_layernorm"]["weight"],
        "attn": layer_params["self_attn"]["attn_sub_norm"]["weight"],
        "ffn": layer_params["mlp"]["ffn_sub_norm"]["weight"],
    }

    @jax.jit
    def norms_rope(weights, final, x_d, x_heads, x_f, q_b1nh, k_b1kh):
        def layer(y, w):
            y = norm(w["input"], _chained(x_d, y))
            q = apply_rope(_chained(q_b1nh, y), positions_b1, c.rope_theta)
            y = apply_rope(_chained(k_b1kh, q), positions_b1, c.rope_theta)
            y = norm(w["attn"], _chained(x_heads, y))
            y = norm(w["post"], _chained(x_d, y))
            y = norm(w["ffn"], _chained(x_f, y))
            return y.reshape(-1)[:1], None

        y = jax.lax.scan(layer, jnp.zeros((1,), jnp.float32), weights)[0]
        return norm(final, _chained(x_d, y))

    args = (norm_weights, params["norm"]["weight"], normal(1, d), normal(1, n * h), normal(1, c.intermediate_size))
    args += (normal(1, 1, n, h), normal(1, 1, k, h))
    pieces["norms and RoPE"] = _median_ms(norms_rope, args, repeats)
    return DecodeProfile(position, cache_slots, step_ms, pieces, step_ms - sum(pieces.values()))


def profile_table(profile: DecodeProfile) -> str:
    """Markdown: ms per token and share of the step for each piece, the rest and the step."""
    step = profile.step_ms
    lines = [
        f"Where a decoded token's time goes (position {profile.position}, cache of {profile.cache_slots} slots): "
        "each piece jitted and timed alone; rest = the measured step minus the pieces (bench/profile.py).",
        "",
        "| piece | ms / token | of the step |",
        "|---|---:|---:|",
    ]
    rows = [*profile.pieces_ms.items(), ("rest (step - pieces)", profile.rest_ms), ("decode step (measured)", step)]
    for name, ms in rows:
        lines.append(f"| {name} | {ms:.2f} | {100 * ms / step:.0f}% |")
    return "\n".join(lines)
