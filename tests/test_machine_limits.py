"""The machine limits the serving benchmarks measure (bench/machine.py, xla_ffi/machine.cc) and the
roofline they print (bench/roofline.py): the bandwidth kernel reads every byte, the int8 peak loop
does the arithmetic it claims, bytes per token match a count taken from the packed folder's file,
and `bench kernels` / `bench generate` print the new columns. No timing thresholds: these machines
are shared, so only the arithmetic on the timings is checked."""

import dataclasses
import json
import math
import os
import struct

import numpy as np
import pytest

from bitnet_jax import BitNetConfig
from bitnet_jax.bench import machine
from bitnet_jax.bench.machine import MachineLimits, PathLimits
from bitnet_jax.bench.roofline import decode_bytes, decode_context, ternary_ops_per_token
from bitnet_jax.cli import main
from bitnet_jax.errors import BitNetError
from bitnet_jax.kernels import ffi

PATHS = ffi.available_isas()
THREADS = sorted({1, len(os.sched_getaffinity(0))})

# What one round of each path's loop does (xla_ffi/machine.cc), written out again here:
# (accumulators, multiply-adds per accumulator and round). Paths without a loop of their own run
# the scalar one.
PEAK_LOOPS = {"scalar": (4, 1), "avx2": (4, 8 * 32), "avx512": (12, 64)}
LIMITS_HEADER = "| path | threads | read GB/s | (hardware prefetch / fetched ahead) | int8 peak GOPS | peak loop |"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("nbytes", [1, 4095, (3 << 20) + 77])
@pytest.mark.parametrize("read_ahead", [0, machine.READ_AHEAD_BYTES])
def test_bandwidth_kernel_reads_every_byte(path, threads, nbytes, read_ahead):
    """Each pass returns the sum of the bytes it read: numpy's sum of the same buffer, on every path
    and thread split, for sizes that end inside a vector, a page and a thread's range, with or
    without fetching ahead (which looks past the end of every range but the first's)."""
    rng = np.random.default_rng(nbytes)
    host = rng.integers(0, 256, nbytes, dtype=np.uint8)
    with machine.forced_path(path):
        seconds, sums = machine.read_passes(host, threads, passes=3, read_ahead=read_ahead)
    assert sums.tolist() == [int(host.sum(dtype=np.uint64))] * 3
    assert seconds.shape == (3,) and np.all(seconds >= 0)


def test_bandwidth_kernel_rejects_a_negative_read_ahead():
    with pytest.raises(Exception, match=r"read_ahead=-64: expected >= 0 bytes"):
        machine.read_passes(np.zeros(64, np.uint8), 1, passes=1, read_ahead=-64)


def test_filled_buffer_sum_is_numpys():
    """The sum `measure_limits` checks each pass against is the sum of the buffer it fills."""
    buffer, total = machine.filled_buffer((2 << 20) + 12345)  # two whole fill blocks and a part
    assert total == int(np.asarray(buffer).sum(dtype=np.uint64))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("threads", THREADS)
def test_int8_peak_loop_does_its_arithmetic(path, threads):
    """Accumulator u adds a * (b + u) per multiply-add: the threads' summed results equal that
    arithmetic for the multiply-adds the loop reports, and those are its rounds' worth."""
    accumulators, per_round = PEAK_LOOPS.get(path, PEAK_LOOPS["scalar"])
    a, b = 7, -3
    for iterations in (1, 1000):
        with machine.forced_path(path):
            seconds, results, macs = machine.int8_peak_passes(iterations, threads, passes=2, a=a, b=b)
        assert macs == iterations * accumulators * per_round
        one_thread = iterations * per_round * sum(a * (b + u) for u in range(accumulators))
        assert results.tolist() == [threads * one_thread] * 2
        assert np.all(seconds >= 0)


def test_int8_peak_rejects_bad_arguments():
    with pytest.raises(Exception, match="threads=0"):
        machine.int8_peak_passes(10, 0, 1)
    with pytest.raises(Exception, match="a=300"):
        machine.int8_peak_passes(10, 1, 1, a=300)
    with pytest.raises(Exception, match="threads=99"):
        machine.read_passes(np.zeros(16, np.uint8), 99, 1)
    with pytest.raises(BitNetError, match="this CPU runs"):
        machine.measure_limits(paths=["no-such-path"], buffer_bytes=4096)


def _safetensors_sizes(path) -> dict[str, tuple[int, tuple[int, ...]]]:
    """{tensor name: (bytes, shape)} from a safetensors file's own header."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return {name: (t["data_offsets"][1] - t["data_offsets"][0], tuple(t["shape"])) for name, t in header.items()}


@pytest.mark.parametrize("lm_head", ["int8-tied", "int8", "int4-tied", "int4", "float"])
def test_decode_bytes_match_the_packed_folder(tmp_path, lm_head):
    """Bytes per decoded token, counted from the arrays, against a count from the packed folder's
    safetensors header and the config's cache dimensions."""
    pytest.importorskip("safetensors")
    from bitnet_jax.bench.serve import random_packed_params
    from bitnet_jax.serve.packed_folder import save_packed

    config = BitNetConfig.preset("tiny")
    params = random_packed_params(config, lm_head=lm_head)
    save_packed(str(tmp_path), config, params)
    sizes = _safetensors_sizes(tmp_path / "model.safetensors")

    head_prefix = "lm_head." if any(n.startswith("lm_head.") for n in sizes) else "embed_tokens."
    ternary = sum(b for n, (b, _) in sizes.items() if n.startswith("layers.") and n.endswith((".w_packed", ".w_scale")))
    head = sum(b for n, (b, _) in sizes.items() if n.startswith(head_prefix))
    # An embedding table apart from the head is read one row per token.
    embed = {n: v for n, v in sizes.items() if n.startswith("embed_tokens.") and head_prefix != "embed_tokens."}
    embed_row = sum(b // shape[0] for b, shape in embed.values())
    norms = sum(b for n, (b, _) in sizes.items() if n.endswith("norm.weight"))
    kv_slot = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 4  # K and V, float32
    assert ternary > 0 and head > 0 and norms > 0
    assert sum(b for b, _ in sizes.values()) == ternary + head + norms + sum(b for b, _ in embed.values())

    counted = decode_bytes(config, params, np.float32)
    assert (counted.layers, counted.head, counted.other, counted.kv_per_slot) == (
        ternary,
        head,
        norms + embed_row,
        kv_slot,
    )
    assert counted.per_token(decode_context(16, 4)) == ternary + head + norms + embed_row + kv_slot * 18.5


def test_ternary_ops_per_token():
    """tiny: d 256, f 704, 8 query heads and 4 KV heads of 32, 4 layers."""
    per_layer = 256 * 256 + 2 * 256 * 128 + 256 * 256 + 3 * 256 * 704
    assert ternary_ops_per_token(BitNetConfig.preset("tiny")) == 2 * 4 * per_layer


def _limits(read_gb_s: float, peak_gops: float, path: str, threads: int) -> MachineLimits:
    return MachineLimits("test CPU", 1.0, (PathLimits(path, "loop", threads, read_gb_s, peak_gops),))


def test_generate_roofline_arithmetic():
    """The fractions on hand-worked numbers: 20 GB/s over 800 MB per token is a 25 tok/s
    roofline, of which 20 tok/s is 80%; 150 GOPS of a 500 GOPS peak is 30%."""
    from bitnet_jax.bench.serve import GenerateTiming, with_generate_limits

    r = GenerateTiming("ffi", "int8-tied", 2, 128, 128, 120.0, 20.0, 900.0, 850.0, "avx2")
    r = with_generate_limits(
        dataclasses.replace(r, layers_mb=700.0, kv_mb=100.0, prefill_ternary_gops=150.0),  # 800 MB per token
        _limits(20.0, 500.0, "avx2", 2),
    )
    assert (r.read_gb_s, r.roofline_tok_s, r.decode_of_roofline) == pytest.approx((20.0, 25.0, 0.8))
    assert (r.int8_peak_gops, r.prefill_of_int8_peak) == pytest.approx((500.0, 0.3))
    assert r.read_gb_s_after is None and r.decode_of_roofline_after is None  # no second reading given
    # Read again after the runs at 25 GB/s: a 31.25 tok/s roofline, of which 20 tok/s is 64%.
    again = with_generate_limits(r, _limits(20.0, 500.0, "avx2", 2), after=_limits(25.0, 400.0, "avx2", 2))
    assert (again.read_gb_s_after, again.decode_of_roofline_after) == pytest.approx((25.0, 0.64))
    assert (again.decode_of_roofline, again.int8_peak_gops) == pytest.approx((0.8, 500.0))  # the first reading's
    # No limit measured for this thread count or path: nothing is made up.
    other = with_generate_limits(r, _limits(20.0, 500.0, "avx512", 1), after=_limits(25.0, 400.0, "avx512", 1))
    assert other.roofline_tok_s is None and other.prefill_of_int8_peak is None
    assert other.read_gb_s_after is None and other.decode_of_roofline_after is None


def test_bench_kernels_prints_the_limits(tmp_path):
    from bitnet_jax.bench.serve import bench_kernels, kernels_table, with_kernel_limits, write_json

    limits = machine.measure_limits(paths=PATHS, buffer_bytes=4 << 20, passes=2)
    assert [(r.path, r.threads) for r in limits.rows] == [(p, t) for p in PATHS for t in THREADS]
    assert all(r.read_gb_s > 0 and r.int8_peak_gops > 0 for r in limits.rows)
    for r in limits.rows:  # the limit is the faster way of reading (the scalar loop has one)
        assert (r.read_ahead_gb_s is None) == (r.path == "scalar")
        assert r.read_gb_s == max(r.read_hw_gb_s, r.read_ahead_gb_s or 0.0)
    table = machine.limits_table(limits)
    assert LIMITS_HEADER in table
    r = limits.rows[-1]
    ahead = "-" if r.read_ahead_gb_s is None else f"{r.read_ahead_gb_s:.1f}"
    assert f"| {r.path} | {r.threads} | {r.read_gb_s:.1f} | {r.read_hw_gb_s:.1f} / {ahead} |" in table

    # (XLA's float dots are left out here, to save their large weights; the one below stands in.)
    results = bench_kernels(rows=(1,), shapes=((300, 9), (200, 130_001)), repeats=1, isas=PATHS, xla=False)
    xla = dataclasses.replace(results[0], kernel="xla_f32", isa="xla")
    doubled = tuple(dataclasses.replace(r, read_gb_s=2 * r.read_gb_s) for r in limits.rows)
    after = dataclasses.replace(limits, rows=doubled)  # as if the bandwidth had doubled during the timings
    results = [with_kernel_limits(r, limits, after) for r in [*results, xla]]
    table = kernels_table(results)
    assert "| K x N | M | path | us | GB/s | of read BW | of read BW after | GOPS | of int8 peak |" in table
    for r in results:
        assert r.gops == pytest.approx(2 * r.M * r.K * r.N / (r.median_us * 1e-6) / 1e9)
        assert r.read_gb_s == limits.read_gb_s(r.threads)
        assert r.of_read_gb_s == pytest.approx(r.gb_s / r.read_gb_s)
        assert r.read_gb_s_after == 2 * r.read_gb_s and r.of_read_gb_s_after == pytest.approx(r.of_read_gb_s / 2)
        if r.isa == "xla":
            assert r.int8_peak_gops is None and r.of_int8_peak is None
        else:
            assert r.of_int8_peak == pytest.approx(r.gops / limits.int8_peak_gops(r.isa, r.threads))
            row = f"| {r.K} x {r.N} | {r.M} | {r.kernel}:{r.isa} | {r.median_us:.0f} | {r.gb_s:.1f} | "
            shares = f"{100 * r.of_read_gb_s:.0f}% | {100 * r.of_read_gb_s_after:.0f}% | "
            assert row + shares + f"{r.gops:.1f} | {100 * r.of_int8_peak:.0f}% |" in table
    write_json(str(tmp_path / "kernels.json"), results, limits, after)
    rows = json.loads((tmp_path / "kernels.json").read_text())
    assert {"gops", "read_gb_s", "of_read_gb_s", "int8_peak_gops", "of_int8_peak", "of_read_gb_s_after"} <= set(rows[0])
    assert rows[0]["machine_limits_after"]["rows"][0]["read_gb_s"] == 2 * limits.rows[0].read_gb_s
    assert [r["path"] for r in rows[0]["machine_limits"]["rows"]] == [r.path for r in limits.rows]


def test_bench_kernels_chains_copies_within_the_output_budget():
    """One row chains enough weight copies to read them from memory; batched rows at most 8, and
    never so many [M, N] float32 outputs that XLA's temporary buffer outgrows the budget (it would
    be mapped afresh, and its page faults timed, at every call)."""
    from bitnet_jax.bench.serve import _MAX_CHAIN, _OUTPUT_BUDGET, _WORKING_SET, _reps

    assert _reps(640 * 2560 // 4, 1, 4 * 640) == _MAX_CHAIN  # a small matrix: the longest chain
    assert _reps(2560 * 6912 // 4, 1, 4 * 6912) == math.ceil(_WORKING_SET / (2560 * 6912 // 4))
    assert _reps(2560 * 640 // 4, 8, 4 * 8 * 640) == 8
    for m, n in ((128, 6912), (256, 6912), (256, 2560), (128, 128256)):
        reps = _reps(2560 * n // 4, m, 4 * m * n)
        assert reps >= 1 and (reps == 1 or reps * 4 * m * n <= _OUTPUT_BUDGET)
    assert _reps(2560 * 6912 // 4, 256, 4 * 256 * 6912) == 2


def test_bench_generate_prints_the_roofline(tmp_path, capsys):
    out = tmp_path / "generate.json"
    argv = ["bench", "generate", "--preset", "tiny", "--random-weights", "--backends", "ffi"]
    argv += ["--prompt-tokens", "16", "--new-tokens", "4", "--repeats", "1", "--read-buffer-mb", "8"]
    assert main(argv + ["--profile", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert LIMITS_HEADER in printed
    assert "| backend | MB/token: layers + head + other + KV (context) = total | read GB/s |" in printed
    assert "| backend | path | threads | prefill tok/s | ternary GOPS | int8 peak GOPS | of peak |" in printed

    (row,) = json.loads(out.read_text())
    assert row["machine_limits"]["rows"][-1]["read_gb_s"] == row["read_gb_s"]  # the selected path, all threads
    parts = row["layers_mb"] + row["head_mb"] + row["other_mb"] + row["kv_mb"]
    assert row["mb_per_token"] == pytest.approx(parts) and row["decode_context"] == 18.5
    assert row["roofline_tok_s"] == pytest.approx(row["read_gb_s"] * 1e3 / row["mb_per_token"])
    assert row["decode_of_roofline"] == pytest.approx(row["decode_tok_s"] / row["roofline_tok_s"])
    ops = ternary_ops_per_token(BitNetConfig.preset("tiny")) * 16
    assert row["prefill_ternary_gops"] == pytest.approx(ops * row["prefill_tok_s"] / 16 / 1e9)
    assert row["prefill_of_int8_peak"] == pytest.approx(row["prefill_ternary_gops"] / row["int8_peak_gops"])
    assert math.isfinite(row["roofline_tok_s"])
    # Read again after the runs: its own limits in the JSON, decode against both readings printed.
    after = row["machine_limits_after"]["rows"][-1]
    assert (after["path"], after["threads"]) == (row["machine_limits"]["rows"][-1]["path"], row["threads"])
    assert row["read_gb_s_after"] == after["read_gb_s"]
    roofline_after = row["read_gb_s_after"] * 1e3 / row["mb_per_token"]
    assert row["decode_of_roofline_after"] == pytest.approx(row["decode_tok_s"] / roofline_after)
    assert (
        f"| {100 * row['decode_of_roofline']:.0f}% | {row['read_gb_s_after']:.1f} "
        f"| {100 * row['decode_of_roofline_after']:.0f}% |"
    ) in printed
    assert printed.count(LIMITS_HEADER) == 2

    # --profile: each piece timed alone, the rest is what the measured step leaves.
    profile = row["profile"]
    assert list(profile["pieces_ms"]) == ["ternary matmuls", "lm_head", "attention", "norms and RoPE"]
    assert all(ms > 0 for ms in profile["pieces_ms"].values())
    assert profile["step_ms"] == pytest.approx(1e3 / row["decode_tok_s"])
    assert profile["rest_ms"] == pytest.approx(profile["step_ms"] - sum(profile["pieces_ms"].values()))
    assert (profile["position"], profile["cache_slots"]) == (16 + 1, 16 + 1 + 4)
    for name, ms in profile["pieces_ms"].items():
        assert f"| {name} | {ms:.2f} | {100 * ms / profile['step_ms']:.0f}% |" in printed
    assert main(argv + ["--read-buffer-mb", "0"]) == 2


def test_context_table_pairs_the_runs_of_a_round():
    """Hand-worked: after 128 tokens the runs decode at 40, 30, 36 tok/s, after 2048 at 34, 27, 27
    in the same rounds: medians 36 and 27 (75%), round by round 85%, 90%, 75% (median 85%); the
    roofline allows 800 / 900 MB = 89%. A backend timed at one length has no row."""
    from bitnet_jax.bench.serve import GenerateTiming, context_table

    def timing(backend, prompt, runs, layers_mb):
        r = GenerateTiming(backend, "int8-tied", 2, prompt, 128, 100.0, float(np.median(runs)), 1.0, 1.0, "avx2")
        return dataclasses.replace(r, layers_mb=layers_mb, decode_runs_tok_s=runs)

    table = context_table(
        [
            timing("ffi", 2048, (34.0, 27.0, 27.0), 900.0),
            timing("ffi", 128, (40.0, 30.0, 36.0), 800.0),
            timing("xla", 128, (1.0,), 800.0),
        ]
    )
    assert "| ffi | 2048 | 27.00 | 75% | 85% (75%-90%) | 89% |" in table
    assert "| xla |" not in table and table.count("| ffi |") == 1
    assert context_table([timing("ffi", 128, (40.0,), 800.0)]) == ""


def test_bench_generate_times_prompt_lengths_in_turns(tmp_path, capsys):
    """--prompt-tokens 8,16: one process times both lengths, its runs in alternating rounds; each
    length has its row (its own context and KV bytes), its runs' rates, and the context table."""
    out = tmp_path / "generate.json"
    argv = ["bench", "generate", "--preset", "tiny", "--random-weights", "--backends", "ffi"]
    argv += ["--prompt-tokens", "16,8", "--new-tokens", "4", "--repeats", "3", "--read-buffer-mb", "8"]
    assert main(argv + ["--json", str(out)]) == 0
    printed = capsys.readouterr().out
    short, long = json.loads(out.read_text())
    assert (short["prompt_tokens"], long["prompt_tokens"]) == (8, 16)
    assert (short["decode_context"], long["decode_context"]) == (10.5, 18.5)
    assert long["kv_mb"] == pytest.approx(short["kv_mb"] * 18.5 / 10.5) and long["layers_mb"] == short["layers_mb"]
    for row in (short, long):
        assert len(row["decode_runs_tok_s"]) == 3
        assert row["decode_tok_s"] == pytest.approx(np.median(row["decode_runs_tok_s"]))
        assert row["peak_rss_mb"] > 0 and row["compile_s"] > 0
    paired = np.median(np.divide(long["decode_runs_tok_s"], short["decode_runs_tok_s"]))
    assert "| ffi | 16 |" in printed and f"| {100 * paired:.0f}% (" in printed
    for bad in ("8,8", "0,8", "8,x", "", "16,512"):  # the last: past the tiny preset's 512-token context
        assert main(["bench", "generate", "--random-weights", "--preset", "tiny", "--prompt-tokens", bad]) == 2
        assert "--prompt-tokens" in capsys.readouterr().err


def test_bench_generate_samples_as_asked(tmp_path, capsys):
    """--temperature / --top-k / --top-p reach every timed run (the generate program samples, on
    the FFI backend with the cut kernel): the rows say how tokens were picked, and so does the
    table; settings `generate` refuses are refused before any child starts."""
    out = tmp_path / "generate.json"
    argv = ["bench", "generate", "--preset", "tiny", "--random-weights", "--backends", "ffi", "--prompt-tokens", "8"]
    argv += ["--new-tokens", "4", "--repeats", "1", "--read-buffer-mb", "8"]
    assert main(argv + ["--temperature", "0.8", "--top-k", "20", "--top-p", "0.9", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    assert (row["temperature"], row["top_k"], row["top_p"]) == (0.8, 20, 0.9)
    assert row["decode_tok_s"] > 0 and len(row["decode_runs_tok_s"]) == 1
    assert "Tokens picked by sampling: temperature 0.8, top_k 20, top_p 0.9." in capsys.readouterr().out
    for bad in (["--top-p", "1.5"], ["--temperature", "-1"], ["--top-k", "0"]):
        assert main(["bench", "generate", "--random-weights", "--preset", "tiny", "--temperature", "1", *bad]) == 2
        err = capsys.readouterr().err
        assert bad[0].lstrip("-").replace("-", "_") in err, err
