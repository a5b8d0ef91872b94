"""Pre-tokenized documents on disk: what `bitnet-jax tokenize` writes and `array_record:` sources read.

A token folder holds
  tokens.array_record   one record per document: its token ids (no EOS) as little-endian
                        uint16 (vocab_size <= 65536) or uint32 bytes
  tokens.lengths.npy    [documents] uint32: each document's token count, so training can find
                        a window's documents without reading the others
  tokens.json           {"format", "dtype", "documents", "tokens", "tokenizer": {"fingerprint",
                        "vocab_size", "eos_id"}, "source", "flags"}
  tokens.flags.array_record  (chat sources only, "flags": true) one record per document: one
                        byte per token, the loss flag of `pipeline.MaskedStream` (1 on assistant
                        tokens); the document ends are implied, as in the token records
  tokenizer.model or tokenizer.json (+ its config files): a copy of the tokenizer, so the folder is
                        self-contained and `load_tokenizer(folder)` gives the tokenizer back

Training reads the folder lazily (`DocumentStream`): the token stream of the chosen documents is
never held in memory, and each window reads only the one or few records it overlaps.

ArrayRecord's reader returns zero records, without an error, for a file that is garbage or cut
short; the counts in tokens.json are what catches that.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from array_record.python import array_record_module

from bitnet_jax.data.tokenizer import copy_tokenizer
from bitnet_jax.errors import BitNetError

RECORDS_FILE = "tokens.array_record"
FLAGS_FILE = "tokens.flags.array_record"
LENGTHS_FILE = "tokens.lengths.npy"
META_FILE = "tokens.json"
FORMAT = "bitnet-jax-tokens-v1"


def record_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def write_token_folder(
    out_dir: str | os.PathLike,
    docs: Iterable[Sequence[int]],
    tokenizer,
    source: str,
    flags: Iterable[Sequence[int]] | None = None,
) -> dict:
    """Writes `docs` (token ids per document) as a token folder; returns the metadata written.
    `flags` (chat sources): one flag byte per token of each document, written beside them."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = record_dtype(tokenizer.vocab_size)
    tmp, flags_tmp = out / f"{RECORDS_FILE}.tmp", out / f"{FLAGS_FILE}.tmp"
    # group_size:1 keeps each record its own chunk, so reading one document decodes only it.
    writer = array_record_module.ArrayRecordWriter(str(tmp), "group_size:1")
    flags_writer = None if flags is None else array_record_module.ArrayRecordWriter(str(flags_tmp), "group_size:1")
    lengths = []
    try:
        for doc, doc_flags in zip(docs, itertools.repeat(None) if flags is None else flags):
            writer.write(np.asarray(doc, dtype=dtype).tobytes())
            lengths.append(len(doc))
            if flags_writer is not None:
                if len(doc_flags) != len(doc):
                    raise ValueError(f"document {len(lengths) - 1}: {len(doc)} tokens but {len(doc_flags)} flags")
                flags_writer.write(np.asarray(doc_flags, dtype=np.uint8).tobytes())
    finally:
        writer.close()
        if flags_writer is not None:
            flags_writer.close()
    if not lengths:
        tmp.unlink()
        flags_tmp.unlink(missing_ok=True)
        raise BitNetError(f"{source} holds no non-empty documents; nothing to tokenize.")
    n_docs, n_tokens = len(lengths), int(sum(lengths))
    os.replace(tmp, out / RECORDS_FILE)
    if flags_writer is not None:
        os.replace(flags_tmp, out / FLAGS_FILE)
    np.save(out / LENGTHS_FILE, np.asarray(lengths, dtype=np.uint32))
    copy_tokenizer(tokenizer, out)
    meta = {
        "format": FORMAT,
        "dtype": dtype.str,
        "documents": n_docs,
        "tokens": n_tokens,
        "tokenizer": {
            "fingerprint": tokenizer.fingerprint,
            "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id,
        },
        "source": source,
        "flags": flags is not None,
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def token_folder(path: str | os.PathLike) -> Path:
    """The token folder of an `array_record:` path (the folder, or its tokens.array_record)."""
    p = Path(path)
    folder = p.parent if p.name == RECORDS_FILE else p
    if not (folder / RECORDS_FILE).is_file():
        raise BitNetError(
            f"array_record:{path}: found no {RECORDS_FILE} in {folder}. Expected a folder written by "
            f"`bitnet-jax tokenize --out {folder}`; run that first."
        )
    return folder


def read_meta(path: str | os.PathLike) -> dict:
    folder = token_folder(path)
    meta_path = folder / META_FILE
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise BitNetError(
            f"{folder} has {RECORDS_FILE} but no {META_FILE} naming its tokenizer and dtype; "
            "write the folder again with `bitnet-jax tokenize`."
        ) from None
    except ValueError as e:
        raise BitNetError(
            f"{meta_path} is not valid JSON ({e}); write the folder again with `bitnet-jax tokenize`."
        ) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise BitNetError(
            f"{meta_path}: expected format {FORMAT!r}, found {found!r}; write the folder again "
            "with this version's `bitnet-jax tokenize`."
        )
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
        raise _corrupt(
            records_path,
            f"record {bad} has {len(records[bad])} bytes, not a multiple of {dtype.itemsize} ({dtype.name})",
        )
    docs = [np.frombuffer(r, dtype=dtype) for r in records]
    n_tokens = sum(len(d) for d in docs)
    if n_tokens != meta["tokens"]:
        raise _corrupt(records_path, f"it holds {n_tokens} tokens, {META_FILE} says {meta['tokens']}")
    return docs, meta


def _corrupt(path: Path, found: str) -> BitNetError:
    return BitNetError(
        f"{path} is corrupt or incomplete: {found}. Expected the file `bitnet-jax tokenize` wrote; write it again."
    )


def open_stream(path: str | os.PathLike) -> tuple["DocumentStream", dict]:
    """(a lazy stream over all documents of a token folder, its metadata), checked against tokens.json."""
    folder = token_folder(path)
    meta = read_meta(folder)
    records_path = folder / RECORDS_FILE
    try:
        lengths = np.load(folder / LENGTHS_FILE)
    except (OSError, ValueError) as e:
        raise _corrupt(folder / LENGTHS_FILE, f"{type(e).__name__}: {e}") from None
    if lengths.ndim != 1 or len(lengths) != meta["documents"] or int(lengths.sum()) != meta["tokens"]:
        raise _corrupt(
            folder / LENGTHS_FILE,
            f"{len(lengths)} lengths summing to {int(lengths.sum())}, "
            f"{META_FILE} says {meta['documents']} documents, {meta['tokens']} tokens",
        )
    n_records = _checked_record_count(records_path, meta["documents"])
    stream = DocumentStream(
        records_path, np.arange(n_records), lengths, np.dtype(meta["dtype"]), eos_id=meta["tokenizer"]["eos_id"]
    )
    return stream, meta


def _checked_record_count(path: Path, documents: int) -> int:
    """The number of records of an array_record file, which must be `documents` (meta.json's)."""
    try:
        reader = array_record_module.ArrayRecordReader(str(path))
        n_records = reader.num_records()
        reader.close()
    except Exception as e:  # riegeli reports damage as RuntimeError or ValueError, depending on where
        raise _corrupt(path, f"{type(e).__name__}: {e}") from None
    if n_records != documents:
        raise _corrupt(path, f"it holds {n_records} records, {META_FILE} says {documents}")
    return n_records


def open_flags_stream(path: str | os.PathLike, separator: int) -> "DocumentStream":
    """The per-token flags of a token folder written with them (`meta["flags"]`), as a lazy stream
    parallel to `open_stream`'s tokens, `separator` in the place of each document's EOS."""
    folder = token_folder(path)
    meta = read_meta(folder)
    flags_path = folder / FLAGS_FILE
    if not meta.get("flags") or not flags_path.is_file():
        raise BitNetError(f"{folder} holds no {FLAGS_FILE}; expected the folder of a chat source.")
    lengths = np.load(folder / LENGTHS_FILE)
    n_records = _checked_record_count(flags_path, meta["documents"])
    return DocumentStream(flags_path, np.arange(n_records), lengths, np.dtype(np.uint8), eos_id=separator)


class DocumentStream:
    """The token stream `doc EOS doc EOS ...` of some records of a token folder, read on demand.

    Supports what the data pipeline uses of a 1-D array: `len`, contiguous slices (each reads
    the records it overlaps) and `np.asarray` (reads everything: for small held-out streams).
    Picklable for grain's worker processes: each process opens its own reader.
    """

    ndim = 1

    def __init__(
        self, records_path: Path, doc_indices: np.ndarray, lengths: np.ndarray, record_dtype: np.dtype, eos_id: int
    ):
        self._path = str(records_path)
        self._docs = np.asarray(doc_indices, dtype=np.int64)  # [D] record index of each stream document
        self._lengths = np.asarray(lengths)[self._docs].astype(np.int64)  # [D] tokens, EOS not counted
        self._ends = np.cumsum(self._lengths + 1)  # [D] stream offset just past each document's EOS
        self._record_dtype = record_dtype
        self._eos_id = eos_id
        self.dtype = {1: np.dtype(np.uint8), 2: np.dtype(np.uint16)}.get(record_dtype.itemsize, np.dtype(np.int32))
        self._reader = None

    def select(self, positions: np.ndarray) -> "DocumentStream":
        """The stream of this stream's documents at `positions` (e.g. a train / held-out split)."""
        lengths = np.zeros(int(self._docs.max(initial=-1)) + 1, dtype=np.int64)
        lengths[self._docs] = self._lengths
        return DocumentStream(Path(self._path), self._docs[positions], lengths, self._record_dtype, self._eos_id)

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def __getitem__(self, index: slice) -> np.ndarray:
        if not isinstance(index, slice):
            raise TypeError("DocumentStream supports slices only")
        start, stop, step = index.indices(len(self))
        if step != 1:
            raise TypeError("DocumentStream supports contiguous slices only")
        if stop <= start:
            return np.empty(0, self.dtype)
        first, last = np.searchsorted(self._ends, [start, stop - 1], side="right")
        pieces = []
        for i, record in zip(range(first, last + 1), self._read(self._docs[first : last + 1])):
            if len(record) != self._lengths[i] * self._record_dtype.itemsize:
                raise _corrupt(
                    Path(self._path),
                    f"record {self._docs[i]} has {len(record)} bytes, {LENGTHS_FILE} "
                    f"says {self._lengths[i]} tokens of {self._record_dtype.itemsize}",
                )
            doc = np.frombuffer(record, dtype=self._record_dtype)
            pieces += [doc, np.array([self._eos_id], self._record_dtype)]
        offset = int(self._ends[first - 1]) if first else 0  # stream position of pieces[0][0]
        return np.concatenate(pieces)[start - offset : stop - offset].astype(self.dtype)

    def __array__(self, dtype=None, copy=None):
        tokens = self[0 : len(self)]
        return tokens if dtype is None else tokens.astype(dtype)

    def _read(self, records: np.ndarray) -> list[bytes]:
        try:
            if self._reader is None:
                self._reader = array_record_module.ArrayRecordReader(self._path)
            return self._reader.read([int(r) for r in records])
        except Exception as e:  # riegeli reports damage as RuntimeError or ValueError, depending on where
            raise _corrupt(Path(self._path), f"{type(e).__name__}: {e}") from None

    def __getstate__(self):
        return {**self.__dict__, "_reader": None}
