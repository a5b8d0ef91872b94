"""One entry point for every model a user may point at: `load_model(path)`.

A bitnet-jax run folder (`bitnet-jax train`), a packed folder (`bitnet-jax convert`), a Hugging
Face BitNet folder or a GGUF file (bitnet.cpp / llama.cpp); each comes back as (config, params,
tokenizer), the tokenizer being the one stored beside (or, in a GGUF file, with) the weights.
"""

from __future__ import annotations

import os

from bitnet_jax.data.tokenizer import load_tokenizer
from bitnet_jax.interop.gguf import is_gguf_file, load_gguf, load_gguf_tokenizer
from bitnet_jax.interop.hf import load_hf
from bitnet_jax.model.serving_layers import is_packed
from bitnet_jax.serve.pack import unpack
from bitnet_jax.serve.packed_folder import is_packed_folder, load_packed, read_packed_folder
from bitnet_jax.train.run_folder import is_run_folder, load_run


def load_model(path: str | os.PathLike, *, shapes_only: bool = False, i2s_layout: str = "x86"):
    """(config, params, tokenizer) from a run folder, a packed folder, a Hugging Face folder or a
    GGUF file (`i2s_layout`: its I2_S code layout, as `load_gguf` takes it).

    With `shapes_only`, a packed folder's params are its weights' abstract shapes
    (`packed_folder.read_packed_folder`; `load_packed` reads the weights), so that the serving program can
    be compiled before the weights take memory.
    """
    path = os.fspath(path)
    if path.endswith(".gguf") or is_gguf_file(path):  # bitnet.cpp / llama.cpp: packed as it is read
        config, params = load_gguf(path, i2s_layout=i2s_layout)
        return config, params, load_gguf_tokenizer(path, config)
    if is_run_folder(path):
        run, params, tokenizer = load_run(path)
        return run.model, params, tokenizer
    if is_packed_folder(path):
        config, params = (read_packed_folder if shapes_only else load_packed)(path)
    else:
        config, params = load_hf(path)
    return config, params, load_tokenizer(path, bos_id=config.bos_token_id, eos_id=(config.eos_ids or (None,))[0])


def load_training_model(path: str | os.PathLike):
    """`load_model`, with packed weights (a packed folder, a GGUF file) turned back into training
    parameters (`pack.unpack`): where `bitnet-jax train --init` starts from. Master weights (a
    Hugging Face bf16 / fp32 folder, a run folder) continue as they are; ternary codes become
    master weights that quantize back to themselves, so the first forward pass is the packed
    model's, and the straight-through gradients then move those weights off the ternary grid."""
    config, params, tokenizer = load_model(path)
    if is_packed(params):
        params = unpack(config, params)
    return config, params, tokenizer
