"""The packed folder: what `bitnet-jax convert` writes and `generate` / `serve` read.

A folder holds `config.json` (the model config, all of `BitNetConfig`, with a `bitnet_jax` entry
naming the format, the layout version and the lm_head kind), `model.safetensors` (parameter paths
joined by '.') and the tokenizer files of the source. `read_packed_folder` checks it against the
config from the headers alone (abstract arrays, enough to compile); `load_packed` reads the weights
straight into 64-byte-aligned host memory.

Folders of layout version 1 load too: they differ only in a group-scale model's ternary codes and
scales (TQ2B and [K / G, N] then, TQ2G tiles now: `kernels/layout.py`), which `load_packed`
repacks as it reads them.
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
from bitnet_jax.kernels import layout
from bitnet_jax.model.config import BitNetConfig
from bitnet_jax.model.serving_layers import is_packed, lm_head_kind
from bitnet_jax.serve.host_memory import aligned_empty, release_freed_memory

PACKED_FORMAT = "bitnet_jax.packed"


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


# Layout versions `load_packed` reads: this one, and version 1 (group-scale codes in TQ2B).
_READABLE_VERSIONS = (1, layout.LAYOUT_VERSION)


def read_packed_folder(folder: str) -> tuple[BitNetConfig, dict]:
    """(config, abstract params) of a folder written by `save_packed`, from config.json and the
    safetensors header alone: the leaves are `jax.ShapeDtypeStruct`s (enough for
    `generate.compile_generate`), with the shapes `load_packed` gives. Checks the layout version and
    that every tensor the config implies is there with its shape and dtype."""
    config, params, _, _ = _read_header(folder)
    return config, params


def _read_header(folder: str) -> tuple[BitNetConfig, dict, dict, set]:
    """(config, abstract params as loaded, abstract params as stored, the paths to repack): the two
    trees differ only for a group-scale model of layout version 1, whose TQ2B codes and [K / G, N]
    scales load as TQ2G tiles."""
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
    if version not in _READABLE_VERSIONS:
        raise BitNetError(
            f"{folder}: weights packed in layout version {version}, but this bitnet_jax reads version "
            f"{layout.LAYOUT_VERSION} (and 1). Convert the source model again with this version "
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
    stored, repack = unflatten_dict(flat), set()
    if version == 1 and config.weight_group_size:
        for block, names in config.linear_shapes.items():
            for name, (k, n) in names.items():
                codes, scales = (
                    flat.get(("layers", block, name, "w_packed")),
                    flat.get(("layers", block, name, "w_scale")),
                )
                if codes is None or scales is None or len(scales.shape) != 3:
                    continue  # _check_against names what is missing or wrong
                if tuple(codes.shape[1:]) == layout.packed_ternary_shape(n, k) and scales.shape[2] == n:
                    layers, groups = codes.shape[0], scales.shape[1]
                    flat[("layers", block, name, "w_packed")] = jax.ShapeDtypeStruct(
                        (layers, *layout.packed_ternary_tiles_shape(n, k)), codes.dtype
                    )
                    flat[("layers", block, name, "w_scale")] = jax.ShapeDtypeStruct(
                        (layers, *layout.group_scales_shape(n, groups)), scales.dtype
                    )
                    repack |= {("layers", block, name, "w_packed"), ("layers", block, name, "w_scale")}
    params = unflatten_dict(flat)
    spec = ServingSpec("xla", meta.get("lm_head", "int8"), config.act_bits)  # only the shapes are used
    expected = jax.eval_shape(lambda: BitNetLM(config, spec).init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))
    _check_against(merge_serving_variables(nn.unbox(expected)), params, weights)
    return config, params, stored, repack


def load_packed(folder: str) -> tuple[BitNetConfig, dict]:
    """(config, packed params) from a folder written by `save_packed`; checks layout and shapes
    (`read_packed_folder`) before reading any weight.

    The params are JAX arrays that own the bytes read from the file: each tensor is read straight
    into 64-byte-aligned host memory, which XLA:CPU adopts without a copy. (safetensors' own
    readers map the file: its touched pages would count as resident beside the copies, twice the
    weights at the peak.)
    """
    config, shapes, stored, repack = _read_header(folder)
    weights = os.path.join(folder, "model.safetensors")

    def read(f, path, spec):
        names = tuple(k.key for k in path)
        tensor = _read_tensor(f, offsets[".".join(names)], spec)
        if names in repack:  # a version-1 group model's TQ2B codes or [K / G, N] scales: as TQ2G tiles
            block, name = names[1], names[2]
            k, n = config.linear_shapes[block][name]
            tiles = aligned_empty(_leaf(shapes, names).shape, tensor.dtype)
            for i, layer in enumerate(tensor):
                tiles[i] = (
                    layout.repack_ternary_tiles(layer, n, k)
                    if names[3] == "w_packed"
                    else layout.tile_group_scales(layer)
                )
            tensor = tiles
        return jax.device_put(tensor)

    try:
        offsets = _tensor_offsets(weights)
        with open(weights, "rb", buffering=0) as f:
            params = jax.tree.map_with_path(lambda path, spec: read(f, path, spec), stored)
    except (OSError, ValueError, KeyError) as e:
        raise BitNetError(
            f"{weights}: cannot read the packed weights ({e}); the file is truncated or corrupt. "
            "Convert the model again."
        ) from None
    release_freed_memory()
    return config, params


def _leaf(tree: dict, names: tuple[str, ...]):
    for name in names:
        tree = tree[name]
    return tree


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
