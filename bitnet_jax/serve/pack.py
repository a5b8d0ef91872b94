"""Convert: fake-quant (training) parameters -> packed serving parameters, and their folder format.

`pack(config, params)` is the one explicit step between the two paths (`convert_hf` gives the same
result for a Hugging Face folder, reading and packing it a layer at a time). Every BitLinear kernel
[K, N] is quantized exactly as the training forward quantizes it (`quant.weight_quantize`: the
same ternary values and scale), then packed to 2-bit codes (`layout.pack_ternary`) with its scale
([1] per tensor, [N] per channel, [K / G, N] per group of G inputs). The lm_head (the tied
embedding for 2B4T-style models) becomes int8 rows with one scale each (`lm_head="int8"`; for
tied models, `"int8-tied"`, the serving default, also serves the input embedding from those rows)
or stays float.

A converted folder holds `config.json` (the model config, all of `BitNetConfig`, with a `bitnet_jax`
entry naming the format, layout version and lm_head), `model.safetensors` (parameter paths joined by '.') and
the tokenizer files of the source (`bitnet-jax convert`); `load_packed` reads it back without repacking.
"""

from __future__ import annotations

import json
import os
import stat

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from bitnet_jax.errors import BitNetError
from bitnet_jax.interop.hf import HFCheckpoint, stack_layers
from bitnet_jax.kernels import layout
from bitnet_jax.kernels.ops import LM_HEADS
from bitnet_jax.model.config import BitNetConfig
from bitnet_jax.model.quant import weight_quantize
from bitnet_jax.model.serving_layers import is_packed, lm_head_kind
from bitnet_jax.serve.host_memory import aligned_empty, release_freed_memory

PACKED_FORMAT = "bitnet_jax.packed"
# Rows of an int8 table quantized at once: the float temporaries of a 2B4T embedding
# [128256, 2560] stay at ~40 MB each instead of 1.3 GB.
_INT8_ROWS_PER_STEP = 4096
_quantize = jax.jit(weight_quantize, static_argnums=1)


def default_lm_head(config: BitNetConfig) -> str:
    """The serving default: 'int8-tied' for tied models (one int8 table for both ends: 2B4T then
    serves in 1.17 GB instead of 1.82), else 'int8'. On a trained model the tied table costs 0.31%
    relative logit error against the float head, 0.23% for 'int8' alone (README, "lm_head")."""
    return "int8-tied" if config.tie_word_embeddings else "int8"


def pack(config: BitNetConfig, params, *, lm_head: str | None = None) -> dict:
    """Serving parameters for `BitNetLM(config, serving=...)` from training parameters.

    Args:
      config: the model's config. Its activation quantizer must be per token. Weight scales are
        kept at the config's granularity: [1] per tensor, [N] per channel (the FFI kernels' two),
        [K / G, N] per group of G inputs ('group:G'; served by the XLA integer path).
      params: training parameters (ours, or from `load_hf`), float32 or bfloat16.
      lm_head: 'int8' (per-row int8 lm_head, 2x smaller than bf16; the input embedding keeps
        its float table), 'int8-tied' (tied models: one int8 table for both ends, the smallest)
        or 'float'; None for `default_lm_head(config)`.
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
        _pack_ends(
            config,
            lm_head,
            lambda rows: embedding_vd[rows],
            lambda rows: head_vd[rows],
            lambda: _to_numpy(params["lm_head"]),
        )
    )
    return out


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
            _pack_ends(config, lm_head, embedding, head, lambda: {"kernel": np.ascontiguousarray(head(slice(None)).T)})
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
        for name in shapes:
            source = layer[block][name]
            w_t_kn, scale = _quantize(jnp.asarray(source["kernel"], jnp.float32), config.weight_quant)
            scale = np.asarray(scale, np.float32)  # [1, 1], [1, N] or, per group, [K / G, 1, N]
            out[block][name] = {
                "w_packed": layout.pack_ternary(np.asarray(w_t_kn, np.int8).T),
                "w_scale": scale.reshape(scale.shape[0], -1) if scale.ndim == 3 else scale.reshape(-1),
            }
            if "rms_norm" in source:
                out[block][name]["rms_norm"] = _to_numpy(source["rms_norm"])
        for norm in ("attn_sub_norm", "ffn_sub_norm"):
            if norm in layer[block]:
                out[block][norm] = _to_numpy(layer[block][norm])
    for norm in ("input_layernorm", "post_attention_layernorm"):
        out[norm] = _to_numpy(layer[norm])
    return out


def _pack_ends(config: BitNetConfig, lm_head: str, embedding_rows, head_rows, float_head) -> dict:
    """`embed_tokens` and `lm_head` of the serving parameters, from `embedding_rows(rows)` and
    `head_rows(rows)` (a slice of the rows of the embedding and the lm_head as [V, D])
    and `float_head()` (an untied lm_head's training parameters)."""
    v = config.vocab_size
    if lm_head == "int8-tied":
        return {"embed_tokens": _int8_rows(embedding_rows, v)}
    out = {"embed_tokens": {"embedding": embedding_rows(slice(None))}}
    if lm_head == "int8":
        out["lm_head"] = _int8_rows(head_rows, v)
    elif not config.tie_word_embeddings:
        out["lm_head"] = float_head()
    return out


def _int8_rows(rows_of, n: int) -> dict:
    """The per-row int8 table of the [N, K] matrix whose rows `rows_of(rows)` gives. Quantized a
    block of rows at a time, which gives the same bytes as all at once: every row has its own scale."""
    w_int8 = scale_n = None
    for start in range(0, n, _INT8_ROWS_PER_STEP):
        rows = slice(start, min(start + _INT8_ROWS_PER_STEP, n))
        w8_rk, scale_r = layout.quantize_int8_rows(np.asarray(rows_of(rows), np.float32))
        w8_rkp = layout.pack_int8(w8_rk)
        if w_int8 is None:
            w_int8, scale_n = np.empty((n, w8_rkp.shape[1]), np.int8), np.empty(n, np.float32)
        w_int8[rows], scale_n[rows] = w8_rkp, scale_r
    return {"w_int8": w_int8, "w_scale": scale_n}


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
    if lm_head not in LM_HEADS:
        raise BitNetError(f"pack: lm_head={lm_head!r}; expected one of {LM_HEADS}.")
    if lm_head == "int8-tied" and not config.tie_word_embeddings:
        raise BitNetError(
            "pack: lm_head='int8-tied' needs tied embeddings; this model has a separate lm_head (use lm_head='int8')."
        )


# --- the converted folder ----------------------------------------------------------------------


def save_packed(folder: str, config: BitNetConfig, params) -> None:
    """Writes packed parameters as a folder that `load_packed` (and `bitnet-jax generate`) reads.
    (`bitnet-jax convert` also copies the tokenizer, with `tokenizer.copy_tokenizer`.)"""
    from safetensors.numpy import save_file

    if not is_packed(params):
        raise BitNetError("save_packed: expected packed parameters (from bitnet_jax.serve.pack).")
    os.makedirs(folder, exist_ok=True)
    hf = config.to_dict()
    hf["bitnet_jax"] = {
        "format": PACKED_FORMAT,
        "layout_version": layout.LAYOUT_VERSION,
        "lm_head": lm_head_kind(params),
    }
    flat = {".".join(path): np.ascontiguousarray(value) for path, value in flatten_dict(params).items()}
    tmp = os.path.join(folder, "model.safetensors.tmp")
    with open(tmp, "wb") as f:  # only to learn the mode that open() gives a new file under the umask
        mode = stat.S_IMODE(os.fstat(f.fileno()).st_mode)
    save_file(flat, tmp, metadata={"format": PACKED_FORMAT, "layout_version": str(layout.LAYOUT_VERSION)})
    # safetensors writes a private temporary file (mode 0600) and renames it over `tmp`: give the
    # weights the mode of every other file in the folder, so that whoever can read those can read these.
    os.chmod(tmp, mode)
    os.replace(tmp, os.path.join(folder, "model.safetensors"))  # no half-written weights on a crash
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)


def is_packed_folder(folder: str) -> bool:
    try:
        with open(os.path.join(folder, "config.json")) as f:
            return json.load(f).get("bitnet_jax", {}).get("format") == PACKED_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def read_packed_folder(folder: str) -> tuple[BitNetConfig, dict]:
    """(config, abstract params) of a folder written by `save_packed`, from config.json and the
    safetensors header alone: the leaves are `jax.ShapeDtypeStruct`s (enough for
    `generate.compile_generate`). Checks the layout version and that every tensor the config
    implies is there with its shape and dtype."""
    from safetensors import safe_open

    from bitnet_jax.kernels.ops import ServingSpec
    from bitnet_jax.model.serving_layers import merge_serving_variables
    from bitnet_jax.model.transformer import BitNetLM

    config_path = os.path.join(folder, "config.json")
    try:
        with open(config_path) as f:
            hf = json.load(f)
    except (OSError, ValueError) as e:
        raise BitNetError(f"{config_path}: cannot read the packed model's config ({e}).") from None
    meta = hf.pop("bitnet_jax", {})
    if meta.get("format") != PACKED_FORMAT:
        raise BitNetError(f"{folder} is not a packed bitnet-jax folder (config.json has no bitnet_jax.format).")
    version = meta.get("layout_version")
    if version != layout.LAYOUT_VERSION:
        raise BitNetError(
            f"{folder}: weights packed in layout version {version}, but this bitnet_jax reads version "
            f"{layout.LAYOUT_VERSION}. Convert the source model again with this version "
            "(bitnet-jax convert SRC DST), or install the bitnet_jax that wrote it."
        )
    config = BitNetConfig.from_dict(hf, source=config_path)
    weights = os.path.join(folder, "model.safetensors")
    try:
        with safe_open(weights, framework="np") as handle:
            flat = {}
            for name in handle.keys():
                tensor = handle.get_slice(name)
                flat[tuple(name.split("."))] = jax.ShapeDtypeStruct(
                    tuple(tensor.get_shape()), _SAFETENSORS_DTYPES[tensor.get_dtype()]
                )
    except Exception as e:  # SafetensorError, OSError, KeyError (a dtype packing never writes)
        raise BitNetError(f"{weights}: cannot read the packed weights ({e!r}). Convert the model again.") from None
    params = unflatten_dict(flat)
    spec = ServingSpec("xla", meta.get("lm_head", "int8"), config.act_bits)  # only the shapes are used
    expected = jax.eval_shape(lambda: BitNetLM(config, spec).init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))
    _check_against(merge_serving_variables(nn.unbox(expected)), params, weights)
    return config, params


def load_packed(folder: str) -> tuple[BitNetConfig, dict]:
    """(config, packed params) from a folder written by `save_packed`; checks layout and shapes
    (`read_packed_folder`) before reading any weight.

    The params are JAX arrays that own the bytes read from the file: each tensor is read straight
    into 64-byte-aligned host memory, which XLA:CPU adopts without a copy. (safetensors' own
    readers map the file: its touched pages would count as resident beside the copies, twice the
    weights at the peak.)
    """
    config, shapes = read_packed_folder(folder)
    weights = os.path.join(folder, "model.safetensors")
    try:
        offsets = _tensor_offsets(weights)
        with open(weights, "rb", buffering=0) as f:
            params = jax.tree.map_with_path(
                lambda path, spec: jax.device_put(_read_tensor(f, offsets[".".join(k.key for k in path)], spec)), shapes
            )
    except (OSError, ValueError, KeyError) as e:
        raise BitNetError(
            f"{weights}: cannot read the packed weights ({e}); the file is truncated or corrupt. "
            "Convert the model again."
        ) from None
    release_freed_memory()
    return config, params


_SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": jnp.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def _tensor_offsets(file: str) -> dict[str, tuple[int, int]]:
    """Byte range of every tensor in a safetensors file, from its header (an 8-byte little-endian
    length, then JSON with each tensor's `data_offsets` relative to the end of the header)."""
    with open(file, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(length))
    return {
        name: (8 + length + info["data_offsets"][0], 8 + length + info["data_offsets"][1])
        for name, info in header.items()
        if name != "__metadata__"
    }


def _read_tensor(f, byte_range: tuple[int, int], spec) -> np.ndarray:
    out = aligned_empty(spec.shape, spec.dtype)
    start, end = byte_range
    if end - start != out.nbytes:
        raise ValueError(f"a tensor holds {end - start} bytes, expected {out.nbytes}")
    view, done = memoryview(out.reshape(-1).view(np.uint8)), 0
    f.seek(start)
    while done < out.nbytes:
        got = f.readinto(view[done:])
        if not got:
            raise ValueError(f"the file ends {out.nbytes - done} bytes into a tensor")
        done += got
    return out


def _check_against(expected, params, where: str):
    """Every expected tensor is present with the expected shape and kind of dtype."""
    got = flatten_dict(params)
    for path, spec in flatten_dict(expected).items():
        name = ".".join(path)
        if path not in got:
            raise BitNetError(f"{where}: tensor {name} is missing; the file does not match config.json.")
        shape = tuple(got[path].shape)
        integer = jnp.issubdtype(spec.dtype, jnp.integer)
        dtype_ok = got[path].dtype == spec.dtype if integer else jnp.issubdtype(got[path].dtype, jnp.floating)
        if shape != tuple(spec.shape) or not dtype_ok:
            raise BitNetError(
                f"{where}: tensor {name} is {got[path].dtype} {list(shape)}, but config.json implies "
                f"{spec.dtype} {list(spec.shape)}; the weights and config.json disagree."
            )
