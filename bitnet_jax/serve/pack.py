"""Convert: fake-quant (training) parameters <-> packed serving parameters.

`pack(config, params)` is the one explicit step between the two paths (`convert_hf` gives the same
result for a Hugging Face folder, reading and packing it a layer at a time). Every BitLinear kernel
[K, N] is quantized exactly as the training forward quantizes it (`quant.weight_quantize`: the
same ternary values and scale), then packed to 2-bit codes (`layout.pack_ternary`) with its scale
([1] per tensor, [N] per channel, [K / G, N] per group of G inputs). The lm_head (the tied
embedding for 2B4T-style models) becomes int8 rows with one scale each (`lm_head="int8"`; for
tied models, `"int8-tied"`, the serving default, also serves the input embedding from those rows),
int4 rows with a float16 scale per 32 inputs (`"int4"`, `"int4-tied"`), or stays float
(`serving_layers.pack_ends`).

`packed_folder.py` writes the result to disk and reads it back without repacking.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from bitnet_jax.errors import BitNetError
from bitnet_jax.interop.hf import HFCheckpoint, stack_layers
from bitnet_jax.kernels import layout
from bitnet_jax.kernels.ops import default_lm_head
from bitnet_jax.model.config import BitNetConfig
from bitnet_jax.model.quant import ternary_master_weights
from bitnet_jax.model.serving_layers import check_lm_head, float_rows, is_packed, lm_head_rows, pack_ends, ternary_codes


def pack(config: BitNetConfig, params, *, lm_head: str | None = None) -> dict:
    """Serving parameters for `BitNetLM(config, serving=...)` from training parameters.

    Args:
      config: the model's config. Its activation quantizer must be per token. Weight scales are
        kept at the config's granularity: [1] per tensor, [N] per channel, [K / G, N] per group of
        G inputs ('group:G'; the FFI kernels serve G a multiple of 64, the XLA integer path others).
      params: training parameters (ours, or from `load_hf`), float32 or bfloat16.
      lm_head: 'int8' (per-row int8 lm_head, 2x smaller than bf16; the input embedding keeps
        its float table), 'int8-tied' (tied models: one int8 table for both ends), 'int4' /
        'int4-tied' (4-bit codes, a float16 scale per 32 inputs: 1.8x smaller than int8, for more
        error) or 'float'; None for `ops.default_lm_head(config)`.
    """
    lm_head = lm_head or default_lm_head(config)
    _check_packable(config, lm_head)
    if is_packed(params):
        raise BitNetError("pack: these parameters are packed already.")
    layers = params["layers"]
    out = {
        "layers": stack_layers(
            lambda i: _pack_layer(config, jax.tree.map(lambda a: a[i], layers)), config.num_hidden_layers
        ),
        "norm": _to_numpy(params["norm"]),
    }
    embedding_vd = np.asarray(params["embed_tokens"]["embedding"])
    head_vd = embedding_vd if config.tie_word_embeddings else np.asarray(params["lm_head"]["kernel"]).T
    out.update(
        pack_ends(
            lm_head,
            config.tie_word_embeddings,
            config.vocab_size,
            lambda rows: embedding_vd[rows],
            lambda rows: head_vd[rows],
            lambda: _to_numpy(params["lm_head"]),
        )
    )
    return out


def unpack(config: BitNetConfig, packed) -> dict:
    """Training parameters from packed ones, the inverse of `pack` for the ternary layers: every
    BitLinear kernel becomes master weights that quantize back to the same codes and scales
    (`quant.ternary_master_weights`), so that training can continue from a packed folder or a
    GGUF file. An int8 or int4 embedding or lm_head comes back as its dequantized rows (the float table
    it was made from is gone)."""
    if not is_packed(packed):
        raise BitNetError("unpack: expected packed parameters (from bitnet_jax.serve.pack or a GGUF file).")
    packed = jax.tree.map(np.asarray, packed)

    def layer(i: int) -> dict:
        source = jax.tree.map(lambda a: a[i], packed["layers"])
        out = {norm: source[norm] for norm in ("input_layernorm", "post_attention_layernorm")}
        for block, shapes in config.linear_shapes.items():
            out[block] = {norm: value for norm, value in source[block].items() if "w_packed" not in value}
            for name, (k, n) in shapes.items():
                p = source[block][name]
                t_nk, w_scale = ternary_codes(p, k, n, config.weight_quant)
                out[block][name] = {"kernel": ternary_master_weights(t_nk.T, w_scale, config.weight_quant)}
                if "rms_norm" in p:
                    out[block][name]["rms_norm"] = p["rms_norm"]
        return out

    rows = lambda table: float_rows(table, config.hidden_size)
    params = {
        "embed_tokens": {"embedding": rows(packed["embed_tokens"])},
        "layers": stack_layers(layer, config.num_hidden_layers),
        "norm": packed["norm"],
    }
    if not config.tie_word_embeddings:
        params["lm_head"] = {"kernel": lm_head_rows(packed, config.hidden_size).T}
    return params


def convert_hf(folder: str | os.PathLike, *, lm_head: str | None = None) -> tuple[BitNetConfig, dict]:
    """`(config, pack(config, params, lm_head=lm_head))` for `config, params = load_hf(folder)`,
    with the same bytes, but each layer is read, quantized and packed before the next is read, and
    int8 tables are read a block of rows at a time: the peak memory is the packed result plus about
    one layer of float weights, not the whole float model (a 2B4T-shaped bf16 folder: 2.0 GB for a
    0.85 GB result, where `load_hf` alone builds 10 GB; benchmarks/RESULTS.md)."""
    with HFCheckpoint(os.fspath(folder)) as checkpoint:
        config = checkpoint.config
        lm_head = lm_head or default_lm_head(config)
        _check_packable(config, lm_head)
        out = {
            "layers": stack_layers(
                lambda i: _pack_layer(config, _float32(checkpoint.layer(i))), config.num_hidden_layers
            ),
            "norm": _float32(checkpoint.norm()),
        }
        embedding = lambda rows: _float32(checkpoint.embedding(rows))
        head = embedding if config.tie_word_embeddings else lambda rows: _float32(checkpoint.lm_head(rows))
        out.update(
            pack_ends(
                lm_head,
                config.tie_word_embeddings,
                config.vocab_size,
                embedding,
                head,
                lambda: {"kernel": np.ascontiguousarray(head(slice(None)).T)},
            )
        )
        checkpoint.warn_unused()
    return config, out


def _float32(tree):
    """float32 numpy leaves: what `load_hf` (dtype float32) gives `pack`."""
    return jax.tree.map(lambda a: np.asarray(a, np.float32), tree)


def _pack_layer(config: BitNetConfig, layer: dict) -> dict:
    """One layer's serving parameters from its training parameters (no leading layer axis)."""
    out = {"self_attn": {}, "mlp": {}}
    for block, shapes in config.linear_shapes.items():
        for name, (k, n) in shapes.items():
            source = layer[block][name]
            t_nk, w_scale = ternary_codes(source, k, n, config.weight_quant)
            if w_scale.ndim == 2:  # [K / G, N] per group of inputs: TQ2G tiles, and their scales so
                packed = {"w_packed": layout.pack_ternary_tiles(t_nk), "w_scale": layout.tile_group_scales(w_scale)}
            else:
                packed = {"w_packed": layout.pack_ternary(t_nk), "w_scale": w_scale}
            out[block][name] = packed
            if "rms_norm" in source:
                out[block][name]["rms_norm"] = _to_numpy(source["rms_norm"])
        for norm in ("attn_sub_norm", "ffn_sub_norm"):
            if norm in layer[block]:
                out[block][norm] = _to_numpy(layer[block][norm])
    for norm in ("input_layernorm", "post_attention_layernorm"):
        out[norm] = _to_numpy(layer[norm])
    return out


def _to_numpy(tree):
    return jax.tree.map(np.asarray, tree)


def _check_packable(config: BitNetConfig, lm_head: str):
    if config.weight_quant == "none":
        raise BitNetError(
            "pack: weight_quant='none' (the full-precision baseline) has no ternary weights to "
            "pack. Serve it unpacked (generate(..., backend='xla') on its training parameters)."
        )
    if config.act_quant != "token":
        raise BitNetError(
            f"pack: act_quant={config.act_quant!r} has no packed kernel (the kernels quantize activations per "
            "token). Serve this model unpacked (generate(..., backend='xla'))."
        )
    check_lm_head(lm_head, config.tie_word_embeddings, "pack")
