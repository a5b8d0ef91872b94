"""`bitnet-jax train` on data other than a text folder: a JSON Lines + pre-tokenized ArrayRecord
mixture resumed exactly, a Hugging Face tokenizer.json, and bad data stopping the run with a message."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
import tokenizers
from tiny_run import CORPUS_FILES, RUN
from tokenizers import decoders, models, pre_tokenizers, trainers

from bitnet_jax import cli
from bitnet_jax.data.pipeline import stdlib_root
from bitnet_jax.train.run_folder import load_run


def _chunks(text, lines=30):
    rows = text.splitlines(keepends=True)
    return ["".join(rows[i : i + lines]) for i in range(0, len(rows), lines)]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Two JSON Lines files of stdlib code chunks, and the second pre-tokenized with a new tokenizer."""
    root = tmp_path_factory.mktemp("train_data")
    docs = [c for name in CORPUS_FILES for c in _chunks((stdlib_root() / name).read_text(encoding="utf-8"))]
    for name, part in (("a.jsonl", docs[::2]), ("b.jsonl", docs[1::2])):
        (root / name).write_text("".join(json.dumps({"content": d}) + "\n" for d in part))
    os.environ["BITNET_JAX_CACHE"] = str(root / "cache")
    corpus = "{'kind': 'jsonl', 'path': '%s', 'field': 'content'}" % (root / "b.jsonl")
    assert cli.main(["tokenize", "--corpus", corpus, "--vocab-size", "640", "--out", str(root / "tok")]) == 0
    yield root
    os.environ.pop("BITNET_JAX_CACHE", None)


def _args(out, *settings):
    return ["train", "--no-progress", "--out", str(out), *[a for s in (*RUN, *settings) for a in ("--set", s)]]


def _mixture(env):
    return (
        f"corpus=[{{'kind': 'jsonl', 'path': '{env / 'a.jsonl'}', 'field': 'content', 'weight': 3}}, "
        f"'array_record:{env / 'tok'}']"
    )


def _params_equal(run_a, run_b):
    _, params_a, _ = load_run(str(run_a))
    _, params_b, _ = load_run(str(run_b))
    return all(
        np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b))
    )


def test_mixture_run_resumes_exactly(env, capsys):
    whole, resumed = env / "whole", env / "resumed"
    assert cli.main(_args(whole, _mixture(env), "model.vocab_size=640")) == 0
    run = json.loads((whole / "run.json").read_text())
    assert run["corpus"][0]["weight"] == 3 and run["corpus"][1] == f"array_record:{env / 'tok'}"
    # The run took the tokenizer stored with the pre-tokenized data.
    assert (whole / "tokenizer.model").read_bytes() == (env / "tok" / "tokenizer.model").read_bytes()
    metrics = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["eval_loss"] < metrics[0]["eval_loss"]

    assert cli.main(_args(resumed, _mixture(env), "model.vocab_size=640")) == 0
    shutil.rmtree(resumed / "checkpoints" / "6")  # lose the work after step 3
    assert cli.main(_args(resumed, _mixture(env), "model.vocab_size=640")) == 0
    assert "Resumed from step 3" in capsys.readouterr().out
    assert _params_equal(whole, resumed)


def test_hugging_face_tokenizer_json(env, tmp_path):
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [json.loads(line)["content"] for line in (env / "a.jsonl").read_text().splitlines()]
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=640,  # as the tiny run's: the same programs as the runs above, compiled once
            special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    (tmp_path / "hf").mkdir()
    tok.save(str(tmp_path / "hf" / "tokenizer.json"))
    out = tmp_path / "run"
    assert (
        cli.main(
            _args(
                out,
                f"corpus={{'kind': 'jsonl', 'path': '{env / 'a.jsonl'}', 'field': 'content'}}",
                f"tokenizer={tmp_path / 'hf' / 'tokenizer.json'}",
                f"model.vocab_size={tok.get_vocab_size()}",
                "model.bos_token_id=0",
                "model.eos_token_id=1",
            )
        )
        == 0
    )
    _, _, loaded = load_run(str(out))
    assert loaded.eos_id == 1 and loaded.encode("def f(x):") == tok.encode("def f(x):").ids


@pytest.mark.parametrize(
    "corpus, message",
    [
        ("jsonl:{bad}", "bad.jsonl, line 2: expected one JSON object per line"),
        ("jsonl:{a}", "no field 'text'; this line has 'content'"),
        (
            "[{{'kind': 'jsonl', 'path': '{a}', 'field': 'content'}}, 'array_record:{empty}']",
            "found no tokens.array_record",
        ),
    ],
)
def test_bad_data_stops_the_run_with_a_message(env, tmp_path, capsys, corpus, message):
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"text": \n')
    (tmp_path / "empty").mkdir()
    corpus = corpus.format(bad=tmp_path / "bad.jsonl", a=env / "a.jsonl", empty=tmp_path / "empty")
    assert (
        cli.main(_args(tmp_path / "run", f"corpus={corpus}", "model.vocab_size=640", f"tokenizer={env / 'tok'}")) == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_pretokenized_data_with_another_tokenizer_is_refused(env, tmp_path, capsys):
    other = tmp_path / "other"
    assert (
        cli.main(
            [
                "tokenize",
                "--corpus",
                f"{{'kind': 'jsonl', 'path': '{env / 'a.jsonl'}', 'field': 'content'}}",
                "--vocab-size",
                "640",
                "--out",
                str(other),
            ]
        )
        == 0
    )
    assert (
        cli.main(
            _args(tmp_path / "run", f"corpus=array_record:{env / 'tok'}", "model.vocab_size=640", f"tokenizer={other}")
        )
        == 2
    )
    assert "tokenized with another tokenizer" in capsys.readouterr().err
