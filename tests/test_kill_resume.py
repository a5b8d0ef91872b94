"""Checkpoints that lose nothing: a run killed with SIGKILL, after a checkpoint is complete or while
one is being written in the background, and then resumed, ends bit for bit where an uninterrupted
run ends; and an asynchronous save keeps the values it was given while donated steps run on.

The runs are `bitnet-jax train` subprocesses started outside the source tree. To kill one at a
chosen point, a small driver (written below) holds up one checkpoint save, tells the test with a
marker file, and waits to be killed. They share a JAX compilation cache, so that only the first run
compiles (the compiled programs are the same either way).

Saves are held through public orbax API or at the file system calls (`os.rename`, `os.mkdir`) that
orbax's commit protocol makes on a local disk (write into `<step>.orbax-checkpoint-tmp`, rename it
to `<step>` when complete), never through orbax's private modules, which move between releases. If
a new orbax stops making those calls, the hold is never reached and the tests say so; none can pass
without holding."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from test_train import read_metrics, train_args
from tiny_run import CORPUS_FILES

import bitnet_jax
from bitnet_jax import BitNetError
from bitnet_jax.data.pipeline import stdlib_root
from bitnet_jax.train import run_folder
from bitnet_jax.train.run_config import load_run_config
from bitnet_jax.train.run_folder import (
    checkpoint_manager,
    read_run_file,
    save_checkpoint,
    unfinished_saves,
)
from bitnet_jax.train.step import make_model, make_optimizer, make_train_step

N = 4  # the step killed at; runs are 2N steps long
RUN = [f"steps={2 * N}", "checkpoint_every=2", "keep_checkpoints=3", "eval_every=4"]

DRIVER = '''
"""bitnet-jax train ARGS, with the checkpoint save of one step held up until the test kills it."""
import os
import sys
import time

import orbax.checkpoint as ocp

from bitnet_jax import cli

hold_at, held_step, marker, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]


def hold():
    open(marker, "w").close()
    while True:
        time.sleep(1)


if hold_at == "finalized":  # the training loop, once the step's checkpoint is complete on disk
    save = ocp.CheckpointManager.save

    def save_then_hold(self, step, *args, **kwargs):
        saved = save(self, step, *args, **kwargs)
        if step == held_step:
            self.wait_until_finished()
            hold()
        return saved
    ocp.CheckpointManager.save = save_then_hold
else:  # orbax's background thread, with every file written but the folder not renamed to its step yet
    rename = os.rename

    def hold_then_rename(src, dst, *args, **kwargs):
        src_name, dst_name = os.path.basename(os.fspath(src)), os.path.basename(os.fspath(dst))
        if dst_name == str(held_step) and src_name.startswith(f"{held_step}.orbax-checkpoint-tmp"):
            hold()
        return rename(src, dst, *args, **kwargs)
    os.rename = hold_then_rename

sys.exit(cli.main(argv))
'''


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A corpus, a tokenizer / token cache, a JAX compilation cache and the environment of the runs."""
    root = tmp_path_factory.mktemp("kill")
    corpus = root / "corpus"
    corpus.mkdir()
    for name in CORPUS_FILES:
        (corpus / f"{name}.txt").write_bytes((stdlib_root() / name).read_bytes())
    (root / "driver.py").write_text(DRIVER)
    package_root = str(Path(bitnet_jax.__file__).parents[1])  # the package under test
    process_env = {
        **os.environ,
        "BITNET_JAX_CACHE": str(root / "cache"),
        "PYTHONPATH": os.pathsep.join([package_root, os.environ.get("PYTHONPATH", "")]),
        "JAX_COMPILATION_CACHE_DIR": str(root / "jax-cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }
    return {"root": root, "corpus": str(corpus), "driver": str(root / "driver.py"), "process_env": process_env}


def train(env, out, cwd) -> str:
    """Plain `bitnet-jax train` to the end; its output."""
    result = subprocess.run(
        [sys.executable, "-m", "bitnet_jax.cli", *train_args(env, out, *RUN)],
        cwd=cwd,
        env=env["process_env"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def uninterrupted(env):
    out = env["root"] / "whole"
    train(env, out, env["root"])
    return out


def saved(run_dir, step: int):
    """Everything the checkpoint of `step` holds, read by orbax as it was saved."""
    manager = checkpoint_manager(str(run_dir), read_run_file(str(run_dir)), read_only=True)
    return manager.restore(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardRestore(), opt_state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()
        ),
    )


def assert_same_trees(a, b):
    paths_a, leaves_a = zip(*jax.tree_util.tree_flatten_with_path(a)[0])
    paths_b, leaves_b = zip(*jax.tree_util.tree_flatten_with_path(b)[0])
    assert paths_a == paths_b
    for path, x, y in zip(paths_a, leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("hold_at", ["finalized", "in-flight"])
def test_sigkill_and_resume_equals_the_uninterrupted_run(env, uninterrupted, tmp_path, hold_at):
    out, marker = tmp_path / "run", tmp_path / "held"
    proc = subprocess.Popen(
        [sys.executable, env["driver"], hold_at, str(N), str(marker), *train_args(env, out, *RUN)],
        cwd=tmp_path,
        env=env["process_env"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        if proc.poll() is not None:
            pytest.fail(f"the run ended before it was held:\n{proc.communicate()[0]}")
        assert marker.exists(), "the run was not held within 240 s"
        folders = sorted(os.listdir(out / "checkpoints"))
        if hold_at == "finalized":
            assert folders == ["2", "4"]
        else:  # step 4 is written under a temporary name, which becomes "4" only when complete
            assert folders[0] == "2" and len(folders) == 2 and folders[1].startswith("4.orbax-checkpoint-tmp")
            assert {"params", "opt_state", "meta"} <= set(os.listdir(out / "checkpoints" / folders[1]))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL

    printed = train(env, out, tmp_path)
    if hold_at == "finalized":
        assert f"Resumed from step {N}" in printed and "incomplete" not in printed
    else:  # the half-written checkpoint was not taken, and its folder was cleaned away
        assert (
            f"The checkpoint of step {N} is incomplete (the run stopped while saving it) and is deleted; "
            "the newest complete one is used."
        ) in printed, printed
        assert f"Resumed from step {N - 2}" in printed
    assert sorted(os.listdir(out / "checkpoints")) == ["4", "6", "8"]  # the last 3, nothing else
    assert not (out / "corrupt-checkpoints").exists()

    whole, resumed = saved(uninterrupted, 2 * N), saved(out, 2 * N)
    assert_same_trees(whole.params, resumed.params)
    assert_same_trees(whole.opt_state, resumed.opt_state)
    assert whole.meta == resumed.meta  # the step and the data iterator's position
    metrics_whole, metrics_resumed = read_metrics(uninterrupted), read_metrics(out)
    assert [m["step"] for m in metrics_resumed] == list(range(2 * N + 1))
    for key in ("loss", "eval_loss", "learning_rate"):
        assert [m.get(key) for m in metrics_resumed] == [m.get(key) for m in metrics_whole]


def test_an_async_save_keeps_its_values_while_donated_steps_run(tmp_path, monkeypatch):
    run = load_run_config(
        None,
        [
            "model.hidden_size=32",
            "model.intermediate_size=32",
            "model.num_hidden_layers=1",
            "model.num_attention_heads=2",
            "model.num_key_value_heads=1",
            "model.vocab_size=97",
            "warmup_steps=0",
            "learning_rate=1e-2",
        ],
    )
    assert run.async_checkpoints
    model, optimizer = make_model(run), make_optimizer(run)
    step = make_train_step(model, optimizer, donate=True)
    rng = np.random.default_rng(0)
    batches = [
        {
            "inputs": rng.integers(0, 97, (4, 16), dtype=np.int32),
            "targets": rng.integers(0, 97, (4, 16), dtype=np.int32),
            "segment_ids": np.ones((4, 16), np.int32),
        }
        for _ in range(4)
    ]
    params = bitnet_jax.init_params(run.model, 0)
    opt_state = optimizer.init(params)
    params, opt_state, _ = step(params, opt_state, batches[0])
    expected = jax.tree.map(jnp.copy, (params, opt_state))  # device copies: no numpy view of the originals

    # Orbax writes the arrays in a background thread, into a folder that it also creates there
    # (`AsyncOptions.create_directories_asynchronously`, on by default) and that the writes wait
    # for. Hold that folder's creation, and with it every write, until the steps below ran.
    release, held = threading.Event(), []
    mkdir = os.mkdir

    def held_mkdir(path, *args, **kwargs):
        if ".orbax-checkpoint-tmp" in os.fspath(path) and threading.current_thread() is not threading.main_thread():
            held.append(os.fspath(path))
            release.wait(120)
        return mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", held_mkdir)

    manager = checkpoint_manager(str(tmp_path), run)
    try:
        save_checkpoint(manager, 1, params, opt_state, {"position": 1})
        for batch in batches[1:]:
            inputs = params
            params, opt_state, _ = step(params, opt_state, batch)
        jax.block_until_ready(params)
        assert all(x.is_deleted() for x in jax.tree.leaves(inputs))  # the last step did donate its inputs
        deadline = time.monotonic() + 60
        while not held and time.monotonic() < deadline:
            time.sleep(0.01)
        assert held, "orbax created no checkpoint folder in a background thread: the save was not held"
        written = [f for _, _, files in os.walk(tmp_path / "checkpoints") for f in files]
        assert not written, f"files were written while the save was held: {written}"
    finally:
        release.set()
        manager.wait_until_finished()
    assert os.path.isdir(tmp_path / "checkpoints" / "1")

    restored = manager.restore(
        1,
        args=ocp.args.Composite(
            params=ocp.args.StandardRestore(expected[0]), opt_state=ocp.args.StandardRestore(expected[1])
        ),
    )
    assert_same_trees(expected, (restored.params, restored.opt_state))


def test_a_save_cut_short_that_is_never_redone_is_cleaned_away(tmp_path, monkeypatch):
    """As after a kill during the save on Ctrl-C at a step between `checkpoint_every` boundaries:
    the resumed run does not save that step again, which would have replaced the folder."""
    run = load_run_config(None, ["keep_checkpoints=2"])
    tree = {"w": jnp.arange(4.0)}

    rename = os.rename

    def cut_short(src, dst, *args, **kwargs):  # orbax's last act of a save: the folder takes its step's name
        if os.path.basename(os.fspath(src)).startswith("5.orbax-checkpoint-tmp"):
            raise OSError("stopped before the rename")
        return rename(src, dst, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(os, "rename", cut_short)
        manager = checkpoint_manager(str(tmp_path), run)
        save_checkpoint(manager, 5, tree, tree, {"position": 5})
        with pytest.raises(Exception, match="stopped before the rename"):
            manager.wait_until_finished()
    [cut] = os.listdir(tmp_path / "checkpoints")
    assert cut.startswith("5.orbax-checkpoint-tmp")  # some orbax releases add a suffix
    assert unfinished_saves(str(tmp_path)) == [5]

    manager = checkpoint_manager(str(tmp_path), run)  # as a resumed run makes it
    assert manager.latest_step() is None
    save_checkpoint(manager, 6, tree, tree, {"position": 6})
    manager.wait_until_finished()
    assert os.listdir(tmp_path / "checkpoints") == ["6"]


def test_a_metrics_line_cut_short_by_a_kill_is_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "eval_loss": 6.5}\n{"step": 1, "loss": 6.4}\n{"step": 2, "lo')
    assert run_folder.read_metrics(str(path), up_to=5) == [{"step": 0, "eval_loss": 6.5}, {"step": 1, "loss": 6.4}]
    assert path.read_text() == '{"step": 0, "eval_loss": 6.5}\n{"step": 1, "loss": 6.4}\n'
    path.write_text('{"step": 0, "eval_loss": 6.5}\n{"step": 1, "lo\n{"step": 2, "loss": 6.4}\n')
    with pytest.raises(BitNetError, match="line 2 is not JSON"):  # damage elsewhere is not a kill
        run_folder.read_metrics(str(path), up_to=5)
