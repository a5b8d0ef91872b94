"""Reading the documents of a data source (`sources.DataSource`) and turning them into token streams.

Each source gives a train and a held-out token stream (`doc EOS doc EOS ...`, see `data.py`):
- `stdlib` and `text` folders hold one document per file and split by file path (`data.split_files`);
- `jsonl`, `parquet` and `array_record` hold many documents per file and split by the document's
  index among the source's non-empty documents, in file order: the same rule on the same
  documents, so an `array_record` folder tokenized from a JSONL source splits exactly as it does.
Whitespace-only (and null) documents are skipped everywhere. Streams of text sources are cached
like `data.tokenize_files`'s, keyed by the files' contents, the field and the tokenizer.

`chat` sources hold one conversation per JSON line (`_read_conversations`), split by index
like `jsonl`; each is rendered by the tokenizer's chat template (`chat.chat_training_ids`) into a
`data.MaskedStream` whose loss flags mark the assistant tokens, cached keyed by the files, the
tokenizer and the template.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from bitnet_jax.data import chat, token_records
from bitnet_jax.data import pipeline as data
from bitnet_jax.data.sources import DataSource
from bitnet_jax.errors import BitNetError

_SUFFIXES = {"jsonl": (".jsonl", ".json"), "chat": (".jsonl", ".json"), "parquet": (".parquet",)}
# Bump when the rendering or masking of chat sources changes: it keys their cached streams.
_CHAT_FORMAT = "chat-v1"


def source_files(source: DataSource, default_suffixes: Sequence[str]) -> tuple[list[Path], Path]:
    """(the source's data files in order, the root their split keys are relative to)."""
    if source.kind == "stdlib":
        return data.stdlib_source_files(), data.stdlib_root()
    if source.kind == "text":
        return data.text_files(source.path, source.suffixes or default_suffixes), Path(source.path)
    if source.kind == "array_record":
        folder = token_records.token_folder(source.path)
        return [folder / token_records.RECORDS_FILE], folder
    path = source.path
    if any(c in path for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(path, recursive=True) if os.path.isfile(p))
    elif os.path.isdir(path):
        files = data.walk_files(Path(path), _SUFFIXES[source.kind])
    elif os.path.isfile(path):
        files = [Path(path)]
    else:
        raise BitNetError(
            f"{source.name}: {path} does not exist. Expected a {source.kind} file, a folder of them or a glob pattern."
        )
    if not files:
        raise BitNetError(
            f"{source.name}: found no {' or '.join(_SUFFIXES[source.kind])} files there. Point the "
            "source at your data files."
        )
    return files, Path(path)


def read_texts(source: DataSource, files: Sequence[Path]) -> list[str]:
    """The non-empty documents of a jsonl or parquet source, in file order."""
    read = _read_jsonl if source.kind == "jsonl" else _read_parquet
    texts = [t for f in files for t in read(f, source.field) if t is not None and t.strip()]
    if not texts:
        raise BitNetError(
            f"{source.name}: the {source.kind} data hold no non-empty documents in "
            f"{'field' if source.kind == 'jsonl' else 'column'} {source.field!r}. Expected text "
            "there; check the path and the field name."
        )
    return texts


def _json_lines(path: Path):
    """(line number, parsed record) of each non-blank line of a JSON Lines file (blank lines, a
    trailing newline say, are no records); invalid JSON is an error naming file and line."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line)
            except ValueError as e:
                raise BitNetError(
                    f"{path}, line {line_no}: expected one JSON object per line, found invalid JSON "
                    f"({e}): {line.strip()[:80]!r}. Fix or remove that line."
                ) from None


def _read_conversations(path: Path) -> list[tuple[int, list[dict]]]:
    """(line number, messages) of each conversation of a chat JSON Lines file; errors name the
    file and the line."""
    conversations = []
    for line_no, record in _json_lines(path):
        try:
            conversations.append((line_no, chat.check_conversation(record)))
        except BitNetError as e:
            raise BitNetError(f"{path}, line {line_no}: {e}") from None
    return conversations


def _read_jsonl(path: Path, field: str) -> list[str | None]:
    texts = []
    for line_no, record in _json_lines(path):
        if not isinstance(record, dict):
            raise BitNetError(
                f"{path}, line {line_no}: expected a JSON object with a {field!r} field, found "
                f"a JSON {type(record).__name__}."
            )
        if field not in record:
            raise BitNetError(
                f"{path}, line {line_no}: no field {field!r}; this line has "
                f"{', '.join(map(repr, record)) or 'no fields'}. Set the source's 'field' to "
                "the one that holds the text."
            )
        value = record[field]
        if value is not None and not isinstance(value, str):
            raise BitNetError(
                f"{path}, line {line_no}: field {field!r} holds a JSON {type(value).__name__}; "
                "expected a string of text."
            )
        texts.append(value)
    return texts


def _read_parquet(path: Path, column: str) -> list[str | None]:
    try:
        import pyarrow
        import pyarrow.parquet as pq
    except ImportError:
        raise BitNetError("Reading Parquet needs pyarrow: pip install pyarrow.") from None
    try:
        pfile = pq.ParquetFile(path)
        schema = pfile.schema_arrow
        if column not in schema.names:
            raise BitNetError(
                f"{path}: no column {column!r}; its columns are {', '.join(map(repr, schema.names))}. "
                "Set the source's 'column' to the one that holds the text."
            )
        kind = schema.field(column).type
        if not (pyarrow.types.is_string(kind) or pyarrow.types.is_large_string(kind)):
            raise BitNetError(f"{path}: column {column!r} holds {kind}; expected strings of text.")
        return pfile.read(columns=[column]).column(column).to_pylist()
    except (pyarrow.ArrowException, OSError) as e:
        raise BitNetError(
            f"{path} is not a readable Parquet file ({type(e).__name__}: {e}). Expected a complete "
            "Parquet file; write or copy it again."
        ) from None


def split_indices(n: int, heldout_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) document indices of n documents: `data.split_files`'s rule on the index.

    A document is held out iff a stable hash of its index is below `heldout_fraction`, so
    appending documents moves none of the earlier ones; if that holds out nothing and n >= 2,
    the document with the smallest hash is held out.
    """
    hashes = np.array([data.unit_hash(f"doc:{i}") for i in range(n)])
    held = hashes < heldout_fraction
    if not held.any() and heldout_fraction > 0 and n >= 2:
        held[np.argmin(hashes)] = True
    return np.flatnonzero(~held), np.flatnonzero(held)


def training_documents(
    source: DataSource, default_suffixes: Sequence[str], heldout_fraction: float
) -> tuple[list[Path] | list[str], list[Path], str]:
    """What a new tokenizer trains on: (train files or train texts, the files that key the tokenizer
    cache, a key suffix).

    Text folders give their train files (read lazily by the trainer, and the cache key, as before
    mixtures existed); jsonl and parquet sources give their train texts, keyed by their data files
    plus the suffix, which tells apart sources with the same files.
    """
    files, root = source_files(source, default_suffixes)
    if source.kind in ("stdlib", "text"):
        train = data.split_files(files, root, heldout_fraction)[0]
        return train, train, ""
    if source.kind == "array_record":
        raise BitNetError(f"{source.name} is already tokenized; its folder holds the tokenizer to use.")
    if source.kind == "chat":
        raise BitNetError(
            f"{source.name}: chat data are rendered by the model's chat template, and a tokenizer trained "
            "here has none. Use the tokenizer of a model that has one: `train --init SRC`, `--set "
            "tokenizer=FOLDER` or `tokenize --tokenizer FOLDER` (its tokenizer_config.json holding a chat_template)."
        )
    texts = read_texts(source, files)
    train, _ = split_indices(len(texts), heldout_fraction)
    return [texts[i] for i in train], files, f"{source.kind}:{source.field}:{heldout_fraction}"


def source_streams(
    source: DataSource,
    tokenizer,
    *,
    default_suffixes: Sequence[str],
    heldout_fraction: float,
    cache_dir: str | os.PathLike | None,
) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) token streams of one source (`data.MaskedStream`s for a chat source)."""
    files, root = source_files(source, default_suffixes)
    if source.kind == "chat":
        return chat_streams(source, files, tokenizer, heldout_fraction, cache_dir)
    if source.kind in ("stdlib", "text"):
        train, held = data.split_files(files, root, heldout_fraction)
        return data.tokenize_files(train, tokenizer, cache_dir), data.tokenize_files(held, tokenizer, cache_dir)
    if source.kind == "array_record":
        stream, meta = token_records.open_stream(root)
        check_tokenizer(source, meta, tokenizer)
        train, held = split_indices(meta["documents"], heldout_fraction)
        if meta.get("flags"):  # a chat source's: masked streams, split as the source splits
            flags = token_records.open_flags_stream(root, separator=data.DOC_END)
            return tuple(data.MaskedStream(stream.select(i), flags.select(i)) for i in (train, held))
        return stream.select(train), stream.select(held)
    key = None
    if cache_dir is not None:
        key = data.files_key(
            files, extra=f"tokens:{tokenizer.fingerprint}:{source.kind}:{source.field}:{heldout_fraction}"
        )
        paths = [Path(cache_dir) / f"tokens-{key}-{side}.npy" for side in ("train", "heldout")]
        if all(p.is_file() for p in paths):
            return tuple(np.load(p, mmap_mode="r") for p in paths)
    texts = read_texts(source, files)
    streams = _split_streams(texts, heldout_fraction, lambda t: data.texts_to_stream(t, tokenizer))
    if key is None:
        return streams
    return tuple(
        data.cached_stream(cache_dir, f"{key}-{side}", lambda s=s: s) for side, s in zip(("train", "heldout"), streams)
    )


def chat_streams(
    source: DataSource,
    files: Sequence[Path],
    tokenizer,
    heldout_fraction: float,
    cache_dir: str | os.PathLike | None,
) -> tuple[data.MaskedStream, data.MaskedStream]:
    """(train, held-out) masked streams of a chat source: conversations rendered by the tokenizer's
    chat template, LOSS on assistant tokens. Every record is read and rendered (both splits), so
    a bad one stops the run before it starts."""
    template = _chat_template(source, tokenizer)
    if cache_dir is None:
        return _render_chat_streams(source, files, template, tokenizer, heldout_fraction)
    digest = hashlib.sha256(template.encode()).hexdigest()[:16]
    key = data.files_key(files, extra=f"{_CHAT_FORMAT}:{tokenizer.fingerprint}:{digest}:{heldout_fraction}")
    built = functools.cache(lambda: _render_chat_streams(source, files, template, tokenizer, heldout_fraction))
    return tuple(
        data.MaskedStream(
            data.cached_stream(cache_dir, f"{key}-{side}", lambda i=i: built()[i].tokens),
            data.cached_stream(cache_dir, f"{key}-{side}-flags", lambda i=i: built()[i].flags),
        )
        for i, side in enumerate(("train", "heldout"))
    )


def _chat_template(source: DataSource, tokenizer) -> str:
    template = chat.tokenizer_chat_template(tokenizer)
    if not template:
        raise BitNetError(
            f"{source.name}: the tokenizer ({tokenizer.path}) has no chat template (no chat_template in the "
            f"tokenizer_config.json beside it), so the conversations cannot be rendered as the model expects. "
            "Fine-tune a chat model (--init SRC with a template), or add its chat_template to that file."
        )
    return template


def _chat_documents(
    source: DataSource, files: Sequence[Path], template: str, tokenizer
) -> tuple[list[list[int]], list[list[int]]]:
    """(token ids, loss mask) of every conversation of a chat source, in file order."""
    docs, masks = [], []
    for path in files:
        for line_no, messages in _read_conversations(path):
            try:
                ids, mask = chat.chat_training_ids(template, messages, tokenizer)
            except BitNetError as e:
                raise BitNetError(f"{path}, line {line_no}: {e}") from None
            docs.append(ids)
            masks.append(mask)
    if not docs:
        raise BitNetError(f"{source.name}: the chat data hold no conversations; expected one JSON object per line.")
    return docs, masks


def _render_chat_streams(
    source: DataSource, files: Sequence[Path], template: str, tokenizer, heldout_fraction: float
) -> tuple[data.MaskedStream, data.MaskedStream]:
    docs, masks = _chat_documents(source, files, template, tokenizer)
    return tuple(
        data.masked_docs_to_stream(
            [docs[i] for i in side], [masks[i] for i in side], tokenizer.eos_id, tokenizer.vocab_size
        )
        for side in split_indices(len(docs), heldout_fraction)
    )


def _split_streams(docs: Sequence, heldout_fraction: float, to_stream: Callable[[list], np.ndarray]):
    train, held = split_indices(len(docs), heldout_fraction)
    return to_stream([docs[i] for i in train]), to_stream([docs[i] for i in held])


def check_tokenizer(source: DataSource, meta: dict, tokenizer) -> None:
    """Refuses pre-tokenized data whose tokenizer is not the run's."""
    expected = meta["tokenizer"]
    if expected["fingerprint"] != tokenizer.fingerprint:
        raise BitNetError(
            f"{source.name} was tokenized with another tokenizer (fingerprint {expected['fingerprint']}, "
            f"vocab_size {expected['vocab_size']}) than this run's ({tokenizer.fingerprint}, vocab_size "
            f"{tokenizer.vocab_size}). Tokenize it again with this run's tokenizer, or set the run's tokenizer "
            f"to {token_records.token_folder(source.path)}."
        )


def read_all_texts(source: DataSource, default_suffixes: Sequence[str]) -> list[str]:
    """Every non-empty document of a text source, in order (what `bitnet-jax tokenize` writes)."""
    files, _ = source_files(source, default_suffixes)
    if source.kind in ("stdlib", "text"):
        return data.read_text_files(files)
    if source.kind == "array_record":
        raise BitNetError(f"{source.name} is already tokenized; tokenize its text source instead.")
    if source.kind == "chat":
        raise BitNetError(f"{source.name} holds conversations, not text documents; render them with the chat template.")
    return read_texts(source, files)


def tokenize_to_folder(
    source: DataSource,
    tokenizer,
    out_dir: str | os.PathLike,
    default_suffixes: Sequence[str] = (".py", ".txt", ".md", ".rst"),
) -> dict:
    """Tokenizes every document of a text source into a token folder (`token_records`); returns its metadata.

    An `array_record:` source over the folder then gives the same streams as the source on the fly
    (for jsonl, parquet and chat sources; text folders split by file there, by document index here).
    A chat source's conversations are rendered by the tokenizer's chat template, their loss flags
    written beside them.
    """
    if source.kind == "chat":
        files, _ = source_files(source, default_suffixes)
        docs, masks = _chat_documents(source, files, _chat_template(source, tokenizer), tokenizer)
        flags = (np.asarray(m, np.uint8) * data.LOSS for m in masks)
        return token_records.write_token_folder(out_dir, docs, tokenizer, source=source.name, flags=flags)
    texts = read_all_texts(source, default_suffixes)
    docs = (tokenizer.encode_batch(texts[i : i + 1024]) for i in range(0, len(texts), 1024))
    return token_records.write_token_folder(
        out_dir, (d for batch in docs for d in batch), tokenizer, source=source.name
    )
