"""`bitnet-jax bench train`: both sides are timed on the same shapes and reported with their model
FLOPs and MFU (no timing asserts; the medians, rates and MFU are checked on a scripted clock, the
FLOP count against a count by hand)."""

import json
import os
import subprocess
import sys

import pytest
from xla_flags import device_count_flags

from bitnet_jax import cli
from bitnet_jax.bench import train as bench
from bitnet_jax.errors import BitNetError
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
    assert "Compile time of the train step: QAT " in table and "2 layers x 64 wide (scanned)" in table
    header = "| model | weights | activations | step (ms) | tokens/s | GFLOP / step | GFLOP/s | MFU (f32 peak) "
    assert header + "| MFU (bf16 peak) |" in table
    assert "Matmul peak (XLA dot of n x n matrices on each of 1 device(s)" in table
    assert "The model computes in float32: MFU against the f32 peak applies." in table
    assert "Dots in the compiled step, by operand type: QAT " in table

    rows = json.loads(out.read_text())
    assert [r["name"] for r in rows] == ["qat", "fp"]
    assert (rows[0]["weight_quant"], rows[1]["weight_quant"], rows[1]["act_quant"]) == ("group:32", "none", "none")
    for row in rows:  # the arithmetic on real timings is checked on scripted ones below
        assert len(row["times_ms"]) == 3 and all(t > 0 for t in row["times_ms"])
        assert min(row["times_ms"]) <= row["median_ms"] <= max(row["times_ms"]) and row["tokens_per_s"] > 0
        assert row["compute_dtype"] == "float32" and row["gflop_per_step"] == pytest.approx(44_040_192 / 1e9)
        peaks = {p["dtype"]: p for p in row["peaks"]}
        assert sorted(peaks) == ["bfloat16", "float32"] and all(p["gflops"] > 0 for p in peaks.values())
        assert row["gflops"] == pytest.approx(row["gflop_per_step"] / (row["median_ms"] / 1e3))
        assert row["mfu_f32"] == pytest.approx(row["gflops"] / peaks["float32"]["gflops"])
        assert row["mfu_bf16"] == pytest.approx(row["gflops"] / peaks["bfloat16"]["gflops"])
        assert row["compile_s"] > 0
        # A float32 step's dots are all f32: a QAT step's forward, dx and dW products, at least.
        assert set(row["dot_operand_types"]) == {"f32"} and row["dot_operand_types"]["f32"] >= 3


def test_bench_train_medians_and_rates_on_a_scripted_clock(monkeypatch):
    """Real steps, with the seconds each timed call reports scripted: the medians, rates and table
    are checked against numbers worked out by hand."""
    real_timed, calls = bench._timed, []
    # warmup=1: two untimed calls per side (warm up, after the compile), QAT's first; then QAT, FP, ...
    seconds = [99.0] * 4 + [0.030, 0.006, 0.010, 0.002, 0.020, 0.004, 0.060, 0.020]

    def scripted(step, state, batch):
        state, _ = real_timed(step, state, batch)
        calls.append(step)
        return state, seconds[len(calls) - 1]

    monkeypatch.setattr(bench, "_timed", scripted)
    # The peak dots: 2 * 256^3 FLOPs (peak_min_s=0 keeps n at 256) in 1.6777216 ms (f32) and
    # twice that (bf16): 20 and 10 GFLOP/s.
    dot_ms = {"float32": 1.6777216, "bfloat16": 3.3554432}
    monkeypatch.setattr(bench._PeakDot, "seconds", lambda dot: dot_ms[dot.dtype] / 1e3)
    # The quantization of the test above: the same two programs, compiled once in the session.
    run = load_run_config(None, SMALL + ["model.weight_quant=group:32"])
    qat, fp = bench.bench_train(run, repeats=4, warmup=1, peak_min_s=0)

    assert len(calls) == 12 and calls[4] is calls[0] and calls[5] is calls[2] and calls[4] is not calls[5]
    assert qat.times_ms == pytest.approx((30, 10, 20, 60)) and fp.times_ms == pytest.approx((6, 2, 4, 20))
    # medians of 10 20 | 30 60 and 2 4 | 6 20 (means would be 30 and 8); 2 x 32 tokens per step
    assert (qat.median_ms, fp.median_ms) == pytest.approx((25, 5))
    assert (qat.tokens_per_s, fp.tokens_per_s) == pytest.approx((2560, 12800))
    table = bench.train_table(run, [qat, fp])
    assert "| QAT (BitNet b1.58) | group:32 | token, 8-bit | 25.0 | 2,560 |" in table
    assert "| full precision | none | none | 5.0 | 12,800 |" in table
    assert "median of 4 interleaved runs" in table and "QAT / full-precision step time: 5.00x" in table

    # 44,040,192 FLOPs per step (test_train_step_flops_by_hand): 0.044040192 GFLOP in 25 ms and 5 ms.
    assert (qat.gflops, fp.gflops) == pytest.approx((1.76160768, 8.8080384))
    mfu = (qat.mfu_f32, qat.mfu_bf16, fp.mfu_f32, fp.mfu_bf16)
    assert mfu == pytest.approx((0.088080384, 0.176160768, 0.44040192, 0.88080384))
    assert [(p.dtype, p.size, p.devices, p.times_ms) for p in qat.peaks] == [
        ("float32", 256, 1, (1.6777216,) * 4),
        ("bfloat16", 256, 1, (3.3554432,) * 4),
    ]
    assert [p.gflops for p in qat.peaks] == pytest.approx([20, 10])
    assert "| 25.0 | 2,560 | 0.044 | 1.8 | 8.8% | 17.6% |" in table
    assert "| 5.0 | 12,800 | 0.044 | 8.8 | 44.0% | 88.1% |" in table
    assert "float32 20.0 GFLOP/s (n = 256), bfloat16 10.0 GFLOP/s (n = 256)" in table


def test_train_step_flops_by_hand():
    """SMALL's dimensions, multiplied out by hand: D 64, F 128, L 2, N 4 query heads of H 16 (2 KV
    heads: k and v are 64 x 32), V 512, B x T = 2 x 32 tokens."""
    per_layer = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 64 * 128 + 64 * 128 + 128 * 64  # q k v o gate up down
    assert per_layer == 36_864
    matmul_params = 2 * per_layer + 64 * 512  # 2 layers + the (tied) lm_head
    linear = 6 * matmul_params * 64  # 2 FLOPs per weight and token forward, 4 backward
    # Q K^T and P V over the full T x T square, each 2 FLOPs per (B N T T H) term forward, 3x with
    # backward, in each of 2 layers.
    attention = 2 * 3 * (2 + 2) * (2 * 4 * 32 * 32 * 16)
    assert (linear, attention) == (40_894_464, 3_145_728)
    run = load_run_config(None, SMALL)
    assert bench.train_step_flops(run.model, run.batch_size, run.seq_len) == linear + attention == 44_040_192
    # Quantization changes the FLOPs of no product, nor does tying (the tied head is the same [D, V] product).
    assert bench.train_step_flops(run.model.replace(weight_quant="none", act_quant="none"), 2, 32) == 44_040_192
    assert bench.train_step_flops(run.model.replace(tie_word_embeddings=False), 2, 32) == 44_040_192
    # One row of 128: twice the tokens (linear FLOPs double), B * T^2 from 2 * 32^2 to 128^2 (8x).
    assert bench.train_step_flops(run.model, 1, 128) == 2 * linear + 8 * attention


def test_matmul_peak_is_positive():
    for dtype in ("float32", "bfloat16"):
        peak = bench.matmul_peak(dtype, repeats=2, max_size=256)
        assert (peak.dtype, peak.size, peak.devices, len(peak.times_ms)) == (dtype, 256, 1, 2)
        assert peak.gflops > 0 and all(t > 0 for t in peak.times_ms)
    with pytest.raises(BitNetError, match="float16"):
        bench.matmul_peak("float16")


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
    env = {**os.environ, "XLA_FLAGS": device_count_flags(4)}
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


def test_dot_operand_types_reads_fused_and_unfused_dots():
    """Dots counted by their operands' element type, in fused computations (parameters typed in
    the computation's own lines) and at the entry level (operands defined elsewhere)."""
    hlo = """HloModule m
%fused_computation.7 (param_0.1: bf16[8,16], param_1.2: bf16[16,4]) -> f32[8,4] {
  %param_0.1 = bf16[8,16]{1,0} parameter(0)
  %param_1.2 = bf16[16,4]{1,0} parameter(1)
  ROOT %dot.3 = f32[8,4]{1,0} dot(%param_0.1, %param_1.2), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}
ENTRY %main (a: bf16[8,16], b: bf16[16,4], c: f32[16,8]) -> f32[8,4] {
  %a = bf16[8,16]{1,0} parameter(0)
  %b = bf16[16,4]{1,0} parameter(1)
  %c = f32[16,8]{1,0} parameter(2)
  %convert.1 = f32[16,4]{1,0} convert(%b)
  %dot.9 = f32[8,4]{1,0} dot(%c, %convert.1), lhs_contracting_dims={0}, rhs_contracting_dims={0}
  ROOT %ynn_fusion = f32[8,4]{1,0} fusion(%a, %b), kind=kCustom, calls=%fused_computation.7
}
"""
    assert bench.dot_operand_types(hlo) == {"bf16": 1, "f32": 1}
