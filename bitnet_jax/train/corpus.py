"""A run's data: its tokenizer and the token streams of its sources (`RunConfig.corpus`).

The tokenizer is, in order: the one already in the run folder (a resumed run); `RunConfig.tokenizer`;
the one stored with the first `array_record` source; else a sentencepiece model trained on the
sources' training documents (cached by their contents). It is copied into the run folder.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from bitnet_jax.data import documents, token_records
from bitnet_jax.data import pipeline as data
from bitnet_jax.data.tokenizer import (
    HF_TOKENIZER_FILE,
    SENTENCEPIECE_FILE,
    copy_tokenizer,
    load_tokenizer,
)
from bitnet_jax.data.tokenizer_training import train_sentencepiece
from bitnet_jax.errors import BitNetError
from bitnet_jax.train.run_config import RunConfig


@dataclasses.dataclass
class Corpus:
    tokenizer: object
    train_tokens: list[np.ndarray | data.MaskedStream]  # one [N] stream per source (masked: chat sources)
    eval_tokens: np.ndarray | data.MaskedStream  # [N] the sources' held-out streams, in source order
    names: list[str]  # the sources, as messages name them
    weights: list[float]


def prepare_corpus(run: RunConfig, out_dir: str, cache_dir: str) -> Corpus:
    """Finds the tokenizer (training one if needed) and tokenizes both splits of every source (cached)."""
    sources = run.sources
    tokenizer = _tokenizer(run, out_dir, cache_dir)
    check_run_tokenizer(tokenizer, run)
    streams = [
        documents.source_streams(
            s,
            tokenizer,
            default_suffixes=run.corpus_suffixes,
            heldout_fraction=run.heldout_fraction,
            cache_dir=cache_dir,
        )
        for s in sources
    ]
    for source, (train, held) in zip(sources, streams):
        if len(train) == 0:
            raise BitNetError(
                f"{source.name} leaves no training documents after holding out "
                f"{run.heldout_fraction:.0%} for evaluation; add documents or lower heldout_fraction."
            )
    eval_tokens = data.concat_streams([h for _, h in streams], tokenizer.eos_id)
    return Corpus(
        tokenizer, [t for t, _ in streams], eval_tokens, [s.name for s in sources], [s.weight for s in sources]
    )


def _tokenizer(run: RunConfig, out_dir: str, cache_dir: str):
    if any(os.path.isfile(os.path.join(out_dir, f)) for f in (SENTENCEPIECE_FILE, HF_TOKENIZER_FILE)):
        return load_tokenizer(out_dir)
    pretokenized = [s for s in run.sources if s.kind == "array_record"]
    if run.tokenizer:
        tokenizer = load_tokenizer(run.tokenizer)
    elif pretokenized:
        tokenizer = load_tokenizer(token_records.token_folder(pretokenized[0].path))
    else:
        tokenizer = _trained_tokenizer(run, cache_dir)
    copy_tokenizer(tokenizer, out_dir)
    return tokenizer


def _trained_tokenizer(run: RunConfig, cache_dir: str):
    docs, key_files, extras = [], [], []
    for source in run.sources:
        source_docs, files, extra = documents.training_documents(source, run.corpus_suffixes, run.heldout_fraction)
        docs += source_docs
        key_files += files
        extras += [extra] if extra else []
    # For the default corpus this is the key used before mixtures existed, so caches stay valid.
    key = data.files_key(
        key_files,
        extra=f"spm-{run.model.vocab_size}-{run.tokenizer_max_bytes}-{run.seed}" + "".join(f":{e}" for e in extras),
    )
    tokenizer_dir = os.path.join(cache_dir, f"tokenizer-{key}")
    if os.path.isfile(os.path.join(tokenizer_dir, SENTENCEPIECE_FILE)):
        return load_tokenizer(tokenizer_dir)
    files = [d for d in docs if not isinstance(d, str)]
    texts = [d for d in docs if isinstance(d, str)]
    what = f"{len(files)} files" if not texts else f"{len(files) + len(texts)} documents"
    print(f"Training a {run.model.vocab_size}-piece sentencepiece tokenizer on {what}...")
    return train_sentencepiece(
        files, run.model.vocab_size, tokenizer_dir, max_bytes=run.tokenizer_max_bytes, seed=run.seed, texts=texts
    )


def check_run_tokenizer(tokenizer, run: RunConfig):
    """Refuses a tokenizer whose vocabulary size or end-of-sequence id the run's model does not expect."""
    m = run.model
    if tokenizer.vocab_size != m.vocab_size or tokenizer.eos_id not in m.eos_ids:
        raise BitNetError(
            f"The tokenizer has vocab_size={tokenizer.vocab_size}, eos={tokenizer.eos_id}; the model config "
            f"expects vocab_size={m.vocab_size}, eos={m.eos_token_id}. Use a fresh --out folder or make them agree."
        )
