"""Input pipeline: text files -> token stream (cached on disk) -> shuffled grain batches.

Other sources (JSON Lines, Parquet, pre-tokenized ArrayRecord) become token streams in
`documents.py`; several streams are mixed by weight in `make_train_iterator`.

The embedded default corpus is this Python's own standard library source (`stdlib_source_files`):
present on every machine that runs this package, ~10 MB of real code, no download.

Axis letters: B = batch, T = sequence length (tokens per example), N = tokens in a stream.

Token streams are documents (files) joined as `doc_0 EOS doc_1 EOS ... doc_n EOS`. Training
examples are windows of T+1 tokens at stride T (`inputs = w[:-1]`, `targets = w[1:]`), so every
token of the stream is predicted once per epoch. `segment_ids` number the documents inside a
window from 1; the id increases on the token after each EOS, so an EOS belongs to the document
it ends. `eos_id` defaults to the id `train_sentencepiece` reserves (2); pass
`tokenizer.eos_id` for any other tokenizer, or segment ids come out wrong.

Chat sources give a `MaskedStream`: the same token stream plus one flag byte per token, `LOSS`
(the token is a training target: assistant tokens only) and `DOC_END` (the EOS that ends a
document; a conversation may hold the EOS id itself, when its template ends turns with
`eos_token`, and must stay one segment). When any stream of a run is masked, every batch gets a
`loss_mask` (int32 [B, T], 1 where the target counts) and segment ids follow `DOC_END`; plain
streams then have LOSS on every token and DOC_END on every EOS, which gives the same segment ids
and an all-ones mask. Runs on plain streams alone get batches without `loss_mask`, as before.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import grain
import numpy as np
from absl import flags

from bitnet_jax.data.sources import HELDOUT_FRACTION
from bitnet_jax.data.tokenizer import EOS_ID, Tokenizer
from bitnet_jax.errors import BitNetError

# Stdlib parts left out of the default corpus: third-party packages, the test suites (a
# 20+ MB mix of fixtures and odd strings that would dwarf the library), and generated data that
# is not code (pydoc's topic texts, the codec mapping tables in encodings/).
_STDLIB_SKIP_DIRS = frozenset(
    {
        "site-packages",
        "dist-packages",
        "__pycache__",
        "test",
        "tests",
        "idle_test",
        "pydoc_data",
        "encodings",
    }
)
_STDLIB_SKIP_PREFIXES = ("_sysconfigdata",)  # build-machine configuration dumps
_CACHE_FORMAT = "v1"


def stdlib_root() -> Path:
    """The folder of this Python's standard library (`sysconfig.get_paths()["stdlib"]`)."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_source_files() -> list[Path]:
    """The `.py` files of this Python's standard library: the embedded default corpus.

    Sorted by relative path, so the list is deterministic for a given Python installation.
    Leaves out site-packages, test suites and generated data (see `_STDLIB_SKIP_DIRS`); on
    CPython 3.11 that is ~700 files, ~10 MB.
    """
    root = stdlib_root()
    files = [
        p
        for p in walk_files(root, (".py",))
        if not _STDLIB_SKIP_DIRS.intersection(p.relative_to(root).parts[:-1])
        and not p.name.startswith(_STDLIB_SKIP_PREFIXES)
    ]
    if not files:
        raise BitNetError(
            f"Found no .py files under this Python's standard library folder {root}. This Python "
            "ships without its source; pass your own text folder instead."
        )
    return files


def text_files(folder: str | os.PathLike, suffixes: Sequence[str] = (".py",)) -> list[Path]:
    """All files under `folder` (recursively) whose name ends with one of `suffixes`.

    Sorted by relative path; hidden files and folders (".git", ...) and `__pycache__` are skipped.
    """
    root = Path(folder)
    if not root.is_dir():
        raise BitNetError(f"Text folder {root} does not exist or is not a folder; pass a folder.")
    suffixes = tuple(suffixes)
    files = walk_files(root, suffixes)
    if not files:
        raise BitNetError(
            f"Found no files ending in {', '.join(suffixes)} under {root}. Pass a folder with "
            "such files, or other suffixes."
        )
    return files


def walk_files(root: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """Files under `root` ending in one of `suffixes`, hidden files and caches skipped, in path order."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__pycache__"]
        found += [Path(dirpath, f) for f in filenames if f.endswith(suffixes) and not f.startswith(".")]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def unit_hash(text: str) -> float:
    """A stable value in [0, 1) for a string (unlike `hash`, the same in every process)."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_files(
    files: Sequence[str | os.PathLike], root: str | os.PathLike, heldout_fraction: float = HELDOUT_FRACTION
) -> tuple[list[Path], list[Path]]:
    """Splits files into (train, held-out) by a stable hash of each path relative to `root`.

    A file is held out iff its hash is below `heldout_fraction`, so its side never depends on the
    other files. If that leaves nothing held out and there are at least 2 files, the file with the
    smallest hash is held out, so tiny corpora still get an evaluation split.
    """
    if not 0.0 <= heldout_fraction < 1.0:
        raise BitNetError(f"heldout_fraction must be in [0, 1); got {heldout_fraction}.")
    root = Path(root)
    keyed = [(unit_hash(Path(f).relative_to(root).as_posix()), Path(f)) for f in files]
    heldout = {f for h, f in keyed if h < heldout_fraction}
    if not heldout and heldout_fraction > 0 and len(keyed) >= 2:
        heldout = {min(keyed, key=lambda hf: hf[0])[1]}
    train = [f for _, f in keyed if f not in heldout]
    return train, [f for _, f in keyed if f in heldout]


def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.int32)


def files_key(files: Sequence[str | os.PathLike], extra: str = "") -> str:
    """A short hex key of the files' contents in order (not their paths), plus `extra`.

    Keys caches of anything derived from the files: token streams, trained tokenizers.
    """
    key = hashlib.sha256(f"{_CACHE_FORMAT}:{extra}:".encode())
    for f in files:
        key.update(hashlib.sha256(Path(f).read_bytes()).digest())
    return key.hexdigest()[:24]


def tokenize_files(
    files: Sequence[str | os.PathLike], tokenizer: Tokenizer, cache_dir: str | os.PathLike | None = None
) -> np.ndarray:
    """The token stream `doc_0 EOS doc_1 EOS ...` of the files, in order: [N] uint16 or int32.

    Empty (whitespace-only) files are skipped; no files give an empty stream. With `cache_dir`,
    the stream is saved as `tokens-<key>.npy`, keyed by the tokenizer's fingerprint and the
    files' contents in order, and a later call with the same key memory-maps it instead of
    re-tokenizing.
    """
    paths = [Path(f) for f in files]
    if not paths:
        return np.empty(0, _token_dtype(tokenizer.vocab_size))
    key = files_key(paths, extra=f"tokens:{tokenizer.fingerprint}") if cache_dir is not None else None
    return cached_stream(cache_dir, key, lambda: texts_to_stream(read_text_files(paths), tokenizer))


def read_text_files(paths: Sequence[Path]) -> list[str]:
    """The non-empty (not whitespace-only) files' texts, read as open() in text mode would."""
    texts = [p.read_bytes().decode("utf-8", errors="replace") for p in paths]
    # Same universal-newline translation as open() in text mode.
    return [t.replace("\r\n", "\n").replace("\r", "\n") for t in texts if t.strip()]


def docs_to_stream(docs: Sequence[Sequence[int]], eos_id: int, vocab_size: int) -> np.ndarray:
    """`doc_0 EOS doc_1 EOS ...`: [N] uint16 or int32."""
    tokens_n = np.empty(sum(len(d) + 1 for d in docs), _token_dtype(vocab_size))
    pos = 0
    for doc in docs:
        tokens_n[pos : pos + len(doc)] = doc
        tokens_n[pos + len(doc)] = eos_id
        pos += len(doc) + 1
    return tokens_n


def texts_to_stream(texts: Sequence[str], tokenizer: Tokenizer) -> np.ndarray:
    """The token stream of documents given as texts (none may be empty)."""
    if not texts:
        return np.empty(0, _token_dtype(tokenizer.vocab_size))
    return docs_to_stream(tokenizer.encode_batch(list(texts)), tokenizer.eos_id, tokenizer.vocab_size)


def cached_stream(cache_dir: str | os.PathLike | None, key: str | None, build: Callable[[], np.ndarray]) -> np.ndarray:
    """`build()`, saved as `cache_dir/tokens-<key>.npy` and memory-mapped from there next time."""
    if cache_dir is None or key is None:
        return build()
    cache_path = Path(cache_dir) / f"tokens-{key}.npy"
    if cache_path.is_file():
        return np.load(cache_path, mmap_mode="r")
    tokens_n = build()
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_path.with_name(f"{cache_path.stem}.{os.getpid()}.tmp.npy")
    np.save(tmp, tokens_n)
    os.replace(tmp, cache_path)  # atomic: a concurrent reader never sees half a file
    return np.load(cache_path, mmap_mode="r")


# The bits of a MaskedStream's per-token flags.
LOSS = 1  # the token is a training target (its prediction counts in the loss)
DOC_END = 2  # the token ends a document: the next token starts a new segment


@dataclass(frozen=True)
class MaskedStream:
    """A token stream `doc EOS doc EOS ...` with one flag byte per token (`LOSS`, `DOC_END`).

    Supports what the pipeline uses of a 1-D stream: `len`, `ndim`, and `window(start, stop)`.
    """

    tokens: np.ndarray  # [N] uint16 or int32
    flags: np.ndarray  # [N] uint8

    ndim = 1

    def __len__(self) -> int:
        return len(self.tokens)

    def window(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(self.tokens[start:stop]), np.asarray(self.flags[start:stop])


def plain_flags(tokens_n: np.ndarray, eos_id: int) -> np.ndarray:
    """The flags of a plain stream: every token a target, every EOS a document end."""
    return np.where(np.asarray(tokens_n) == eos_id, LOSS | DOC_END, LOSS).astype(np.uint8)


def masked_docs_to_stream(
    docs: Sequence[Sequence[int]], masks: Sequence[Sequence[int]], eos_id: int, vocab_size: int
) -> MaskedStream:
    """`doc_0 EOS doc_1 EOS ...` with LOSS where a document's mask is 1; each EOS, which ends a
    document and is no target (the model never has to predict it), is flagged DOC_END alone."""
    tokens_n = docs_to_stream(docs, eos_id, vocab_size)
    flags_n = np.full(len(tokens_n), DOC_END, np.uint8)
    pos = 0
    for doc, mask in zip(docs, masks):
        flags_n[pos : pos + len(doc)] = np.asarray(mask, np.uint8) * LOSS
        pos += len(doc) + 1
    return MaskedStream(tokens_n, flags_n)


def concat_streams(streams: Sequence, eos_id: int):
    """One stream of several (held-out splits of several sources): masked if any of them is."""
    if len(streams) == 1:
        return streams[0]
    if not any(isinstance(s, MaskedStream) for s in streams):
        return np.concatenate([np.asarray(s) for s in streams])
    parts = [s if isinstance(s, MaskedStream) else MaskedStream(np.asarray(s), plain_flags(s, eos_id)) for s in streams]
    dtype = np.result_type(*(p.tokens.dtype for p in parts))
    return MaskedStream(
        np.concatenate([np.asarray(p.tokens, dtype) for p in parts]), np.concatenate([p.flags for p in parts])
    )


@dataclass(frozen=True)
class TokenSplits:
    """Token streams of the train and held-out files of one corpus."""

    train: np.ndarray  # [N_train]
    heldout: np.ndarray  # [N_heldout]; empty when the corpus has a single file
    train_files: tuple[Path, ...]
    heldout_files: tuple[Path, ...]


def tokenize_splits(
    files: Sequence[str | os.PathLike],
    root: str | os.PathLike,
    tokenizer: Tokenizer,
    cache_dir: str | os.PathLike | None = None,
    heldout_fraction: float = HELDOUT_FRACTION,
) -> TokenSplits:
    """`split_files` then `tokenize_files` on each side (each cached separately)."""
    train, heldout = split_files(files, root, heldout_fraction)
    return TokenSplits(
        train=tokenize_files(train, tokenizer, cache_dir),
        heldout=tokenize_files(heldout, tokenizer, cache_dir),
        train_files=tuple(train),
        heldout_files=tuple(heldout),
    )


class _Windows:
    """Window i of a token stream: tokens [i*T, i*T + T + 1) as int32 [T+1]; with `masked`,
    {"tokens": int32 [T+1], "flags": uint8 [T+1]} (a plain stream's flags made by `plain_flags`)."""

    def __init__(self, stream, seq_len: int, *, masked: bool = False, eos_id: int = EOS_ID):
        self._stream = stream
        self._seq_len = seq_len
        self._masked = masked
        self._eos_id = eos_id

    def __len__(self) -> int:
        return (len(self._stream) - 1) // self._seq_len

    def __getitem__(self, i: int) -> np.ndarray | dict[str, np.ndarray]:
        start = int(i) * self._seq_len
        stop = start + self._seq_len + 1
        if isinstance(self._stream, MaskedStream):
            tokens, flags = self._stream.window(start, stop)
            return {"tokens": tokens.astype(np.int32), "flags": flags}
        tokens = np.asarray(self._stream[start:stop], dtype=np.int32)
        return {"tokens": tokens, "flags": plain_flags(tokens, self._eos_id)} if self._masked else tokens


def _windows_to_batch(windows_bw: np.ndarray | dict[str, np.ndarray], eos_id: int) -> dict[str, np.ndarray]:
    """[B, T+1] windows -> {"inputs", "targets", "segment_ids"}, each int32 [B, T]; masked windows
    ({"tokens", "flags"}) add "loss_mask" (the LOSS flag of each target) and end segments at
    DOC_END instead of at every EOS."""
    if isinstance(windows_bw, dict):
        tokens_bw, flags_bw = windows_bw["tokens"], windows_bw["flags"]
        ends_bt = (flags_bw[:, :-1] & DOC_END) != 0
    else:
        tokens_bw, flags_bw = windows_bw, None
        ends_bt = windows_bw[:, :-1] == eos_id
    inputs_bt = tokens_bw[:, :-1].astype(np.int32)
    targets_bt = tokens_bw[:, 1:].astype(np.int32)
    # Documents ended strictly before position t: document ends over inputs[:t].
    ended_bt = np.cumsum(ends_bt, axis=1, dtype=np.int32) - ends_bt
    batch = {"inputs": inputs_bt, "targets": targets_bt, "segment_ids": ended_bt + 1}
    if flags_bw is not None:
        batch["loss_mask"] = ((flags_bw[:, 1:] & LOSS) != 0).astype(np.int32)
    return batch


class _ToBatch(grain.transforms.Map):
    def __init__(self, eos_id: int):
        self._eos_id = eos_id

    def map(self, windows_bw: np.ndarray) -> dict[str, np.ndarray]:
        return _windows_to_batch(windows_bw, self._eos_id)


def _check_stream(tokens: np.ndarray, seq_len: int, batch_size: int, what: str) -> None:
    for name, value in (("seq_len", seq_len), ("batch_size", batch_size)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise BitNetError(f"{name} must be a positive integer; got {value!r}.")
    if np.ndim(tokens) != 1:
        raise BitNetError(f"Expected a 1-D token stream for the {what} data; got shape {np.shape(tokens)}.")
    need = batch_size * seq_len + 1
    if len(tokens) < need:
        raise BitNetError(
            f"The {what} data has {len(tokens)} tokens; one batch of {batch_size} windows of "
            f"{seq_len}+1 tokens needs at least {need}. Use more text, or a smaller seq_len or "
            "batch_size."
        )


def _shuffle_seed(seed: int, source: int = 0) -> int:
    # grain shuffles epoch e with seed + e, so seeds 0 and 1 would share all but one epoch;
    # hashing the user's seed makes nearby seeds unrelated. Source 0 of a mixture keeps the
    # single-source seed, so adding a source does not reorder the first one.
    text = f"bitnet-jax-shuffle:{int(seed)}" + (f":{source}" if source else "")
    digest = hashlib.sha256(text.encode()).digest()
    return int.from_bytes(digest[:4], "big") >> 1  # leave room for the per-epoch increment


def make_train_iterator(
    tokens: np.ndarray | list[np.ndarray],
    seq_len: int,
    batch_size: int,
    seed: int,
    *,
    weights: Sequence[float] | None = None,
    names: Sequence[str] | None = None,
    eos_id: int = EOS_ID,
    worker_count: int = 0,
    prefetch_batches: int = 2,
    shard_index: int | None = None,
    shard_count: int | None = None,
) -> grain.DatasetIterator:
    """An endless iterator of training batches {"inputs", "targets", "segment_ids"}: int32 [B, T]
    (and "loss_mask" when a stream is a `MaskedStream`).

    Windows are shuffled with `seed`, reshuffled every epoch; batches run across epoch borders
    (every window appears once per epoch). Deterministic for a seed, and checkpointable:
    `it.get_state()` is a small dict, `it.set_state(state)` on a fresh iterator from the same
    arguments resumes exactly. `worker_count > 0` prepares batches in that many processes (same
    batches, but a state saved with one worker_count restores only with the same worker_count).

    `tokens` may be a list of streams (one per source, named by `names` in errors) mixed by
    `weights`: each source's windows are shuffled and repeated on their own, then interleaved
    deterministically in those proportions (grain's `MapDataset.mix`), so a small source repeats
    more often than a large one instead of running out.

    With `shard_count` processes (default: `jax.process_count()`), this process
    (`shard_index`, default `jax.process_index()`) gets every shard_count-th window of the global
    order, `batch_size / shard_count` rows per batch: the processes' batches together are exactly
    the single-process batch.
    """
    # A list is a mixture; anything else is one stream (an array, or a lazy `DocumentStream`).
    streams = list(tokens) if isinstance(tokens, (list, tuple)) else [tokens]
    if not streams:
        raise BitNetError("make_train_iterator got no token streams; pass at least one.")
    if shard_count is None or shard_index is None:
        import jax  # only here: the data pipeline itself does not need JAX

        shard_index, shard_count = jax.process_index(), jax.process_count()
    if batch_size % shard_count:
        raise BitNetError(
            f"batch_size={batch_size} must be a multiple of the number of processes "
            f"({shard_count}): each loads batch_size / processes rows."
        )
    if len(streams) == 1:
        _check_stream(streams[0], seq_len, batch_size, "training")
    else:
        names = list(names) if names is not None else [f"source {i}" for i in range(len(streams))]
        weights = [1.0] * len(streams) if weights is None else list(weights)
        if len(weights) != len(streams) or not all(w > 0 for w in weights):
            raise BitNetError(f"Expected one positive weight per source ({len(streams)}); got {weights}.")
        for stream, name in zip(streams, names):  # each source needs one window; repeats fill batches
            if np.ndim(stream) != 1 or len(stream) < seq_len + 1:
                raise BitNetError(
                    f"The training data of {name} have {len(stream)} tokens; one window of "
                    f"{seq_len}+1 tokens needs at least {seq_len + 1}. Add documents to that "
                    "source, drop it, or use a smaller seq_len."
                )
    masked = any(isinstance(s, MaskedStream) for s in streams)
    parts = [
        grain.MapDataset.source(_Windows(stream, seq_len, masked=masked, eos_id=eos_id))
        .shuffle(seed=_shuffle_seed(seed, i))
        .repeat()
        for i, stream in enumerate(streams)
    ]
    ds = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights)
    if shard_count > 1:
        ds = ds[shard_index::shard_count]
    ds = ds.batch(batch_size // shard_count, drop_remainder=True).map(_ToBatch(eos_id))
    # One background thread overlaps batch building with the training step; the data are in
    # memory, so more threads only contend for the GIL.
    iter_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=prefetch_batches))
    if worker_count > 0:
        if not flags.FLAGS.is_parsed():  # grain's worker processes expect parsed absl flags
            flags.FLAGS.mark_as_parsed()
        iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return iter(iter_ds)


def make_eval_batches(
    tokens: np.ndarray, seq_len: int, batch_size: int, max_batches: int | None = None, *, eos_id: int = EOS_ID
) -> list[dict[str, np.ndarray]]:
    """Up to `max_batches` batches of consecutive, non-overlapping windows, in stream order (with
    "loss_mask" for a `MaskedStream`)."""
    _check_stream(tokens, seq_len, batch_size, "held-out")
    windows = _Windows(tokens, seq_len, eos_id=eos_id)
    n_batches = len(windows) // batch_size
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    batches = []
    for b in range(n_batches):
        rows = [windows[b * batch_size + i] for i in range(batch_size)]
        windows_bw = (
            {k: np.stack([r[k] for r in rows]) for k in rows[0]} if isinstance(rows[0], dict) else np.stack(rows)
        )
        batches.append(_windows_to_batch(windows_bw, eos_id))
    return batches
