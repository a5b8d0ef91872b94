"""The serving engine's time to first token for long prompts, alone on an idle engine: one request
of `length` random tokens and max_tokens 1, on random packed weights of a preset's shape (no
download), with the engine's programs compiled in a child as `bitnet-jax serve` runs it.

    python benchmarks/long_prompt_prefill.py [--lengths 512,2048] [--repeats 3]

Prints each length's median time to first token, the prompt tokens a second that makes, and the
process's peak RSS (which includes building the random weights).
"""

import argparse
import json
import resource
import threading
import time

import numpy as np

from bitnet_jax.bench.serve import random_packed_params, set_threads
from bitnet_jax.bench.server import IdTokenizer
from bitnet_jax.kernels.ops import default_lm_head
from bitnet_jax.model.config import BitNetConfig
from bitnet_jax.serve.batching import Engine, GenerationRequest


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="b1.58-2b4t")
    parser.add_argument("--lengths", default="512,2048")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--kv-cache", default="int8", choices=("float32", "int8"))
    parser.add_argument("--prefill-chunk", type=int, default=256, help="the engine's prefill_chunk")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    set_threads(args.threads)
    lengths = [int(n) for n in args.lengths.split(",")]
    config = BitNetConfig.preset(args.preset).replace(eos_token_id=None)
    params = random_packed_params(config, lm_head=default_lm_head(config))
    context = -(-(max(lengths) + 1) // 256) * 256
    engine = Engine(
        config,
        params,
        IdTokenizer(),
        max_batch=1,
        max_context=context,
        kv_cache=args.kv_cache,
        in_child=True,
        prefill_chunk=args.prefill_chunk,
    )
    del params
    engine.start()
    rng = np.random.default_rng(0)

    def first_token_s(length: int) -> float:
        done, start, first = threading.Event(), time.perf_counter(), []

        def on_event(event):
            if not first:
                first.append(time.perf_counter() - start)
            if event.finish_reason:
                done.set()

        prompt = tuple(int(i) for i in rng.integers(0, config.vocab_size, length))
        engine.submit(GenerationRequest(prompt, 1), on_event)
        done.wait()
        return first[0]

    try:
        for length in lengths:  # compiles each length's prefill
            first_token_s(length)
        results = []
        for length in lengths:
            times = [first_token_s(length) for _ in range(args.repeats)]
            results.append(dict(length=length, median_s=float(np.median(times)), times_s=times))
    finally:
        engine.stop()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3
    print(f"{args.preset}, {args.kv_cache} cache, chunks of {engine.prefill_chunk}, peak RSS {peak_mb:.0f} MB")
    print("| prompt tokens | TTFT median s | prompt tok/s |")
    print("|---:|---:|---:|")
    for r in results:
        print(f"| {r['length']} | {r['median_s']:.2f} | {r['length'] / r['median_s']:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            summary = dict(preset=args.preset, kv_cache=args.kv_cache, peak_rss_mb=peak_mb, results=results)
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
