"""GGUF import and export (`bitnet_jax/interop/gguf*.py`).

The fixtures are small GGUF files written here with the `gguf` package's GGUFWriter, each ternary
format laid out from its own documentation, not by the code under test:
  I2_S   bitnet.cpp's x86 layout (32-byte chunks of 128 codes, bits 7-6 first, then a float32
         scale in a 32-byte tail), written weight by weight below (`_i2_s_bytes`);
  TQ2_0 / TQ1_0  llama.cpp's converter path: the float weights t * s quantized by
         `gguf.quants.quantize` (which sets each block's d to its absmax), or, as upstream
         llama.cpp's 'bitnet' converter does, codes with d = 1 and a per-tensor `.scale` tensor.
Odd shapes: GQA and MHA, tied and untied, inputs not a multiple of 256 (I2_S allows 128s).
The expected logits come from the fake-quant training model `BitNetLM(config)` on master weights
that its own absmean quantizer turns into the fixture's ternary values and scales.
"""

import functools
import json
import os
import re

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict
from near_ties import assert_same_forward, jitted_forward

from bitnet_jax import BitNetConfig, BitNetError, BitNetLM, init_params, load_gguf, load_model, pack, save_packed
from bitnet_jax.cli import main
from bitnet_jax.data.tokenizer import copy_tokenizer, load_tokenizer
from bitnet_jax.data.tokenizer_training import train_sentencepiece
from bitnet_jax.interop import gguf_export
from bitnet_jax.interop.gguf import Metadata, open_gguf
from bitnet_jax.interop.gguf_export import quantize_q6_k, save_gguf
from bitnet_jax.interop.gguf_vocab import LLAMA3_SPLIT, add_vocab, gguf_tokenizer
from bitnet_jax.kernels import layout
from bitnet_jax.kernels.ops import ServingSpec
from bitnet_jax.model.serving_layers import serving_variables

HF_FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "hf", "packed_bitlinear")  # its tokenizer
TQ = {"tq2_0": gguf.GGMLQuantizationType.TQ2_0, "tq1_0": gguf.GGMLQuantizationType.TQ1_0}
LINEARS = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output"}
LINEARS |= {"gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
IDS = jnp.array([[417, 5, 17, 200, 33, 301, 64, 9, 120, 250]])


# --- an independent writer ----------------------------------------------------------------------


I2_S_CHUNKS = {"x86": 128, "arm": 64}  # QK_I2_S of bitnet.cpp's x86 and ARM builds


def _i2_s_bytes(t_nk, scale, layout="x86"):
    """bitnet.cpp's I2_S (`quantize_i2_s`): with C = QK_I2_S (128 on x86, 64 on ARM) and B = C / 4,
    weight j of the row-major tensor, in chunk j // C at position p = j % C, is 2 bits of byte
    B * (j // C) + p % B at bit 6 - 2 * (p // B), as code t + 1; the n / 4 code bytes are followed
    by the f32 scale and 28 bytes of padding."""
    chunk = I2_S_CHUNKS[layout]
    span = chunk // 4
    flat = np.asarray(t_nk).reshape(-1)
    j = np.arange(flat.size)
    out = np.zeros(flat.size // 4 + 32, np.uint8)
    p = j % chunk
    np.bitwise_or.at(out, span * (j // chunk) + p % span, ((flat + 1) << (6 - 2 * (p // span))).astype(np.uint8))
    out[flat.size // 4 : flat.size // 4 + 4] = np.frombuffer(np.float32(scale).tobytes(), np.uint8)
    return out.view(np.int8)


def _shapes(c):
    qo, kv, d, f = (
        c.num_attention_heads * c.head_dim,
        c.num_key_value_heads * c.head_dim,
        c.hidden_size,
        c.intermediate_size,
    )
    out_in = {"q_proj": (qo, d), "k_proj": (kv, d), "v_proj": (kv, d), "o_proj": (d, qo)}
    return out_in | {"gate_proj": (f, d), "up_proj": (f, d), "down_proj": (d, f)}


def make_case(c, seed):
    """Ternary codes and scales of every linear, norms and tables: (layers, ends) as numpy."""
    rng = np.random.default_rng(seed)
    layers = []
    for _ in range(c.num_hidden_layers):
        layer = {}
        for name, (n, k) in _shapes(c).items():
            t = rng.choice(np.array([-1, 0, 1], np.int8), size=(n, k), p=[0.3, 0.4, 0.3])
            if c.weight_group_size:  # a scale per (output row, 256 inputs): f16 numbers, as TQ blocks store them
                s = rng.uniform(0.5, 2.0, (n, k // 256)).astype(np.float16).astype(np.float32)
            else:
                s = np.float32(np.float16(rng.uniform(0.5, 2.0)))  # f16: TQ's d holds it exactly
            layer[name] = (t, s)
        for norm, width in (("attn_norm", c.hidden_size), ("ffn_norm", c.hidden_size)):
            layer[norm] = rng.uniform(0.5, 1.5, width).astype(np.float32)
        layer["attn_sub_norm"] = rng.uniform(0.5, 1.5, c.num_attention_heads * c.head_dim).astype(np.float32)
        layer["ffn_sub_norm"] = rng.uniform(0.5, 1.5, c.intermediate_size).astype(np.float32)
        layers.append(layer)
    ends = {
        "token_embd": rng.normal(0, 1, (c.vocab_size, c.hidden_size)).astype(np.float32),
        "output_norm": rng.uniform(0.5, 1.5, c.hidden_size).astype(np.float32),
    }
    if not c.tie_word_embeddings:
        ends["output"] = rng.normal(0, 0.5, (c.vocab_size, c.hidden_size)).astype(np.float32)
    return layers, ends


def write_fixture(
    path, c, layers, ends, *, arch, fmt, tables, upstream_scale=False, meta=None, skip=(), hook=None, i2s_layout="x86"
):
    """A GGUF file as bitnet.cpp's / llama.cpp's converters lay it out. `tables` maps token_embd /
    output to a ggml type name; returns the float tables the file holds (as its readers decode them)."""
    tok = load_tokenizer(HF_FIXTURE)
    w = gguf.GGUFWriter(path, arch)
    keys = {
        f"{arch}.context_length": c.max_position_embeddings,
        f"{arch}.embedding_length": c.hidden_size,
        f"{arch}.block_count": c.num_hidden_layers,
        f"{arch}.feed_forward_length": c.intermediate_size,
        f"{arch}.attention.head_count": c.num_attention_heads,
        f"{arch}.attention.head_count_kv": c.num_key_value_heads,
        f"{arch}.rope.dimension_count": c.head_dim,
        "tokenizer.ggml.bos_token_id": c.bos_token_id,
        "tokenizer.ggml.eos_token_id": c.eos_token_id,
    }
    for key, value in keys.items():
        w.add_uint32(key, value)
    w.add_float32(f"{arch}.rope.freq_base", c.rope_theta)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", c.rms_norm_eps)
    if arch == "bitnet":
        w.add_string("bitnet.hidden_activation", c.hidden_act)
    with open(os.path.join(HF_FIXTURE, "tokenizer.json")) as f:
        spec = json.load(f)
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", "gpt2")
    w.add_array("tokenizer.ggml.tokens", [tok.id_to_token(i) for i in range(tok.vocab_size)])
    w.add_array("tokenizer.ggml.token_type", [3 if i >= 417 else 1 for i in range(tok.vocab_size)])
    w.add_array("tokenizer.ggml.merges", [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    w.add_string("tokenizer.chat_template", "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    for key, (kind, value) in (meta or {}).items():
        getattr(w, f"add_{kind}")(key, value)
    decoded = {}
    for name in ("token_embd", "output"):
        if name not in ends:
            continue
        kind, table = tables[name], ends[name]
        if kind == "F16":
            data, raw = table.astype(np.float16), None
        elif kind == "Q6_K":  # gguf.quants has no Q6_K quantizer: random valid blocks
            rng = np.random.default_rng(7)
            blocks = rng.integers(0, 256, (table.shape[0] * table.shape[1] // 256, 210), dtype=np.uint8)
            blocks[:, -2:] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
            data, raw = blocks.reshape(table.shape[0], -1), gguf.GGMLQuantizationType.Q6_K
        else:
            raw = gguf.GGMLQuantizationType[kind]
            data = gguf.quants.quantize(table, raw)
        decoded[name] = gguf.quants.dequantize(data, raw) if raw is not None else data.astype(np.float32)
        w.add_tensor(f"{name}.weight", data, raw_dtype=raw)
    w.add_tensor("output_norm.weight", ends["output_norm"])
    for i, layer in enumerate(layers):
        for norm in ("attn_norm", "ffn_norm", "attn_sub_norm", "ffn_sub_norm"):
            w.add_tensor(f"blk.{i}.{norm}.weight", layer[norm])
        for ours, theirs in LINEARS.items():
            name = f"blk.{i}.{theirs}.weight"
            if name in skip:
                continue
            t, s = layer[ours]
            n, k = t.shape
            if fmt == "i2_s":
                w.add_tensor(name, _i2_s_bytes(t, s, i2s_layout), raw_shape=(n, k), raw_dtype=36)
            elif (
                upstream_scale and i == 0 and np.ndim(s) == 0
            ):  # llama.cpp's 'bitnet' on layer 0: codes with d = 1, then .scale
                w.add_tensor(name, gguf.quants.quantize(t.astype(np.float32), TQ[fmt]), raw_dtype=TQ[fmt])
                w.add_tensor(f"blk.{i}.{theirs}.scale", np.array([s], np.float32))
            else:  # the float weights t * s, quantized with d = each block's absmax
                s_nk = np.repeat(s, 256, axis=1) if np.ndim(s) else s
                w.add_tensor(name, gguf.quants.quantize(t * s_nk, TQ[fmt]), raw_dtype=TQ[fmt])
    if hook:
        hook(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return decoded


def master_params(c, layers, ends, decoded):
    """Training parameters whose absmean quantizer gives back each layer's (t, s): W = t * s / p,
    p the fraction of non-zero codes in the granule (as `interop/hf.py` maps offline weights)."""
    stacked = {}
    for i, layer in enumerate(layers):
        tree = {"self_attn": {}, "mlp": {}}
        for name in _shapes(c):
            t, s = layer[name]
            t = t.astype(np.float32)
            if np.ndim(s):
                g = t.reshape(t.shape[0], -1, 256)
                p = np.maximum(np.mean(g != 0, axis=-1, keepdims=True), 1 / 256)
                w_nk = (g * s[..., None] / p).reshape(t.shape)
            else:
                w_nk = t * s / max(np.mean(t != 0), 1 / t.size)
            block = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            tree[block][name] = {"kernel": w_nk.T}
        tree["input_layernorm"] = {"weight": layer["attn_norm"]}
        tree["post_attention_layernorm"] = {"weight": layer["ffn_norm"]}
        tree["self_attn"]["attn_sub_norm"] = {"weight": layer["attn_sub_norm"]}
        tree["mlp"]["ffn_sub_norm"] = {"weight": layer["ffn_sub_norm"]}
        for path, value in flatten_dict(tree).items():
            stacked.setdefault(path, []).append(value)
    params = {"layers": unflatten_dict({k: np.stack(v) for k, v in stacked.items()})}
    params["embed_tokens"] = {"embedding": decoded["token_embd"]}
    params["norm"] = {"weight": ends["output_norm"]}
    if "output" in decoded:
        params["lm_head"] = {"kernel": decoded["output"].T}
    return jax.tree.map(jnp.asarray, params)


@functools.lru_cache(maxsize=None)
def _forward(config, backend):
    """One jitted forward per model (compiling dominates this file's time)."""
    return jax.jit(BitNetLM(config, ServingSpec(backend, "float")).apply)


def serving_logits(config, params, backend):
    return np.asarray(_forward(config, backend)(serving_variables(jax.tree.map(jnp.asarray, params)), IDS))


CASES = {  # name: (config overrides, arch, format, tables, group scales, upstream .scale tensors)
    "i2_s_gqa_tied_k384": (
        dict(hidden_size=384, intermediate_size=640, num_attention_heads=6, num_key_value_heads=2),
        "bitnet-b1.58", "i2_s", {"token_embd": "F16"}, False, False,
    ),
    "tq2_0_mha_untied_both_scale_styles": (
        dict(hidden_size=256, intermediate_size=768, num_attention_heads=2, num_key_value_heads=2,
             tie_word_embeddings=False),
        "bitnet-b1.58", "tq2_0", {"token_embd": "Q8_0", "output": "BF16"}, False, True,
    ),
    "tq1_0_groups_silu": (
        dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, hidden_act="silu"),
        "bitnet", "tq1_0", {"token_embd": "Q6_K"}, True, False,
    ),
}  # fmt: skip


def _config(**overrides):
    base = dict(vocab_size=419, num_hidden_layers=2, bos_token_id=417, eos_token_id=418, max_position_embeddings=256)
    return BitNetConfig(**(base | overrides))


@pytest.mark.parametrize("case", sorted(CASES))
def test_import_gives_the_fake_quant_logits(case, tmp_path):
    overrides, arch, fmt, tables, groups, upstream = CASES[case]
    c = _config(**overrides, weight_quant="group:256" if groups else "tensor")
    layers, ends = make_case(c, seed=len(case))
    path = str(tmp_path / f"{case}.gguf")
    decoded = write_fixture(path, c, layers, ends, arch=arch, fmt=fmt, tables=tables, upstream_scale=upstream)
    if c.tie_word_embeddings:
        config, params = load_gguf(path, lm_head="float")
    else:  # read as the lm_head, saying that the engines ignore it
        with pytest.warns(UserWarning, match="output.weight.*never read it"):
            config, params = load_gguf(path, lm_head="float")
    assert config == c
    for i, layer in enumerate(layers):  # the codes and scales of the file, exactly
        for name in LINEARS:
            t, s = layer[name]
            block = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            got = params["layers"][block][name]
            assert np.array_equal(_unpack(got["w_packed"][i], *t.shape, grouped=bool(groups)), t), name
            if groups:  # TQ2G's tiled scales
                assert np.array_equal(layout.untile_group_scales(got["w_scale"][i], t.shape[0]), s.T), name
            else:
                assert np.array_equal(got["w_scale"][i], np.array([s], np.float32)), name
    # The same forward up to the order of float sums and the training scale (a float32 mean of
    # |W|, within a few ulps of s): every difference beyond float noise must be an int8 code that
    # flipped at a near-tie (tests/near_ties.py, the rule the serving tests use).
    backend = "xla" if groups else "ffi"
    assert_same_forward(
        *jitted_forward(BitNetLM(c), {"params": master_params(c, layers, ends, decoded)}, IDS),
        *jitted_forward(BitNetLM(config, ServingSpec(backend, "float")), serving_variables(_on_device(params)), IDS),
    )


def test_arm_i2_s_layout(tmp_path):
    """bitnet.cpp built for ARM writes I2_S in 64-weight chunks of 16 bytes. Read with
    i2s_layout='arm', a file from the independent writer gives its codes and scales exactly, also at
    widths of 64s that the x86 layout's 128-weight chunks do not take; export writes the same bytes;
    read as x86 (the file does not say which), the codes come out shuffled."""
    c = _config(hidden_size=320, intermediate_size=576, num_attention_heads=5, num_key_value_heads=5)
    layers, ends = make_case(c, seed=11)
    path = str(tmp_path / "arm.gguf")
    tables = {"token_embd": "F16"}
    write_fixture(path, c, layers, ends, arch="bitnet-b1.58", fmt="i2_s", tables=tables, i2s_layout="arm")
    config, params = load_gguf(path, lm_head="float", i2s_layout="arm")
    assert config == c
    for i, layer in enumerate(layers):
        for name in LINEARS:
            t, s = layer[name]
            block = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            got = params["layers"][block][name]
            assert np.array_equal(_unpack(got["w_packed"][i], *t.shape, grouped=False), t), name
            assert np.array_equal(got["w_scale"][i], np.array([s], np.float32)), name

    out = str(tmp_path / "again.gguf")
    save_gguf(out, config, params, load_tokenizer(HF_FIXTURE), format="i2_s", lm_head="f16", i2s_layout="arm")
    theirs, ours = open_gguf(path), open_gguf(out)
    for name in (f"blk.1.{gguf_name}.weight" for gguf_name in LINEARS.values()):
        want = next(t.data for t in theirs.tensors if t.name == name)
        assert np.array_equal(next(t.data for t in ours.tensors if t.name == name), want), name
    with pytest.raises(BitNetError, match="hidden_size=320 is not a multiple of 128"):
        save_gguf(str(tmp_path / "x86.gguf"), config, params, load_tokenizer(HF_FIXTURE), format="i2_s")

    _, as_x86 = load_gguf(path, lm_head="float")  # 320 x 320 and 576 x 320 are whole 128-chunks too
    q = as_x86["layers"]["self_attn"]["q_proj"]["w_packed"][0]
    assert not np.array_equal(q, params["layers"]["self_attn"]["q_proj"]["w_packed"][0])
    with pytest.raises(BitNetError, match=r"i2s_layout='risc-v': expected one of \['arm', 'x86'\]"):
        load_gguf(path, i2s_layout="risc-v")


def test_cli_convert_arm_i2_s(tmp_path, capsys):
    src = _packed_source(tmp_path, "i2_s", "float")
    out = tmp_path / "arm.gguf"
    assert main(["convert", str(src), str(out), "--format", "i2_s", "--i2s-layout", "arm"]) == 0
    assert "I2_S ternary layers, arm layout" in capsys.readouterr().out
    assert main(["convert", str(out), str(tmp_path / "back"), "--i2s-layout", "arm"]) == 0
    config, params, _ = load_model(str(tmp_path / "back"))
    want = load_model(str(src))[1]
    for block, name in (("self_attn", "o_proj"), ("mlp", "down_proj")):
        assert np.array_equal(params["layers"][block][name]["w_packed"], want["layers"][block][name]["w_packed"])
    with pytest.raises(SystemExit):  # argparse: not one of the choices
        main(["convert", str(out), str(tmp_path / "bad"), "--i2s-layout", "mips"])
    assert "invalid choice: 'mips'" in capsys.readouterr().err


def _on_device(params):
    return jax.tree.map(jnp.asarray, params)


def _unpack(w_packed, n, k, grouped):
    """The codes of packed weights: TQ2G tiles for a model with group scales, TQ2B otherwise."""
    from bitnet_jax.kernels import layout

    return jax.jit(layout.unpack_codes, static_argnums=(1, 2, 3))(w_packed, n, k, grouped)


def test_tokenizer_and_chat_template_from_metadata(tmp_path):
    overrides, arch, fmt, tables, _, _ = CASES["i2_s_gqa_tied_k384"]
    c = _config(**overrides)
    path = str(tmp_path / "m.gguf")
    write_fixture(path, c, *make_case(c, 0), arch=arch, fmt=fmt, tables=tables)
    config, params, tokenizer = load_model(path)
    reference = load_tokenizer(HF_FIXTURE)
    text = "def f(x):\n    return x + 1  # héllo <|end_of_text|>"
    assert tokenizer.encode(text) == reference.encode(text)
    assert (tokenizer.bos_id, tokenizer.eos_id) == (417, 418)
    assert tokenizer.decode(reference.encode(text)) == reference.decode(reference.encode(text))
    from bitnet_jax.serve.chat import chat_template

    assert chat_template(path) == "{% for m in messages %}{{ m['content'] }}{% endfor %}"


def _write_vocab_only(path, tokenizer, config):
    """A GGUF file holding only the tokenizer metadata that export writes."""
    writer = gguf.GGUFWriter(path, "bitnet")
    add_vocab(writer, tokenizer, config, None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_llama3_pre_tokenizer_round_trip(tmp_path):
    """A LLaMA-3-style tokenizer.json (split regex, then byte level; `ignore_merges`) -> GGUF
    metadata ('llama-bpe') -> the tokenizer rebuilt from them: the same ids."""
    with open(os.path.join(HF_FIXTURE, "tokenizer.json")) as f:
        spec = json.load(f)
    spec["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        ],
    }
    spec["model"]["ignore_merges"] = True
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text(json.dumps(spec))
    reference = load_tokenizer(tmp_path / "tok", bos_id=417, eos_id=418)
    c = _config()
    path = str(tmp_path / "v.gguf")
    _write_vocab_only(path, reference, c)
    meta = Metadata(open_gguf(path), path)
    assert meta.string("tokenizer.ggml.pre") == "llama-bpe"
    text = "Hello  world!! 1234567 it's\n\n   x = f(y)  # done<|end_of_text|>"
    assert gguf_tokenizer(meta, c).encode(text) == reference.encode(text)


# --- export ---------------------------------------------------------------------------------------


def _model(fmt, weight_quant="tensor"):
    """A small model for `fmt`'s engine (i2_s: bitnet.cpp's relu2 MLP; TQ: llama.cpp's SiLU one)."""
    c = _config(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)
    return c.replace(hidden_act="relu2" if fmt == "i2_s" else "silu", weight_quant=weight_quant)


@functools.lru_cache(maxsize=None)
def _trained_like(c):
    """Training parameters with f16-exact embeddings (the exported table is f16); one per config."""
    params = init_params(c, 0)
    emb = params["embed_tokens"]["embedding"]
    params["embed_tokens"]["embedding"] = (emb * 30).astype(jnp.float16).astype(jnp.float32)
    return params


@pytest.mark.parametrize("fmt", ["i2_s", "tq2_0", "tq1_0"])
def test_export_import_round_trip(fmt, tmp_path):
    group = fmt == "tq1_0"
    c = _model(fmt, "group:256" if group else "tensor")
    packed = pack(c, _trained_like(c), lm_head="float")
    if group:  # TQ block scales are f16: a model whose group scales are f16 numbers fits exactly
        for lin in (v for block in packed["layers"].values() for v in block.values() if "w_scale" in v):
            lin["w_scale"] = np.asarray(lin["w_scale"]).astype(np.float16).astype(np.float32)
    path = str(tmp_path / f"m.{fmt}.gguf")
    save_gguf(path, c, packed, load_tokenizer(HF_FIXTURE), format=fmt)
    config, params = load_gguf(path, lm_head="float")
    assert config == c
    got, want = flatten_dict(params), flatten_dict(packed)
    assert sorted(got) == sorted(want)
    for key in want:
        assert np.array_equal(np.asarray(got[key]), np.asarray(want[key])), key
    backend = "xla" if group else "ffi"
    np.testing.assert_array_equal(serving_logits(config, params, backend), serving_logits(c, packed, backend))
    # The engine-facing metadata: the architecture, and llama.cpp's per-tensor scales for TQ.
    reader = open_gguf(path)
    assert reader.fields["general.architecture"].contents() == gguf_export.ARCH_OF[fmt]
    names = {t.name for t in reader.tensors}
    assert ("blk.0.attn_q.scale" in names) == (fmt == "tq2_0")


def _packed_source(tmp_path, fmt, lm_head):
    """A packed folder of `_model(fmt)` with the fixture's tokenizer: a `convert` source."""
    src = tmp_path / "packed"
    save_packed(str(src), _model(fmt), pack(_model(fmt), _trained_like(_model(fmt)), lm_head=lm_head))
    copy_tokenizer(load_tokenizer(HF_FIXTURE), src)
    return src


def test_cli_convert_both_ways_and_generate(tmp_path, capsys):
    c = _model("tq2_0")
    src = _packed_source(tmp_path, "tq2_0", "int8-tied")
    out = tmp_path / "m.gguf"
    assert main(["convert", str(src), str(out), "--format", "tq2_0", "--lm-head", "q8_0"]) == 0
    assert main(["convert", str(out), str(tmp_path / "back")]) == 0
    config, params, tokenizer = load_model(str(tmp_path / "back"))
    assert config == c and tokenizer.encode("hello") == load_tokenizer(HF_FIXTURE).encode("hello")
    capsys.readouterr()
    assert main(["generate", "--model", str(out), "--prompt", "def", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("def")


def test_sentencepiece_vocab_round_trip(tmp_path):
    sp = train_sentencepiece([], 300, tmp_path / "sp", texts=["def f(x):\n    return x + 1  # ok\n" * 40])
    c = _config(vocab_size=300, bos_token_id=sp.bos_id, eos_token_id=sp.eos_id, pad_token_id=sp.pad_id)
    path = str(tmp_path / "v.gguf")
    _write_vocab_only(path, sp, c)
    tokenizer = gguf_tokenizer(Metadata(open_gguf(path), path), c)
    text = "def g(y):\n\treturn  y * 2  # ünïcode ok"
    assert tokenizer.encode(text) == sp.encode(text)
    assert tokenizer.decode(sp.encode(text)) == sp.decode(sp.encode(text)) == text


def test_q6_k_quantizer_matches_the_gguf_decoder():
    w = np.random.default_rng(0).normal(0, 1, (8, 512)).astype(np.float32)
    back = gguf.quants.dequantize(quantize_q6_k(w), gguf.GGMLQuantizationType.Q6_K)
    # Each 16-weight run has step d * scale >= max|w| / 31 (rounded to int8 scales of an f16 d):
    # the error is at most half a step, plus the scale's own rounding (< 1%).
    step = np.abs(w).reshape(-1, 16).max(axis=1, keepdims=True) / 31
    assert np.all(np.abs(back - w).reshape(-1, 16) <= 0.51 * step * 1.02 + 1e-6)


@pytest.mark.parametrize(
    "quant, fmt, says",
    [
        ("channel", "i2_s", "packed bitnet-jax folder"),
        ("group:256", "i2_s", "--format tq2_0"),
        ("group:128", "tq2_0", "only 'group:256' or 'tensor'"),
        ("tensor", "tq2_0", "SiLU-gated MLP. Use --format i2_s"),  # a relu2 model into llama.cpp's graph
    ],
)
def test_export_refuses_what_the_format_cannot_hold(quant, fmt, says, tmp_path):
    c = _config(
        hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, weight_quant=quant
    )
    with pytest.raises(BitNetError, match=re.escape(says)):
        save_gguf(tmp_path / "x.gguf", c, None, load_tokenizer(HF_FIXTURE), format=fmt)  # refused before reading
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("fmt", ["i2_s", "tq2_0"])
@pytest.mark.parametrize(
    "overrides, says",
    [
        # bitnet.cpp's bitnet-b1.58 graph (and llama.cpp's 'bitnet' one) multiplies by token_embd and
        # never uses an output.weight; it sizes attn_sub_norm to hidden_size and refuses other widths.
        (dict(tie_word_embeddings=False), "never uses it), and this model's lm_head is untied"),
        (dict(head_dim=128), "of hidden_size=256 (attn_sub_norm has that width); this model's are 512 wide"),
    ],
)
def test_export_refuses_what_the_engines_do_not_run(overrides, says, fmt, tmp_path):
    c = _model(fmt).replace(**overrides)
    with pytest.raises(BitNetError, match=re.escape(says)):
        save_gguf(tmp_path / "x.gguf", c, None, load_tokenizer(HF_FIXTURE), format=fmt)  # refused before reading
    assert os.listdir(tmp_path) == []


def test_export_refuses_non_f16_group_scales_and_leaves_nothing(tmp_path):
    c = _model("tq2_0", "group:256")
    with pytest.raises(BitNetError, match="not an f16 number"):
        save_gguf(tmp_path / "x.gguf", c, _trained_like(c), load_tokenizer(HF_FIXTURE), format="tq2_0")
    assert os.listdir(tmp_path) == []


def test_a_failure_while_writing_leaves_no_file(tmp_path, monkeypatch):
    c = _model("i2_s")

    def fail_midway(self, *args, **kwargs):
        self.fout[0].write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", fail_midway)
    with pytest.raises(OSError, match="disk full"):
        save_gguf(tmp_path / "x.gguf", c, _trained_like(c), load_tokenizer(HF_FIXTURE), format="i2_s")
    assert os.listdir(tmp_path) == []


# --- bad input --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    c = _config(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)
    return c, make_case(c, 3), tmp_path_factory.mktemp("bad")


def _bad(small, name, **kw):
    c, (layers, ends), folder = small
    path = str(folder / f"{name}.gguf")
    write_fixture(path, c, layers, ends, fmt=kw.pop("fmt", "tq2_0"), tables={"token_embd": "F16"}, **kw)
    return path


def test_other_architecture_is_refused(small):
    path = _bad(small, "llama", arch="llama")
    with pytest.raises(BitNetError, match=r"general.architecture is 'llama'.*bitnet-b1.58"):
        load_gguf(path)


def test_truncated_file_is_refused(small):
    path = _bad(small, "whole", arch="bitnet")
    cut = path.replace("whole", "cut")
    with open(path, "rb") as f, open(cut, "wb") as g:
        g.write(f.read()[: os.path.getsize(path) // 2])
    with pytest.raises(BitNetError, match=f"{cut}.*truncated or corrupt"):
        load_gguf(cut)


def test_unknown_and_unsupported_tensor_types_are_refused(small):
    def odd(w):
        w.add_tensor("blk.0.extra.weight", np.zeros(64, np.int8), raw_shape=(256,), raw_dtype=99)

    with pytest.raises(BitNetError, match="blk.0.extra.weight has type id 99"):
        load_gguf(_bad(small, "unknown", arch="bitnet", hook=odd))
    c, (layers, ends), folder = small

    def q4(w):
        t, s = layers[0]["q_proj"]
        w.add_tensor("blk.0.attn_q.weight", gguf.quants.quantize(t * s, gguf.GGMLQuantizationType.Q4_0),
                     raw_dtype=gguf.GGMLQuantizationType.Q4_0)  # fmt: skip

    path = _bad(small, "q4", arch="bitnet", skip={"blk.0.attn_q.weight"}, hook=q4)
    with pytest.raises(BitNetError, match="blk.0.attn_q.weight is Q4_0; expected I2_S, TQ1_0 or TQ2_0"):
        load_gguf(path)


def test_wrong_shape_and_missing_tensor_are_refused(small):
    c, (layers, ends), folder = small

    def short_k(w):
        t, s = layers[1]["k_proj"]
        w.add_tensor("blk.1.attn_k.weight", gguf.quants.quantize(t[:64] * s, TQ["tq2_0"]), raw_dtype=TQ["tq2_0"])

    path = _bad(small, "shape", arch="bitnet", skip={"blk.1.attn_k.weight"}, hook=short_k)
    with pytest.raises(
        BitNetError, match=r"blk.1.attn_k.weight has shape \[64, 256\]; the metadata imply \[128, 256\]"
    ):
        load_gguf(path)
    path = _bad(small, "missing", arch="bitnet", skip={"blk.1.ffn_down.weight"})
    with pytest.raises(BitNetError, match="tensor blk.1.ffn_down.weight is missing"):
        load_gguf(path)


def test_metadata_key_of_the_wrong_type_is_refused(small):
    path = _bad(small, "meta", arch="bitnet", meta={"bitnet.block_count": ("string", "two")})
    with pytest.raises(BitNetError, match="metadata key bitnet.block_count is STRING; expected an integer"):
        load_gguf(path)
