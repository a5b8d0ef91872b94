"""`bitnet-jax bench train`: both sides are timed on the same shapes and reported (no timing asserts)."""

import json
import os
import subprocess
import sys

from bitnet_jax import cli

SMALL = ["model.hidden_size=64", "model.intermediate_size=128", "model.num_hidden_layers=2",
         "model.num_attention_heads=4", "model.num_key_value_heads=2", "model.vocab_size=512",
         "seq_len=32", "batch_size=2"]


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
    for row in rows:
        assert len(row["times_ms"]) == 3 and all(t > 0 for t in row["times_ms"])
        assert row["median_ms"] == sorted(row["times_ms"])[1]
        assert abs(row["tokens_per_s"] - 2 * 32 / (row["median_ms"] / 1e3)) < 1e-6 * row["tokens_per_s"]


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
    result = subprocess.run([sys.executable, "-m", "bitnet_jax.cli", *argv], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "mesh (data, fsdp, tensor) = (2, 1, 2) over 4 device(s)" in result.stdout
    assert [r["name"] for r in json.loads(out.read_text())] == ["qat", "fp"]
