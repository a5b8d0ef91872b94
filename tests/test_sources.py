"""Data sources beyond text folders: config forms, JSON Lines, Parquet, pre-tokenized ArrayRecord
folders (`bitnet-jax tokenize`), weighted mixtures, per-process shards, and the errors bad data give."""

import json

import numpy as np
import pytest

from bitnet_jax import cli
from bitnet_jax.data import documents, token_records
from bitnet_jax.data import pipeline as data
from bitnet_jax.data.sources import DataSource, parse_source
from bitnet_jax.data.tokenizer_training import train_sentencepiece
from bitnet_jax.errors import BitNetError
from bitnet_jax.train.run_config import RunConfig, load_run_config

DOCS = [f"def f{i}(x):\n    return x + {i}  # é {'word ' * (i % 5)}\n" for i in range(60)]


class ByteTokenizer:
    """Byte-level stand-in (id = byte + 3, eos = 2) with the file and fingerprint a token folder records."""

    vocab_size, bos_id, eos_id, pad_id = 259, 1, 2, 0
    stop_ids = frozenset({2})
    fingerprint = "bytes-v1"
    path = __file__  # copied into token folders like a real tokenizer file

    def encode(self, text):
        return [b + 3 for b in text.encode("utf-8")]

    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]


def _jsonl(path, docs, field="text"):
    lines = [json.dumps({field: d, "id": i}) for i, d in enumerate(docs)]
    lines.insert(3, "")  # blank lines are no documents
    lines.insert(5, json.dumps({field: None, "id": -1}))  # nor are nulls
    path.write_text("\n".join(lines) + "\n")
    return path


def _streams(source, tokenizer, cache=None, fraction=0.1):
    return documents.source_streams(
        source, tokenizer, default_suffixes=(".txt",), heldout_fraction=fraction, cache_dir=cache
    )


def _reference_stream(docs, tokenizer):
    out = []
    for d in docs:
        out += tokenizer.encode(d) + [tokenizer.eos_id]
    return np.array(out)


# Config forms.
@pytest.mark.parametrize(
    "spec, expected",
    [
        ("stdlib", DataSource("stdlib")),
        ("/no/such/folder", DataSource("text", "/no/such/folder")),
        ("jsonl:/d/a.jsonl", DataSource("jsonl", "/d/a.jsonl")),
        ("parquet:/d/*.parquet", DataSource("parquet", "/d/*.parquet")),
        ("array_record:/d/tok", DataSource("array_record", "/d/tok")),
        (
            {"kind": "jsonl", "path": "a.jsonl", "field": "content", "weight": 0.7},
            DataSource("jsonl", "a.jsonl", field="content", weight=0.7),
        ),
        ({"kind": "parquet", "path": "p", "column": "body"}, DataSource("parquet", "p", field="body")),
        (
            {"kind": "text", "path": "t", "suffixes": [".md"], "weight": 2},
            DataSource("text", "t", suffixes=(".md",), weight=2.0),
        ),
    ],
)
def test_source_forms_parse_and_round_trip(spec, expected):
    source = parse_source(spec)
    assert source == expected
    assert parse_source(source.to_spec()) == source


def test_run_config_keeps_a_mixture_through_run_json():
    corpus = ["jsonl:/d/a.jsonl", {"kind": "parquet", "path": "/d/p", "column": "body", "weight": 3}]
    run = load_run_config(None, [f"corpus={corpus!r}", "worker_count=2", "tokenizer=/t/tokenizer.json"])
    assert [s.weight for s in run.sources] == [1.0, 3.0] and run.sources[1].field == "body"
    again = RunConfig.from_dict(json.loads(json.dumps(run.to_dict())), source="run.json")
    assert again == run and again.worker_count == 2
    assert load_run_config(None).corpus == "stdlib" and load_run_config(None).sources == (DataSource("stdlib"),)


@pytest.mark.parametrize(
    "corpus, message",
    [
        ("jsnl:/d/a.jsonl", "unknown source kind 'jsnl' (did you mean 'jsonl'?)"),
        ({"kind": "csv", "path": "a"}, "unknown source kind 'csv'"),
        ([{"kind": "jsonl", "path": "a", "weight": -1}], "corpus[0]: weight=-1 is invalid: expected a positive"),
        ([{"kind": "jsonl", "path": "a", "weight": 0}, {"kind": "jsonl", "path": "b", "weight": 0}], "weight=0"),
        ([{"kind": "jsonl", "path": "a", "feld": "x"}], "'feld' (did you mean 'field'?)"),
        ([{"kind": "parquet", "path": "a", "field": "x"}], "it takes column, kind, path, weight"),
        ({"kind": "jsonl"}, "needs a 'path'"),
        ([], "non-empty list"),
        (3, "expected a source"),
    ],
)
def test_bad_sources_are_refused(corpus, message):
    with pytest.raises(BitNetError, match="RunConfig.corpus") as err:
        load_run_config(None, [f"corpus={corpus!r}"])
    assert message in str(err.value)


# JSON Lines.
def test_jsonl_documents_split_and_cache(tmp_path):
    path = _jsonl(tmp_path / "a.jsonl", DOCS)
    tok = ByteTokenizer()
    source = parse_source(f"jsonl:{path}")
    train, held = _streams(source, tok, cache=tmp_path / "cache")
    train_idx, held_idx = documents.split_indices(len(DOCS), 0.1)
    assert 1 <= len(held_idx) < 20
    np.testing.assert_array_equal(train, _reference_stream([DOCS[i] for i in train_idx], tok))
    np.testing.assert_array_equal(held, _reference_stream([DOCS[i] for i in held_idx], tok))
    assert len(list((tmp_path / "cache").glob("tokens-*-train.npy"))) == 1
    again = _streams(source, tok, cache=tmp_path / "cache")  # from the cache
    assert isinstance(again[0], np.memmap) and np.array_equal(again[0], train)


def test_split_indices_are_stable_when_documents_are_appended():
    train, held = documents.split_indices(500, 0.1)
    assert 25 <= len(held) <= 80 and not set(train) & set(held) and len(train) + len(held) == 500
    _, held_more = documents.split_indices(800, 0.1)
    assert set(held_more) & set(range(500)) == set(held)


def test_bad_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c",\n')
    with pytest.raises(BitNetError) as err:
        _streams(parse_source(f"jsonl:{path}"), ByteTokenizer())
    assert f"{path}, line 3" in str(err.value) and "invalid JSON" in str(err.value)


def test_missing_jsonl_field_lists_the_fields(tmp_path):
    path = _jsonl(tmp_path / "a.jsonl", DOCS, field="content")
    with pytest.raises(BitNetError) as err:
        _streams(parse_source(f"jsonl:{path}"), ByteTokenizer())
    assert "no field 'text'" in str(err.value) and "'content', 'id'" in str(err.value)
    assert "line 1" in str(err.value)
    path.write_text('["a list"]\n')
    with pytest.raises(BitNetError, match="found a JSON list"):
        _streams(parse_source(f"jsonl:{path}"), ByteTokenizer())


def test_empty_dataset_is_refused(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text('{"text": "  "}\n\n{"text": null}\n')
    with pytest.raises(BitNetError, match="hold no non-empty documents in field 'text'"):
        _streams(parse_source(f"jsonl:{path}"), ByteTokenizer())
    (tmp_path / "folder").mkdir()
    with pytest.raises(BitNetError, match="found no .jsonl or .json files"):
        _streams(parse_source(f"jsonl:{tmp_path / 'folder'}"), ByteTokenizer())
    with pytest.raises(BitNetError, match="does not exist"):
        _streams(parse_source(f"jsonl:{tmp_path / 'missing.jsonl'}"), ByteTokenizer())


# Parquet.
def test_parquet_documents_and_errors(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    folder = tmp_path / "pq"
    folder.mkdir()
    # Two files, read in name order; a null row is skipped.
    pq.write_table(pa.table({"body": DOCS[:25] + [None], "n": list(range(26))}), folder / "part-0.parquet")
    pq.write_table(pa.table({"body": DOCS[25:], "n": list(range(35))}), folder / "part-1.parquet")
    tok = ByteTokenizer()
    train, held = _streams(parse_source({"kind": "parquet", "path": str(folder), "column": "body"}), tok)
    train_idx, held_idx = documents.split_indices(len(DOCS), 0.1)
    np.testing.assert_array_equal(train, _reference_stream([DOCS[i] for i in train_idx], tok))
    np.testing.assert_array_equal(held, _reference_stream([DOCS[i] for i in held_idx], tok))

    with pytest.raises(BitNetError) as err:
        _streams(parse_source(f"parquet:{folder}"), tok)  # default column "text"
    assert "no column 'text'" in str(err.value) and "'body', 'n'" in str(err.value)
    with pytest.raises(BitNetError, match="column 'n' holds int64; expected strings"):
        _streams(parse_source({"kind": "parquet", "path": str(folder), "column": "n"}), tok)
    good = (folder / "part-0.parquet").read_bytes()
    (folder / "part-0.parquet").write_bytes(good[: len(good) // 2])  # cut short
    with pytest.raises(BitNetError, match="part-0.parquet is not a readable Parquet file"):
        _streams(parse_source({"kind": "parquet", "path": str(folder), "column": "body"}), tok)


# Pre-tokenized ArrayRecord folders.
def test_tokenize_then_read_equals_on_the_fly(tmp_path, capsys):
    path = _jsonl(tmp_path / "a.jsonl", DOCS)
    sp = train_sentencepiece([], 300, tmp_path / "sp", texts=DOCS)
    out = tmp_path / "tok"
    assert (
        cli.main(["tokenize", "--corpus", f"jsonl:{path}", "--tokenizer", str(tmp_path / "sp"), "--out", str(out)]) == 0
    )
    assert "Wrote 60 documents" in capsys.readouterr().out
    meta = json.loads((out / "tokens.json").read_text())
    assert meta["dtype"] == "<u2" and meta["documents"] == 60 and meta["tokenizer"]["fingerprint"] == sp.fingerprint
    # One record per document: its ids, little-endian uint16, no EOS.
    docs, _ = token_records.read_documents(out)
    assert [d.tolist() for d in docs] == [sp.encode(d) for d in DOCS]
    on_the_fly = _streams(parse_source(f"jsonl:{path}"), sp)
    pretokenized = _streams(parse_source(f"array_record:{out}"), sp)
    for a, b in zip(on_the_fly, pretokenized):
        np.testing.assert_array_equal(a, b)
    # A tokenizer trained by the command itself lands in the folder, which load_tokenizer reads.
    assert (
        cli.main(
            [
                "tokenize",
                "--corpus",
                f"{{'kind': 'jsonl', 'path': '{path}'}}",
                "--vocab-size",
                "300",
                "--out",
                str(tmp_path / "tok2"),
            ]
        )
        == 0
    )
    assert (tmp_path / "tok2" / "tokenizer.model").is_file()


def test_pretokenized_stream_is_read_lazily_and_exactly(tmp_path):
    import pickle

    out = tmp_path / "tok"
    tok = ByteTokenizer()
    documents.tokenize_to_folder(parse_source(f"jsonl:{_jsonl(tmp_path / 'a.jsonl', DOCS)}"), tok, out)
    stream, _ = token_records.open_stream(out)
    reference = _reference_stream(DOCS, tok)  # all documents, EOS after each
    assert len(stream) == len(reference) and stream.dtype == np.uint16
    rng = np.random.default_rng(0)
    for start in [0, len(reference) - 7, *rng.integers(0, len(reference), 30)]:
        stop = start + int(rng.integers(1, 300))  # within one document, or across several
        np.testing.assert_array_equal(stream[start:stop], reference[start:stop])
    picked = stream.select(np.array([3, 10, 11]))
    np.testing.assert_array_equal(np.asarray(picked), _reference_stream([DOCS[3], DOCS[10], DOCS[11]], tok))
    copy = pickle.loads(pickle.dumps(stream))  # as grain's worker processes get it
    np.testing.assert_array_equal(copy[100:400], reference[100:400])
    # Batches from the lazy stream equal batches from the same stream in memory.
    lazy = data.make_train_iterator(stream, 32, 4, 0, eos_id=tok.eos_id)
    in_memory = data.make_train_iterator(reference.astype(np.uint16), 32, 4, 0, eos_id=tok.eos_id)
    for a, b in zip(_take(lazy, 5), _take(in_memory, 5)):
        assert all(np.array_equal(a[k], b[k]) for k in a)


def test_pretokenized_with_another_tokenizer_is_refused(tmp_path):
    out = tmp_path / "tok"
    documents.tokenize_to_folder(parse_source(f"jsonl:{_jsonl(tmp_path / 'a.jsonl', DOCS)}"), ByteTokenizer(), out)
    other = ByteTokenizer()
    other.fingerprint = "other"
    with pytest.raises(BitNetError, match="tokenized with another tokenizer"):
        _streams(parse_source(f"array_record:{out}"), other)


@pytest.mark.parametrize("damage", ["garbage", "cut short", "no metadata", "no lengths", "wrong lengths"])
def test_corrupt_array_record_is_refused(tmp_path, damage):
    out = tmp_path / "tok"
    documents.tokenize_to_folder(parse_source(f"jsonl:{_jsonl(tmp_path / 'a.jsonl', DOCS)}"), ByteTokenizer(), out)
    records = out / "tokens.array_record"
    good = records.read_bytes()
    if damage == "garbage":
        records.write_bytes(b"not an array record" * 50)
    elif damage == "cut short":
        records.write_bytes(good[: len(good) // 2])
    elif damage == "no metadata":
        (out / "tokens.json").unlink()
    elif damage == "no lengths":
        (out / "tokens.lengths.npy").unlink()
    else:  # same count and total, so only reading a record shows it
        np.save(out / "tokens.lengths.npy", np.roll(np.load(out / "tokens.lengths.npy"), 1))
    message = {"no metadata": "no tokens.json", "no lengths": "tokens.lengths.npy is corrupt or incomplete"}.get(
        damage, "tokens.array_record is corrupt or incomplete"
    )
    with pytest.raises(BitNetError, match=message):
        train, held = _streams(parse_source(f"array_record:{out}"), ByteTokenizer())
        np.asarray(train)
    with pytest.raises(BitNetError, match="found no tokens.array_record"):
        _streams(parse_source(f"array_record:{tmp_path}"), ByteTokenizer())


# Mixtures and shards.
def _tagged_streams():
    # Source k's tokens are k*10000 + position, so every row tells which source it came from.
    return [np.arange(k * 10000, k * 10000 + n, dtype=np.int32) for k, n in enumerate((900, 300, 2000))]


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_mixture_proportions_follow_weights_and_seed():
    streams, weights = _tagged_streams(), [0.5, 0.3, 0.2]
    make = lambda seed: data.make_train_iterator(streams, 10, 8, seed, weights=weights, eos_id=-1)
    batches = _take(make(0), 125)  # 1000 windows
    rows = np.concatenate([b["inputs"] for b in batches])
    counts = np.bincount(rows[:, 0] // 10000, minlength=3)
    np.testing.assert_allclose(counts / counts.sum(), weights, atol=0.01)
    for row, target in zip(rows, np.concatenate([b["targets"] for b in batches])):
        k = row[0] // 10000  # a window never crosses sources and is shifted by one
        assert (row // 10000 == k).all() and np.array_equal(target, row + 1) and (row[0] - k * 10000) % 10 == 0
    # The small source (29 windows) repeats, reshuffled, instead of running out.
    small = rows[rows[:, 0] // 10000 == 1][:, 0]
    assert len(small) > 29 and sorted(small[:29]) == list(range(10000, 10290, 10))
    again = _take(make(0), 125)
    assert all(np.array_equal(a["inputs"], b["inputs"]) for a, b in zip(batches, again))
    other = np.concatenate([b["inputs"] for b in _take(make(1), 125)])
    assert not np.array_equal(other, rows)


def test_mixture_state_round_trips_through_json():
    make = lambda: data.make_train_iterator(_tagged_streams(), 10, 4, 5, weights=[2, 1, 1], eos_id=-1)
    it = make()
    _take(it, 7)
    state = json.loads(json.dumps(it.get_state()))
    expected = _take(it, 40)
    restored = make()
    restored.set_state(state)
    assert all(np.array_equal(a["inputs"], b["inputs"]) for a, b in zip(_take(restored, 40), expected))


def test_a_source_too_small_for_a_window_is_named():
    streams = [np.arange(500, dtype=np.int32), np.arange(5, dtype=np.int32)]
    with pytest.raises(BitNetError, match="training data of jsonl:tiny.jsonl have 5 tokens"):
        data.make_train_iterator(streams, 10, 4, 0, names=["text:big", "jsonl:tiny.jsonl"], eos_id=-1)


@pytest.mark.parametrize("weights", [None, [3, 1, 1]], ids=["single", "mixture"])
def test_process_shards_together_make_the_global_batch(weights):
    streams = _tagged_streams() if weights else _tagged_streams()[2]
    make = lambda index, count: data.make_train_iterator(
        streams, 10, 8, 3, weights=weights, eos_id=-1, shard_index=index, shard_count=count
    )
    whole = _take(make(0, 1), 12)
    shards = [_take(make(i, 2), 12) for i in range(2)]
    for b, (s0, s1) in enumerate(zip(shards[0], shards[1])):
        assert s0["inputs"].shape == (4, 10)
        assert not set(s0["inputs"][:, 0]) & set(s1["inputs"][:, 0])
        assert sorted(np.concatenate([s0["inputs"][:, 0], s1["inputs"][:, 0]])) == sorted(whole[b]["inputs"][:, 0])
    with pytest.raises(BitNetError, match="multiple of the number of processes"):
        data.make_train_iterator(streams, 10, 7, 3, weights=weights, eos_id=-1, shard_index=0, shard_count=2)


def test_worker_processes_give_the_same_batches_and_resume():
    streams = _tagged_streams()
    make = lambda workers: data.make_train_iterator(
        streams, 10, 4, 2, weights=[1, 1, 2], eos_id=-1, worker_count=workers
    )
    expected = _take(make(0), 6)
    it = make(1)
    _take(it, 2)
    state = json.loads(json.dumps(it.get_state()))
    restored = make(1)
    restored.set_state(state)
    with_workers = _take(restored, 4)
    for i in (it, restored):
        i.close()  # stops the worker processes now
    assert all(np.array_equal(a["inputs"], b["inputs"]) for a, b in zip(with_workers, expected[2:]))
