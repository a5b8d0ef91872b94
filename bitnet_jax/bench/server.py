"""`bitnet-jax bench serve`: the HTTP server under 1, 2, 4 and 8 concurrent streaming clients.

The server runs in this process (`serve.server.running`) on random packed weights of a preset's
shape (`bench.serve.random_packed_params`, no download), with as many slots as the most clients;
its clients in a child process, a thread each, each sending one streaming `/v1/completions`
request of random prompt token ids (`max_tokens` new tokens; greedy unless a temperature is
given) and timing its chunks. Per level:

  aggregate decode tok/s  tokens after each request's first, over the time from the last first
                          token to the last token (every request decodes in that window: the
                          engine prefills all waiting requests before its next decode step)
  per-request tok/s       median over requests of (tokens - 1) / (last token - first token)
  TTFT                    time to the first token (median and p90): queueing and prefill
  peak RSS                the server process's high-water mark since the weights were built
  limit tok/s             what this machine allows the level's decode steps (`with_serve_limits`,
                          with the read bandwidth and int8 peak measured in the same run): a
                          step for B streams runs its parts one after another, the decoder
                          layers' matmuls, the lm_head and attention, each reading its weights
                          once (attention: each stream's KV cache) and computing B tokens' int8
                          operations, so each takes at least the longer of its reading and its
                          arithmetic; B streams / the sum of the parts' times. One stream is
                          memory-bound throughout; with enough streams the layers' matmuls are
                          compute-bound (on a 2-core Zen 4, from about 6) while the lm_head's
                          read still takes longer than its arithmetic ("mixed").
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time

import numpy as np

from bitnet_jax.bench.serve import _percent, sampling_text


@dataclasses.dataclass(frozen=True)
class ServeTiming:
    clients: int
    prompt_tokens: int  # the shortest prompt (every prompt, unless a range was asked)
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
    temperature: float = 0.0  # each request's; 0 is greedy
    top_p: float = 1.0
    prompt_tokens_max: int | None = None  # the longest, where prompts were drawn from a range
    prefill_chunk: int | None = None  # prompt tokens the engine read a step (`Engine.prefill_chunk`)
    # What a decode step reads and computes (bench/roofline.py): MB read once per step whatever
    # the streams (decoder-layer weights, lm_head, norms), MB of KV cache per stream at the mean
    # context of its decoded tokens, and int8 operations (G) per decoded token (the ternary
    # matmuls and the lm_head, 2 per multiply-add).
    step_weights_mb: float = 0.0
    kv_mb_per_stream: float = 0.0
    ops_per_token_g: float = 0.0
    head_mb: float = 0.0  # of step_weights_mb, the lm_head's
    head_ops_per_token_g: float = 0.0  # of ops_per_token_g, the lm_head's
    isa: str = ""  # the kernel path that served
    # Against this machine's limits (`with_serve_limits`).
    read_gb_s: float | None = None
    int8_peak_gops: float | None = None
    limit_tok_s: float | None = None  # clients / the step's time at the limits (`with_serve_limits`)
    bound: str | None = None  # what sets its parts' times: "memory", "compute" or "mixed"
    of_limit: float | None = None  # aggregate_decode_tok_s / limit_tok_s
    # The same against the limits measured again after the levels (a shared host's bandwidth
    # moves from minute to minute: a figure is only as sure as the two readings agree).
    limit_tok_s_after: float | None = None
    of_limit_after: float | None = None


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
    prompt_tokens: int | tuple[int, int] = 128,
    new_tokens: int = 128,
    max_context: int = 2048,
    lm_head: str | None = None,
    kv_cache: str | None = None,
    kv_cache_tokens: int | None = None,
    prefill_chunk: int | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> list[ServeTiming]:
    """Times the server at each client count (see the module docstring). `lm_head` and `kv_cache`
    as for `bench generate` (defaults: the serving default head, a float32 cache);
    `kv_cache_tokens` and `prefill_chunk` as for `Engine` (None: its defaults); `temperature` and
    `top_p` each request's (default greedy), each request seeded apart. `prompt_tokens` as
    (shortest, longest): each prompt's length drawn uniformly from that range, and a request for
    each prefill program its lengths run (`Engine.prefill_programs`) sent before the timed
    levels, so that they are compiled and loaded (a served model meets many lengths, and keeps a
    program for each prompt-length bucket)."""
    import gc
    import itertools
    import multiprocessing
    import os

    from bitnet_jax.bench.roofline import decode_bytes, decode_context, ternary_ops_per_token
    from bitnet_jax.bench.serve import peak_rss_mb, random_packed_params, reset_peak_rss
    from bitnet_jax.kernels import ffi
    from bitnet_jax.kernels.ops import default_lm_head
    from bitnet_jax.serve.batching import Engine
    from bitnet_jax.serve.generate import kv_cache_dtype, serving_params
    from bitnet_jax.serve.host_memory import map_large_blocks
    from bitnet_jax.serve.server import create_app, running

    map_large_blocks()  # as `serve` does, before the weights
    # No stop ids: every request decodes exactly `new_tokens` tokens.
    config = config.replace(eos_token_id=None)
    lm_head, kv_cache = lm_head or default_lm_head(config), kv_cache or "float32"
    params = random_packed_params(config, lm_head=lm_head, seed=seed)
    serving = serving_params(config, params, None, kv_cache)[1]  # as the engine will serve
    traffic = decode_bytes(config, params, kv_cache_dtype(params, serving))
    isa = ffi.selected_isa() if serving.backend == "ffi" else serving.backend  # no measured limits for "xla"
    engine = Engine(
        config,
        params,
        IdTokenizer(),
        max_batch=max(clients),
        max_context=max_context,
        kv_cache=kv_cache,
        kv_cache_tokens=kv_cache_tokens,
        in_child=True,  # as `bitnet-jax serve` runs it
        prefix_cache=True,
        prefill_chunk=prefill_chunk,
    )
    del params
    gc.collect()
    engine.start()  # compiles the decode step and a one-token prefill
    # The timed prompts and seeds, and the warm-up's apart: the timed ones are the same whatever
    # the warm-up sends (its requests depend on the engine's programs, `prefill_chunk` among them).
    rng, warm_rng = np.random.default_rng(seed), np.random.default_rng(seed + 1)
    shortest, longest = prompt_tokens if isinstance(prompt_tokens, tuple) else (prompt_tokens, prompt_tokens)
    kv_mb = traffic.kv_per_slot * decode_context((shortest + longest) / 2, new_tokens) / 1e6
    head_ops_g = 2 * config.hidden_size * config.vocab_size / 1e9
    ops_g = ternary_ops_per_token(config) / 1e9 + head_ops_g

    def prompt(length, rng=rng):
        return [int(i) for i in rng.integers(0, config.vocab_size, length)]

    def prompts(n):
        return [prompt(int(rng.integers(shortest, longest + 1))) for _ in range(n)]

    # One request for each prefill program that the range's lengths run (the shortest length that
    # runs it), so that every one is compiled and loaded before the timed levels.
    warm_up, loaded = [], set()
    for length in range(shortest, longest + 1):
        programs = set(engine.prefill_programs(length))
        if not programs <= loaded:
            warm_up.append(length)
            loaded |= programs

    sampling = dict(max_tokens=new_tokens, temperature=temperature, top_p=top_p)
    seeds, warm_seeds = itertools.count(seed), itertools.count(seed + 10**6)
    results = []
    # The clients run in a process of their own, so that the peak RSS is the server's alone (as
    # a deployed server's is): in this process their HTTP client and buffers added 10-20 MB.
    with running(create_app(engine, model_name="bench")) as url, multiprocessing.get_context("spawn").Pool(1) as pool:
        for length in warm_up:
            _send(pool, url, [prompt(length, warm_rng)], sampling, [next(warm_seeds)])
        reset_peak_rss()
        for n in clients:
            times, usage = _send(pool, url, prompts(n), sampling, [next(seeds) for _ in range(n)])
            starts = np.array([t[0] for t in times])
            firsts = np.array([t[1] for t in times])
            lasts = np.array([t[-1] for t in times])
            decoded = np.array([len(t) - 2 for t in times])  # pieces after the first
            window = lasts.max() - firsts.max()
            ttft = firsts - starts
            results.append(
                ServeTiming(
                    n,
                    shortest,
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
                    temperature,
                    top_p,
                    longest if longest != shortest else None,
                    engine.prefill_chunk,
                    (traffic.layers + traffic.head + traffic.other) / 1e6,
                    kv_mb,
                    ops_g,
                    traffic.head / 1e6,
                    head_ops_g,
                    isa,
                )
            )
            print(serve_table(results[-1:]).splitlines()[-1], flush=True)
    engine.stop()
    return results


def _send(pool, url: str, prompts: list[list[int]], sampling: dict, seeds: list[int]) -> tuple[list, list]:
    """`_clients` in the clients' process (`pool`)."""
    return pool.apply(_clients, (url, prompts, sampling, seeds))


def _clients(url: str, prompts: list[list[int]], sampling: dict, seeds: list[int]) -> tuple[list, list]:
    """One streaming /v1/completions request per prompt, all at once, each on a thread: per
    request [start, time of each chunk with text...], and the completion tokens each reported."""
    import httpx

    def request(prompt, seed, times, usage):
        body = dict(model="bench", prompt=prompt, stream=True, seed=seed, **sampling)
        body["stream_options"] = {"include_usage": True}
        times.append(time.perf_counter())
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=3600) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        usage.append(chunk["usage"]["completion_tokens"])
                    elif chunk["choices"][0]["text"]:
                        times.append(time.perf_counter())

    times: list[list[float]] = [[] for _ in prompts]
    usage: list[int] = []
    threads = [threading.Thread(target=request, args=(p, s, t, usage)) for p, s, t in zip(prompts, seeds, times)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return times, usage


def with_serve_limits(r: ServeTiming, limits, after=None) -> ServeTiming:
    """`r` with the limit of its decode steps on this machine (`limits`: bench/machine.py's
    MachineLimits, measured on r's thread count and kernel path). A step for B = r.clients streams
    runs three parts one after another: the decoder layers' matmuls (step_weights_mb - head_mb
    read, B * (ops_per_token_g - head_ops_per_token_g) G int8 ops), the lm_head (head_mb, B *
    head_ops_per_token_g) and attention (B * kv_mb_per_stream read). A part can be no faster than
    its reading at the read bandwidth, nor than its arithmetic at the int8 peak; limit = B / the
    sum of the longer of each part's two times. (One maximum over the whole step's bytes and ops
    would let the lm_head's reading hide under the layers' arithmetic, which a step that runs
    them in turn cannot do.) With `after` (the limits measured again after the levels), the
    limit from that reading too. Fields stay None where no limit was measured for r's threads
    or path."""
    first = _step_limit(r, limits)
    if first is None:
        return r
    read, peak, limit, bound = first
    again = _step_limit(r, after) if after is not None else None
    return dataclasses.replace(
        r,
        read_gb_s=read,
        int8_peak_gops=peak,
        limit_tok_s=limit,
        bound=bound,
        of_limit=r.aggregate_decode_tok_s / limit,
        limit_tok_s_after=again[2] if again else None,
        of_limit_after=r.aggregate_decode_tok_s / again[2] if again else None,
    )


def _step_limit(r: ServeTiming, limits) -> tuple[float, float, float, str] | None:
    """(read GB/s, int8 peak GOPS, limit tok/s, bound) of r's decode steps under `limits`."""
    read, peak = limits.read_gb_s(r.threads), limits.int8_peak_gops(r.isa, r.threads)
    if not read or not peak:
        return None
    b = r.clients
    parts = (  # (MB read, G int8 ops) of the decoder layers, the lm_head and attention
        (r.step_weights_mb - r.head_mb, b * (r.ops_per_token_g - r.head_ops_per_token_g)),
        (r.head_mb, b * r.head_ops_per_token_g),
        (b * r.kv_mb_per_stream, 0.0),
    )
    times = [(mb / (read * 1e3), ops / peak) for mb, ops in parts if mb or ops]
    step_s = sum(max(memory_s, compute_s) for memory_s, compute_s in times)
    memory = [memory_s >= compute_s for memory_s, compute_s in times]
    bound = "memory" if all(memory) else "compute" if not any(memory) else "mixed"
    return read, peak, b / step_s, bound


def serve_table(results: list[ServeTiming]) -> str:
    lines = [
        "| clients | aggregate decode tok/s | per-request tok/s | TTFT median (s) | TTFT p90 (s) | peak RSS MB "
        "| limit tok/s (bound) | of limit | limit, read after | of limit, read after |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        limit = "-" if r.limit_tok_s is None else f"{r.limit_tok_s:.1f} ({r.bound})"
        limit_after = "-" if r.limit_tok_s_after is None else f"{r.limit_tok_s_after:.1f}"
        lines.append(
            f"| {r.clients} | {r.aggregate_decode_tok_s:.1f} | {r.per_request_tok_s:.2f} | {r.ttft_median_s:.2f} "
            f"| {r.ttft_p90_s:.2f} | {r.peak_rss_mb:.0f} | {limit} | {_percent(r.of_limit)} | {limit_after} "
            f"| {_percent(r.of_limit_after)} |"
        )
    one = next((r for r in results if r.clients == 1), None)
    if one is not None and len(results) > 1:
        most = max(results, key=lambda r: r.clients)
        lines.append("")
        gain = most.aggregate_decode_tok_s / one.aggregate_decode_tok_s
        lines.append(
            f"Aggregate decode with {most.clients} clients: {gain:.2f}x one client's "
            f"({most.slots} slots of up to {most.max_context} tokens, {most.kv_cache_tokens} KV cache slots, "
            f"{most.threads} threads; {most.lm_head} lm_head, {most.kv_cache} KV cache; {_sampling(most)}; "
            f"{_prompts(most)}; prefill chunks of {most.prefill_chunk} tokens)."
        )
    r = next((r for r in results if r.limit_tok_s is not None), None)
    if r is not None:
        lines += [
            "",
            f"Limit: a decode step for B streams runs, one after another, the decoder layers' matmuls "
            f"({r.step_weights_mb - r.head_mb:.1f} MB of weights read once, "
            f"{r.ops_per_token_g - r.head_ops_per_token_g:.2f} G int8 ops per token), the lm_head "
            f"({r.head_mb:.1f} MB, {r.head_ops_per_token_g:.2f} G ops per token) and attention "
            f"({r.kv_mb_per_stream:.1f} MB of KV cache per stream); each takes at least the longer of its "
            f"reading at {r.read_gb_s:.1f} GB/s (read before the levels) and its arithmetic at "
            f"{r.int8_peak_gops:,.0f} GOPS ({r.isa}, {r.threads} threads); limit tok/s = B / the sum.",
        ]
    return "\n".join(lines)


def _sampling(r: ServeTiming) -> str:
    return sampling_text(r.temperature, top_p=r.top_p if r.top_p < 1 else None)  # top_p 1: no cut


def _prompts(r: ServeTiming) -> str:
    if r.prompt_tokens_max is None:
        return f"{r.prompt_tokens}-token prompts"
    return f"prompts of {r.prompt_tokens}-{r.prompt_tokens_max} tokens, every prefill program loaded"
