"""`bitnet-jax bench serve`: the HTTP server under 1, 2, 4 and 8 concurrent streaming clients.

The server runs in this process (`serve.server.running`) on random packed weights of a preset's
shape (`bench.serve.random_packed_params`, no download), with as many slots as the most clients;
each client thread sends one streaming `/v1/completions` request of random prompt token ids
(greedy, `max_tokens` new tokens) and times its chunks. Per level:

  aggregate decode tok/s  tokens after each request's first, over the time from the last first
                          token to the last token (every request decodes in that window: the
                          engine prefills all waiting requests before its next decode step)
  per-request tok/s       median over requests of (tokens - 1) / (last token - first token)
  TTFT                    time to the first token (median and p90): queueing and prefill
  peak RSS                this process's high-water mark since the weights were built
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time

import numpy as np


@dataclasses.dataclass(frozen=True)
class ServeTiming:
    clients: int
    prompt_tokens: int
    new_tokens: int  # per request, as counted by the server's usage
    aggregate_decode_tok_s: float
    per_request_tok_s: float
    ttft_median_s: float
    ttft_p90_s: float
    peak_rss_mb: float
    slots: int
    max_context: int
    threads: int
    lm_head: str
    kv_cache: str
    kv_cache_tokens: int  # slots in the engine's page pool


class IdTokenizer:
    """Random weights have no tokenizer: token i is the text "<i>" (one chunk per token)."""

    bos_id, eos_id, stop_ids = None, None, ()

    def encode(self, text: str) -> list[int]:
        return []  # the benchmark sends token ids, not text

    def decode(self, ids) -> str:
        return "".join(f"<{int(i)}>" for i in ids)

    def id_to_token(self, token_id: int) -> str:
        return f"<{token_id}>"


def bench_serve(
    config,
    *,
    clients: tuple[int, ...] = (1, 2, 4, 8),
    prompt_tokens: int = 128,
    new_tokens: int = 128,
    max_context: int = 2048,
    lm_head: str | None = None,
    kv_cache: str | None = None,
    kv_cache_tokens: int | None = None,
    seed: int = 0,
) -> list[ServeTiming]:
    """Times the server at each client count (see the module docstring). `lm_head` and `kv_cache`
    as for `bench generate` (defaults: the serving default head, a float32 cache);
    `kv_cache_tokens` as for `Engine` (default: every slot can hold `max_context`)."""
    import gc
    import os

    import httpx

    from bitnet_jax.bench.serve import peak_rss_mb, random_packed_params, reset_peak_rss
    from bitnet_jax.kernels.ops import default_lm_head
    from bitnet_jax.serve.batching import Engine
    from bitnet_jax.serve.server import create_app, running

    # No stop ids: every request decodes exactly `new_tokens` tokens.
    config = config.replace(eos_token_id=None)
    lm_head, kv_cache = lm_head or default_lm_head(config), kv_cache or "float32"
    params = random_packed_params(config, lm_head=lm_head, seed=seed)
    engine = Engine(
        config,
        params,
        IdTokenizer(),
        max_batch=max(clients),
        max_context=max_context,
        kv_cache=kv_cache,
        kv_cache_tokens=kv_cache_tokens,
        in_child=True,  # as `bitnet-jax serve` runs it
    )
    del params
    gc.collect()
    engine.start()  # compiles the decode step and a one-token prefill
    rng = np.random.default_rng(seed)
    results = []
    with running(create_app(engine, model_name="bench")) as url:

        def request(prompt, times, usage):
            body = dict(model="bench", prompt=prompt, max_tokens=new_tokens, temperature=0, stream=True)
            body["stream_options"] = {"include_usage": True}
            start = time.perf_counter()
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=3600) as response:
                for line in response.iter_lines():
                    if line.startswith("data: {"):
                        chunk = json.loads(line[6:])
                        if chunk.get("usage"):
                            usage.append(chunk["usage"]["completion_tokens"])
                        elif chunk["choices"][0]["text"]:
                            times.append(time.perf_counter())
            times.insert(0, start)

        def prompt():
            return [int(i) for i in rng.integers(0, config.vocab_size, prompt_tokens)]

        request(prompt(), [], [])  # compiles the prefill of this prompt length
        reset_peak_rss()
        for n in clients:
            times = [[] for _ in range(n)]
            usage: list[int] = []
            threads = [threading.Thread(target=request, args=(prompt(), times[i], usage)) for i in range(n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            starts = np.array([t[0] for t in times])
            firsts = np.array([t[1] for t in times])
            lasts = np.array([t[-1] for t in times])
            decoded = np.array([len(t) - 2 for t in times])  # pieces after the first
            window = lasts.max() - firsts.max()
            ttft = firsts - starts
            results.append(
                ServeTiming(
                    n,
                    prompt_tokens,
                    int(np.median(usage)),
                    float(decoded.sum() / window) if window > 0 else float("nan"),
                    float(np.median(decoded / (lasts - firsts))),
                    float(np.median(ttft)),
                    float(np.percentile(ttft, 90)),
                    peak_rss_mb(),
                    engine.max_batch,
                    engine.max_context,
                    len(os.sched_getaffinity(0)),
                    lm_head,
                    kv_cache,
                    engine.kv_cache_tokens,
                )
            )
            print(serve_table(results[-1:]).splitlines()[-1], flush=True)
    engine.stop()
    return results


def serve_table(results: list[ServeTiming]) -> str:
    lines = [
        "| clients | aggregate decode tok/s | per-request tok/s | TTFT median (s) | TTFT p90 (s) | peak RSS MB |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.clients} | {r.aggregate_decode_tok_s:.1f} | {r.per_request_tok_s:.2f} | {r.ttft_median_s:.2f} "
            f"| {r.ttft_p90_s:.2f} | {r.peak_rss_mb:.0f} |"
        )
    one = next((r for r in results if r.clients == 1), None)
    if one is not None and len(results) > 1:
        most = max(results, key=lambda r: r.clients)
        lines.append("")
        gain = most.aggregate_decode_tok_s / one.aggregate_decode_tok_s
        lines.append(
            f"Aggregate decode with {most.clients} clients: {gain:.2f}x one client's "
            f"({most.slots} slots of up to {most.max_context} tokens, {most.kv_cache_tokens} KV cache slots, "
            f"{most.threads} threads; {most.lm_head} lm_head, {most.kv_cache} KV cache)."
        )
    return "\n".join(lines)
