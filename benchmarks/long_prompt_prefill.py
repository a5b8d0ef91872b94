"""The serving engine's time to first token for long prompts, alone on an idle engine: one request
of `length` random tokens and max_tokens 1, on random packed weights of a preset's shape (no
download), with the engine's programs compiled in a child as `bitnet-jax serve` runs it.

    python benchmarks/long_prompt_prefill.py [--lengths 512,2048] [--repeats 3] [--prefill-chunk 64,256]

Prints each length's median time to first token, the prompt tokens a second that makes, and the
process's peak RSS (which includes building the random weights). With several --prefill-chunk
values, one engine per value on the same weights, their requests alternated (a length on each
engine in turn, every repeat), and each engine's median beside the first's as a ratio: a
comparison within one run, on a host whose speed drifts between runs. The peak RSS is then that
of all the engines together (each holds its own cache and programs); run one value for its own.
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
    parser.add_argument(
        "--prefill-chunk", default="256", help="the engine's prefill_chunk; several, comma-separated, compared"
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    set_threads(args.threads)
    lengths = [int(n) for n in args.lengths.split(",")]
    config = BitNetConfig.preset(args.preset).replace(eos_token_id=None)
    params = random_packed_params(config, lm_head=default_lm_head(config))
    chunks = [int(c) for c in args.prefill_chunk.split(",")]
    context = -(-(max(lengths) + 1) // 256) * 256
    engines = [
        Engine(
            config,
            params,
            IdTokenizer(),
            max_batch=1,
            max_context=context,
            kv_cache=args.kv_cache,
            in_child=True,
            prefill_chunk=chunk,
        )
        for chunk in chunks
    ]
    del params
    rng = np.random.default_rng(0)

    def first_token_s(engine: Engine, length: int) -> float:
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

    times = {(c, n): [] for c in chunks for n in lengths}
    try:
        for engine in engines:
            engine.start()
            for length in lengths:  # compiles each length's prefill
                first_token_s(engine, length)
        for _ in range(args.repeats):
            for length in lengths:
                for chunk, engine in zip(chunks, engines):
                    times[chunk, length].append(first_token_s(engine, length))
    finally:
        for engine in engines:
            engine.stop()
    medians = {key: float(np.median(t)) for key, t in times.items()}
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3
    in_chunks = ", ".join(str(e.prefill_chunk) for e in engines)
    print(f"{args.preset}, {args.kv_cache} cache, chunks of {in_chunks} tokens, peak RSS {peak_mb:.0f} MB")
    print("\n".join(ttft_table(lengths, chunks, medians)))
    if args.json:
        with open(args.json, "w") as f:
            results = [
                dict(length=n, prefill_chunk=c, median_s=medians[c, n], times_s=times[c, n])
                for n in lengths
                for c in chunks
            ]
            summary = dict(preset=args.preset, kv_cache=args.kv_cache, peak_rss_mb=peak_mb, results=results)
            json.dump(summary, f, indent=1)


def ttft_table(lengths, chunks, medians, computed=None) -> list[str]:
    """A markdown table of the median time to first token (`medians[chunk, length]`, s) and the
    prompt tokens a second it makes, a column per chunk size, each beside the first size's as a
    ratio; with `computed[chunk, length]`, the tokens computed (the padded length) too."""
    what = "TTFT median s, prompt tok/s" + (" (tokens computed)" if computed else "")
    lines = ["| prompt tokens | " + " | ".join(f"chunks of {c}: {what}" for c in chunks) + " |"]
    lines.append("|---:|" + "---|" * len(chunks))
    for n in lengths:
        cells = []
        for c in chunks:
            cell = f"{medians[c, n]:.2f}, {n / medians[c, n]:.0f}" + (f" ({computed[c, n]})" if computed else "")
            if c != chunks[0]:
                cell += f", {medians[c, n] / medians[chunks[0], n]:.2f}x chunks of {chunks[0]}"
            cells.append(cell)
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return lines


if __name__ == "__main__":
    main()
