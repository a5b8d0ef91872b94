"""How long a decoding stream waits while the serving engine reads another request's long prompt.

    python benchmarks/long_prompt_stall.py [--prompt-tokens 2048] [--kv-cache int8]

Random 2B4T-shaped packed weights (`bench.serve.random_packed_params`, the serving default head)
in a `serve.batching.Engine` with 2 slots. Request A (a short prompt, greedy, many tokens) starts
decoding; request B with a long prompt arrives once A has streamed `--warm-tokens` tokens. Prints
the time to B's first token and A's gaps between tokens: the median, the longest, and those over
1 s (the engine reading B's prompt). B's prompt length is compiled once beforehand (by a B-sized request
alone), so no compile is in the numbers.
"""

import argparse
import threading
import time

import numpy as np


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-tokens", type=int, default=2048)
    parser.add_argument("--kv-cache", default="int8")
    parser.add_argument("--warm-tokens", type=int, default=8)
    parser.add_argument("--prefill-chunk", type=int, default=256, help="the engine's prefill_chunk")
    args = parser.parse_args()

    from bitnet_jax.bench.serve import random_packed_params
    from bitnet_jax.bench.server import IdTokenizer
    from bitnet_jax.kernels.ops import default_lm_head
    from bitnet_jax.model.config import BitNetConfig
    from bitnet_jax.serve.batching import Engine, GenerationRequest, wait_idle

    config = BitNetConfig.preset("b1.58-2b4t").replace(eos_token_id=None)
    params = random_packed_params(config, lm_head=default_lm_head(config))

    context = -(-(args.prompt_tokens + 64) // 256) * 256
    engine = Engine(
        config,
        params,
        IdTokenizer(),
        max_batch=2,
        max_context=context,
        kv_cache=args.kv_cache,
        prefill_chunk=args.prefill_chunk,
    )
    engine.start()
    rng = np.random.default_rng(0)
    long_prompt = tuple(int(i) for i in rng.integers(0, config.vocab_size, args.prompt_tokens))
    t0 = time.perf_counter()
    engine.submit(GenerationRequest(long_prompt, 1), lambda e: None)  # compiles this prompt length
    assert wait_idle(engine, timeout=3600)
    print(f"compile and first prefill of {args.prompt_tokens} tokens alone: {time.perf_counter() - t0:.1f} s")

    a_times, b_first = [], []
    a_done = threading.Event()

    def on_a(event):
        a_times.extend([time.perf_counter()] * max(1, len(event.token_ids)))
        if event.finish_reason:
            a_done.set()

    engine.submit(GenerationRequest((1, 2, 3, 4), 60), on_a)
    while len(a_times) < args.warm_tokens:
        time.sleep(0.005)
    b_sent = time.perf_counter()
    engine.submit(GenerationRequest(long_prompt, 4), lambda e: b_first or b_first.append(time.perf_counter()))
    a_done.wait(3600)
    wait_idle(engine, timeout=3600)
    engine.stop()

    gaps = np.diff(np.array(a_times))
    slow = gaps[gaps > 1.0]
    print(f"B's first token {b_first[0] - b_sent:.1f} s after it arrived ({args.prompt_tokens}-token prompt)")
    print(f"A's gaps between tokens: median {np.median(gaps):.3f} s, longest {gaps.max():.2f} s")
    print(f"A's gaps over 1 s: {len(slow)}, {slow.sum():.1f} s in all")


if __name__ == "__main__":
    main()
