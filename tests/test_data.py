"""Input pipeline tests: file discovery, split, token cache, grain batches, eval batches."""

import json
from pathlib import Path

import numpy as np
import pytest

from bitnet_jax.data import pipeline as data
from bitnet_jax.data.tokenizer_training import train_sentencepiece
from bitnet_jax.errors import BitNetError


class ByteTokenizer:
    """Byte-level stand-in: id = byte + 3, eos = 2. Predictable, so tests can build references."""

    vocab_size = 259
    bos_id, eos_id, pad_id = 1, 2, 0
    stop_ids = frozenset({2})

    def __init__(self, fingerprint="bytes-v1"):
        self.fingerprint = fingerprint
        self.calls = 0

    def encode(self, text):
        return [b + 3 for b in text.encode("utf-8")]

    def encode_batch(self, texts):
        self.calls += 1
        return [self.encode(t) for t in texts]

    def decode(self, ids):
        return bytes(i - 3 for i in ids if i >= 3).decode("utf-8", errors="replace")


def _write(root: Path, rel: str, text: str) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    for i in range(40):
        body = "".join(f"def f{i}_{j}(x):\n    return x * {j}  # é\n\n" for j in range(i % 7 + 1))
        _write(root, f"pkg{i % 3}/mod{i:02d}.py", body)
    _write(root, "empty.py", "  \n")
    _write(root, "notes.txt", "not python\n")
    _write(root, ".hidden/secret.py", "x = 1\n")
    _write(root, "pkg0/__pycache__/mod00.py", "x = 1\n")
    return root


def test_stdlib_source_files():
    files = data.stdlib_source_files()
    root = data.stdlib_root()
    rel = [f.relative_to(root).as_posix() for f in files]
    assert len(files) > 300
    assert "os.py" in rel and "json/__init__.py" in rel
    assert rel == sorted(rel)
    assert not any(part in ("site-packages", "test", "tests", "encodings") for r in rel for part in r.split("/")[:-1])
    assert all(r.endswith(".py") for r in rel)


def test_text_files(corpus):
    files = data.text_files(corpus, (".py",))
    rel = [f.relative_to(corpus).as_posix() for f in files]
    assert len(rel) == 41
    assert rel == sorted(rel)
    assert "notes.txt" not in rel
    assert not any(".hidden" in r or "__pycache__" in r for r in rel)
    assert len(data.text_files(corpus, (".py", ".txt"))) == 42


def test_text_files_empty_folder(tmp_path):
    with pytest.raises(BitNetError) as err:
        data.text_files(tmp_path, (".py", ".md"))
    assert str(tmp_path) in str(err.value) and ".py" in str(err.value) and ".md" in str(err.value)
    _write(tmp_path, "a.txt", "text")
    with pytest.raises(BitNetError, match=".py"):
        data.text_files(tmp_path, (".py",))
    with pytest.raises(BitNetError, match="does not exist"):
        data.text_files(tmp_path / "missing")


def test_split_is_deterministic_disjoint_and_stable(tmp_path):
    names = [f"d{i % 5}/file{i}.py" for i in range(400)]
    files = [tmp_path / n for n in names]
    train, held = data.split_files(files, tmp_path, heldout_fraction=0.1)
    assert (train, held) == data.split_files(files, tmp_path, 0.1)
    assert not set(train) & set(held)
    assert sorted(train + held) == sorted(files)
    assert 20 <= len(held) <= 60  # ~40 expected
    # A file's side depends only on its own path: dropping other files moves nothing.
    sub_train, sub_held = data.split_files(files[::3], tmp_path, 0.1)
    assert set(sub_held) == set(held) & set(files[::3])
    # The same relative paths under another root split the same way.
    other = tmp_path / "elsewhere"
    _, held_other = data.split_files([other / n for n in names], other, 0.1)
    assert [h.relative_to(other) for h in held_other] == [h.relative_to(tmp_path) for h in held]


def test_split_tiny_corpus_still_holds_one_out(tmp_path):
    files = [tmp_path / "a.py", tmp_path / "b.py", tmp_path / "c.py"]
    train, held = data.split_files(files, tmp_path, heldout_fraction=0.001)
    assert len(held) == 1 and len(train) == 2
    assert data.split_files(files[:1], tmp_path) == (files[:1], [])


def test_tokenize_files_stream_and_cache(corpus, tmp_path):
    files = data.text_files(corpus)
    tok = ByteTokenizer()
    cache = tmp_path / "cache"
    tokens = data.tokenize_files(files, tok, cache)
    # Reference: each non-empty file's bytes, then EOS, in order.
    expected = []
    for f in files:
        text = f.read_text(encoding="utf-8")
        if text.strip():
            expected += [b + 3 for b in text.encode("utf-8")] + [tok.eos_id]
    assert tokens.dtype == np.uint16
    np.testing.assert_array_equal(tokens, expected)
    assert tok.calls == 1 and len(list(cache.glob("*.npy"))) == 1

    again = data.tokenize_files(files, tok, cache)  # from the cache, no tokenizing
    assert tok.calls == 1
    np.testing.assert_array_equal(again, expected)

    data.tokenize_files(files, ByteTokenizer("another-tokenizer"), cache)  # new key
    _write(corpus, "pkg1/mod01.py", "changed = True\n")
    data.tokenize_files(files, tok, cache)  # new contents: new key
    assert tok.calls == 2 and len(list(cache.glob("*.npy"))) == 3


def test_files_key_and_empty_file_list(corpus, tmp_path):
    files = data.text_files(corpus)
    key = data.files_key(files, extra="a")
    assert key == data.files_key(files, extra="a") != data.files_key(files, extra="b")
    assert data.files_key(files[1:], extra="a") != key
    moved = tmp_path / "moved.py"
    moved.write_bytes(files[0].read_bytes())
    assert data.files_key([moved, *files[1:]], extra="a") == key  # contents, not paths
    empty = data.tokenize_files([], ByteTokenizer(), tmp_path / "cache")
    assert empty.shape == (0,) and empty.dtype == np.uint16


def test_tokenize_splits_with_sentencepiece(corpus, tmp_path):
    files = data.text_files(corpus)
    train, held = data.split_files(files, corpus)
    sp = train_sentencepiece(train, 320, tmp_path / "tok")
    splits = data.tokenize_splits(files, corpus, sp, tmp_path / "cache")
    assert splits.train_files == tuple(train) and splits.heldout_files == tuple(held)
    assert len(held) >= 1
    # Decoding the stream gives back the documents, EOS-separated.
    eos_at = np.flatnonzero(np.asarray(splits.heldout) == sp.eos_id)
    docs, start = [], 0
    for end in eos_at:
        docs.append(sp.decode(splits.heldout[start:end].tolist()))
        start = end + 1
    assert docs == [f.read_text(encoding="utf-8") for f in held if f.read_text().strip()]


def _window_start(stream_n, inputs_t):
    """Where in the stream a batch row came from (the stream is arange, so values are offsets)."""
    start = int(inputs_t[0])
    np.testing.assert_array_equal(inputs_t, stream_n[start : start + len(inputs_t)])
    return start


def test_train_batches_shapes_and_shift():
    stream_n = np.arange(1000, dtype=np.int32)
    seq_len, batch = 16, 4
    it = data.make_train_iterator(stream_n, seq_len, batch, seed=0, eos_id=-1)
    for _ in range(30):  # past the first epoch (62 windows / 4 per batch)
        b = next(it)
        assert set(b) == {"inputs", "targets", "segment_ids"}
        for v in b.values():
            assert v.shape == (batch, seq_len) and v.dtype == np.int32
        for row in range(batch):
            start = _window_start(stream_n, b["inputs"][row])
            assert start % seq_len == 0
            targets_t = stream_n[start + 1 : start + seq_len + 1]
            np.testing.assert_array_equal(b["targets"][row], targets_t)
        np.testing.assert_array_equal(b["segment_ids"], 1)  # no EOS in this stream


def test_epochs_cover_every_window_once_and_reshuffle():
    stream_n = np.arange(8 * 10 + 1, dtype=np.int32)  # exactly 10 windows of 8
    it = data.make_train_iterator(stream_n, 8, 5, seed=3, eos_id=-1)
    starts = [int(start) for b in _take(it, 6) for start in b["inputs"][:, 0]]
    epochs = [starts[0:10], starts[10:20], starts[20:30]]
    for epoch in epochs:
        assert sorted(epoch) == list(range(0, 80, 8))
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(batches_a, batches_b):
    return all(np.array_equal(a[k], b[k]) for a, b in zip(batches_a, batches_b) for k in a)


def test_seed_determinism():
    stream_n = np.arange(5000, dtype=np.int32) % 251
    make = lambda seed: data.make_train_iterator(stream_n, 32, 4, seed=seed, eos_id=250)
    assert _same(_take(make(7), 10), _take(make(7), 10))
    assert not _same(_take(make(7), 10), _take(make(8), 10))


def test_nearby_seeds_do_not_share_epochs():
    # grain shuffles epoch e with seed + e; seeds must not be passed through as is.
    stream_n = np.arange(8 * 10 + 1, dtype=np.int32)
    seed0 = _take(data.make_train_iterator(stream_n, 8, 10, seed=0, eos_id=-1), 2)
    seed1 = _take(data.make_train_iterator(stream_n, 8, 10, seed=1, eos_id=-1), 1)
    assert not np.array_equal(seed0[1]["inputs"], seed1[0]["inputs"])


def test_iterator_state_restore():
    stream_n = np.arange(3000, dtype=np.int32) % 97
    make = lambda: data.make_train_iterator(stream_n, 16, 4, seed=11, eos_id=96)
    it = make()
    _take(it, 5)
    state = json.loads(json.dumps(it.get_state()))  # checkpointable as plain JSON
    expected = _take(it, 60)  # crosses an epoch border (46 windows)
    restored = make()
    restored.set_state(state)
    assert _same(_take(restored, 60), expected)
    assert not _same(_take(make(), 60), expected)


def _reference_segments(inputs_t, eos_id):
    out, seg = [], 1
    for token in inputs_t:
        out.append(seg)
        if token == eos_id:
            seg += 1
    return out


def test_segment_ids_around_eos():
    eos = 0
    # EOS at the first input, mid-window, twice in a row, and as the last input of a window.
    stream_n = np.array([0, 5, 6, 0, 7, 0, 0, 8, 9, 0, 4, 4, 4, 0, 3, 3, 2], dtype=np.uint16)
    batches = data.make_eval_batches(stream_n, 8, 2, eos_id=eos)
    assert len(batches) == 1
    for row in range(2):
        inputs_t = batches[0]["inputs"][row]
        np.testing.assert_array_equal(batches[0]["segment_ids"][row], _reference_segments(inputs_t, eos))
    np.testing.assert_array_equal(batches[0]["segment_ids"][0], [1, 2, 2, 2, 3, 3, 4, 5])
    np.testing.assert_array_equal(batches[0]["segment_ids"][1], [1, 1, 2, 2, 2, 2, 3, 3])


def test_train_segment_ids_match_reference():
    rng = np.random.default_rng(0)
    stream_n = rng.integers(0, 20, size=4000).astype(np.uint16)  # EOS (0) about every 20 tokens
    it = data.make_train_iterator(stream_n, 64, 4, seed=1, eos_id=0)
    for b in _take(it, 5):
        for row in range(4):
            np.testing.assert_array_equal(b["segment_ids"][row], _reference_segments(b["inputs"][row], 0))


def test_eval_batches_fixed_and_non_overlapping():
    stream_n = np.arange(1000, dtype=np.int32)
    batches = data.make_eval_batches(stream_n, 10, 3, max_batches=5, eos_id=-1)
    assert len(batches) == 5
    assert _same(batches, data.make_eval_batches(stream_n, 10, 3, max_batches=5, eos_id=-1))
    inputs = np.concatenate([b["inputs"] for b in batches]).reshape(-1)
    targets = np.concatenate([b["targets"] for b in batches]).reshape(-1)
    np.testing.assert_array_equal(inputs, stream_n[:150])  # consecutive, each token once
    np.testing.assert_array_equal(targets, stream_n[1:151])
    assert len(data.make_eval_batches(stream_n, 10, 3, eos_id=-1)) == 33  # 99 windows / 3


def test_too_small_corpus():
    stream_n = np.arange(100, dtype=np.uint16)
    with pytest.raises(BitNetError) as err:
        data.make_train_iterator(stream_n, 64, 2, seed=0, eos_id=1)
    assert "100 tokens" in str(err.value) and "129" in str(err.value)
    with pytest.raises(BitNetError, match="held-out data has 0 tokens"):
        data.make_eval_batches(stream_n[:0], 8, 1, eos_id=1)
    with pytest.raises(BitNetError, match="seq_len"):
        data.make_train_iterator(stream_n, 0, 2, seed=0, eos_id=1)


def test_default_eos_is_sentencepiece_eos():
    stream_n = np.array([5, 2, 6, 7, 2, 8, 9, 9, 9], dtype=np.uint16)
    inputs_t = stream_n[:8]
    batch = data.make_eval_batches(stream_n, 8, 1)[0]
    np.testing.assert_array_equal(batch["segment_ids"][0], _reference_segments(inputs_t, 2))


def test_train_iterator_on_cached_memmap(corpus, tmp_path):
    tok = ByteTokenizer()
    tokens = data.tokenize_files(data.text_files(corpus), tok, tmp_path / "cache")
    assert isinstance(tokens, np.memmap)
    b = next(data.make_train_iterator(tokens, 32, 2, seed=0, eos_id=tok.eos_id))
    assert b["inputs"].dtype == np.int32 and b["inputs"].shape == (2, 32)
    assert tok.decode(b["inputs"][0].tolist())  # real text
