"""Multi-process training: two processes on this machine (2 simulated CPU devices each, gloo
collectives), one mesh over their 4 devices, each feeding its own rows of the global batch,
train as one process on one device does.

Tolerances are those of test_sharding.py (same model, data and steps), for the same reasons.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sharded_runs
from xla_flags import device_count_flags

from bitnet_jax import init_params
from bitnet_jax.train.run_folder import load_run

REPO = Path(__file__).parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def read_metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_corpus):
    root = tmp_path_factory.mktemp("multiprocess")
    previous = os.environ.get("BITNET_JAX_CACHE")
    os.environ["BITNET_JAX_CACHE"] = tiny_corpus["cache"]
    yield {
        "root": root,
        "corpus": tiny_corpus["corpus"],
        "env": {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])},
    }
    if previous is None:
        os.environ.pop("BITNET_JAX_CACHE", None)
    else:
        os.environ["BITNET_JAX_CACHE"] = previous


def test_two_processes_train_like_one(env, one_device_cli_run):
    # The one-process reference first (conftest.py): it also trained the tokenizer that both
    # processes then read.
    whole = one_device_cli_run
    out, port = env["root"] / "two", free_port()
    args = sharded_runs.cli_args(env["corpus"], str(out), "mesh=(2,1,2)")
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bitnet_jax.cli",
                *args,
                "--coordinator-address",
                f"localhost:{port}",
                "--num-processes",
                "2",
                "--process-id",
                str(i),
            ],
            env={**env["env"], "XLA_FLAGS": device_count_flags(2)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert all("Done: step 6" in o for o in outputs)

    got, want = read_metrics(out), read_metrics(whole)
    assert [m["step"] for m in got] == [m["step"] for m in want] == list(range(7))  # one writer: no duplicates
    for key in ("loss", "eval_loss"):
        np.testing.assert_allclose(
            [m[key] for m in got if key in m], [m[key] for m in want if key in m], rtol=2e-3, err_msg=key
        )
    run, params_whole, _ = load_run(str(whole))
    _, params_two, _ = load_run(str(out))  # a checkpoint saved by both processes together
    sharded_runs.assert_same_training(init_params(run.model, run.seed), params_whole, sharded_runs.flat(params_two))


def test_incomplete_multi_process_settings(env, tmp_path):
    """--num-processes alone: JAX finds no coordinator on a plain machine."""
    clean = {k: v for k, v in env["env"].items() if not k.startswith(("JAX_COORDINATOR", "SLURM_", "OMPI_"))}
    result = subprocess.run(
        [sys.executable, "-m", "bitnet_jax.cli", "train", "--out", str(tmp_path / "run"), "--num-processes", "2"],
        env=clean,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.startswith("error: Multi-process start failed") and "--coordinator-address" in result.stderr
    assert "Traceback" not in result.stderr
