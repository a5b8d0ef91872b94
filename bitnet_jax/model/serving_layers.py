"""The serving layers: the same decoder on packed weights (`bitnet_jax.serve.pack`), and the tree
those weights form. This is the one place where `model/` calls `kernels/`.

Packed parameters are the training tree with every BitLinear `kernel` replaced by `w_packed`
(2-bit codes, `kernels/layout.py`) and `w_scale`, and the embedding and / or lm_head replaced by
a quantized table where the lm_head kind says so: int8 rows (`w_int8`, `w_scale` per row) or
int4 rows (`w_int4`, `w_scale` float16 per row and group of 32 inputs). The layers' packed weights live in
their own variable collection (`PACKED`), broadcast into the layer scan instead of scanned over,
so that a kernel reads layer `layer` of the stack in place rather than a copy of it.

Axis letters: M rows of a flattened matmul, I input features, O output features, L layers,
V vocabulary, D model width; `kernels/layout.py` names the packed array's own axes.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from bitnet_jax.errors import BitNetError
from bitnet_jax.kernels import layout, ops
from bitnet_jax.model.hadamard import rotate_input
from bitnet_jax.model.layers import RMSNorm
from bitnet_jax.model.quant import weight_quantize

# The variable collection of the layers' packed weights.
PACKED = "packed"


class TernaryLinear(nn.Module):
    """Serving BitLinear on packed weights: never builds a float kernel.

    Weights, stacked over layers: `w_packed` uint8 [L, *layout.packed_shape(O, I, grouped)] (TQ2B,
    or TQ2G tiles with group scales) and `w_scale` float32 [L, 1] (per tensor), [L, O] (per
    channel) or, per group of inputs, the tiles' [L, ceil(O / 16), (I / group) * 16]
    (`layout.tile_group_scales` of [I / group, O]).

    With `hadamard` set, the input is rotated as the training BitLinear rotates it, by the same
    function, before the kernels quantize it: the packed codes are those of the rotated-basis
    weights, so the kernels need not know (`model/hadamard.py`).
    """

    features: int
    spec: ops.ServingSpec
    num_layers: int
    per_channel: bool = False
    group_size: int = 0  # G of 'group:G': a scale per G inputs and output
    input_norm_eps: float | None = None
    split: str = "n"  # how a 'tensor' mesh axis splits it (ops.ternary_linear)
    hadamard: int = 0  # a BitNetConfig.hadamard setting; 0: no rotation
    hadamard_seed: int | None = None  # BitNetConfig.hadamard_seed; None: no sign flips

    @nn.compact
    def __call__(self, x_bi, layer):
        if self.input_norm_eps is not None:
            x_bi = RMSNorm(self.input_norm_eps, name="rms_norm")(x_bi)
        x_bi = rotate_input(x_bi, self.hadamard, self.hadamard_seed)
        w_packed, w_scale = _packed_weights(self, x_bi.shape[-1])
        y = ops.ternary_linear(
            x_bi, w_packed, w_scale, self.features, self.spec.act_bits, self.spec.backend, layer, split=self.split
        )
        return y.astype(x_bi.dtype)


def _packed_weights(linear: TernaryLinear, k: int):
    """Declares (inside `linear`'s compact call) and returns its stacked packed weights for
    inputs of width k: (w_packed [L, G, X], w_scale [L, ...])."""
    packed_shape = (linear.num_layers, *layout.packed_shape(linear.features, k, grouped=bool(linear.group_size)))
    w_packed = linear.variable(PACKED, "w_packed", jnp.zeros, packed_shape, jnp.uint8).value
    if linear.group_size:
        scale_shape = layout.group_scales_shape(linear.features, k // linear.group_size)
    else:
        scale_shape = (linear.features if linear.per_channel else 1,)
    w_scale = linear.variable(PACKED, "w_scale", jnp.ones, (linear.num_layers, *scale_shape), jnp.float32).value
    return w_packed, w_scale


class _TernaryWeights(TernaryLinear):
    """A TernaryLinear's variables alone, under its name (the same tree), for `ternary_linears`.
    Called with the layer's input, as a TernaryLinear is, so that what intercepts a TernaryLinear's
    call (tests/near_ties.py sows each quantizer's input) sees the same call."""

    @nn.compact
    def __call__(self, x_bi, layer=None):
        return _packed_weights(self, x_bi.shape[-1])


def ternary_linears(linears: list[dict], x_bi, layer) -> tuple:
    """TernaryLinear layers of the same input, each given by its fields (name included), applied
    to x: the same results as calling each, in one custom call where the FFI backend can
    (`ops.ternary_linears`). Layers that normalize or rotate their own input, or that a tensor
    mesh would split differently, are called one by one. Call inside the parent's compact method,
    as one would the layers."""
    own_input = any(f["input_norm_eps"] is not None or f["hadamard"] for f in linears)
    if own_input or len({f["split"] for f in linears}) > 1:
        return tuple(TernaryLinear(**fields)(x_bi, layer) for fields in linears)
    projections = []
    for fields in linears:
        w_packed, w_scale = _TernaryWeights(**fields)(x_bi, layer)
        projections.append((w_packed, w_scale, fields["features"]))
    spec = linears[0]["spec"]
    ys = ops.ternary_linears(x_bi, projections, spec.act_bits, spec.backend, layer, split=linears[0]["split"])
    return tuple(y.astype(x_bi.dtype) for y in ys)


class Int8Embed(nn.Module):
    """Serving embedding / lm_head held as int8 rows [V, Dp] with one scale per row."""

    num_embeddings: int
    features: int
    spec: ops.ServingSpec

    def setup(self):
        padded = -(-self.features // layout.INT8_ROW_ALIGN) * layout.INT8_ROW_ALIGN
        self.w_int8 = self.param("w_int8", nn.initializers.zeros, (self.num_embeddings, padded), jnp.int8)
        self.w_scale = self.param("w_scale", nn.initializers.ones, (self.num_embeddings,), jnp.float32)

    def __call__(self, ids):
        return ops.int8_embed(ids, self.w_int8, self.w_scale, self.features)

    def attend(self, x_bd, when=None):
        w_int8, w_scale = self.w_int8, self.w_scale  # (read outside `when`'s branch: Flax's variables)
        return _attend_when(
            lambda x: ops.int8_linear(x, w_int8, w_scale, self.spec.act_bits, self.spec.backend), x_bd, when
        )


class Int4Embed(nn.Module):
    """Serving embedding / lm_head held as 4-bit codes [V, Dp / 2] with a float16 scale per row and
    group of 32 inputs [V, Dp / 32] (`layout.pack_int4`)."""

    num_embeddings: int
    features: int
    spec: ops.ServingSpec

    def setup(self):
        row_bytes = layout.int4_row_bytes(self.features)
        groups = row_bytes * 2 // layout.INT4_GROUP_K
        self.w_int4 = self.param("w_int4", nn.initializers.zeros, (self.num_embeddings, row_bytes), jnp.uint8)
        self.w_scale = self.param("w_scale", nn.initializers.ones, (self.num_embeddings, groups), jnp.float16)

    def __call__(self, ids):
        return ops.int4_embed(ids, self.w_int4, self.w_scale, self.features)

    def attend(self, x_bd, when=None):
        w_int4, w_scale = self.w_int4, self.w_scale
        return _attend_when(
            lambda x: ops.int4_linear(x, w_int4, w_scale, self.spec.act_bits, self.spec.backend), x_bd, when
        )


def _attend_when(head, x_bd, when):
    """`head(x_bd)`, the logits of a serving table; with `when` (a traced bool), zeros of their
    shape where it is False, without reading the table (a prefill chunk that holds no prompt's
    last token: on 2B4T the int8 table is 328 MB, some 13 ms a chunk)."""
    if when is None:
        return head(x_bd)
    logits = jax.eval_shape(head, x_bd)
    return jax.lax.cond(when, head, lambda x: jnp.zeros(logits.shape, logits.dtype), x_bd)


# The serving module of each quantized table kind (ops.head_table).
TABLES = {"int8": Int8Embed, "int4": Int4Embed}


def is_packed(params) -> bool:
    """True for serving parameters made by `pack`."""
    try:
        return "w_packed" in params["layers"]["self_attn"]["q_proj"]
    except (KeyError, TypeError):
        return False


def table_kind(table) -> str | None:
    """'int8' or 'int4' for a packed embedding / lm_head table that is quantized, None for a float one."""
    return next((kind for kind in TABLES if f"w_{kind}" in table), None)


def lm_head_kind(params) -> str:
    """How packed parameters hold the lm_head: one of ops.LM_HEADS."""
    tied = table_kind(params["embed_tokens"])
    if tied:
        return f"{tied}-tied"
    return table_kind(params.get("lm_head", {})) or "float"


def float_rows(table, hidden_size: int) -> np.ndarray:
    """The float32 rows [V, D] of a packed embedding or lm_head table: a float `embedding` as it is,
    int8 or int4 rows dequantized."""
    if "embedding" in table:
        return np.asarray(table["embedding"], np.float32)
    if "w_int4" in table:
        q_vd = np.asarray(layout.unpack_int4(table["w_int4"], hidden_size), np.float32)
        scale_vd = np.repeat(np.asarray(table["w_scale"], np.float32), layout.INT4_GROUP_K, axis=1)
        return q_vd * scale_vd[:, :hidden_size]
    w8_vd = np.asarray(table["w_int8"])[:, :hidden_size].astype(np.float32)
    return w8_vd * np.asarray(table["w_scale"], np.float32)[:, None]


# Rows of a table quantized at once: the float temporaries of a 2B4T embedding [128256, 2560]
# stay at ~40 MB each instead of 1.3 GB.
_TABLE_ROWS_PER_STEP = 4096


def quantized_table(kind: str, rows_of, n: int) -> dict:
    """The packed table ('int8': `w_int8`, `w_scale` per row; 'int4': `w_int4`, `w_scale` per row and
    group of 32) of the [N, K] matrix whose rows `rows_of(rows)` gives (a slice of rows as float
    [R, K]). Quantized a block of rows at a time, which gives the same bytes as all at once: every
    row has its own scales."""
    codes = scales = None
    for start in range(0, n, _TABLE_ROWS_PER_STEP):
        rows = slice(start, min(start + _TABLE_ROWS_PER_STEP, n))
        codes_r, scales_r = _quantize_rows(kind, np.asarray(rows_of(rows), np.float32))
        if codes is None:
            codes = np.empty((n, *codes_r.shape[1:]), codes_r.dtype)
            scales = np.empty((n, *scales_r.shape[1:]), scales_r.dtype)
        codes[rows], scales[rows] = codes_r, scales_r
    return {f"w_{kind}": codes, "w_scale": scales}


def _quantize_rows(kind: str, w_rk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if kind == "int8":
        q_rk, scale_r = layout.quantize_int8_rows(w_rk)
        return layout.pack_int8(q_rk), scale_r
    q_rk, scale_rc = layout.quantize_int4_groups(w_rk)
    return layout.pack_int4(q_rk), scale_rc


def pack_ends(lm_head: str, tied: bool, vocab_size: int, embedding_rows, head_rows, float_head) -> dict:
    """`embed_tokens` and `lm_head` of packed parameters for lm_head kind `lm_head` (ops.LM_HEADS),
    from `embedding_rows(rows)` and `head_rows(rows)` (a slice of the rows of the embedding and the
    lm_head as float [V, D]) and `float_head()` (an untied float lm_head's parameters). `tied`:
    whether the model ties its embeddings. The one layout of the two ends: `pack`, `convert_hf`
    and `load_gguf` all build them here."""
    table, shared = ops.head_table(lm_head)
    if shared:
        return {"embed_tokens": quantized_table(table, embedding_rows, vocab_size)}
    out = {"embed_tokens": {"embedding": embedding_rows(slice(None))}}
    if table is not None:
        out["lm_head"] = quantized_table(table, head_rows, vocab_size)
    elif not tied:
        out["lm_head"] = float_head()
    return out


def check_lm_head(lm_head: str, tied: bool, where: str):
    """Refuses an lm_head kind that is not in ops.LM_HEADS, or a '-tied' one for an untied model."""
    if lm_head not in ops.LM_HEADS:
        raise BitNetError(f"{where}: lm_head={lm_head!r}; expected one of {ops.LM_HEADS}.")
    if ops.head_table(lm_head)[1] and not tied:
        raise BitNetError(
            f"{where}: lm_head={lm_head!r} needs tied embeddings; this model has a separate lm_head "
            f"(use lm_head={lm_head.removesuffix('-tied')!r})."
        )


def lm_head_rows(params, hidden_size: int) -> np.ndarray:
    """The float32 rows [V, D] of an untied lm_head, from training or packed parameters: a float
    `kernel` [D, V] transposed, int8 rows dequantized."""
    head = params["lm_head"]
    if "kernel" in head:
        return np.asarray(head["kernel"], np.float32).T
    return float_rows(head, hidden_size)


_quantize = jax.jit(weight_quantize, static_argnums=1)
_unpack_codes = jax.jit(layout.unpack_codes, static_argnums=(1, 2, 3))  # one compile per shape, not per op


def ternary_codes(linear, in_features: int, out_features: int, weight_quant: str) -> tuple[np.ndarray, np.ndarray]:
    """(codes int8 [O, I] in {-1, 0, 1}, float32 scales as packed: [1] per tensor, [O] per
    channel, [I / G, O] per group of G inputs) of one layer's BitLinear: unpacked from packed
    parameters (`w_packed`, `w_scale`), or from training ones (`kernel` [I, O]) quantized exactly
    as the training forward quantizes them (`quant.weight_quantize`). The one place both trees are
    read as codes: `pack` stores these, `unpack` and the exporters read them back."""
    if "w_packed" in linear:
        scale = np.asarray(linear["w_scale"], np.float32)
        grouped = scale.ndim == 2  # TQ2G tiles and their scales
        t_oi = _unpack_codes(linear["w_packed"], out_features, in_features, grouped)
        return np.asarray(t_oi), np.asarray(layout.untile_group_scales(scale, out_features)) if grouped else scale
    t_io, scale = _quantize(jnp.asarray(linear["kernel"], jnp.float32), weight_quant)
    scale = np.asarray(scale, np.float32)  # [1, 1], [1, O] or, per group, [I / G, 1, O]
    return np.asarray(t_io, np.int8).T, scale.reshape(scale.shape[0], -1) if scale.ndim == 3 else scale.reshape(-1)


def _is_packed_leaf(path: tuple[str, ...]) -> bool:
    return path[0] == "layers" and path[-1] in ("w_packed", "w_scale")


def serving_variables(params) -> dict:
    """Flax variables for `BitNetLM(config, serving).apply` from packed parameters: the packed
    weights of the layers go to the `PACKED` collection (broadcast into the layer scan), the
    rest (norms, embeddings, an int8 lm_head) to "params"."""
    flat = traverse_util.flatten_dict(params)
    split = lambda packed: traverse_util.unflatten_dict(
        {path: value for path, value in flat.items() if _is_packed_leaf(path) == packed}
    )
    return {"params": split(False), PACKED: split(True)}


def merge_serving_variables(variables) -> dict:
    """The inverse of `serving_variables`: one parameter tree."""
    flat = {**traverse_util.flatten_dict(variables["params"]), **traverse_util.flatten_dict(variables.get(PACKED, {}))}
    return traverse_util.unflatten_dict(flat)
