"""`bitnet-jax bench train`: both sides are timed on the same shapes and reported (no timing
asserts; the medians and rates are checked on a scripted clock)."""

import json
import os
import subprocess
import sys

import pytest

from bitnet_jax import cli
from bitnet_jax.bench import train as bench
from bitnet_jax.train.run_config import load_run_config

SMALL = [
    "model.hidden_size=64",
    "model.intermediate_size=128",
    "model.num_hidden_layers=2",
    "model.num_attention_heads=4",
    "model.num_key_value_heads=2",
    "model.vocab_size=512",
    "seq_len=32",
    "batch_size=2",
]


def test_bench_train_table_and_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["bench", "train", "--repeats", "3", "--json", str(out), "--set", "model.weight_quant=group:32"]
    assert cli.main(argv + [a for s in SMALL for a in ("--set", s)]) == 0
    table = capsys.readouterr().out
    assert "| QAT (BitNet b1.58) | group:32 | token, 8-bit |" in table
    assert "| full precision | none | none |" in table
    assert "QAT / full-precision step time:" in table

    rows = json.loads(out.read_text())
    assert [r["name"] for r in rows] == ["qat", "fp"]
    assert (rows[0]["weight_quant"], rows[1]["weight_quant"], rows[1]["act_quant"]) == ("group:32", "none", "none")
    for row in rows:  # the arithmetic on real timings is checked on scripted ones below
        assert len(row["times_ms"]) == 3 and all(t > 0 for t in row["times_ms"])
        assert min(row["times_ms"]) <= row["median_ms"] <= max(row["times_ms"]) and row["tokens_per_s"] > 0


def test_bench_train_medians_and_rates_on_a_scripted_clock(monkeypatch):
    """Real steps, with the seconds each timed call reports scripted: the medians, rates and table
    are checked against numbers worked out by hand."""
    real_timed, calls = bench._timed, []
    # warmup=1: two untimed calls per side (compile, warm up), QAT's first; then QAT, FP, QAT, FP, ...
    seconds = [99.0] * 4 + [0.030, 0.006, 0.010, 0.002, 0.020, 0.004, 0.060, 0.020]

    def scripted(step, state, batch):
        state, _ = real_timed(step, state, batch)
        calls.append(step)
        return state, seconds[len(calls) - 1]

    monkeypatch.setattr(bench, "_timed", scripted)
    # The quantization of the test above: the same two programs, compiled once in the session.
    run = load_run_config(None, SMALL + ["model.weight_quant=group:32"])
    qat, fp = bench.bench_train(run, repeats=4, warmup=1)

    assert len(calls) == 12 and calls[4] is calls[0] and calls[5] is calls[2] and calls[4] is not calls[5]
    assert qat.times_ms == pytest.approx((30, 10, 20, 60)) and fp.times_ms == pytest.approx((6, 2, 4, 20))
    # medians of 10 20 | 30 60 and 2 4 | 6 20 (means would be 30 and 8); 2 x 32 tokens per step
    assert (qat.median_ms, fp.median_ms) == pytest.approx((25, 5))
    assert (qat.tokens_per_s, fp.tokens_per_s) == pytest.approx((2560, 12800))
    table = bench.train_table(run, [qat, fp])
    assert "| QAT (BitNet b1.58) | group:32 | token, 8-bit | 25.0 | 2,560 |" in table
    assert "| full precision | none | none | 5.0 | 12,800 |" in table
    assert "median of 4 interleaved runs" in table and "QAT / full-precision step time: 5.00x" in table


def test_bench_train_bad_arguments(capsys):
    assert cli.main(["bench", "train", "--repeats", "0"]) == 2
    assert "repeats=0" in capsys.readouterr().err
    assert cli.main(["bench", "train", "--set", "model.act_bits=9"]) == 2
    assert "act_bits" in capsys.readouterr().err


def test_bench_train_on_a_mesh_of_simulated_devices(tmp_path):
    """On 4 simulated CPU devices, both sides run sharded over the configured mesh (in a
    subprocess: the device count is fixed when JAX starts)."""
    out = tmp_path / "bench.json"
    argv = ["bench", "train", "--repeats", "2", "--json", str(out), "--set", "mesh=[2,1,2]"]
    argv += [a for s in SMALL for a in ("--set", s)]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    result = subprocess.run(
        [sys.executable, "-m", "bitnet_jax.cli", *argv],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "mesh (data, fsdp, tensor) = (2, 1, 2) over 4 device(s)" in result.stdout
    assert [r["name"] for r in json.loads(out.read_text())] == ["qat", "fp"]
