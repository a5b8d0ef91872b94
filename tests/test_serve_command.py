"""`bitnet-jax serve` as a command: it serves on 127.0.0.1, and SIGTERM lets the request in flight
finish, then exits 0."""

import dataclasses
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from bitnet_jax import BitNetConfig
from bitnet_jax.cli import main


def ffi_attention_simd() -> bool:
    from bitnet_jax.kernels import ffi
    from bitnet_jax.kernels.ops import ATTENTION_SIMD_ISAS

    return ffi.selected_isa() in ATTENTION_SIMD_ISAS


FIXTURES = Path(__file__).parent / "fixtures" / "hf"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_command_sigterm_finishes_the_stream_and_exits_0(tmp_path):
    folder = tmp_path / "packed"
    assert main(["convert", str(FIXTURES / "packed_bitlinear"), str(folder)]) == 0
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "bitnet_jax.cli", "serve", "--model", str(folder), "--port", str(port)]
    command += ["--max-batch", "8", "--max-context", "128", "--model-name", "tiny"]  # test_server.py's shapes
    command += ["--kv-cache-tokens", "512"]  # 4 requests of the whole context at once
    command += ["--no-prefix-cache"]  # (on by default; its prompts are too short to reuse a prefix)
    with open(tmp_path / "server.log", "w") as log:
        # cwd=tmp_path: from the repository root, `-m` would import the source checkout (which has no
        # compiled _ffi_ext) instead of the installed package.
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()
            assert time.monotonic() < deadline, "the server did not answer /health"
            try:
                health = httpx.get(url + "/health")
                if health.status_code == 200:
                    assert health.json()["kv_pages"] == 4  # pages of the 128-token context
                    break
            except httpx.TransportError:
                time.sleep(0.2)

        first_piece, events = threading.Event(), []

        def stream():
            body = dict(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=40, stream=True)
            body.update(temperature=0, stream_options={"include_usage": True})  # greedy: one reply, every run
            with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as response:
                for line in response.iter_lines():
                    if line:
                        events.append(line)
                        first_piece.set()

        client = threading.Thread(target=stream)
        client.start()
        assert first_piece.wait(120)
        server.send_signal(signal.SIGTERM)
        client.join(120)
        assert server.wait(60) == 0
    finally:
        if server.poll() is None:
            server.kill()
    # The stream in flight was finished, not cut: every token, the finish reason, [DONE].
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    (usage,) = [c["usage"] for c in chunks if c.get("usage")]
    # Ended as a whole reply ends: at max_tokens, or earlier at a stop token (the fixture's
    # greedy reply may reach one; OpenAI's default temperature 1 made that a matter of chance).
    assert finish == ["length" if usage["completion_tokens"] == 40 else "stop"]
    assert "Stopped." in (tmp_path / "server.log").read_text()


def test_bench_serve_small(tmp_path, capsys):
    out = tmp_path / "serve.json"
    argv = ["bench", "serve", "--preset", "tiny", "--random-weights", "--clients", "1,2", "--prompt-tokens", "8"]
    argv += [
        "--read-buffer-mb",
        "8",
        "--new-tokens",
        "4",
        "--max-context",
        "32",
        "--lm-head",
        "int4-tied",
        "--kv-cache",
        "int8",
    ]
    assert main(argv + ["--kv-cache-tokens", "40", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| clients | aggregate decode tok/s |" in table and "Aggregate decode with 2 clients" in table
    rows = json.loads(out.read_text())
    assert [r["clients"] for r in rows] == [1, 2] and all(r["new_tokens"] == 4 for r in rows)
    assert all(r["lm_head"] == "int4-tied" and r["kv_cache"] == "int8" for r in rows)
    assert all(r["kv_cache_tokens"] == 32 for r in rows)  # one page of the 32-token context
    assert all(r["aggregate_decode_tok_s"] > 0 and r["ttft_p90_s"] >= r["ttft_median_s"] > 0 for r in rows)
    assert all(r["temperature"] == 0 and r["top_p"] == 1 for r in rows)
    assert "KV cache; greedy; 8-token prompts; prefill chunks of" in table
    assert all(r["prompt_tokens"] == 8 and r["prompt_tokens_max"] is None for r in rows)

    # Each level against the limit of its decode steps, from the limits measured in the run (on
    # the path that served and the level's threads): B / the sum, over the decoder layers, the
    # lm_head and attention, of the longer of each part's reading and arithmetic.
    def step_s(r, limits):
        b, read, peak = r["clients"], 1e3 * limits["read_gb_s"], limits["int8_peak_gops"]
        layers_ops = b * (r["ops_per_token_g"] - r["head_ops_per_token_g"])
        layers = max((r["step_weights_mb"] - r["head_mb"]) / read, layers_ops / peak)
        head = max(r["head_mb"] / read, b * r["head_ops_per_token_g"] / peak)
        return layers + head + b * r["kv_mb_per_stream"] / read

    for r in rows:
        (limits,) = [x for x in r["machine_limits"]["rows"] if (x["path"], x["threads"]) == (r["isa"], r["threads"])]
        assert r["read_gb_s"] == limits["read_gb_s"] and r["int8_peak_gops"] == limits["int8_peak_gops"]
        assert r["limit_tok_s"] == pytest.approx(r["clients"] / step_s(r, limits))
        assert r["bound"] in ("memory", "compute", "mixed")
        assert r["of_limit"] == pytest.approx(r["aggregate_decode_tok_s"] / r["limit_tok_s"])
        assert f"| {r['limit_tok_s']:.1f} ({r['bound']}) | {100 * r['of_limit']:.0f}% |" in table
        # Read again after the levels: that reading's limit beside the first.
        (again,) = [
            x for x in r["machine_limits_after"]["rows"] if (x["path"], x["threads"]) == (r["isa"], r["threads"])
        ]
        assert r["limit_tok_s_after"] == pytest.approx(r["clients"] / step_s(r, again))
        assert r["of_limit_after"] == pytest.approx(r["aggregate_decode_tok_s"] / r["limit_tok_s_after"])
    # The tiny model's bytes and ops, counted from its shapes: 2 bits a ternary weight; the
    # lm_head (int4, tied) and its int8 operations, 2 per multiply-add; an int8 KV cache (H codes
    # and a float32 scale per slot, kv head, key or value and layer) at the decoded tokens' mean
    # context, 8 + (4 + 1) / 2 positions.
    config = BitNetConfig.preset("tiny")
    ternary = sum(k * n for names in config.linear_shapes.values() for k, n in names.values())
    ops = 2 * (ternary * config.num_hidden_layers + config.hidden_size * config.vocab_size)
    assert rows[0]["ops_per_token_g"] == pytest.approx(ops / 1e9)
    assert rows[0]["head_ops_per_token_g"] == pytest.approx(2 * config.hidden_size * config.vocab_size / 1e9)
    assert 0 < rows[0]["head_mb"] < rows[0]["step_weights_mb"]
    slot = config.num_hidden_layers * 2 * config.num_key_value_heads * (config.head_dim + 4)
    assert rows[0]["kv_mb_per_stream"] == pytest.approx(slot * 10.5 / 1e6)
    assert rows[0]["step_weights_mb"] > ternary * config.num_hidden_layers / 4 / 1e6
    assert "Limit: a decode step for B streams runs, one after another," in table


def test_with_serve_limits_arithmetic():
    """Hand-worked, at 20 GB/s and 500 GOPS: 800 MB of weights of which the lm_head's 300, 5 G
    ops a token of which its 1 G, 10 MB of cache a stream. One stream: the layers 25 ms of
    reading (against 8 of arithmetic), the head 15 (2), the cache 0.5, all memory-bound: 40.5
    ms, 24.7 tok/s (20 is 81% of it). 8 streams: the layers 64 ms of arithmetic (25 of reading),
    the head 16 of arithmetic (15), the cache 4: 84 ms, 95.2 tok/s (60 is 63%), compute and
    memory mixed; one maximum over the whole step (44 ms of reading, 80 of arithmetic) would
    have claimed 100. The layers alone compute-bound and nothing else read: "compute". No limit
    measured for the path: none claimed."""
    from bitnet_jax.bench.machine import MachineLimits, PathLimits
    from bitnet_jax.bench.server import ServeTiming, with_serve_limits

    limits = MachineLimits("cpu", 8.0, (PathLimits("avx2", "vpmaddubsw ymm", 2, 20.0, 500.0),))
    base = ServeTiming(1, 8, 4, 20.0, 20.0, 0.1, 0.1, 1.0, 8, 64, 2, "int8-tied", "int8", 64)
    base = dataclasses.replace(
        base,
        step_weights_mb=800.0,
        kv_mb_per_stream=10.0,
        ops_per_token_g=5.0,
        head_mb=300.0,
        head_ops_per_token_g=1.0,
        isa="avx2",
    )
    one = with_serve_limits(base, limits)
    assert (one.bound, one.limit_tok_s, one.of_limit) == ("memory", pytest.approx(1 / 0.0405), pytest.approx(0.81))
    eight = with_serve_limits(dataclasses.replace(base, clients=8, aggregate_decode_tok_s=60.0), limits)
    assert (eight.bound, eight.limit_tok_s) == ("mixed", pytest.approx(8 / 0.084))
    assert eight.of_limit == pytest.approx(60.0 * 0.084 / 8)
    layers_only = dataclasses.replace(
        base,
        clients=8,
        step_weights_mb=500.0,
        kv_mb_per_stream=0.0,
        head_mb=0.0,
        ops_per_token_g=4.0,
        head_ops_per_token_g=0.0,
    )
    assert with_serve_limits(layers_only, limits).bound == "compute"
    other = with_serve_limits(dataclasses.replace(base, isa="avx512"), limits)
    assert other.limit_tok_s is None and other.of_limit is None and other.bound is None
    # Read again at 40 GB/s: one stream's reading takes half as long, 49.4 tok/s (20 is 40%).
    faster = MachineLimits("cpu", 8.0, (PathLimits("avx2", "vpmaddubsw ymm", 2, 40.0, 500.0),))
    again = with_serve_limits(base, limits, faster)
    assert (again.limit_tok_s_after, again.of_limit_after) == (pytest.approx(1 / 0.02025), pytest.approx(0.405))
    assert again.limit_tok_s == one.limit_tok_s and one.limit_tok_s_after is None


def test_bench_serve_sampling(tmp_path, capsys):
    """--temperature / --top-p reach every request (the server's sampling branch runs) and the table says so."""
    out = tmp_path / "serve.json"
    argv = ["bench", "serve", "--preset", "tiny", "--random-weights", "--clients", "1,2", "--prompt-tokens", "8"]
    argv += [
        "--new-tokens",
        "4",
        "--max-context",
        "32",
        "--temperature",
        "0.8",
        "--top-p",
        "0.9",
        "--read-buffer-mb",
        "8",
    ]
    assert main(argv + ["--json", str(out)]) == 0
    assert "temperature 0.8, top_p 0.9; 8-token prompts; prefill chunks of" in capsys.readouterr().out
    rows = json.loads(out.read_text())
    assert all(r["temperature"] == 0.8 and r["top_p"] == 0.9 and r["new_tokens"] == 4 for r in rows)


def test_bench_serve_prompt_range(tmp_path, capsys, monkeypatch):
    """--prompt-tokens A-B draws each prompt's length from the range, after one request for each
    prefill program its lengths run (loaded before the timed levels: the shortest length of each
    bucket); a bad range is refused."""
    import bitnet_jax.bench.server as bench_server

    sent, send = [], bench_server._send

    def recording_send(pool, url, prompts, *rest):
        sent.append([len(p) for p in prompts])
        return send(pool, url, prompts, *rest)

    monkeypatch.setattr(bench_server, "_send", recording_send)
    out = tmp_path / "serve.json"
    argv = ["bench", "serve", "--preset", "tiny", "--random-weights", "--clients", "1,4", "--prompt-tokens", "5-40"]
    argv += ["--new-tokens", "4", "--max-context", "64", "--prefill-chunk", "128", "--read-buffer-mb", "8"]
    assert main(argv + ["--json", str(out)]) == 0
    # (Chunks of 128 where they run in place: where the FFI kernel attends them.)
    chunk = 128 if ffi_attention_simd() else 256
    assert f"prompts of 5-40 tokens, every prefill program loaded; prefill chunks of {chunk} tokens)." in (
        capsys.readouterr().out
    )
    assert sent[:3] == [[5], [17], [33]]  # the buckets of 16, 32 and 48 tokens
    assert [len(lengths) for lengths in sent[3:]] == [1, 4] and all(5 <= n <= 40 for s in sent[3:] for n in s)
    rows = json.loads(out.read_text())
    assert all(r["prompt_tokens"] == 5 and r["prompt_tokens_max"] == 40 for r in rows)
    assert all(r["prefill_chunk"] == chunk for r in rows)
    for bad in ("40-5", "0-8", "a-b", "1-2-3"):
        assert main(["bench", "serve", "--preset", "tiny", "--random-weights", "--prompt-tokens", bad]) == 2
        assert "--prompt-tokens" in capsys.readouterr().err
