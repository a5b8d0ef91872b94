"""`bitnet-jax serve` as a command: it serves on 127.0.0.1, and SIGTERM lets the request in flight
finish, then exits 0."""

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

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
    argv += ["--new-tokens", "4", "--max-context", "32", "--lm-head", "int4-tied", "--kv-cache", "int8"]
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


def test_bench_serve_sampling(tmp_path, capsys):
    """--temperature / --top-p reach every request (the server's sampling branch runs) and the table says so."""
    out = tmp_path / "serve.json"
    argv = ["bench", "serve", "--preset", "tiny", "--random-weights", "--clients", "1,2", "--prompt-tokens", "8"]
    argv += ["--new-tokens", "4", "--max-context", "32", "--temperature", "0.8", "--top-p", "0.9"]
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
    argv += ["--new-tokens", "4", "--max-context", "64", "--prefill-chunk", "128"]
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
