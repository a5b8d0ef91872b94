"""The main job end to end at a tiny scale: `bitnet-jax train` then `generate`, resume, Ctrl-C,
and the errors a user can cause from the command line."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from tiny_run import CORPUS_FILES, RUN

from bitnet_jax import BitNetError, cli
from bitnet_jax.data.pipeline import stdlib_root
from bitnet_jax.train.run_folder import load_run


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A text corpus folder and a private tokenizer / token cache shared by the tests here."""
    root = tmp_path_factory.mktemp("train")
    corpus = root / "corpus"
    corpus.mkdir()
    for name in CORPUS_FILES:
        shutil.copy(stdlib_root() / name, corpus / f"{name}.txt")
    cache = root / "cache"
    os.environ["BITNET_JAX_CACHE"] = str(cache)
    yield {"root": root, "corpus": str(corpus), "cache": str(cache)}
    os.environ.pop("BITNET_JAX_CACHE", None)


def train_args(env, out, *extra):
    return [
        "train",
        "--no-progress",
        "--out",
        str(out),
        "--set",
        f"corpus={env['corpus']}",
        *[a for s in RUN for a in ("--set", s)],
        *[a for s in extra for a in ("--set", s)],
    ]


def read_metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(env):
    """One finished 6-step run (the CLI's own output is checked in the first test), also the
    uninterrupted run that the resumed ones must equal."""
    out = env["root"] / "run"
    assert cli.main(train_args(env, out)) == 0
    return out


def test_train_writes_a_self_contained_run_folder_and_generates(trained, capsys):
    out = trained

    assert {"run.json", "tokenizer.model", "metrics.jsonl", "loss.png", "checkpoints"} <= set(os.listdir(out))
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [0, 1, 2, 3, 4, 5, 6]
    assert all({"loss", "learning_rate", "tokens_per_s"} <= m.keys() for m in metrics[1:])
    assert [m["step"] for m in metrics if "eval_loss" in m] == [0, 3, 6]
    assert metrics[-1]["eval_loss"] < metrics[0]["eval_loss"]  # it learns, even in 6 steps
    assert sorted(int(s) for s in os.listdir(out / "checkpoints")) == [3, 6]

    run, params, tokenizer = load_run(str(out))
    assert run.steps == 6 and run.model.hidden_size == 64 and tokenizer.vocab_size == 640
    assert params["layers"]["mlp"]["up_proj"]["kernel"].shape == (2, 64, 128)

    assert cli.main(["generate", "--model", str(out), "--prompt", "def ", "--max-new-tokens", "8", "--verbose"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("def ") and len(captured.out) > len("def \n")
    assert "tokens/s" in captured.err


def test_resumed_run_equals_uninterrupted_run(env, trained, capsys):
    # `trained` is the uninterrupted run: a fresh run of the same settings.
    whole, resumed = trained, env["root"] / "resumed"
    assert cli.main(train_args(env, resumed)) == 0
    # Lose the work after step 3, as a run killed between checkpoints would.
    shutil.rmtree(resumed / "checkpoints" / "6")
    assert cli.main(train_args(env, resumed)) == 0
    printed = capsys.readouterr().out
    assert "Resumed from step 3" in printed and "Done: step 6" in printed

    _, params_whole, _ = load_run(str(whole))
    _, params_resumed, _ = load_run(str(resumed))
    for a, b in zip(jax.tree.leaves(params_whole), jax.tree.leaves(params_resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # metrics.jsonl holds each step once: the lost steps were dropped and logged again.
    assert [m["step"] for m in read_metrics(resumed)] == [0, 1, 2, 3, 4, 5, 6]
    assert read_metrics(resumed)[-1]["loss"] == read_metrics(whole)[-1]["loss"]


@pytest.mark.parametrize("damage", ["incomplete", "garbage"])
def test_resume_skips_a_corrupt_latest_checkpoint(env, trained, tmp_path, capsys, damage):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    latest = run / "checkpoints" / "6"
    if damage == "incomplete":  # as if killed while saving
        shutil.rmtree(latest / "opt_state")
    else:
        for f in (latest / "params").rglob("*"):
            if f.is_file():
                f.write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning, match="checkpoint of step 6 is corrupt or incomplete"):
        assert cli.main(train_args(env, run)) == 0
    printed = capsys.readouterr().out
    assert "Moved unreadable checkpoint(s) [6]" in printed and "Resumed from step 3" in printed
    assert sorted(os.listdir(run / "checkpoints")) == ["3", "6"]  # step 6 trained and saved again
    assert len(os.listdir(run / "corrupt-checkpoints")) == 1
    _, params_whole, _ = load_run(str(trained))
    _, params_resumed, _ = load_run(str(run))
    for a, b in zip(jax.tree.leaves(params_whole), jax.tree.leaves(params_resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_load_run_falls_back_and_then_refuses(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    shutil.rmtree(run / "checkpoints" / "6" / "params")
    with pytest.warns(UserWarning, match="step 6"):
        _, params, _ = load_run(str(run))  # step 3's parameters
    shutil.rmtree(run / "checkpoints" / "3" / "params")
    with pytest.warns(UserWarning), pytest.raises(BitNetError, match=r"none of its checkpoints \(steps \[6, 3\]\)"):
        load_run(str(run))


def test_resume_with_a_different_model_is_refused(env, trained, capsys):
    assert cli.main(train_args(env, trained, "model.hidden_size=32")) == 2
    err = capsys.readouterr().err
    assert "different model" in err and "hidden_size" in err


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_keeps_the_last_checkpoint(env, signum):
    out = env["root"] / f"interrupted-{signum}"
    cmd = [sys.executable, "-m", "bitnet_jax.cli", *train_args(env, out, "steps=100000", "checkpoint_every=1000")]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "BITNET_JAX_CACHE": env["cache"]},
    )
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 4:  # step 0 eval + 3 steps
            break
        time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()[0]
    proc.send_signal(signum)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output
    assert "Interrupted at step" in output and "Saved" in output

    steps = [int(s) for s in os.listdir(out / "checkpoints") if s.isdigit()]
    assert len(steps) == 1 and steps[0] >= 3  # no checkpoint_every boundary was reached
    run, params, _ = load_run(str(out))
    assert run.steps == 100000
    assert read_metrics(out)[-1]["step"] <= steps[0] + 1


def test_empty_corpus_folder(env, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(train_args(env, tmp_path / "run", f"corpus={empty}")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Found no files ending in" in err and str(empty) in err


def test_corpus_too_small_for_one_batch(env, tmp_path, capsys):
    assert cli.main(train_args(env, tmp_path / "run", "batch_size=10000")) == 2
    assert "needs at least" in capsys.readouterr().err


@pytest.mark.parametrize(
    "setting, message",
    [
        ("stepz=10", "stepz"),
        ("steps=-1", "RunConfig.steps=-1 is invalid: expected a positive integer"),
        ("model.hidden_sise=64", "hidden_sise"),
        ("model.weight_quant=ternary", "weight_quant"),
        ("seq_len=4096", "max_position_embeddings"),
        ("async_checkpoints=1", "RunConfig.async_checkpoints=1 is invalid: expected True or False"),
        ("steps", "expected key=value"),
    ],
)
def test_bad_set_values(env, tmp_path, capsys, setting, message):
    assert cli.main(train_args(env, tmp_path / "run", setting)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # nothing was written


def test_unknown_key_in_config_file(tmp_path, capsys):
    config = tmp_path / "bad.py"
    config.write_text("def get_config():\n    return {'model': {'preset': 'tiny'}, 'learning_rat': 1e-3}\n")
    assert cli.main(["train", "--config", str(config), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "learning_rat" in err and "learning_rate" in err  # names the key and suggests the fix


def test_missing_config_file(tmp_path, capsys):
    assert cli.main(["train", "--config", str(tmp_path / "nope.py")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--max-new-tokens", "0"], "max_new_tokens"),
        (["--prompt", "x " * 200], "context"),
    ],
)
def test_generate_bad_requests(trained, capsys, args, message):
    argv = ["generate", "--model", str(trained)] + ([] if "--prompt" in args else ["--prompt", "def "])
    assert cli.main(argv + args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


def test_generate_from_a_missing_folder(tmp_path, capsys):
    assert cli.main(["generate", "--model", str(tmp_path / "nowhere"), "--prompt", "hi"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_generate_from_a_run_folder_without_checkpoint(trained, tmp_path, capsys):
    run = tmp_path / "fresh"
    run.mkdir()
    shutil.copy(trained / "run.json", run / "run.json")
    assert cli.main(["generate", "--model", str(run), "--prompt", "hi"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
