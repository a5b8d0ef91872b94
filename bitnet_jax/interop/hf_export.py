"""Hugging Face export: a folder that transformers' `BitNetForCausalLM.from_pretrained` loads.

Two kinds, the two that `hf.load_hf` reads back to the same parameters:
- master weights (default): every BitLinear kernel as its full-precision weight `W` [out, in]
  (`quantization_mode: online`, `linear_class: autobitlinear`), quantized in every forward pass
  exactly as training does. In bf16 (the released 2B4T "bf16" layout) or float32 (`dtype`).
- packed (`packed=True`): each BitLinear as its ternary codes, 4 per byte (uint8 [out/4, in], the
  layout of `hf.pack_hf_ternary`), and `weight_scale` = mean|W| as float32 [1], with
  `quantization_mode: offline`, `linear_class: autobitlinear` (transformers multiplies the output
  by that scale). b1.58 2B4T's own files use `linear_class: bitlinear`, whose `weight_scale` is
  1 / mean|W| in bf16: writing that would round every scale to 8 bits, so the export uses the
  layout that holds the scale exactly.
Only the b1.58 recipe (one weight scale per tensor, 8-bit per-token activations) exists in
transformers: other quantizer settings are refused (`hf.config_to_hf`).

Embeddings, norms and an untied lm_head are written in the chosen float dtype (float32 for the
packed kind). A packed bitnet-jax folder as the source gives its ternary layers exactly, and its
int8 embedding / lm_head rows dequantized (that folder no longer holds the float table).

The folder also gets `config.json`, the tokenizer files with a `tokenizer_config.json` (tokenizer
class, special tokens, chat template), and `generation_config.json`. It is written under a
temporary name beside `out` and renamed at the end: a failure leaves nothing half-written.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import jax
import ml_dtypes
import numpy as np

from bitnet_jax.errors import BitNetError
from bitnet_jax.interop.hf import LAYER_NORMS, config_to_hf, pack_hf_ternary
from bitnet_jax.model.config import BitNetConfig
from bitnet_jax.model.quant import ternary_master_weights
from bitnet_jax.model.serving_layers import float_rows, is_packed, lm_head_rows, ternary_codes

_DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32}


def export_hf(
    config: BitNetConfig,
    params,
    tokenizer,
    out: str | os.PathLike,
    *,
    packed: bool = False,
    dtype: str = "bfloat16",
    chat_template: str | None = None,
    stop_ids: tuple[int, ...] = (),
    force: bool = False,
) -> None:
    """Writes `params` (training parameters, or packed ones from `pack`) as a Hugging Face folder.

    Args:
      tokenizer: the model's tokenizer (`data.tokenizer.load_tokenizer`); its files are copied.
      packed: the offline packed kind instead of master weights (see the module docstring).
      dtype: 'bfloat16' or 'float32' for master weights, embeddings and norms (packed: float32).
      chat_template: written into tokenizer_config.json when given.
      stop_ids: generation_config.json's eos_token_id (default: the config's eos ids).
      force: replace an existing non-empty `out` (otherwise refused).
    """
    from safetensors.numpy import save_file

    from bitnet_jax.data.tokenizer import copy_tokenizer

    out = os.path.abspath(os.fspath(out))
    if dtype not in _DTYPES:
        raise BitNetError(f"export_hf: dtype={dtype!r}; expected one of {sorted(_DTYPES)}.")
    if os.path.exists(out) and not os.path.isdir(out):
        raise BitNetError(f"{out} exists and is not a folder; choose another output path.")
    if os.path.isdir(out) and os.listdir(out) and not force:
        raise BitNetError(f"{out} exists and is not empty; choose another folder or pass --force to replace it.")
    hf_config = config_to_hf(config, quantization_mode="offline" if packed else "online")
    tensors = hf_tensors(config, params, packed=packed, dtype=np.float32 if packed else _DTYPES[dtype])
    hf_config["torch_dtype"] = "float32" if packed else dtype

    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out) + ".tmp-", dir=os.path.dirname(out))
    try:
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        _write_json(os.path.join(tmp, "config.json"), hf_config)
        copy_tokenizer(tokenizer, tmp)
        _write_tokenizer_config(tmp, tokenizer, chat_template)
        eos = list(stop_ids or config.eos_ids)
        generation = {"bos_token_id": config.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else eos}
        if config.pad_token_id is not None:
            generation["pad_token_id"] = config.pad_token_id
        _write_json(os.path.join(tmp, "generation_config.json"), generation)
        if os.path.isdir(out):  # --force: the old folder goes only once the new one is complete
            old = out + ".old-" + os.path.basename(tmp)
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def hf_tensors(config: BitNetConfig, params, *, packed: bool, dtype) -> dict[str, np.ndarray]:
    """Transformers' tensor names -> numpy arrays, from training or packed parameters."""
    source_packed = is_packed(params)
    params = jax.tree.map(np.asarray, params)
    layers = params["layers"]
    out: dict[str, np.ndarray] = {}
    for i in range(config.num_hidden_layers):
        prefix = f"model.layers.{i}"
        for hf_name in LAYER_NORMS:
            out[f"{prefix}.{hf_name}.weight"] = _get(layers, hf_name.split("."))["weight"][i].astype(dtype)
        for block, shapes in config.linear_shapes.items():
            for name, (in_features, out_features) in shapes.items():
                p = layers[block][name]
                module = f"{prefix}.{block}.{name}"
                layer_p = jax.tree.map(lambda a: a[i], p)
                t_oi, scale = ternary_codes(layer_p, in_features, out_features, config.weight_quant)
                scale = float(scale.reshape(-1)[0])  # one per tensor: the only granularity `config_to_hf` lets through
                if packed:
                    out[f"{module}.weight"] = pack_hf_ternary(t_oi)
                    out[f"{module}.weight_scale"] = np.asarray([scale], np.float32)
                else:
                    out[f"{module}.weight"] = _master_weight(p, i, t_oi, scale, source_packed).astype(dtype)
                if "rms_norm" in p:
                    out[f"{module}.rms_norm.weight"] = p["rms_norm"]["weight"][i].astype(dtype)
    out["model.norm.weight"] = params["norm"]["weight"].astype(dtype)
    out["model.embed_tokens.weight"] = float_rows(params["embed_tokens"], config.hidden_size).astype(dtype)
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = lm_head_rows(params, config.hidden_size).astype(dtype)
    return {name: np.ascontiguousarray(value) for name, value in out.items()}


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _master_weight(p, i, t_oi, scale, source_packed):
    if not source_packed:
        return np.asarray(p["kernel"][i], np.float32).T
    return ternary_master_weights(t_oi, scale)


def _write_tokenizer_config(folder: str, tokenizer, chat_template: str | None) -> None:
    """tokenizer_config.json: kept if the tokenizer brought one (the chat template added if it
    lacks one), else written for transformers' Llama tokenizers; a sentencepiece tokenizer's (a
    GGUF file's brings only its special tokens and template) is completed with those keys."""
    from bitnet_jax.data.tokenizer import HFTokenizer

    path = os.path.join(folder, "tokenizer_config.json")
    fast = isinstance(tokenizer, HFTokenizer)
    values = {}
    if os.path.isfile(path):
        with open(path) as f:
            values = json.load(f)
    if not values or not fast:
        token = lambda i: None if i is None or i < 0 else tokenizer.id_to_token(i)
        values = {
            "tokenizer_class": "PreTrainedTokenizerFast" if fast else "LlamaTokenizer",
            "bos_token": token(tokenizer.bos_id),
            "eos_token": token(tokenizer.eos_id),
            "add_bos_token": True,
            "add_eos_token": False,
            **values,
        }
    if chat_template and not values.get("chat_template"):
        values["chat_template"] = chat_template
    _write_json(path, values)


def _write_json(path: str, values: dict) -> None:
    with open(path, "w") as f:
        json.dump(values, f, indent=2)
        f.write("\n")
