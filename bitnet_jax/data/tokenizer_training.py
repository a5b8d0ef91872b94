"""Training the sentencepiece tokenizers this project uses when a run brings none: a byte-level-safe
BPE model for code (ids and normalization as `tokenizer.py` describes), on a run's training split.
"""

from __future__ import annotations

import io
import os
import random
import time
from pathlib import Path
from typing import Iterator, Sequence

import sentencepiece as spm

from bitnet_jax.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, SENTENCEPIECE_FILE, UNK_ID, SentencePieceTokenizer
from bitnet_jax.errors import BitNetError

_CHUNK_BYTES = 2048  # training sentences: multi-line chunks of about this size
_MAX_SENTENCE_BYTES = 1 << 16  # longer lines are generated blobs, not code: skipped


def _training_sentences(documents: Sequence[Path | str], max_bytes: int, seed: int, stats: dict) -> Iterator[str]:
    """Multi-line chunks of the documents (files, read when reached, or texts), in a seeded
    order, until max_bytes of UTF-8."""
    order = list(documents)
    random.Random(seed).shuffle(order)
    total = 0
    for doc in order:
        text = doc if isinstance(doc, str) else Path(doc).read_text(encoding="utf-8", errors="replace")
        chunk: list[str] = []
        chunk_bytes = 0
        for line in text.splitlines(keepends=True):
            n = len(line.encode("utf-8"))
            if n > _MAX_SENTENCE_BYTES:  # a generated blob, not code; skip it
                continue
            if chunk and chunk_bytes + n > _CHUNK_BYTES:
                yield "".join(chunk)
                chunk, chunk_bytes = [], 0
            if total + n > max_bytes:
                if chunk:
                    yield "".join(chunk)
                stats["bytes"] = total
                return
            chunk.append(line)
            chunk_bytes += n
            total += n
        if chunk:
            yield "".join(chunk)
        stats["files"] = stats.get("files", 0) + 1
    stats["bytes"] = total


def train_sentencepiece(
    text_files: Sequence[str | os.PathLike],
    vocab_size: int,
    out_dir: str | os.PathLike,
    *,
    max_bytes: int = 16_000_000,
    seed: int = 0,
    texts: Sequence[str] | None = None,
) -> SentencePieceTokenizer:
    """Trains a BPE sentencepiece model for code and writes `out_dir/tokenizer.model`.

    Reads the files in an order shuffled by `seed` until `max_bytes` of text, so the result is a
    function of (files, vocab_size, max_bytes, seed). Pass only training-split files. The
    stdlib (~10 MB) with vocab_size 4096 trains in a few seconds on 2 cores. `texts` (documents
    held in memory, e.g. read from JSON Lines) are used along with the files.
    """
    files = [Path(f) for f in text_files]
    documents = [*files, *(texts or ())]
    if not documents:
        raise BitNetError("train_sentencepiece got no text files or texts; pass at least one.")
    min_vocab = 4 + 256 + 1
    if vocab_size < min_vocab:
        raise BitNetError(
            f"vocab_size={vocab_size} is too small: 4 special ids and 256 byte pieces need "
            f"{min_vocab - 1}, plus at least one merge. Use vocab_size >= {min_vocab}."
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stats: dict = {}
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    start = time.perf_counter()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_sentences(documents, max_bytes, seed, stats),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            # Code needs its whitespace: keep every character as is and never fold spaces.
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            split_by_whitespace=True,
            allow_whitespace_only_pieces=True,
            # Rare characters go through byte fallback instead of taking vocabulary slots.
            character_coverage=0.9999,
            max_sentence_length=_MAX_SENTENCE_BYTES,
            pad_id=PAD_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            unk_id=UNK_ID,
            pad_piece="<pad>",
            bos_piece="<s>",
            eos_piece="</s>",
            unk_piece="<unk>",
            num_threads=os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as e:
        hint = (
            "each distinct character of the text needs its own id besides the 260 "
            "special and byte ids: use a larger vocab_size"
            if "required_chars" in str(e)
            else "use a smaller vocab_size or more text"
        )
        raise BitNetError(
            f"sentencepiece could not train a {vocab_size}-token vocabulary on "
            f"{stats.get('bytes', 0)} bytes from {len(documents)} documents ({e}); {hint}."
        ) from e
    path = out / SENTENCEPIECE_FILE
    tmp = path.with_suffix(".model.tmp")
    tmp.write_bytes(model.getvalue())
    os.replace(tmp, path)
    tokenizer = SentencePieceTokenizer(path)
    tokenizer.train_stats = {**stats, "seconds": time.perf_counter() - start}
    return tokenizer
