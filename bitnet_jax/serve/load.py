"""One entry point for every model a user may point at: `load_model(path)`.

A bitnet-jax run folder (`bitnet-jax train`), a packed folder (`bitnet-jax convert`) or a Hugging
Face BitNet folder; each comes back as (config, params, tokenizer), the tokenizer being the one
stored beside the weights.
"""

from __future__ import annotations

import os

from bitnet_jax.data.tokenizer import load_tokenizer
from bitnet_jax.interop.hf import load_hf
from bitnet_jax.serve.pack import is_packed_folder, load_packed, read_packed_folder
from bitnet_jax.train.loop import is_run_folder, load_run


def load_model(path: str | os.PathLike, *, shapes_only: bool = False):
    """(config, params, tokenizer) from a run folder, a packed folder or a Hugging Face folder.

    With `shapes_only`, a packed folder's params are its weights' abstract shapes
    (`pack.read_packed_folder`; `load_packed` reads the weights), so that the serving program can
    be compiled before the weights take memory.
    """
    path = os.fspath(path)
    if is_run_folder(path):
        run, params, tokenizer = load_run(path)
        return run.model, params, tokenizer
    if is_packed_folder(path):
        config, params = (read_packed_folder if shapes_only else load_packed)(path)
    else:
        config, params = load_hf(path)
    return config, params, load_tokenizer(path, bos_id=config.bos_token_id, eos_id=(config.eos_ids or (None,))[0])
