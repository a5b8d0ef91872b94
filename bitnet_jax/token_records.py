"""Pre-tokenized documents on disk: what `bitnet-jax tokenize` writes and `array_record:` sources read.

A token folder holds
  tokens.array_record   one record per document: its token ids (no EOS) as little-endian
                        uint16 (vocab_size <= 65536) or uint32 bytes
  tokens.json           {"format", "dtype", "documents", "tokens", "tokenizer": {"fingerprint",
                        "vocab_size", "eos_id"}, "source"}
  tokenizer.model or tokenizer.json (+ its config files): a copy of the tokenizer, so the folder is
                        self-contained and `load_tokenizer(folder)` gives the tokenizer back

ArrayRecord's reader returns zero records, without an error, for a file that is garbage or cut
short; the counts in tokens.json are what catches that.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from array_record.python import array_record_module

from .errors import BitNetError
from .tokenizer import copy_tokenizer

RECORDS_FILE = "tokens.array_record"
META_FILE = "tokens.json"
FORMAT = "bitnet-jax-tokens-v1"


def record_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def write_token_folder(out_dir: str | os.PathLike, docs: Iterable[Sequence[int]], tokenizer,
                       source: str) -> dict:
    """Writes `docs` (token ids per document) as a token folder; returns the metadata written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = record_dtype(tokenizer.vocab_size)
    tmp = out / f"{RECORDS_FILE}.tmp"
    # group_size:1 keeps each record its own chunk, so reading one document decodes only it.
    writer = array_record_module.ArrayRecordWriter(str(tmp), "group_size:1")
    n_docs = n_tokens = 0
    try:
        for doc in docs:
            writer.write(np.asarray(doc, dtype=dtype).tobytes())
            n_docs += 1
            n_tokens += len(doc)
    finally:
        writer.close()
    if n_docs == 0:
        tmp.unlink()
        raise BitNetError(f"{source} holds no non-empty documents; nothing to tokenize.")
    os.replace(tmp, out / RECORDS_FILE)
    copy_tokenizer(tokenizer, out)
    meta = {"format": FORMAT, "dtype": dtype.str, "documents": n_docs, "tokens": n_tokens,
            "tokenizer": {"fingerprint": tokenizer.fingerprint,
                          "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id},
            "source": source}
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def token_folder(path: str | os.PathLike) -> Path:
    """The token folder of an `array_record:` path (the folder, or its tokens.array_record)."""
    p = Path(path)
    folder = p.parent if p.name == RECORDS_FILE else p
    if not (folder / RECORDS_FILE).is_file():
        raise BitNetError(f"array_record:{path}: found no {RECORDS_FILE} in {folder}. Expected a folder written by "
                          f"`bitnet-jax tokenize --out {folder}`; run that first.")
    return folder


def read_meta(path: str | os.PathLike) -> dict:
    folder = token_folder(path)
    meta_path = folder / META_FILE
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise BitNetError(f"{folder} has {RECORDS_FILE} but no {META_FILE} naming its tokenizer and dtype; "
                          "write the folder again with `bitnet-jax tokenize`.") from None
    except ValueError as e:
        raise BitNetError(f"{meta_path} is not valid JSON ({e}); write the folder again with "
                          "`bitnet-jax tokenize`.") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise BitNetError(f"{meta_path}: expected format {FORMAT!r}, found {found!r}; write the folder again "
                          "with this version's `bitnet-jax tokenize`.")
    return meta


def read_documents(path: str | os.PathLike) -> tuple[list[np.ndarray], dict]:
    """(token ids of each document, metadata) of a token folder; checks it against tokens.json."""
    folder = token_folder(path)
    meta = read_meta(folder)
    dtype = np.dtype(meta["dtype"])
    records_path = folder / RECORDS_FILE
    try:
        reader = array_record_module.ArrayRecordReader(str(records_path))
        try:
            records = reader.read_all()
        finally:
            reader.close()
    except Exception as e:  # riegeli reports damage as RuntimeError or ValueError, depending on where
        raise _corrupt(records_path, f"{type(e).__name__}: {e}") from None
    if len(records) != meta["documents"]:
        raise _corrupt(records_path, f"it holds {len(records)} records, {META_FILE} says {meta['documents']}")
    bad = next((i for i, r in enumerate(records) if len(r) % dtype.itemsize), None)
    if bad is not None:
        raise _corrupt(records_path, f"record {bad} has {len(records[bad])} bytes, not a multiple of "
                                     f"{dtype.itemsize} ({dtype.name})")
    docs = [np.frombuffer(r, dtype=dtype) for r in records]
    n_tokens = sum(len(d) for d in docs)
    if n_tokens != meta["tokens"]:
        raise _corrupt(records_path, f"it holds {n_tokens} tokens, {META_FILE} says {meta['tokens']}")
    return docs, meta


def _corrupt(path: Path, found: str) -> BitNetError:
    return BitNetError(f"{path} is corrupt or incomplete: {found}. Expected the file `bitnet-jax tokenize` wrote; "
                       "write it again.")
