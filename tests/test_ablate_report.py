"""What `bitnet-jax ablate` reports for each variant beyond the loss: mean and spread over
`--seeds`, bits per byte as `bitnet-jax eval` scores it, bytes as `bitnet-jax convert` writes them,
decode speed and its path, the quality-vs-bytes plot; and a seed's run resuming alone."""

import json
import os
import shutil
import statistics
import struct

import pytest
from tiny_run import RUN

from bitnet_jax import BitNetConfig, cli
from bitnet_jax.model.transformer import init_params
from bitnet_jax.research.ablate import decode_tokens_per_s

# RUN's held-out scoring budget: eval_batches x batch_size x seq_len = 2 x 4 x 32 tokens.
SCORED_TOKENS = 256


@pytest.fixture(scope="module")
def env(tiny_env):
    return tiny_env


def ablate_args(env, out, *extra):
    sets = [f"corpus={env['corpus']}", *RUN]
    return ["ablate", "--no-progress", "--out", str(out), *extra, *[a for s in sets for a in ("--set", s)]]


def final_eval_loss(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines][-1]["eval_loss"]


def safetensors_data_bytes(path):
    """The bytes of every tensor in a safetensors file, from its header (format: an 8-byte
    little-endian header length, a JSON header of data_offsets, then the data)."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    return sum(end - start for key, v in header.items() if key != "__metadata__" for start, end in [v["data_offsets"]])


def test_seeds_bits_per_byte_bytes_decode_and_resume(env, tmp_path, capsys):
    out = env["root"] / "abl"
    argv = ablate_args(env, out, "--grid", "weight_quant=group:32", "--seeds", "2")
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    names = ["w-none_a-none", "w-none_a-none_seed1", "w-group32_a-token-8", "w-group32_a-token-8_seed1"]
    assert set(names) <= set(os.listdir(out))
    assert (out / "quality_vs_bytes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = json.loads((out / "results.json").read_text())["runs"]
    assert [r["name"] for r in rows] == ["w-none_a-none", "w-group32_a-token-8"]

    for row, folders in zip(rows, [names[:2], names[2:]]):
        assert row["seeds"] == [0, 1]
        assert [json.loads((out / f / "run.json").read_text())["seed"] for f in folders] == [0, 1]
        # Losses straight from each seed's metrics; mean and sample spread by the statistics module.
        losses = [final_eval_loss(out / f) for f in folders]
        assert row["final_eval_losses"] == losses and losses[0] != losses[1]
        # Float rounding of two different mean / stdev implementations on two numbers: 1e-12 relative.
        assert row["final_eval_loss"] == pytest.approx(statistics.mean(losses), rel=1e-12)
        assert row["final_eval_loss_std"] == pytest.approx(statistics.stdev(losses), rel=1e-12)
        bpb = row["bits_per_byte_per_seed"]
        assert row["bits_per_byte"] == pytest.approx(statistics.mean(bpb), rel=1e-12)
        assert row["bits_per_byte_std"] == pytest.approx(statistics.stdev(bpb), rel=1e-12)
        assert row["decode_tokens_per_s"] > 0
        assert f"{row['final_eval_loss']:.3f} ± {row['final_eval_loss_std']:.3f}" in printed

    # Bits per byte is what `bitnet-jax eval` reports for the run on the same held-out tokens
    # (its default context is the run's seq_len): the same program on the same windows and
    # batches, so only the float summation order of the totals could differ (1e-9 relative).
    report = tmp_path / "eval.json"
    run_dir = out / "w-group32_a-token-8_seed1"
    assert cli.main(["eval", "--model", str(run_dir), "--max-tokens", str(SCORED_TOKENS), "--json", str(report)]) == 0
    assert rows[1]["bits_per_byte_per_seed"][1] == pytest.approx(
        json.loads(report.read_text())["bits_per_byte"], rel=1e-9
    )

    # Bytes: exactly the tensor data `bitnet-jax convert` writes for the first seed's run.
    assert cli.main(["convert", str(out / "w-group32_a-token-8"), str(tmp_path / "packed")]) == 0
    assert rows[1]["packed_bytes"] == safetensors_data_bytes(tmp_path / "packed" / "model.safetensors")
    assert rows[1]["stored_as"] == "packed, lm_head int8-tied" and rows[0]["stored_as"] == "float32 (not packable)"
    # The FFI kernels take no per-group scales: the packed XLA path; the baseline cannot be packed.
    assert rows[1]["decode_path"] == "xla path" and rows[0]["decode_path"] == "xla path (unpacked)"

    # One seed's run lost its last checkpoint (a killed study): only it trains again.
    shutil.rmtree(out / "w-group32_a-token-8_seed1" / "checkpoints" / "6")
    capsys.readouterr()
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("finished earlier, skipped") == 3
    assert "w-group32_a-token-8_seed1: training 6 steps" in printed and "Resumed from step 3" in printed
    again = json.loads((out / "results.json").read_text())["runs"]
    # The resumed seed ends where it ended before: resume is bit-exact (test_kill_resume.py); the
    # tolerance is test_ablate.py's for the same check, a few f32 ulps of the eval mean.
    assert again[1]["final_eval_losses"] == pytest.approx(rows[1]["final_eval_losses"], rel=1e-6)


def test_decode_of_a_per_tensor_model_runs_the_ffi_kernels():
    config = BitNetConfig.preset(
        "tiny",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=640,
        max_position_embeddings=64,
    )
    rate, path = decode_tokens_per_s(config, init_params(config), list(range(3, 40)))
    assert path == "ffi" and rate > 0


@pytest.mark.parametrize("seeds", ["0", "-1"])
def test_bad_seeds_is_refused_before_anything_is_written(env, tmp_path, capsys, seeds):
    argv = ablate_args(env, tmp_path / "abl", "--grid", "weight_quant=tensor", "--seeds", seeds)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and f"--seeds {seeds}: expected a positive number of seeds" in err
    assert not (tmp_path / "abl").exists()
