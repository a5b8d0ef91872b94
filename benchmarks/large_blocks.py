"""What mapping large blocks apart (`host_memory.map_large_blocks`) costs the serving engine's
decode step: one process, glibc's mmap threshold switched between rounds, so that every setting
meets the same minutes of the host.

    python benchmarks/large_blocks.py [--widths 1,8] [--thresholds 32,4,1] [--rounds 6]
                                      [--temperature 0.8 --top-p 0.9]

Thresholds are in MiB; 32 is where glibc's moving default ends once a block that large has been
freed (blocks below it then come from the heap and stay there when freed). Each round sets each
threshold in turn, runs one step at each width (its temporary buffer allocated under the
setting) and times four more. Prints each width's median and min step per threshold, in ms, on
random 2B4T-shaped packed weights (no download), every row at position 200. glibc only.
"""

import argparse
import time

import numpy as np

from bitnet_jax.bench.serve import random_packed_params, set_threads
from bitnet_jax.bench.server import IdTokenizer
from bitnet_jax.kernels.ops import default_lm_head
from bitnet_jax.model.config import BitNetConfig
from bitnet_jax.serve.batching import Engine
from bitnet_jax.serve.host_memory import map_large_blocks


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="b1.58-2b4t")
    parser.add_argument("--widths", default="1,8")
    parser.add_argument("--thresholds", default="32,4,1", help="MiB, comma-separated")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-p", type=float, default=0.9)
    args = parser.parse_args()
    set_threads(args.threads)
    widths = [int(w) for w in args.widths.split(",")]
    thresholds = [int(t) for t in args.thresholds.split(",")]
    config = BitNetConfig.preset(args.preset).replace(eos_token_id=None)
    params = random_packed_params(config, lm_head=default_lm_head(config))
    engine = Engine(config, params, IdTokenizer(), max_batch=max(widths), max_context=512, kv_cache="int8")
    del params
    engine._temperature_b[:], engine._top_p_b[:] = args.temperature, args.top_p  # as a request sets its row's
    steps = {w: (np.arange(w, dtype=np.int32), np.full(w, 200, np.int32)) for w in widths}
    for rows, positions in steps.values():
        engine._run_step(rows, positions)  # compiles this width
    times = {(w, t): [] for w in widths for t in thresholds}
    for _ in range(args.rounds):
        for t in thresholds:
            if not map_large_blocks(t << 20):
                raise SystemExit("mallopt refused the threshold (not glibc?)")
            for w, (rows, positions) in steps.items():
                engine._run_step(rows, positions)
                for _ in range(4):
                    start = time.perf_counter()
                    engine._run_step(rows, positions)
                    times[(w, t)].append(time.perf_counter() - start)
    print(f"{args.preset}, int8 cache, temperature {args.temperature}, top_p {args.top_p}, {args.rounds} rounds")
    print("| width | threshold MiB | median ms | min ms |")
    print("|---:|---:|---:|---:|")
    for (w, t), ts in times.items():
        print(f"| {w} | {t} | {1e3 * np.median(ts):.1f} | {1e3 * min(ts):.1f} |")


if __name__ == "__main__":
    main()
