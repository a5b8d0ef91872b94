"""Loading Hugging Face BitNet checkpoints (`BitNetForCausalLM` folders) into `BitNetLM` parameters.

Three weight layouts exist for a BitLinear `W` [out, in] in such folders (see transformers'
`integrations/bitnet.py`):

- online (`quantization_mode: online`, `linear_class: autobitlinear`): full-precision master
  weights, quantized at every forward pass. They are our training parameters as they are.
- offline `autobitlinear`: ternary weights (possibly packed) and `weight_scale = mean|W|`; the
  layer multiplies its output by `weight_scale`.
- offline `bitlinear` (b1.58 2B4T): packed ternary weights and `weight_scale = 1 / mean|W|`; the
  layer divides its output by `input_scale * weight_scale`.

Packed weights are uint8 [out/4, in]: byte [r, c] holds rows r, r+R, r+2R, r+3R (R = out/4) of
column c, two bits each from the low bits up, each the code `t + 1` of a ternary value t.

Offline weights `(W_t, s)` become master weights `W' = W_t * s / p`, where p = mean|W_t| is the
fraction of non-zeros: `mean|W'| = s` and `round(W' / s) = W_t` exactly, so the model's own
per-tensor absmean quantizer reproduces `(W_t, s)` and the parameters stay trainable.

`HFCheckpoint` reads such a folder a layer at a time (`load_hf` reads every layer; `pack.convert_hf`
packs each one as it is read).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from collections.abc import Callable, Iterator

import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict
from safetensors import safe_open

from bitnet_jax.errors import BitNetError
from bitnet_jax.model.config import BitNetConfig
from bitnet_jax.model.quant import ternary_master_weights

LAYER_NORMS = ("input_layernorm", "post_attention_layernorm", "self_attn.attn_sub_norm", "mlp.ffn_sub_norm")
# Buffers transformers may save that carry no parameters.
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


def load_hf(path: str | os.PathLike, dtype=jnp.float32) -> tuple[BitNetConfig, dict]:
    """Reads a local Hugging Face BitNet folder; returns `(config, params)` for `BitNetLM`.

    Accepts single or sharded safetensors, full-precision (bf16 / fp32) master weights and both
    packed offline kinds. The result gives the same logits as transformers on the same folder.
    """
    with HFCheckpoint(os.fspath(path)) as checkpoint:
        config = checkpoint.config
        params = {
            "embed_tokens": {"embedding": checkpoint.embedding()},
            "layers": stack_layers(checkpoint.layer, config.num_hidden_layers),
            "norm": checkpoint.norm(),
        }
        if not config.tie_word_embeddings:
            params["lm_head"] = {"kernel": checkpoint.lm_head().T}
        checkpoint.warn_unused()
    params = _tree_map(lambda a: jnp.asarray(a, dtype), params)
    return config, params


def stack_layers(layer: Callable[[int], dict], num_layers: int) -> dict:
    """The tree of `layer(i)` for i < num_layers, each leaf stacked on a new leading axis [L, ...].

    Each layer is copied into arrays allocated once, then dropped: stacking a list of layers at
    the end would hold every layer twice.
    """
    stacked = {}
    for i in range(num_layers):
        for path, value in flatten_dict(layer(i)).items():
            value = np.asarray(value)
            if i == 0:
                stacked[path] = np.empty((num_layers, *value.shape), value.dtype)
            stacked[path][i] = value
    return unflatten_dict(stacked)


def read_hf_config(folder: str) -> tuple[BitNetConfig, dict]:
    if not os.path.isdir(folder):
        raise BitNetError(
            f"Model folder {folder!r} does not exist or is not a folder: expected a local Hugging Face "
            "BitNet folder (config.json + *.safetensors) or a bitnet-jax run folder."
        )
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise BitNetError(
            f"{folder!r} has no config.json: expected a Hugging Face BitNet folder; found "
            f"{sorted(os.listdir(folder))[:10]}."
        )
    try:
        with open(config_path) as f:
            hf = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BitNetError(f"{config_path} is not valid JSON ({e}); restore it from the original checkpoint.") from None
    return config_from_hf(hf, source=config_path), hf


def generation_stop_ids(folder: str | os.PathLike, config: BitNetConfig) -> tuple[int, ...]:
    """The ids that end generation with a model folder, as transformers' `generate` stops: the
    config's `eos_ids` plus `generation_config.json`'s `eos_token_id` (an int or a list). Chat
    models often name their end of turn only there (LLaMA-3's `<|eot_id|>`)."""
    ids = set(config.eos_ids)
    path = os.path.join(os.fspath(folder), "generation_config.json")
    if not os.path.isfile(path):
        return tuple(sorted(ids))
    try:
        with open(path) as f:
            generation = json.load(f)
    except (OSError, ValueError) as e:
        raise BitNetError(f"{path} is not valid JSON ({e}); fix or remove it.") from None
    value = generation.get("eos_token_id") if isinstance(generation, dict) else None
    for token in value if isinstance(value, list) else [value]:
        if token is None:
            continue
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < config.vocab_size:
            raise BitNetError(
                f"{path}: eos_token_id {token!r} is not a token id of this model (0.."
                f"{config.vocab_size - 1}); fix or remove the file."
            )
        ids.add(token)
    return tuple(sorted(ids))


def config_from_hf(hf: dict, *, source: str = "config.json") -> BitNetConfig:
    """Maps a Hugging Face BitNet `config.json` onto `BitNetConfig`.

    Keys that only matter to transformers (dtype, architectures, ...) are ignored; keys that would
    change the computation and that this implementation does not support are refused.
    """
    if hf.get("model_type") != "bitnet":
        raise BitNetError(
            f"{source} has model_type={hf.get('model_type')!r}; expected 'bitnet' "
            "(a Hugging Face BitNetForCausalLM checkpoint such as microsoft/bitnet-b1.58-2B-4T)."
        )
    if hf.get("attention_bias"):
        raise BitNetError(f"{source} sets attention_bias=true; BitNet b1.58 models have no biases.")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise BitNetError(f"{source} uses rope_type={rope_type!r}; only the default RoPE is supported.")
    # 2B4T's config has a top-level rope_theta; transformers 5 saves it under rope_parameters.
    theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    values = {
        "vocab_size": hf["vocab_size"],
        "hidden_size": hf["hidden_size"],
        "intermediate_size": hf["intermediate_size"],
        "num_hidden_layers": hf["num_hidden_layers"],
        "num_attention_heads": hf["num_attention_heads"],
        "num_key_value_heads": hf.get("num_key_value_heads") or hf["num_attention_heads"],
        "head_dim": hf.get("head_dim"),
        "max_position_embeddings": hf.get("max_position_embeddings", 2048),
        "rope_theta": float(theta),
        "rms_norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "hidden_act": hf.get("hidden_act", "relu2"),
        "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "bos_token_id": hf.get("bos_token_id"),
        "eos_token_id": hf.get("eos_token_id"),
        "pad_token_id": hf.get("pad_token_id"),
        "initializer_range": float(hf.get("initializer_range", 0.02)),
        "linear_norm_eps": quantization_config(hf, source).linear_norm_eps,
    }
    try:
        return BitNetConfig.from_dict(values, source=source)
    except BitNetError as e:
        raise BitNetError(f"{source}: {e}") from None


def config_to_hf(config: BitNetConfig, *, quantization_mode: str = "online") -> dict:
    """A transformers-loadable `config.json`: 'online' quantization of full-precision master
    weights, or 'offline' ternary weights with `weight_scale = mean|W|` (`linear_class:
    autobitlinear` either way; see `hf_export`)."""
    if quantization_mode not in ("online", "offline"):
        raise BitNetError(f"quantization_mode={quantization_mode!r}; expected 'online' or 'offline'.")
    if (config.weight_quant, config.act_quant, config.act_bits) != ("tensor", "token", 8):
        raise BitNetError(
            "Only the b1.58 recipe (weight_quant='tensor', act_quant='token', act_bits=8) has a "
            f"Hugging Face equivalent; this config has {config.weight_quant!r}, {config.act_quant!r}, "
            f"{config.act_bits}."
        )
    if config.hadamard:
        # Not recorded under another key either: transformers would ignore it and quietly run the
        # rotated-basis weights on unrotated inputs.
        raise BitNetError(
            f"hadamard={config.hadamard}: transformers' BitNet has no online Hadamard transform, so a Hugging "
            "Face folder cannot say that o_proj and down_proj rotate their inputs. Serve the model from its run "
            "or a packed folder (bitnet-jax convert RUN OUT), or train it with hadamard=0."
        )
    eos = config.eos_token_id
    return {
        "architectures": ["BitNetForCausalLM"],
        "model_type": "bitnet",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_position_embeddings,
        "rope_theta": config.rope_theta,
        "rms_norm_eps": config.rms_norm_eps,
        "hidden_act": config.hidden_act,
        "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": list(eos) if isinstance(eos, tuple) else eos,
        "pad_token_id": config.pad_token_id,
        "initializer_range": config.initializer_range,
        "attention_bias": False,
        "quantization_config": {
            "quant_method": "bitnet",
            "linear_class": "autobitlinear",
            "quantization_mode": quantization_mode,
            "use_rms_norm": config.linear_norm_eps is not None,
            "rms_norm_eps": config.linear_norm_eps or 1e-6,
            "modules_to_not_convert": ["lm_head"],
        },
    }


@dataclasses.dataclass(frozen=True)
class QuantizationConfig:
    """What a `config.json`'s `quantization_config` says, parsed in this one place.

    kind: 'online' (fp master weights, quantized in the forward pass), 'offline-autobitlinear' /
      'offline-bitlinear' (ternary weights stored, with transformers' two opposite meanings of
      `weight_scale`), or 'none' (plain nn.Linear, no quantization_config).
    linear_norm_eps: the epsilon of the RMSNorm inside every BitLinear (`use_rms_norm`), or None.
    """

    kind: str
    linear_norm_eps: float | None


def quantization_config(hf: dict, source: str) -> QuantizationConfig:
    quant = hf.get("quantization_config")
    if not quant:
        return QuantizationConfig("none", None)
    if quant.get("quant_method", "bitnet") != "bitnet":
        raise BitNetError(
            f"{source}: quantization_config.quant_method={quant.get('quant_method')!r}; expected 'bitnet'."
        )
    linear_class = quant.get("linear_class", "bitlinear")
    mode = quant.get("quantization_mode", "offline")
    if linear_class not in ("bitlinear", "autobitlinear") or mode not in ("online", "offline"):
        raise BitNetError(
            f"{source}: linear_class={linear_class!r}, quantization_mode={mode!r}; expected "
            "linear_class 'bitlinear' or 'autobitlinear' and quantization_mode 'online' or 'offline'."
        )
    if linear_class == "bitlinear":
        kind = "offline-bitlinear"  # transformers' BitLinear is always offline
    else:
        kind = "online" if mode == "online" else "offline-autobitlinear"
    eps = float(quant.get("rms_norm_eps") or 1e-6) if quant.get("use_rms_norm") else None
    return QuantizationConfig(kind, eps)


class HFCheckpoint:
    """A Hugging Face BitNet folder read a piece at a time, as `BitNetLM` training parameters.

    Nothing is read until asked for; only what a call returns stays in memory. A context manager:
    it keeps the safetensors files open.
    """

    def __init__(self, folder: str):
        self.folder = folder
        self.config, hf = read_hf_config(folder)
        self._quant = quantization_config(hf, os.path.join(folder, "config.json")).kind
        self._tensors = _TensorReader(folder)
        c = self.config
        d = c.hidden_size
        heads_width = c.num_attention_heads * c.head_dim
        self._norm_width = {
            "input_layernorm": d,
            "post_attention_layernorm": d,
            "self_attn.attn_sub_norm": heads_width,
            "mlp.ffn_sub_norm": c.intermediate_size,
        }

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._tensors.__exit__(*exc)

    def layer(self, i: int) -> dict:
        """Layer i's parameters: `load_hf(...)["layers"]` without the leading layer axis, norms as
        stored, kernels [in, out] as float32 master weights."""
        layer: dict = {"self_attn": {}, "mlp": {}}
        for norm in LAYER_NORMS:
            weight = self._tensors.get(f"model.layers.{i}.{norm}.weight", (self._norm_width[norm],))
            _nested_set(layer, norm.split(".") + ["weight"], weight)
        for block, shapes in self.config.linear_shapes.items():
            for name, (in_features, out_features) in shapes.items():
                prefix = f"model.layers.{i}.{block}.{name}"
                out_in = (out_features, in_features)  # as transformers stores W
                layer[block][name] = {"kernel": _linear_kernel(self._tensors, prefix, out_in, self._quant)}
                if self.config.linear_norm_eps is not None:
                    layer[block][name]["rms_norm"] = {
                        "weight": self._tensors.get(f"{prefix}.rms_norm.weight", (in_features,))
                    }
        return layer

    def embedding(self, rows: slice | None = None) -> np.ndarray:
        """Rows (default all) of the input embedding [V, D], as stored."""
        shape = (self.config.vocab_size, self.config.hidden_size)
        return self._tensors.get("model.embed_tokens.weight", shape, rows)

    def lm_head(self, rows: slice | None = None) -> np.ndarray:
        """Rows (default all) of an untied lm_head [V, D] (our kernel transposed), as stored."""
        shape = (self.config.vocab_size, self.config.hidden_size)
        return self._tensors.get("lm_head.weight", shape, rows)

    def norm(self) -> dict:
        """The final norm's parameters."""
        return {"weight": self._tensors.get("model.norm.weight", (self.config.hidden_size,))}

    def warn_unused(self) -> None:
        """Warns about tensors that nothing read so far (call it once everything is read)."""
        tensors = self._tensors
        unused = [name for name in tensors.names() if name not in tensors.used and not _IGNORED.match(name)]
        if self.config.tie_word_embeddings:
            unused = [name for name in unused if name != "lm_head.weight"]
        if unused:
            warnings.warn(f"{self.folder}: ignored {len(unused)} tensor(s) that BitNetLM does not use: {unused[:5]}")


def _linear_kernel(tensors: "_TensorReader", prefix: str, out_in: tuple[int, int], quant: str) -> np.ndarray:
    """One BitLinear's kernel [in, out] as master weights (see the module docstring)."""
    out_features, in_features = out_in
    name = f"{prefix}.weight"
    shape, dtype = tensors.meta(name)
    if dtype == "U8":
        if shape != [out_features // 4, in_features] or out_features % 4:
            raise BitNetError(
                f"{tensors.where(name)}: packed tensor {name} has shape {shape}; expected "
                f"[{out_features}/4, {in_features}] for a [{out_features}, {in_features}] BitLinear "
                "(config.json and the weights disagree)."
            )
        w_oi = unpack_hf_ternary(tensors.get(name, tuple(shape)))
    else:
        w_oi = tensors.get(name, out_in)
    if quant in ("online", "none"):
        return w_oi.T.astype(np.float32)

    scale = tensors.get(f"{prefix}.weight_scale", None).astype(np.float64).reshape(-1)
    if scale.size != 1 or not np.isfinite(scale[0]) or scale[0] == 0:
        raise BitNetError(
            f"{tensors.where(name)}: {prefix}.weight_scale should hold one finite non-zero number; "
            f"found {scale[:4]} (shape {scale.shape})."
        )
    mean_abs = scale[0] if quant == "offline-autobitlinear" else 1.0 / scale[0]
    w_oi = w_oi.astype(np.float32, copy=False)
    if not np.all(np.isin(w_oi, (-1.0, 0.0, 1.0))):
        raise BitNetError(
            f"{tensors.where(name)}: {name} is offline-quantized but not ternary (values outside "
            "{-1, 0, 1}); expected ternary or packed uint8 weights with quantization_mode 'offline'."
        )
    return ternary_master_weights(w_oi, mean_abs).T


def unpack_hf_ternary(packed_ri: np.ndarray) -> np.ndarray:
    """transformers' packed uint8 [R, in] -> ternary float32 [4R, in] (row block i from bits 2i)."""
    codes = [(packed_ri >> (2 * i)) & 3 for i in range(4)]
    w_oi = np.concatenate(codes, axis=0).astype(np.float32)
    w_oi -= 1.0
    return w_oi


def pack_hf_ternary(w_oi: np.ndarray) -> np.ndarray:
    """The inverse of `unpack_hf_ternary`, for writing transformers-compatible packed weights."""
    out_features = w_oi.shape[0]
    if out_features % 4:
        raise BitNetError(f"pack_hf_ternary: {out_features} rows is not a multiple of 4.")
    codes = (np.asarray(w_oi) + 1).astype(np.uint8).reshape(4, out_features // 4, -1)
    return codes[0] | (codes[1] << 2) | (codes[2] << 4) | (codes[3] << 6)


class _TensorReader:
    """Tensors of one or several safetensors files, by name, with errors that name the file."""

    def __init__(self, folder: str):
        self.folder = folder
        self.used: set[str] = set()
        self._handles: dict[str, object] = {}
        self._file_of = self._index(folder)

    @staticmethod
    def _index(folder: str) -> dict[str, str]:
        single = os.path.join(folder, "model.safetensors")
        index = os.path.join(folder, "model.safetensors.index.json")
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise BitNetError(f"{index} is not a valid safetensors index ({e!r}); restore it.") from None
            return {name: os.path.join(folder, file) for name, file in weight_map.items()}
        if os.path.isfile(single):
            return {name: single for name in _open_safetensors(single).keys()}
        files = sorted(os.listdir(folder))
        pickles = [f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
        if pickles:
            raise BitNetError(
                f"{folder} holds pickle-based weights ({pickles[:3]}); bitnet-jax reads only safetensors, "
                "which cannot run code when loaded. Convert them once with transformers: "
                "`AutoModelForCausalLM.from_pretrained(folder).save_pretrained(new_folder)` "
                "(safetensors is its default format)."
            )
        raise BitNetError(
            f"{folder} has no model.safetensors or model.safetensors.index.json; found {files[:10]}. "
            "Expected a Hugging Face BitNet folder with safetensors weights."
        )

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handles.clear()

    def names(self) -> Iterator[str]:
        return iter(self._file_of)

    def where(self, name: str) -> str:
        return self._file_of.get(name, self.folder)

    def _handle(self, name: str):
        if name not in self._file_of:
            raise BitNetError(
                f"{self.folder}: tensor {name!r} is missing from the checkpoint; expected it for the "
                "architecture that config.json describes. Is the download complete, and does config.json "
                "belong to these weights?"
            )
        file = self._file_of[name]
        if file not in self._handles:
            if not os.path.isfile(file):
                raise BitNetError(f"{file} is listed in the safetensors index but does not exist; download it again.")
            self._handles[file] = _open_safetensors(file)
        return self._handles[file]

    def meta(self, name: str) -> tuple[list[int], str]:
        tensor_slice = self._handle(name).get_slice(name)
        return list(tensor_slice.get_shape()), tensor_slice.get_dtype()

    def get(self, name: str, shape: tuple[int, ...] | None, rows: slice | None = None) -> np.ndarray:
        """Tensor `name` (`rows` of it: a slice of its first axis) after checking its whole shape."""
        handle = self._handle(name)
        found = list(handle.get_slice(name).get_shape())
        if shape is not None and found != list(shape):
            raise BitNetError(
                f"{self.where(name)}: tensor {name} has shape {found}; expected {list(shape)} from config.json. "
                "The weights and config.json do not belong together."
            )
        try:
            array = handle.get_tensor(name) if rows is None else handle.get_slice(name)[rows]
        except Exception as e:  # safetensors raises its own error types for truncated data
            raise BitNetError(
                f"{self.where(name)}: cannot read tensor {name} ({e}); the file is truncated or corrupt: "
                "download it again."
            ) from None
        self.used.add(name)
        return np.asarray(array)


def _open_safetensors(file: str):
    # pread rather than the default mmap: the pages of a mapped file that reads touch stay resident
    # (and count as the process's memory) until the file is closed, so reading a checkpoint piece by
    # piece would still take as much memory as the whole checkpoint.
    try:
        return safe_open(file, framework="np", backend="pread")
    except Exception as e:  # SafetensorError, OSError
        raise BitNetError(
            f"{file} is not a readable safetensors file ({e}); it is truncated or corrupt: download it again."
        ) from None


def _nested_set(tree: dict, keys: list[str], value):
    for key in keys[:-1]:
        tree = tree.setdefault(key, {})
    tree[keys[-1]] = value


def _tree_map(fn, tree):
    return {k: _tree_map(fn, v) if isinstance(v, dict) else fn(v) for k, v in tree.items()}
