"""`bitnet_jax.generate`'s time to first token for long prompts, by the chunk it reads them in.

    python benchmarks/generate_prefill_chunk.py [--lengths 300,1100,2048] [--chunks 64,256] [--repeats 3]

Where the FFI kernel attends prefill chunks in place (AVX2, AVX-512), `generate` pads a prompt
longer than 256 tokens to a multiple of `generate.IN_PLACE_CHUNK` and reads it that many tokens a
chunk. This sets that constant to each of --chunks in turn, in one process on the same random
packed weights of a preset's shape (no download), and times one `generate` call of one new
token per prompt length and chunk, the chunks alternated within every repeat (a comparison within
one run, on a host whose speed drifts between runs). Each chunk's programs are compiled before
the timed calls. Prints the median time to first token, the prompt tokens a second it makes, the
tokens computed (the padded length) and each chunk's median beside the first's as a ratio.
"""

import argparse
import json
import time

import numpy as np
from long_prompt_prefill import ttft_table  # this folder: the script's own, first on sys.path

from bitnet_jax.bench.serve import random_packed_params, set_threads
from bitnet_jax.kernels.ops import default_lm_head
from bitnet_jax.model.config import BitNetConfig
from bitnet_jax.serve import generate as generate_module


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="b1.58-2b4t")
    parser.add_argument("--lengths", default="300,1100,2048")
    parser.add_argument("--chunks", default="64,256")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--kv-cache", default="int8", choices=("float32", "int8"))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    set_threads(args.threads)
    lengths = [int(n) for n in args.lengths.split(",")]
    chunks = [int(c) for c in args.chunks.split(",")]
    config = BitNetConfig.preset(args.preset).replace(eos_token_id=None)
    params = random_packed_params(config, lm_head=default_lm_head(config))
    rng = np.random.default_rng(0)
    prompts = {n: rng.integers(0, config.vocab_size, (1, n)).astype(np.int32) for n in lengths}
    padded = {}

    def first_token_s(chunk: int, length: int) -> float:
        generate_module.IN_PLACE_CHUNK = chunk
        padded[chunk, length] = generate_module.generate_prompt_length(
            config, params, length, backend="ffi", kv_cache=args.kv_cache
        )
        start = time.perf_counter()
        generate_module.generate(config, params, prompts[length], 1, backend="ffi", kv_cache=args.kv_cache)
        return time.perf_counter() - start

    default = generate_module.IN_PLACE_CHUNK
    times = {(c, n): [] for c in chunks for n in lengths}
    try:
        for chunk in chunks:
            for length in lengths:  # compiles each length's program for this chunk
                first_token_s(chunk, length)
        for _ in range(args.repeats):
            for length in lengths:
                for chunk in chunks:
                    times[chunk, length].append(first_token_s(chunk, length))
    finally:
        generate_module.IN_PLACE_CHUNK = default
    medians = {key: float(np.median(t)) for key, t in times.items()}
    print(f"{args.preset}, {args.kv_cache} cache, generate's in-place chunk of {', '.join(map(str, chunks))} tokens")
    print("\n".join(ttft_table(lengths, chunks, medians, computed=padded)))
    if args.json:
        with open(args.json, "w") as f:
            results = [
                dict(length=n, chunk=c, padded=padded[c, n], median_s=medians[c, n], times_s=times[c, n])
                for n in lengths
                for c in chunks
            ]
            json.dump(dict(preset=args.preset, kv_cache=args.kv_cache, results=results), f, indent=1)


if __name__ == "__main__":
    main()
