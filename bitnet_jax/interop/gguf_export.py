"""GGUF export: a bitnet-jax model -> a file for the engine that owns the format (`save_gguf`).

  format  architecture    engine      ternary tensors
  i2_s    'bitnet-b1.58'  bitnet.cpp  I2_S (x86 or ARM layout), one float32 scale per tensor in its tail
  tq2_0   'bitnet'        llama.cpp   TQ2_0 blocks with d = 1, the scale in `blk.i.<linear>.scale`
  tq1_0   'bitnet'        llama.cpp   TQ1_0, likewise
(layouts: `interop/gguf.py`). A 'group:256' model goes to TQ2_0 / TQ1_0 with each block's d its
group's scale. Nothing is approximated: a model that a format cannot hold exactly is refused with
a message that names one that can (per-channel scales fit none of them; 'group:256' scales only
TQ*, and only when they are f16 numbers; llama.cpp's 'bitnet' graph is SiLU-gated: relu2 models
such as 2B4T go to I2_S). Both engines' graphs multiply the final hidden state by the token
embedding (bitnet.cpp loads an `output.weight` and never uses it) and size `attn_sub_norm` to
the model's width, so an untied lm_head, and q / o projections narrower or wider than the model,
fit no GGUF file. The token embedding is written as `lm_head`: 'f16', 'q8_0' or 'q6_k'; that is
the one lossy choice, the user's.

The file is written under a temporary name in the target's folder and renamed when complete.
"""

from __future__ import annotations

import os

import numpy as np

from bitnet_jax.errors import BitNetError
from bitnet_jax.interop.gguf import I2_S, I2_S_TAIL, LINEARS, NORMS, TQ_BLOCK, i2_s_chunk
from bitnet_jax.interop.gguf_vocab import add_vocab
from bitnet_jax.model.config import BitNetConfig
from bitnet_jax.model.serving_layers import float_rows, ternary_codes

FORMATS = ("i2_s", "tq2_0", "tq1_0")
LM_HEAD_TYPES = ("f16", "q8_0", "q6_k")
ARCH_OF = {"i2_s": "bitnet-b1.58", "tq2_0": "bitnet", "tq1_0": "bitnet"}
_FILE_TYPE = {"i2_s": 40, "tq2_0": 37, "tq1_0": 36}  # llama_ftype: MOSTLY_I2_S (bitnet.cpp), MOSTLY_TQ2_0 / TQ1_0
_HIDDEN_ACT = {"relu2": "relu2", "silu": "silu"}


def encode_i2_s(t_nk: np.ndarray, scale: float, layout: str = "x86") -> np.ndarray:
    """Ternary [N, K] and its scale -> I2_S bytes [N*K/4 + 32] of `layout` ('x86' or 'arm'; see
    `interop/gguf.py`)."""
    span = i2_s_chunk(layout) // 4
    codes = (np.asarray(t_nk, np.int8).reshape(-1, 4, span) + 1).astype(np.uint8)  # [chunk, 4, span]
    out = np.zeros(t_nk.size // 4 + I2_S_TAIL, np.uint8)
    out[: t_nk.size // 4] = (codes[:, 0] << 6 | codes[:, 1] << 4 | codes[:, 2] << 2 | codes[:, 3]).reshape(-1)
    out[t_nk.size // 4 : t_nk.size // 4 + 4] = np.frombuffer(np.float32(scale).tobytes(), np.uint8)
    return out


def encode_tq(t_nk: np.ndarray, qtype, block_scales_nb: np.ndarray | None) -> np.ndarray:
    """Ternary [N, K] -> TQ1_0 / TQ2_0 rows, each block's d its scale (1 when `block_scales_nb` is None)."""
    import gguf

    n, k = t_nk.shape
    rows = gguf.quants.quantize(np.asarray(t_nk, np.float32), qtype)  # codes exact: |t| <= 1 = d or 0
    blocks = rows.reshape(n * (k // TQ_BLOCK), -1)
    d = np.ones(n * (k // TQ_BLOCK), np.float16) if block_scales_nb is None else block_scales_nb.astype(np.float16)
    blocks[:, -2:] = d.reshape(-1, 1).view(np.uint8)
    return rows


def quantize_q6_k(w_nk: np.ndarray) -> np.ndarray:
    """Q6_K rows (ggml's block_q6_K: ql[128], qh[64], int8 scales[16], f16 d per 256 weights).

    A plain absmax quantizer (a scale per 16 weights, q in [-32, 31]), not llama.cpp's searched
    scales; the layout is the one `gguf.quants` dequantizes.
    """
    n, k = w_nk.shape
    x = np.asarray(w_nk, np.float32).reshape(-1, 16, 16)  # [block, sub, 16]
    sub_scale = np.abs(x).max(axis=-1) / 31.0  # [block, 16]
    d = (np.abs(sub_scale).max(axis=-1) / 127.0).astype(np.float16)  # [block]
    d32 = d.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        scales = np.where(d32[:, None] > 0, np.rint(sub_scale / d32[:, None]), 0).clip(-128, 127).astype(np.int8)
        step = d32[:, None] * scales.astype(np.float32)  # [block, 16]
        q = np.where(step[..., None] > 0, np.rint(x / step[..., None]), 0).clip(-32, 31).astype(np.int16) + 32
    q = q.reshape(-1, 2, 2, 64).astype(np.uint8)  # element 128h + 64s + l -> [block, h, s, l]
    ql = (q[:, :, 0] & 0xF) | ((q[:, :, 1] & 0xF) << 4)  # [block, h, 64]
    hi = (q >> 4).reshape(-1, 2, 2, 2, 32)  # [block, h, s, l // 32, l % 32]: bit pair 2 * (2s + l // 32)
    qh = hi[:, :, 0, 0] | hi[:, :, 0, 1] << 2 | hi[:, :, 1, 0] << 4 | hi[:, :, 1, 1] << 6  # [block, h, 32]
    blocks = np.concatenate(
        [ql.reshape(-1, 128), qh.reshape(-1, 64), scales.view(np.uint8), d.reshape(-1, 1).view(np.uint8)], axis=1
    )
    return blocks.reshape(n, -1)


def _check_exportable(config: BitNetConfig, fmt: str, lm_head: str, i2s_layout: str) -> None:
    c = config
    if fmt not in FORMATS:
        raise BitNetError(f"--format {fmt!r}: expected one of {FORMATS}.")
    if lm_head not in LM_HEAD_TYPES:
        raise BitNetError(f"--lm-head {lm_head!r}: expected one of {LM_HEAD_TYPES} for a GGUF file.")
    keep = "Keep it as a packed bitnet-jax folder (bitnet-jax convert SRC DST)"
    if c.weight_quant == "none":
        raise BitNetError("GGUF export: weight_quant='none' has no ternary weights.")
    if c.weight_quant == "channel":
        raise BitNetError(
            f"GGUF export: weight_quant='channel' (one scale per output row) fits none of I2_S (one scale "
            f"per tensor) or TQ1_0 / TQ2_0 (f16 scales per 256 weights) exactly. {keep}."
        )
    group = c.weight_group_size
    if group and fmt == "i2_s":
        raise BitNetError(
            f"GGUF export: weight_quant={c.weight_quant!r} has a scale per group of inputs, and I2_S one per "
            + (
                "tensor; use --format tq2_0 or tq1_0 (a scale per 256 weights)."
                if group == TQ_BLOCK
                else f"tensor. {keep}."
            )
        )
    if group and group != TQ_BLOCK:
        raise BitNetError(
            f"GGUF export: weight_quant={c.weight_quant!r}; TQ1_0 / TQ2_0 hold one scale per 256 weights, "
            f"so only 'group:256' or 'tensor' models fit. {keep}."
        )
    if c.hadamard:
        raise BitNetError(
            f"GGUF export: hadamard={c.hadamard}; bitnet.cpp and llama.cpp do not rotate the inputs of o_proj and "
            f"down_proj (BitNet v2), which this model's weights expect. {keep}."
        )
    if (c.act_quant, c.act_bits, c.linear_norm_eps) != ("token", 8, None):
        raise BitNetError(
            f"GGUF export: act_quant={c.act_quant!r}, act_bits={c.act_bits}, linear_norm_eps={c.linear_norm_eps}; "
            f"bitnet.cpp and llama.cpp run 8-bit per-token activations without a norm inside BitLinear. {keep}."
        )
    widths = {"hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size}
    widths["num_attention_heads*head_dim"] = c.num_attention_heads * c.head_dim
    chunk = i2_s_chunk(i2s_layout)
    unit = chunk if fmt == "i2_s" else TQ_BLOCK
    for name, width in widths.items():
        if width % unit:
            other = f" (--format i2_s takes multiples of {chunk})" if fmt != "i2_s" and width % chunk == 0 else ""
            raise BitNetError(
                f"GGUF export: {name}={width} is not a multiple of {unit}, the input width that "
                f"{fmt.upper()}'s kernels take{other}. {keep}."
            )
    if fmt == "i2_s" and c.hidden_act != "relu2":
        raise BitNetError(
            f"GGUF export: hidden_act={c.hidden_act!r}; bitnet.cpp's bitnet-b1.58 graph squares the ReLU. "
            "Use --format tq2_0 (llama.cpp reads the activation from the file)."
        )
    if fmt != "i2_s" and c.hidden_act != "silu":
        # llama.cpp's 'bitnet' graph (src/models/bitnet.cpp) builds silu(gate) * up whatever the
        # metadata say: a relu2 model would run there, wrongly.
        raise BitNetError(
            f"GGUF export: hidden_act={c.hidden_act!r}, and llama.cpp's 'bitnet' graph computes a SiLU-gated "
            "MLP. Use --format i2_s (bitnet.cpp's bitnet-b1.58 graph squares the ReLU)."
        )
    # Both engines' graphs end with the token embedding as the lm_head (bitnet.cpp's build_bitnet_158
    # loads an output.weight and never uses it), and both create attn_sub_norm with hidden_size
    # entries (bitnet.cpp refuses the file otherwise: "tensor 'blk.0.attn_sub_norm.weight' has wrong
    # shape"). Checked in bitnet.cpp's llama.cpp tree of microsoft/BitNet 1876a3e.
    engines = "bitnet.cpp's bitnet-b1.58 graph and llama.cpp's 'bitnet' graph"
    if not c.tie_word_embeddings:
        raise BitNetError(
            f"GGUF export: {engines} use the token embedding as the lm_head (bitnet.cpp loads an "
            f"output.weight and never uses it), and this model's lm_head is untied. {keep}."
        )
    if c.num_attention_heads * c.head_dim != c.hidden_size:
        raise BitNetError(
            f"GGUF export: {engines} take q / o projections of hidden_size={c.hidden_size} (attn_sub_norm has "
            f"that width); this model's are {c.num_attention_heads * c.head_dim} wide. {keep}."
        )


def save_gguf(
    path: str | os.PathLike,
    config: BitNetConfig,
    params,
    tokenizer,
    *,
    format: str,
    lm_head: str = "f16",
    chat_template: str | None = None,
    name: str = "bitnet-jax",
    i2s_layout: str = "x86",
) -> None:
    """Writes `config`'s model (training or packed parameters) as a GGUF file of `format`
    ('i2_s', 'tq2_0', 'tq1_0'); `lm_head` ('f16', 'q8_0', 'q6_k') is the type of the token
    embedding, which the engines also use as the lm_head; `i2s_layout` ('x86' or 'arm') the
    I2_S code layout, for a bitnet.cpp built for that CPU. Refuses what the format cannot hold
    exactly."""
    import gguf

    _check_exportable(config, format, lm_head, i2s_layout)
    c = config
    path = os.fspath(path)
    arch = ARCH_OF[format]
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise BitNetError(f"GGUF export: the folder of {path!r} does not exist.")
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        _add_metadata(writer, c, format, name, arch)
        add_vocab(writer, tokenizer, c, chat_template)
        data, kw = _float_table(float_rows(params["embed_tokens"], c.hidden_size), lm_head)
        writer.add_tensor("token_embd.weight", data, **kw)
        writer.add_tensor("output_norm.weight", np.asarray(params["norm"]["weight"], np.float32))
        layers = params["layers"]
        for i in range(c.num_hidden_layers):
            for path_in_layer, gguf_name in NORMS.items():
                node = layers
                for part in path_in_layer:
                    node = node[part]
                writer.add_tensor(f"blk.{i}.{gguf_name}.weight", np.asarray(node["weight"][i], np.float32))
            for (block, our_name), gguf_name in LINEARS.items():
                source = layers[block][our_name]
                for tensor_name, data, kw in _linear_tensors(c, format, i, gguf_name, source, our_name, i2s_layout):
                    writer.add_tensor(tensor_name, data, **kw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _add_metadata(writer, c: BitNetConfig, fmt: str, name: str, arch: str) -> None:
    import gguf

    writer.add_name(name)
    writer.add_file_type(_FILE_TYPE[fmt])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(c.vocab_size)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_key_length(c.head_dim)
    writer.add_value_length(c.head_dim)
    writer.add_rope_dimension_count(c.head_dim)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    if arch == "bitnet":
        writer.add_string(f"{arch}.hidden_activation", _HIDDEN_ACT[c.hidden_act])


def _float_table(w_vd: np.ndarray, kind: str):
    """(data, add_tensor keywords) of a [V, D] table in `kind` ('f16', 'q8_0', 'q6_k')."""
    import gguf

    v, d = w_vd.shape
    if kind == "f16":
        return w_vd.astype(np.float16), {}
    block = 32 if kind == "q8_0" else 256
    if d % block:
        raise BitNetError(f"GGUF export: --lm-head {kind} needs hidden_size a multiple of {block}; it is {d}.")
    if kind == "q8_0":
        return gguf.quants.quantize(w_vd, gguf.GGMLQuantizationType.Q8_0), {"raw_dtype": gguf.GGMLQuantizationType.Q8_0}
    return quantize_q6_k(w_vd), {"raw_dtype": gguf.GGMLQuantizationType.Q6_K}


def _linear_tensors(c: BitNetConfig, fmt: str, i: int, gguf_name: str, source, our_name: str, i2s_layout: str):
    """(name, data, add_tensor keywords) of one layer's linear in `fmt`."""
    import gguf

    k, n = next(shapes[our_name] for shapes in c.linear_shapes.values() if our_name in shapes)
    # The serving codes and scales, exactly: unpacked, or quantized as `pack` quantizes them.
    t_nk, w_scale = ternary_codes({key: value[i] for key, value in source.items()}, k, n, c.weight_quant)
    name = f"blk.{i}.{gguf_name}"
    if fmt == "i2_s":
        # int8 view: the writer then neither needs nor converts a ggml type it does not know (I2_S).
        data = encode_i2_s(t_nk, float(w_scale.reshape(-1)[0]), i2s_layout).view(np.int8)
        return [(f"{name}.weight", data, {"raw_shape": (n, k), "raw_dtype": I2_S})]
    qtype = gguf.GGMLQuantizationType.TQ2_0 if fmt == "tq2_0" else gguf.GGMLQuantizationType.TQ1_0
    if w_scale.ndim == 2:  # [K / 256, N]: each block's d is its group's scale, which must be an f16 number
        exact = w_scale.astype(np.float16).astype(np.float32) == w_scale
        used = np.any(t_nk.reshape(n, k // TQ_BLOCK, TQ_BLOCK) != 0, axis=-1).T  # [K / 256, N]
        if not np.all(exact | ~used):
            bad = np.argwhere(~exact & used)[0]
            raise BitNetError(
                f"GGUF export: {name} group scale [{bad[0]}, {bad[1]}] = {w_scale[tuple(bad)]!r} is not an f16 "
                f"number, and {fmt.upper()} stores f16 block scales. Keep the model as a packed bitnet-jax folder "
                "(bitnet-jax convert SRC DST)."
            )
        return [(f"{name}.weight", encode_tq(t_nk, qtype, w_scale.T), {"raw_dtype": qtype})]
    return [
        (f"{name}.weight", encode_tq(t_nk, qtype, None), {"raw_dtype": qtype}),
        (f"{name}.scale", w_scale.reshape(1), {}),
    ]
