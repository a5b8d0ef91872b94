"""The BitNet b1.58 decoder in Flax Linen, numerically matching transformers' `BitNetForCausalLM`.

Axis letters used in array names and einsum strings, the one glossary of `model/` (`layers.py`
and `serving_layers.py` use it too):
  B batch            T query positions       S key/value positions (cache slots)
  D model width      F FFN width             V vocabulary
  N query heads      K key/value heads       G query heads per KV head (N = K * G)
  H head dim         L layers
  M rows of a flattened matmul (B * T)       I, O input / output features of a linear layer
`kernels/` speaks the language of GEMM kernels instead (M rows, N outputs, K inputs, G 4-row
groups of the packed layout): `kernels/layout.py` defines those letters for its modules.

The blocks receive slices of the config, not the config: `AttentionShape`, `MLPShape`, the norm
epsilon, and a `LinearSpec` (quantizers, init, and for serving the packed stack) that builds each
linear layer.

Parameters and activations also carry logical axis names (`embed`, `mlp`, `q_heads`, `kv_heads`,
`vocab`, `layers`; `batch`, `length`, `act_embed` for activations) that `sharding.py` maps onto a
device mesh. They are metadata only: without a mesh they change nothing, and `init_params`
returns plain arrays.

The decoder is LLaMA-like with BitNet's changes: every projection inside the blocks is a
`BitLinear` (ternary weights, int8 activations, straight-through gradients), the FFN is gated
squared ReLU, and two extra "subln" RMSNorms sit before `o_proj` and `down_proj` (which, with
`config.hadamard`, also rotate their inputs: BitNet v2's H-BitLinear, `hadamard.py`). Embeddings,
norms and the lm_head stay in full precision. The layers are one `nn.scan`, so parameters of
the blocks are stacked on a leading L axis and compile time does not grow with depth.

Parameter tree (kernels are [in, out], the Flax convention; HF stores weights [out, in]):
  embed_tokens/embedding [V, D]
  layers/{input_layernorm,post_attention_layernorm}/weight [L, D]
  layers/self_attn/{q,k,v,o}_proj/kernel [L, in, out], layers/self_attn/attn_sub_norm/weight [L, N*H]
  layers/mlp/{gate,up,down}_proj/kernel [L, in, out], layers/mlp/ffn_sub_norm/weight [L, F]
  norm/weight [D], lm_head/kernel [D, V] (absent when tie_word_embeddings)
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from bitnet_jax.kernels import ops
from bitnet_jax.kernels.ops import ServingSpec, float_embed, head_table
from bitnet_jax.model.config import REMAT_POLICIES, BitNetConfig
from bitnet_jax.model.layers import BitLinear, LMHead, QuantSpec, RMSNorm, dot_f32, logical
from bitnet_jax.model.serving_layers import PACKED, TABLES, TernaryLinear, ternary_linears

# Added to masked attention scores: large enough to zero them after softmax, finite so that a
# fully masked row (a padding query) gives a uniform average instead of NaN.
_MASKED = -1e30


class KVCache(NamedTuple):
    """Keys and values of every layer; slot s holds the token at absolute position s.

    Rows [L, Bc, K, S, H]: where a sequence's slots are is said by the caller, per input row,
    as `cache_rows` (the `BitNetLM` call's cache_rows_b / cache_pages_bp): int32 [B], one cache
    row of S slots each (default row b), or int32 [B, P], a paged cache: slot s of input row b
    is slot s % S of cache row (page) cache_rows[b, s // S], so a row holds P * S slots in
    pages that may lie anywhere (`page_slots`).

    A float cache holds them as they are. An int8 cache (a quarter of float32's bytes, for serving)
    holds each slot's keys (and values) per kv head as int8 codes with one float32 scale,
    k = k_scale_lbks[..., None] * k_lbksh (`quantize_kv`); the scales are None for a float cache.
    """

    k_lbksh: jax.Array
    v_lbksh: jax.Array
    k_scale_lbks: jax.Array | None = None
    v_scale_lbks: jax.Array | None = None

    @classmethod
    def zeros(cls, config: BitNetConfig, batch: int, length: int, dtype=jnp.float32) -> "KVCache":
        shape = (config.num_hidden_layers, batch, config.num_key_value_heads, length, config.head_dim)
        if jnp.dtype(dtype) != jnp.int8:
            return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
        scales = lambda: jnp.zeros(shape[:-1], jnp.float32)
        return cls(jnp.zeros(shape, jnp.int8), jnp.zeros(shape, jnp.int8), scales(), scales())

    @property
    def quantized(self) -> bool:
        return self.k_scale_lbks is not None

    def write(self, layer, k_btkh, v_btkh, start_b, rows=None) -> "KVCache":
        """This step's keys and values [B, T, K, H] written into layer `layer`, row b's at its
        slots start_b[b].. (in cache row rows[b], default b, or in its pages rows[b, :]): a
        scatter of the few slots written, done in place by XLA, not a copy. Slots past the
        row's end are dropped. An int8 cache quantizes them first (`quantize_kv`)."""
        if self.quantized:
            (k_q, k_scale), (v_q, v_scale) = quantize_kv(k_btkh), quantize_kv(v_btkh)
            new = KVCache(k_q, v_q, k_scale, v_scale)
        else:
            new = KVCache(k_btkh, v_btkh)
        return jax.tree.map(lambda cache, x: _write_slots(cache, x, layer, start_b, rows), self, new)

    def layer(self, layer, rows=None, slots=None) -> tuple[jax.Array, jax.Array]:
        """(keys, values) [B, K, S', H] of layer `layer` (of the cache rows or pages `rows`,
        default every row; S' = P * S for pages, or the first `slots` of them): a copy,
        dequantized to float32 for an int8 cache."""
        keys, values = self.k_lbksh[layer], self.v_lbksh[layer]
        if self.quantized:
            keys = keys.astype(jnp.float32) * self.k_scale_lbks[layer][..., None]
            values = values.astype(jnp.float32) * self.v_scale_lbks[layer][..., None]
        if rows is not None and rows.ndim == 1:
            keys, values = keys[rows], values[rows]
        elif rows is not None:
            keys, values = join_pages(keys[rows], 1), join_pages(values[rows], 1)
        return keys[:, :, :slots], values[:, :, :slots]

    def row_slots(self, rows=None) -> int:
        """Slots per input row: S, or P * S with pages `rows` [B, P]."""
        s = self.k_lbksh.shape[3]
        return s if rows is None or rows.ndim == 1 else rows.shape[1] * s


def join_pages(pages_: jax.Array, axis: int) -> jax.Array:
    """A row's pages [..., P, K, S, ...] (P at `axis`) as the row [..., K, P * S, ...]: its pages
    one after the other."""
    row = jnp.moveaxis(pages_, axis, axis + 1)
    return row.reshape(row.shape[: axis + 1] + (-1,) + row.shape[axis + 3 :])


def page_slots(rows: jax.Array, slots_bt: jax.Array, page_len: int) -> tuple[jax.Array, jax.Array]:
    """(cache row, slot in that row) [B, T] of input row b's slot slots_bt[b, t], for `rows` as
    `KVCache` takes them: [B] (the row itself, the slot as it is) or pages [B, P] (cache row
    rows[b, s // page_len], slot s % page_len). A slot past the row's P * page_len slots gets
    row -1, which a scatter drops (and a gather must not be asked for)."""
    if rows.ndim == 1:
        return jnp.broadcast_to(rows[:, None], slots_bt.shape), slots_bt
    p = rows.shape[1]
    page_bt = jnp.take_along_axis(rows, jnp.clip(slots_bt // page_len, 0, p - 1), axis=1)
    return jnp.where(slots_bt < p * page_len, page_bt, -1), slots_bt % page_len


def quantize_kv(x_btkh: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(int8 codes [B, T, K, H], float32 scales [B, T, K]) of keys or values: per slot and kv head,
    scale = max|x| / 127 and code = round(x / scale), so that scale * code is within scale / 2 of
    x, a relative error of at most 1/254 of the head's largest entry. An all-zero head gets scale
    0 and codes 0 (exactly zero again)."""
    x = x_btkh.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x), axis=-1) / 127.0
    safe = jnp.where(scale > 0, scale, 1.0)[..., None]
    codes = jnp.clip(jnp.round(x / safe), -127, 127).astype(jnp.int8)
    return codes, scale


@dataclasses.dataclass(frozen=True)
class LinearSpec:
    """What every linear layer of a block needs: its quantizers, its init, and, for serving, the
    packed stack it reads (the layers receive this, not the whole config)."""

    quant: QuantSpec
    init_std: float
    num_layers: int
    serving: ServingSpec | None = None
    hadamard: int = 0  # BitNetConfig.hadamard: the rotation of the layers built with rotate=True
    hadamard_seed: int | None = None  # BitNetConfig.hadamard_seed: its sign flips

    @classmethod
    def of(cls, config: BitNetConfig, serving: ServingSpec | None) -> "LinearSpec":
        c = config
        return cls(QuantSpec.of(c), c.initializer_range, c.num_hidden_layers, serving, c.hadamard, c.hadamard_seed)

    def __call__(self, features: int, name: str, layer, axes: tuple[str, str], rotate: bool = False):
        """The linear layer as a function of x: fake-quant BitLinear (kernel with logical axes
        `axes`) for training, TernaryLinear (on layer `layer` of the packed stack) for serving.
        `rotate`: an H-BitLinear (BitNet v2) when the config's `hadamard` is on."""
        if self.serving is None:
            hadamard = self.hadamard if rotate else 0
            return BitLinear(features, self.quant, self.init_std, axes, hadamard, self.hadamard_seed, name=name)
        linear = TernaryLinear(**self._ternary_fields(features, name, axes, rotate))
        return lambda x: linear(x, layer)

    def parallel(self, layers: list[tuple[int, str, tuple[str, str]]], layer):
        """Several linear layers of the same input, (features, name, axes) each, as one function
        of x returning their outputs: the same as calling each (`__call__`); serving, in one FFI
        call where it can (`serving_layers.ternary_linears`)."""
        if self.serving is None:
            linears = [self(features, name, layer, axes) for features, name, axes in layers]
            return lambda x: tuple(linear(x) for linear in linears)
        linears = [self._ternary_fields(features, name, axes) for features, name, axes in layers]
        return lambda x: ternary_linears(linears, x, layer)

    def _ternary_fields(self, features: int, name: str, axes: tuple[str, str], rotate: bool = False) -> dict:
        """The fields of the serving TernaryLinear for this layer (its name included)."""
        hadamard = self.hadamard if rotate else 0
        # Megatron-style, as training shards the kernels (sharding.RULES): projections out of the
        # embedding split their outputs over 'tensor', projections back into it (o_proj, down_proj)
        # their inputs, which then arrive already split.
        split = "k" if axes[1] == "embed" else "n"
        q = self.quant
        return dict(
            features=features,
            spec=self.serving,
            num_layers=self.num_layers,
            per_channel=q.weight == "channel",
            group_size=q.group_size,
            input_norm_eps=q.input_norm_eps,
            split=split,
            hadamard=hadamard,
            hadamard_seed=self.hadamard_seed,
            name=name,
        )


@dataclasses.dataclass(frozen=True)
class AttentionShape:
    """The attention block's sizes (a slice of BitNetConfig)."""

    num_heads: int  # N
    num_kv_heads: int  # K
    head_dim: int  # H
    hidden_size: int  # D
    rope_theta: float

    @classmethod
    def of(cls, config: BitNetConfig) -> "AttentionShape":
        c = config
        return cls(c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.hidden_size, c.rope_theta)


@dataclasses.dataclass(frozen=True)
class MLPShape:
    """The FFN block's sizes and activation (a slice of BitNetConfig)."""

    hidden_size: int  # D
    intermediate_size: int  # F
    activation: str  # 'relu2' (squared ReLU, b1.58) or 'silu'

    @classmethod
    def of(cls, config: BitNetConfig) -> "MLPShape":
        return cls(config.hidden_size, config.intermediate_size, config.hidden_act)


def apply_rope(x_btnh: jax.Array, positions_bt: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding, half-split ("rotate_half") layout as in transformers' LLaMA family."""
    h = x_btnh.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
    angles_bth = positions_bt[..., None].astype(jnp.float32) * inv_freq
    angles_bth = jnp.concatenate([angles_bth, angles_bth], axis=-1)
    cos, sin = jnp.cos(angles_bth)[:, :, None, :], jnp.sin(angles_bth)[:, :, None, :]
    x1, x2 = jnp.split(x_btnh, 2, axis=-1)
    rotated = x_btnh * cos + jnp.concatenate([-x2, x1], axis=-1) * sin
    return rotated.astype(x_btnh.dtype)


def _write_slots(cache_lbks_: jax.Array, new_btk_: jax.Array, layer, start_b: jax.Array, rows=None) -> jax.Array:
    """`KVCache.write` for one array: [L, Bc, K, S, ...] written at input row b's slots
    start_b[b] + t (`page_slots`) with new [B, T, K, ...]."""
    b, t = new_btk_.shape[:2]
    slots_bt = start_b[:, None] + jnp.arange(t, dtype=start_b.dtype)[None, :]
    rows = jnp.arange(b, dtype=jnp.int32) if rows is None else rows
    rows_bt, slots_bt = page_slots(rows, slots_bt, cache_lbks_.shape[3])
    # Out of bounds (past a row's slots) is dropped, as a scatter's default mode does for any
    # index outside the array; -1 must not wrap around to the last row.
    rows_bt = jnp.where(rows_bt < 0, cache_lbks_.shape[1], rows_bt)
    # Advanced indices around a slice: the indexed slots come out as [B, T, K, ...], new's shape.
    # Pages promise neither order nor uniqueness (a server's idle rows may share one scratch page).
    contiguous = rows.ndim == 1
    return cache_lbks_.at[layer, rows_bt, :, slots_bt].set(
        new_btk_.astype(cache_lbks_.dtype), indices_are_sorted=contiguous, unique_indices=contiguous, mode="drop"
    )


class Attention(nn.Module):
    shape: AttentionShape
    norm_eps: float
    linear: LinearSpec

    @nn.compact
    def __call__(self, x_btd, positions_bt, mask_bts, cache_kv, layer=None, cache_rows=None):
        a = self.shape
        n, k, h = a.num_heads, a.num_kv_heads, a.head_dim
        b, t, _ = x_btd.shape
        linear = lambda features, name, axes, rotate=False: self.linear(features, name, layer, axes, rotate)
        qkv = self.linear.parallel(
            [
                (n * h, "q_proj", ("embed", "q_heads")),
                (k * h, "k_proj", ("embed", "kv_heads")),
                (k * h, "v_proj", ("embed", "kv_heads")),
            ],
            layer,
        )
        q_btd, k_btd, v_btd = qkv(x_btd)
        q_btnh, k_btkh, v_btkh = q_btd.reshape(b, t, n, h), k_btd.reshape(b, t, k, h), v_btd.reshape(b, t, k, h)
        q_btnh = apply_rope(q_btnh, positions_bt, a.rope_theta)
        k_btkh = apply_rope(k_btkh, positions_bt, a.rope_theta)
        backend = "xla" if self.linear.serving is None else self.linear.serving.backend
        out_btnh, cache_kv = grouped_attention(
            q_btnh, k_btkh, v_btkh, positions_bt, mask_bts, cache_kv, layer, backend=backend, cache_rows=cache_rows
        )
        out_btnh = RMSNorm(self.norm_eps, name="attn_sub_norm")(out_btnh.reshape(b, t, n * h))
        # BitNet v2 rotates the inputs of o_proj and down_proj, whose sub-norm outputs hold outliers.
        return linear(a.hidden_size, "o_proj", ("q_heads", "embed"), rotate=True)(out_btnh), cache_kv


def grouped_attention(q_btnh, k_btkh, v_btkh, positions_bt, mask_bts, cache_kv, layer, backend="xla", cache_rows=None):
    """Grouped-query attention of this step's queries over its keys and values, or, with a cache,
    over every slot of layer `layer` of the stacked cache (`cache_kv`, a `KVCache`, float or int8)
    after writing this step's into it (input row b's slots in cache row cache_rows[b], default
    b, or in its pages cache_rows[b, :]: `KVCache`). Returns (out [B, T, N, H], the cache or
    None). (Also timed alone by `bench generate --profile`.)

    With a cache, mask_bts is the cache's mask, slot <= position (`build_attention_mask`); on the FFI
    backend, decode steps and prefill chunks instead attend with the FFI kernel (`ops.ffi_attends`),
    which reads the slots up to each position in place, where the einsums below read a copy of
    every slot the mask covers."""
    b, t, n, h = q_btnh.shape
    k = k_btkh.shape[2]
    if cache_kv is None:
        # Training and cache-free forwards: JAX's attention op, which takes grouped kv heads and
        # the boolean mask as they are and leaves the implementation to JAX (a fused cuDNN kernel
        # on NVIDIA GPUs where the inputs fit it; not measured here). On CPU it is XLA einsums
        # with a float32 softmax, as in the cache path below.
        return jax.nn.dot_product_attention(q_btnh, k_btkh, v_btkh, mask=mask_bts[:, None], scale=h**-0.5), None
    cache_kv = cache_kv.write(layer, k_btkh, v_btkh, positions_bt[:, 0], cache_rows)
    if ops.ffi_attends(backend, q_btnh, cache_kv.k_lbksh):
        return ops.cached_attention(q_btnh, cache_kv, layer, positions_bt, cache_rows), cache_kv
    # The cache keeps slots next to the head dim, the layout the dots below want; a copy of the
    # layer (of the rows and slots the mask covers), which the FFI kernel reads in place instead.
    keys, values = cache_kv.layer(layer, cache_rows, slots=mask_bts.shape[-1])
    q_btkgh = q_btnh.reshape(b, t, k, n // k, h)
    scores_bkgts = jnp.einsum("btkgh,bksh->bkgts", q_btkgh, keys) * (h**-0.5)
    scores_bkgts = jnp.where(mask_bts[:, None, None], scores_bkgts, _MASKED)
    probs_bkgts = jax.nn.softmax(scores_bkgts.astype(jnp.float32), axis=-1).astype(values.dtype)
    return jnp.einsum("bkgts,bksh->btkgh", probs_bkgts, values).reshape(b, t, n, h), cache_kv


class MLP(nn.Module):
    shape: MLPShape
    norm_eps: float
    linear: LinearSpec

    @nn.compact
    def __call__(self, x_btd, layer=None):
        m = self.shape
        linear = lambda features, name, axes, rotate=False: self.linear(features, name, layer, axes, rotate)
        gate_up = self.linear.parallel(
            [(m.intermediate_size, "gate_proj", ("embed", "mlp")), (m.intermediate_size, "up_proj", ("embed", "mlp"))],
            layer,
        )
        gate_btf, up_btf = gate_up(x_btd)
        act_btf = jnp.square(jax.nn.relu(gate_btf)) if m.activation == "relu2" else jax.nn.silu(gate_btf)
        h_btf = RMSNorm(self.norm_eps, name="ffn_sub_norm")(act_btf * up_btf)
        return linear(m.hidden_size, "down_proj", ("mlp", "embed"), rotate=True)(h_btf)


class DecoderLayer(nn.Module):
    attention: AttentionShape
    mlp: MLPShape
    norm_eps: float
    linear: LinearSpec

    @nn.compact
    def __call__(self, carry, positions_bt, mask_bts, cache_rows, layer):
        # The carry of the layer scan: the residual stream and the whole stacked KV cache (or
        # None), which each layer updates at its own index, so the scan never slices or restacks it.
        x_btd, cache_kv = carry
        eps = self.norm_eps
        residual_dtype = x_btd.dtype
        h_btd = RMSNorm(eps, name="input_layernorm")(x_btd)
        h_btd, cache_kv = Attention(self.attention, eps, self.linear, name="self_attn")(
            h_btd, positions_bt, mask_bts, cache_kv, layer, cache_rows
        )
        x_btd = x_btd + h_btd
        h_btd = RMSNorm(eps, name="post_attention_layernorm")(x_btd)
        h_btd = MLP(self.mlp, eps, self.linear, name="mlp")(h_btd, layer)
        # The residual stream keeps the embedding's dtype (bf16 params compute in bf16).
        return (_residual_constraint((x_btd + h_btd).astype(residual_dtype)), cache_kv), None


class BitNetLM(nn.Module):
    """BitNet b1.58 causal language model.

    `BitNetLM(config).apply({"params": params}, input_ids_bt)` -> float32 logits [B, T, V].

    With `serving` set (a `ServingSpec`), the model runs on packed parameters from
    `bitnet_jax.serve.pack`: TernaryLinear layers and, for `lm_head='int8'` or `'int4'`, a
    quantized lm_head table (`'int8-tied'`, `'int4-tied'`: the tied embedding reads it too).

    `remat` rematerializes each decoder layer in the backward pass instead of keeping its
    activations: "none", "full" (keep only the layer's input), or the name of an argument-free
    `jax.checkpoint_policies` policy (see REMAT_POLICIES), e.g. "dots_saveable". Values and
    gradients are unchanged; it trades compute for memory.

    `scan_layers=False` unrolls the layer scan into straight-line code (`nn.scan`'s `unroll` set to
    the layer count): the same parameters, stacked over layers as before, and the same values up to
    float reassociation, but no loop, so XLA neither fills and slices the stacked per-layer
    residuals of the backward pass nor keeps a loop's buffers, and fuses across layer boundaries.
    Steps run faster on CPU (benchmarks/RESULTS.md, "Training throughput"); the program compiles
    each layer anew (compile time grows with the depth) and may hold more memory at its peak.

    Optional inputs:
      positions_bt: int32 RoPE positions (default 0..T-1; with a cache, the absolute positions
        of this step's tokens, which are also the cache slots they are written to).
      attention_mask_bt: 1 for real tokens, 0 for padding keys (no cache only).
      segment_ids_bt: packed documents; a query attends only to keys of its own segment.
      cache: a `KVCache`; the call then returns `(logits, new_cache)`.
      cache_rows_b: int32 [B], with a cache: the cache row each input row reads and writes
        (default row b), so that a batching server can run a few of its cache's rows.
      cache_pages_bp: instead of cache_rows_b, int32 [B, P]: a paged cache, input row b's slot s
        in slot s % S of cache row (page) cache_pages_bp[b, s // S] (`KVCache`), so that a server
        gives each request only the pages its tokens need.
      logits_index_b: int32 [B]; when given, logits are computed only at that position of each
        row and have shape [B, V] (the next-token logits of prompts of different lengths).
      attend_slots: with a cache, a static int: attention reads only each row's first
        `attend_slots` slots (a prompt prefilled into a cache longer than it: the slots past it
        are not written yet), so every position must be below it. Default: every slot of the row.
      logits_when: a traced bool: where False, a quantized serving lm_head (int8, int4) is not
        read and the logits are zeros (a prefill chunk whose logits no row needs). Other heads
        compute the logits regardless.
    """

    config: BitNetConfig
    serving: ServingSpec | None = None
    remat: str = "none"
    scan_layers: bool = True

    @nn.compact
    def __call__(
        self,
        input_ids_bt,
        *,
        positions_bt=None,
        attention_mask_bt=None,
        segment_ids_bt=None,
        cache: KVCache | None = None,
        cache_rows_b=None,
        cache_pages_bp=None,
        logits_index_b=None,
        attend_slots: int | None = None,
        logits_when=None,
    ):
        c = self.config
        b, t = input_ids_bt.shape
        if positions_bt is None:
            positions_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if cache_rows_b is not None and cache_pages_bp is not None:
            raise ValueError("pass cache_rows_b or cache_pages_bp, not both")
        cache_rows = cache_pages_bp if cache_pages_bp is not None else cache_rows_b
        mask_bts = build_attention_mask(
            positions_bt, attention_mask_bt, segment_ids_bt, cache, cache_rows, attend_slots
        )

        table, shared = head_table("float" if self.serving is None else self.serving.lm_head)
        if shared:
            embed = TABLES[table](c.vocab_size, c.hidden_size, self.serving, name="embed_tokens")
        else:
            embed = nn.Embed(
                c.vocab_size,
                c.hidden_size,
                name="embed_tokens",
                embedding_init=logical(nn.initializers.normal(c.initializer_range), ("vocab", "embed")),
            )
        if self.serving is not None and not shared:
            x_btd = float_embed(embed.embedding, input_ids_bt, self.serving.backend)
        else:
            x_btd = embed(input_ids_bt)
        x_btd = _residual_constraint(x_btd)
        layer = DecoderLayer
        if self.remat != "none":
            # prevent_cse=False: scan already keeps XLA from merging the recomputation with the
            # forward pass (jax.checkpoint's documentation), so the extra barrier would only cost speed.
            layer = nn.remat(DecoderLayer, policy=remat_policy(self.remat), prevent_cse=False)
        # "intermediates": what a caller sows inside the layers (apply(..., mutable=["intermediates"]))
        # comes back stacked over layers, as the parameters are.
        layers = nn.scan(
            layer,
            variable_axes={"params": 0, "intermediates": 0},
            variable_broadcast=PACKED,
            split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0),
            length=c.num_hidden_layers,
            # Only a whole unroll helps: a partial one (2 of 4 layers a trip) keeps the loop and
            # its stacked buffers and measured no faster.
            unroll=1 if self.scan_layers else c.num_hidden_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        layer_l = jnp.arange(c.num_hidden_layers, dtype=jnp.int32)
        linear = LinearSpec.of(c, self.serving)
        decoder = layers(AttentionShape.of(c), MLPShape.of(c), c.rms_norm_eps, linear, name="layers")
        (x_btd, cache_out), _ = decoder((x_btd, cache), positions_bt, mask_bts, cache_rows, layer_l)
        x_btd = RMSNorm(c.rms_norm_eps, name="norm")(x_btd)

        if logits_index_b is not None:
            x_btd = jnp.take_along_axis(x_btd, logits_index_b[:, None, None].astype(jnp.int32), axis=1)[:, 0]
        if table is not None and not shared:
            lm_head = TABLES[table](c.vocab_size, c.hidden_size, self.serving, name="lm_head")
            logits = lm_head.attend(x_btd, when=logits_when)
        elif table is not None:
            logits = embed.attend(x_btd, when=logits_when)
        elif c.tie_word_embeddings:
            dtype = jnp.result_type(x_btd, embed.embedding)
            with jax.named_scope("tied_logits"):
                logits = dot_f32(x_btd.astype(dtype), embed.embedding.astype(dtype), 1)
        else:
            logits = LMHead(c.vocab_size, c.initializer_range, name="lm_head")(x_btd)
        logits = logits.astype(jnp.float32)
        if logits.ndim == 3:  # [B, T, V]; split over vocab too, the largest activation of training
            logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
        if cache is None:
            return logits
        return logits, cache_out


def _residual_constraint(x_btd):
    # Layer boundaries: the residual stream is split over the batch only (every tensor-parallel
    # shard needs whole rows of D). A no-op unless a mesh and axis rules are active.
    return nn.with_logical_constraint(x_btd, ("batch", "length", "act_embed"))


def build_attention_mask(positions_bt, attention_mask_bt, segment_ids_bt, cache, cache_rows=None, slots=None):
    """Boolean [B, T, S]: may query t attend to key s (with a cache, S its slots per row:
    `KVCache.row_slots`, or the first `slots` of them)."""
    b, t = positions_bt.shape
    if cache is not None:
        if attention_mask_bt is not None or segment_ids_bt is not None:
            raise ValueError("attention_mask_bt / segment_ids_bt are not supported with a KV cache")
        s = cache.row_slots(cache_rows)
        if slots is not None:
            if not 0 < slots <= s:
                raise ValueError(f"attend_slots={slots}: expected 1..{s}, the cache's slots per row")
            s = slots
        return jnp.arange(s)[None, None, :] <= positions_bt[:, :, None]
    if slots is not None:
        raise ValueError("attend_slots is for calls with a KV cache (cache=...)")
    mask_bts = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
    if attention_mask_bt is not None:
        mask_bts = mask_bts & (attention_mask_bt[:, None, :] != 0)
    if segment_ids_bt is not None:
        mask_bts = mask_bts & (segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :])
    return mask_bts


def remat_policy(name: str):
    """The `jax.checkpoint` policy of a `BitNetLM.remat` value other than "none"."""
    if name == "full":
        return None  # jax.checkpoint's default: save nothing but the inputs
    if name not in REMAT_POLICIES:
        raise ValueError(f"remat={name!r}: expected 'none', 'full' or one of {REMAT_POLICIES}")
    return getattr(jax.checkpoint_policies, name)


def is_bitlinear_kernel(path) -> bool:
    """Whether a parameter-tree path (from `jax.tree_util.tree_flatten_with_path`) is a BitLinear
    kernel: every `kernel` inside the decoder layers (lm_head, an LMHead, is outside them)."""
    keys = [getattr(p, "key", None) for p in path]
    return keys[0] == "layers" and keys[-1] == "kernel"


def init_params(config: BitNetConfig, seed: int = 0) -> dict:
    """Fresh parameters for training from scratch."""
    ids = jnp.zeros((1, 1), jnp.int32)
    return nn.unbox(jax.jit(BitNetLM(config).init)(jax.random.PRNGKey(seed), ids)["params"])
