"""GGUF import: bitnet.cpp and llama.cpp BitNet files -> packed serving parameters (`load_gguf`).

The container is read by the `gguf` package's `GGUFReader` (metadata, tensor table, memory-mapped
data) and float / block types are decoded by its `gguf.quants` numpy code. The ternary layers go
straight to the packed serving layout (`kernels/layout.pack_ternary`): their 2-bit codes are
re-packed as int8 values {-1, 0, 1}, never multiplied by a scale.

Architectures (`general.architecture`) and tensor names (GGUF -> bitnet-jax, per layer i):
  'bitnet-b1.58'  bitnet.cpp (microsoft/BitNet's llama.cpp fork; BitNet b1.58 2B4T): relu2 MLP.
  'bitnet'        upstream llama.cpp: MLP activation from `bitnet.hidden_activation` ('silu' when
                  absent, as llama.cpp defaults; 'relu2' for 2B4T-style models).
  token_embd.weight [V, D] -> embed_tokens; output.weight (absent: tied) -> lm_head (with a
                  warning: both engines' graphs multiply by token_embd and never read it);
  output_norm.weight -> norm; blk.i.attn_norm / ffn_norm -> input_ / post_attention_layernorm;
  blk.i.attn_q / attn_k / attn_v / attn_output -> self_attn.q_proj / k_proj / v_proj / o_proj;
  blk.i.ffn_gate / ffn_up / ffn_down -> mlp.gate_proj / up_proj / down_proj;
  blk.i.attn_sub_norm / ffn_sub_norm -> self_attn.attn_sub_norm / mlp.ffn_sub_norm;
  blk.i.<linear>.scale (upstream llama.cpp, optional, F32 [1]): a per-tensor factor on the linear.
A linear weight [N out, K in] is stored row-major (ggml dims {K, N}); RoPE is the half-split
("NEOX") kind in both engines, so q / k rows are in Hugging Face order (no permutation).

Ternary tensor types:
  I2_S (type id 36, bitnet.cpp's; not in upstream ggml): the n = N*K codes of the whole tensor in
    row-major order, cut into chunks of 128 weights; chunk c is 32 bytes, and byte c*32 + p holds
    weights 128c + p (bits 7-6), 128c + 32 + p (bits 5-4), 128c + 64 + p (bits 3-2) and
    128c + 96 + p (bits 1-0), each as code t + 1 (0: -1, 1: 0, 2: +1). The n/4 code bytes are
    followed by 32 bytes whose first 4 are the tensor's float32 scale s (the rest is padding):
    W = t * s. This is the x86 layout (QK_I2_S = 128, ACT_PARALLEL: `quantize_i2_s` in
    src/ggml-bitnet-mad.cpp, `quantize_to_i2_s` in utils/convert-hf-to-gguf-bitnet.py, read by
    `ggml_vec_dot_i2_i8_s`). bitnet.cpp built for ARM (QK_I2_S = 64) writes the ARM layout: chunks
    of 64 weights in 16 bytes, byte c*16 + p holding weights 64c + p, 64c + 16 + p, 64c + 32 + p
    and 64c + 48 + p, same bits and tail. The file does not say which layout it holds (`i2s_layout`
    names it; default 'x86', what bitnet.cpp's converter writes). I2_S maps to weight_quant
    'tensor' (the FFI kernels).
  TQ2_0 / TQ1_0 (llama.cpp): blocks of 256 weights along K, each with an f16 scale d (W = t * d).
    A tensor whose blocks all have the same d (blocks of all-zero codes match any d) maps to
    'tensor' (FFI kernels); otherwise to 'group:256', one scale per output row and run of 256
    inputs (the FFI group-scale kernel).
    Codes are read with gguf.quants' own TQ decoders on blocks whose d is set to 1.
Embeddings, lm_head and norms: F32, F16, BF16, Q8_0, Q6_K (dequantized to float32).
"""

from __future__ import annotations

import os
import warnings

import numpy as np

from bitnet_jax.errors import BitNetError
from bitnet_jax.kernels import layout
from bitnet_jax.model.config import BitNetConfig
from bitnet_jax.model.serving_layers import check_lm_head, pack_ends

ARCHITECTURES = ("bitnet-b1.58", "bitnet")
I2_S = 36  # bitnet.cpp's GGML type id
# Weights per chunk of I2_S codes (a chunk is a quarter as many bytes), by the bitnet.cpp build that
# wrote the file: QK_I2_S in src/ggml-bitnet-mad.cpp.
I2_S_LAYOUTS = {"x86": 128, "arm": 64}
I2_S_TAIL = 32  # bytes after the codes; the first 4 are the float32 scale
TQ_BLOCK = 256
LINEARS = {  # (block, ours) -> GGUF name
    ("self_attn", "q_proj"): "attn_q",
    ("self_attn", "k_proj"): "attn_k",
    ("self_attn", "v_proj"): "attn_v",
    ("self_attn", "o_proj"): "attn_output",
    ("mlp", "gate_proj"): "ffn_gate",
    ("mlp", "up_proj"): "ffn_up",
    ("mlp", "down_proj"): "ffn_down",
}
NORMS = {  # path in a layer -> GGUF name
    ("input_layernorm",): "attn_norm",
    ("post_attention_layernorm",): "ffn_norm",
    ("self_attn", "attn_sub_norm"): "attn_sub_norm",
    ("mlp", "ffn_sub_norm"): "ffn_sub_norm",
}
ACTIVATIONS = {"relu2": "relu2", "relu_sqr": "relu2", "silu": "silu", "swiglu": "silu", "swish": "silu"}


def _gguf():
    import gguf  # a dependency; imported here so that `import bitnet_jax` stays light

    return gguf


def type_name(raw: int) -> str:
    if raw == I2_S:
        return "I2_S"
    try:
        return _gguf().GGMLQuantizationType(raw).name
    except ValueError:
        return f"type id {raw}"


# --- reading the container ------------------------------------------------------------------


def open_gguf(path: str):
    """A `gguf.GGUFReader` of `path` that also maps I2_S tensors, with errors as BitNetError.

    The package's reader knows only upstream ggml's types, so I2_S tensors (bitnet.cpp's id 36,
    n/4 + 32 bytes) are given their data view here; every other part of the file is parsed by it.
    """
    gguf = _gguf()

    known_types = {int(t) for t in gguf.GGML_QUANT_SIZES}

    class Reader(gguf.GGUFReader):
        def _build_tensors(self, start_offs, fields):
            known, i2s = [], []
            for field in fields:
                name = bytes(field.parts[1]).decode("utf-8", "replace")
                raw = int(field.parts[4][0])
                if raw == I2_S:
                    i2s.append((name, field))
                elif raw in known_types:
                    known.append(field)
                else:
                    raise BitNetError(
                        f"{path}: tensor {name} has {type_name(raw)}, which no supported engine writes; "
                        "expected I2_S, TQ1_0 or TQ2_0 for the linear layers and F32, F16, BF16, Q8_0 or Q6_K "
                        "for the others."
                    )
            super()._build_tensors(start_offs, known)
            for name, field in i2s:
                dims = field.parts[3]
                n = int(np.prod(dims))
                n_bytes = n // 4 + I2_S_TAIL
                offset = int(start_offs + field.parts[5][0])
                data = self._get(offset, np.uint8, n_bytes)
                if data.size != n_bytes:
                    raise ValueError(f"tensor {name} ends past the end of the file")
                self.tensors.append(gguf.ReaderTensor(name, I2_S, dims, n, n_bytes, offset, data, field))

    if not os.path.isfile(path):
        raise BitNetError(f"GGUF file {path!r} does not exist.")
    try:
        return Reader(path, "r")
    except BitNetError:
        raise
    except Exception as e:  # ValueError, IndexError, KeyError, struct / mmap errors: the file is damaged
        raise BitNetError(
            f"{path}: not a readable GGUF file ({type(e).__name__}: {e}); it is truncated or corrupt. "
            "Download or export it again."
        ) from None


class Metadata:
    """Typed access to a GGUF file's key-value metadata, with errors that name the key."""

    def __init__(self, reader, path: str):
        self.reader, self.path = reader, path
        self.arch = self.string("general.architecture")

    def _field(self, key: str, required: bool):
        field = self.reader.fields.get(key)
        if field is None and required:
            raise BitNetError(f"{self.path}: metadata key {key} is missing; the file is incomplete.")
        return field

    def _check(self, key: str, field, kinds: tuple, what: str):
        main = field.types[0] if field.types else None
        sub = field.types[-1] if main is not None and main.name == "ARRAY" and len(field.types) > 1 else None
        got = main.name if sub is None else f"ARRAY of {sub.name}"
        if (main.name if sub is None else ("ARRAY", sub.name)) not in kinds:
            raise BitNetError(f"{self.path}: metadata key {key} is {got}; expected {what}.")

    def int(self, key: str, default=None):
        key = key.format(arch=self.arch) if "{arch}" in key else key
        field = self._field(key, default is None)
        if field is None:
            return default
        ints = ("UINT8", "INT8", "UINT16", "INT16", "UINT32", "INT32", "UINT64", "INT64")
        self._check(key, field, ints, "an integer")
        return int(field.contents())

    def float(self, key: str, default=None):
        key = key.format(arch=self.arch)
        field = self._field(key, default is None)
        if field is None:
            return default
        numbers = ("FLOAT32", "FLOAT64", "UINT32", "INT32", "UINT64", "INT64")
        self._check(key, field, numbers, "a number")
        value = field.contents()
        # A float32 as the shortest decimal that rounds to it: 1e-5 written as float32 reads back as 1e-5.
        return float(str(np.float32(value))) if field.types[0].name == "FLOAT32" else float(value)

    def string(self, key: str, default=None):
        key = key.format(arch=self.arch) if "{arch}" in key else key
        field = self._field(key, default is None)
        if field is None:
            return default
        self._check(key, field, ("STRING",), "a string")
        return field.contents()

    def bool(self, key: str, default=None):
        field = self._field(key, default is None)
        if field is None:
            return default
        self._check(key, field, ("BOOL",), "a boolean")
        return bool(field.contents())

    def array(self, key: str, item: str, default=None):
        field = self._field(key, default is None)
        if field is None:
            return default
        kinds = {"string": (("ARRAY", "STRING"),), "int": tuple(("ARRAY", t) for t in ("INT32", "UINT32", "INT64"))}
        kinds["float"] = (("ARRAY", "FLOAT32"), ("ARRAY", "FLOAT64"))
        self._check(key, field, kinds[item], f"an array of {item}s")
        return field.contents()


# --- ternary tensors --------------------------------------------------------------------------


def i2_s_chunk(layout: str) -> int:
    """Weights per chunk of an I2_S layout name ('x86' or 'arm'; module docstring)."""
    if layout not in I2_S_LAYOUTS:
        raise BitNetError(
            f"i2s_layout={layout!r}: expected one of {sorted(I2_S_LAYOUTS)} (the bitnet.cpp build's CPU)."
        )
    return I2_S_LAYOUTS[layout]


def decode_i2_s(data: np.ndarray, n: int, k: int, where: str, layout: str = "x86") -> tuple[np.ndarray, np.float32]:
    """I2_S bytes of `layout` (module docstring) -> (ternary int8 [N, K], scale)."""
    chunk = i2_s_chunk(layout)
    if (n * k) % chunk:
        raise BitNetError(
            f"{where}: I2_S ({layout} layout) holds whole {chunk}-weight chunks; {n}x{k} weights is not a "
            f"multiple of {chunk}."
        )
    bytes_cp = data[: n * k // 4].reshape(-1, chunk // 4)  # byte p of a chunk: weights p + i * chunk / 4
    codes_cip = np.stack([(bytes_cp >> (6 - 2 * i)) & 3 for i in range(4)], axis=1)  # [chunk, 4, chunk / 4]
    codes = codes_cip.reshape(n, k)
    if np.any(codes == 3):
        raise BitNetError(f"{where}: I2_S code 3 found (only 0, 1, 2 encode -1, 0, +1); the tensor is corrupt.")
    scale = data[n * k // 4 : n * k // 4 + 4].copy().view(np.float32)[0]
    if not np.isfinite(scale):
        raise BitNetError(f"{where}: the I2_S scale is {scale}; expected a finite number.")
    return codes.astype(np.int8) - 1, scale


def decode_tq(data: np.ndarray, qtype, n: int, k: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """TQ1_0 / TQ2_0 rows [N, KB * bytes] -> (ternary int8 [N, K], block scales float32 [N, KB])."""
    gguf = _gguf()
    type_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
    blocks = np.array(data, np.uint8).reshape(-1, type_bytes)  # a copy: d is overwritten below
    # d (f16) is the last 2 bytes of both block types.
    scales = blocks[:, -2:].copy().view(np.float16).astype(np.float32).reshape(n, k // TQ_BLOCK)
    blocks[:, -2:] = np.frombuffer(np.float16(1.0).tobytes(), np.uint8)
    codes = gguf.quants.dequantize(blocks.reshape(n, -1), qtype)  # d = 1: the codes themselves
    if not np.all(np.isin(codes, (-1.0, 0.0, 1.0))):
        raise BitNetError(f"{where}: {type_name(int(qtype))} block with codes outside {{-1, 0, 1}}; corrupt tensor.")
    if not np.all(np.isfinite(scales)):
        raise BitNetError(f"{where}: {type_name(int(qtype))} block scale that is not finite; corrupt tensor.")
    return codes.astype(np.int8), scales


class _Linear:
    """One linear layer read from the file: packed codes and its scales."""

    def __init__(self, packed: np.ndarray, scale: float | None, block_scales_kb_n: np.ndarray | None):
        self.packed, self.scale, self.block_scales = packed, scale, block_scales_kb_n

    def w_scale(self, group: bool, k: int, n: int) -> np.ndarray:
        if not group:
            return np.array([self.scale], np.float32)
        if self.block_scales is not None:
            return self.block_scales
        return np.full((k // TQ_BLOCK, n), self.scale, np.float32)


# --- the model ---------------------------------------------------------------------------------


class GGUFModel:
    """A BitNet GGUF file: its config, its metadata, and its tensors on demand."""

    def __init__(self, path: str | os.PathLike, i2s_layout: str = "x86"):
        self.path = os.fspath(path)
        i2_s_chunk(i2s_layout)  # a known layout, before the file is read
        self.i2s_layout = i2s_layout
        self.reader = open_gguf(self.path)
        self.meta = Metadata(self.reader, self.path)
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.used: set[str] = set()
        if self.meta.arch not in ARCHITECTURES:
            raise BitNetError(
                f"{self.path}: general.architecture is {self.meta.arch!r}; expected one of {ARCHITECTURES} "
                "(bitnet.cpp's BitNet b1.58 or llama.cpp's BitNet)."
            )
        self.config = self._config()

    def _config(self) -> BitNetConfig:
        m = self.meta
        heads = m.int("{arch}.attention.head_count")
        hidden = m.int("{arch}.embedding_length")
        if "token_embd.weight" not in self.tensors:
            raise BitNetError(f"{self.path}: tensor token_embd.weight is missing.")
        tokens = m.array("tokenizer.ggml.tokens", "string", default=[])
        vocab = m.int("{arch}.vocab_size", default=0) or len(tokens) or int(self.tensors["token_embd.weight"].shape[1])
        if self.meta.arch == "bitnet-b1.58":
            act = "relu2"  # bitnet.cpp's graph squares the ReLU whatever the metadata says
        else:
            name = m.string("{arch}.hidden_activation", default="silu")
            if name not in ACTIVATIONS:
                raise BitNetError(
                    f"{self.path}: bitnet.hidden_activation={name!r}; expected one of {sorted(ACTIVATIONS)}."
                )
            act = ACTIVATIONS[name]
        scaling = m.string("{arch}.rope.scaling.type", default="none")
        factor = m.float("{arch}.rope.scaling.factor", default=1.0)
        if scaling not in ("none", "linear") or factor != 1.0:
            raise BitNetError(f"{self.path}: RoPE scaling {scaling!r} x{factor}; only plain RoPE is supported.")
        head_dim = m.int("{arch}.attention.key_length", default=0) or m.int("{arch}.rope.dimension_count", default=0)
        values = dict(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=m.int("{arch}.feed_forward_length"),
            num_hidden_layers=m.int("{arch}.block_count"),
            num_attention_heads=heads,
            num_key_value_heads=m.int("{arch}.attention.head_count_kv", default=heads),
            head_dim=head_dim or None,
            max_position_embeddings=m.int("{arch}.context_length", default=4096),
            rope_theta=m.float("{arch}.rope.freq_base", default=10000.0),
            rms_norm_eps=m.float("{arch}.attention.layer_norm_rms_epsilon"),
            hidden_act=act,
            tie_word_embeddings="output.weight" not in self.tensors,
            bos_token_id=m.int("tokenizer.ggml.bos_token_id", default=-1),
            eos_token_id=m.int("tokenizer.ggml.eos_token_id", default=-1),
            pad_token_id=m.int("tokenizer.ggml.padding_token_id", default=-1),
            weight_quant="tensor",  # set by `load` once the tensors are read
        )
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if values[key] < 0 or values[key] >= vocab:
                values[key] = None  # absent, or llama.cpp's "none" (-1 written as uint32)
        try:
            return BitNetConfig(**values)
        except BitNetError as e:
            raise BitNetError(f"{self.path}: the metadata describe no valid model: {e}") from None

    # Tensors.
    def tensor(self, name: str, shape: tuple[int, ...], types: tuple[str, ...]):
        """The reader tensor `name` after checking its shape ([rows, cols] as numpy orders it) and type."""
        t = self.tensors.get(name)
        if t is None:
            raise BitNetError(
                f"{self.path}: tensor {name} is missing (expected {type_name_list(types)} {list(shape)})."
            )
        self.used.add(name)
        got = tuple(int(d) for d in reversed(t.shape.tolist()))  # ggml lists dims fastest first
        if got != shape:
            raise BitNetError(
                f"{self.path}: tensor {name} has shape {list(got)}; the metadata imply {list(shape)}. "
                "The file's tensors and metadata disagree."
            )
        name_of_type = type_name(int(t.tensor_type))
        if name_of_type not in types:
            raise BitNetError(
                f"{self.path}: tensor {name} is {name_of_type}; expected {type_name_list(types)} for this tensor."
            )
        return t

    def float_rows(self, name: str, shape: tuple[int, ...], rows=slice(None)) -> np.ndarray:
        """`rows` of a float-kind tensor (F32, F16, BF16, Q8_0, Q6_K) of `shape`, as float32."""
        t = self.tensor(name, shape, ("F32", "F16", "BF16", "Q8_0", "Q6_K"))
        data = np.asarray(t.data.reshape(shape[0] if len(shape) == 2 else 1, -1)[rows])
        if int(t.tensor_type) in (0, 1):  # F32, F16: the reader gives typed arrays
            out = data.astype(np.float32)
        else:
            out = _gguf().quants.dequantize(data, t.tensor_type)
        return out if len(shape) == 2 else out.reshape(shape)

    def scale_factor(self, name: str) -> np.float32:
        """An upstream llama.cpp per-tensor scale (`blk.i.<linear>.scale`, one F32 number), else 1."""
        t = self.tensors.get(name)
        if t is None:
            return np.float32(1.0)
        self.used.add(name)
        if int(t.tensor_type) != 0 or t.n_elements != 1:
            raise BitNetError(
                f"{self.path}: tensor {name} is {type_name(int(t.tensor_type))} with {t.n_elements} elements; "
                "expected one F32 number (the linear layer's scale)."
            )
        value = np.float32(np.asarray(t.data).reshape(-1)[0])
        if not np.isfinite(value):
            raise BitNetError(f"{self.path}: tensor {name} is {value}; expected a finite scale.")
        return value

    def linear(self, i: int, gguf_name: str, n: int, k: int) -> _Linear:
        name = f"blk.{i}.{gguf_name}.weight"
        t = self.tensor(name, (n, k), ("I2_S", "TQ1_0", "TQ2_0"))
        where = f"{self.path}: tensor {name}"
        factor = self.scale_factor(f"blk.{i}.{gguf_name}.scale")
        if int(t.tensor_type) == I2_S:
            t_nk, scale = decode_i2_s(t.data, n, k, where, self.i2s_layout)
            return _Linear(layout.pack_ternary(t_nk), np.float32(scale * factor), None)
        if k % TQ_BLOCK:
            raise BitNetError(f"{where}: {k} inputs is not a multiple of {TQ_BLOCK} ({type_name(int(t.tensor_type))}).")
        t_nk, scales_nb = decode_tq(t.data, t.tensor_type, n, k, where)
        used_nb = np.any(t_nk.reshape(n, k // TQ_BLOCK, TQ_BLOCK) != 0, axis=-1)
        values = np.unique(scales_nb[used_nb])
        packed = layout.pack_ternary(t_nk)
        if values.size <= 1:  # one scale for every block that has a non-zero weight
            return _Linear(packed, np.float32((values[0] if values.size else 1.0) * factor), None)
        return _Linear(packed, None, np.ascontiguousarray((scales_nb * factor).T))


def type_name_list(types: tuple[str, ...]) -> str:
    return types[0] if len(types) == 1 else ", ".join(types[:-1]) + " or " + types[-1]


def load_gguf(
    path: str | os.PathLike, *, lm_head: str | None = None, i2s_layout: str = "x86"
) -> tuple[BitNetConfig, dict]:
    """(config, packed serving parameters) from a bitnet.cpp or llama.cpp BitNet GGUF file.

    The parameters are what `serve.pack.pack` gives (run them with `generate` or
    `BitNetLM(config, ServingSpec(...))`); `lm_head` is as in `pack` (one of `ops.LM_HEADS`;
    None: the serving default). `i2s_layout`: the I2_S code layout, 'x86' or 'arm' (which
    bitnet.cpp build wrote the file; the file does not say). The ternary layers are never
    dequantized: see the module docstring for the formats and for which scales serve through
    the FFI kernels.
    """
    from bitnet_jax.interop.hf import stack_layers
    from bitnet_jax.kernels.ops import default_lm_head

    model = GGUFModel(path, i2s_layout)
    c = model.config
    lm_head = lm_head or default_lm_head(c)
    check_lm_head(lm_head, c.tie_word_embeddings, f"load_gguf({model.path})")
    if not c.tie_word_embeddings:
        warnings.warn(
            f"{model.path}: has an output.weight, which bitnet-jax uses as the lm_head; bitnet.cpp's "
            "bitnet-b1.58 graph and llama.cpp's bitnet graph never read it (they multiply by token_embd), "
            "so their logits on this file differ from bitnet-jax's."
        )
    d, f, qo = c.hidden_size, c.intermediate_size, c.num_attention_heads * c.head_dim
    out_in = {name: (n, k) for block in c.linear_shapes.values() for name, (k, n) in block.items()}
    norm_width = {"input_layernorm": d, "post_attention_layernorm": d, "attn_sub_norm": qo, "ffn_sub_norm": f}
    linears = [
        {key: model.linear(i, name, *out_in[key[1]]) for key, name in LINEARS.items()}
        for i in range(c.num_hidden_layers)
    ]
    group = any(lin.block_scales is not None for layer in linears for lin in layer.values())
    if group:
        c = c.replace(weight_quant=f"group:{TQ_BLOCK}")
        for layer in linears:
            for (_, name), lin in layer.items():
                if lin.block_scales is None and out_in[name][1] % TQ_BLOCK:
                    raise BitNetError(
                        f"{model.path}: some layers have per-block scales (group:256) and {name} has "
                        f"{out_in[name][1]} inputs, not a multiple of 256; the model has no single granularity."
                    )

    def layer(i: int) -> dict:
        out: dict = {"self_attn": {}, "mlp": {}}
        for (block, name), lin in linears[i].items():
            n, k = out_in[name]
            w_scale = lin.w_scale(group, k, n)
            if group:  # a group-scale model's codes and scales are TQ2G tiles (kernels/layout.py), every layer's
                out[block][name] = {
                    "w_packed": layout.repack_ternary_tiles(lin.packed, n, k),
                    "w_scale": layout.tile_group_scales(w_scale),
                }
            else:
                out[block][name] = {"w_packed": lin.packed, "w_scale": w_scale}
        for path_in_layer, gguf_name in NORMS.items():
            width = norm_width[path_in_layer[-1]]
            weight = model.float_rows(f"blk.{i}.{gguf_name}.weight", (width,))
            target = out
            for part in path_in_layer[:-1]:
                target = target[part]
            target[path_in_layer[-1]] = {"weight": weight}
        return out

    params = {
        "layers": stack_layers(layer, c.num_hidden_layers),
        "norm": {"weight": model.float_rows("output_norm.weight", (d,))},
    }
    params.update(_ends(model, c, lm_head))
    unused = sorted(set(model.tensors) - model.used)
    if unused:
        warnings.warn(f"{model.path}: ignored {len(unused)} tensor(s) that BitNetLM does not use: {unused[:5]}")
    return c, params


def _ends(model: GGUFModel, c: BitNetConfig, lm_head: str) -> dict:
    """embed_tokens and lm_head of the serving parameters (as `pack` lays them out)."""
    v, d = c.vocab_size, c.hidden_size
    head_name = "token_embd.weight" if c.tie_word_embeddings else "output.weight"
    return pack_ends(
        lm_head,
        c.tie_word_embeddings,
        v,
        lambda rows: model.float_rows("token_embd.weight", (v, d), rows),
        lambda rows: model.float_rows(head_name, (v, d), rows),
        lambda: {"kernel": np.ascontiguousarray(model.float_rows("output.weight", (v, d)).T)},
    )


def is_gguf_file(path: str | os.PathLike) -> bool:
    """True for a file that starts with the GGUF magic."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def load_gguf_tokenizer(path: str | os.PathLike, config: BitNetConfig | None = None):
    """The tokenizer in a GGUF file's metadata, as the project's wrapper (`interop/gguf_vocab.py`)."""
    from bitnet_jax.interop.gguf_vocab import gguf_tokenizer

    model = GGUFModel(path)
    return gguf_tokenizer(model.meta, config or model.config)


def gguf_chat_template(path: str | os.PathLike) -> str | None:
    """`tokenizer.chat_template` of a GGUF file, or None."""
    return GGUFModel(path).meta.string("tokenizer.chat_template", default="") or None
