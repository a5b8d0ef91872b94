"""The serving engine's decode step at several batch widths: one token for each of `width` rows
(`Engine._run_step`, what `bitnet-jax serve` runs per step), on random packed weights of a
preset's shape (no download), every row at the same position.

    python benchmarks/batched_step.py [--widths 1,4,8] [--position 200] [--repeats 15]
                                      [--weight-quant group:64]   (the ternary scales; default: the preset's)
                                      [--temperature 0.8 --top-p 0.9]   (every row sampling so)
    BITNET_JAX_ISA=avx2 python benchmarks/batched_step.py      (another kernel path)

Prints each width's min and median step in ms, the tokens a second that makes (width / median)
and the step's cost against one row's (needs width 1 among the widths). Compiles in this process.
"""

import argparse
import json
import time

import numpy as np

from bitnet_jax.bench.serve import random_packed_params, set_threads
from bitnet_jax.bench.server import IdTokenizer
from bitnet_jax.kernels.ops import default_lm_head
from bitnet_jax.model.config import BitNetConfig
from bitnet_jax.serve.batching import Engine


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="b1.58-2b4t")
    parser.add_argument("--widths", default="1,4,8")
    parser.add_argument("--position", type=int, default=200, help="the rows' position in their cache")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--weight-quant", default=None, help="the ternary layers' scales, e.g. group:64")
    parser.add_argument("--lm-head", default=None, help="default: the serving default (int8-tied for 2B4T)")
    parser.add_argument("--kv-cache", default="int8", choices=("float32", "int8"))
    parser.add_argument("--temperature", type=float, default=0.0, help="every row's (default 0: greedy)")
    parser.add_argument("--top-p", type=float, default=1.0, help="every row's (default 1: no cut)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    set_threads(args.threads)
    widths = [int(w) for w in args.widths.split(",")]
    overrides = {} if args.weight_quant is None else {"weight_quant": args.weight_quant}
    config = BitNetConfig.preset(args.preset, **overrides).replace(eos_token_id=None)
    lm_head = args.lm_head or default_lm_head(config)
    params = random_packed_params(config, lm_head=lm_head)
    context = max(512, -(-(args.position + 1) // 256) * 256)
    engine = Engine(config, params, IdTokenizer(), max_batch=max(widths), max_context=context, kv_cache=args.kv_cache)
    del params
    engine._temperature_b[:], engine._top_p_b[:] = args.temperature, args.top_p  # as a request sets its row's
    results = []
    for width in widths:
        rows = np.arange(width, dtype=np.int32)
        positions = np.full(width, args.position, np.int32)
        engine._run_step(rows, positions)  # compiles this width
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            engine._run_step(rows, positions)
            times.append(time.perf_counter() - start)
        results.append(dict(width=width, min_ms=1e3 * min(times), median_ms=1e3 * float(np.median(times))))
    one = next((r["median_ms"] for r in results if r["width"] == 1), None)
    sampling = "greedy" if args.temperature == 0 else f"temperature {args.temperature}, top_p {args.top_p}"
    print(
        f"{args.preset} ({config.weight_quant} scales), lm_head {lm_head}, {args.kv_cache} cache, "
        f"position {args.position}, {sampling}"
    )
    print("| width | min ms | median ms | tok/s | / one row |")
    print("|---:|---:|---:|---:|---:|")
    for r in results:
        ratio = f"{r['median_ms'] / one:.2f}x" if one else "-"
        tok_s = 1e3 * r["width"] / r["median_ms"]
        print(f"| {r['width']} | {r['min_ms']:.1f} | {r['median_ms']:.1f} | {tok_s:.1f} | {ratio} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                dict(
                    preset=args.preset,
                    weight_quant=config.weight_quant,
                    lm_head=lm_head,
                    kv_cache=args.kv_cache,
                    temperature=args.temperature,
                    top_p=args.top_p,
                    results=results,
                ),
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
