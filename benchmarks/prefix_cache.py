"""A conversation's turns through the serving engine, with and without `prefix_cache`: each turn's
prompt is the history so far (the last prompt and its reply) plus `--turn-tokens` new tokens, as
an OpenAI client resends it. Random packed weights of a preset's shape (no download), the
engine's programs compiled in a child as `bitnet-jax serve` runs it.

    python benchmarks/prefix_cache.py [--first 1500] [--turn-tokens 40] [--turns 4] [--reply 32]

Prints each turn's prompt length and time to first token, with the prefix cache and without.
"""

import argparse
import json
import threading
import time

import numpy as np

from bitnet_jax.bench.serve import random_packed_params, set_threads
from bitnet_jax.bench.server import IdTokenizer
from bitnet_jax.kernels.ops import default_lm_head
from bitnet_jax.model.config import BitNetConfig
from bitnet_jax.serve.batching import Engine, GenerationRequest


def conversation(engine, rng, vocab: int, first: int, turn_tokens: int, turns: int, reply: int) -> list[dict]:
    history, rows = (), []
    for turn in range(turns):
        prompt = history + tuple(int(i) for i in rng.integers(0, vocab, first if turn == 0 else turn_tokens))
        done, start, times, ids = threading.Event(), time.perf_counter(), [], []

        def on_event(event, times=times, ids=ids, done=done, start=start):
            times.append(time.perf_counter() - start)
            ids.extend(event.token_ids)
            if event.finish_reason:
                done.set()

        engine.submit(GenerationRequest(prompt, reply), on_event)
        done.wait()
        rows.append(dict(turn=turn, prompt_tokens=len(prompt), ttft_s=times[0], reply_s=times[-1]))
        history = prompt + tuple(ids)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="b1.58-2b4t")
    parser.add_argument("--first", type=int, default=1500, help="the first turn's prompt tokens")
    parser.add_argument("--turn-tokens", type=int, default=40, help="new tokens in each later turn")
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--reply", type=int, default=32, help="tokens of each reply")
    parser.add_argument("--prefill-chunk", type=int, default=None, help="the engine's prefill_chunk (its default)")
    parser.add_argument(
        "--baseline",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run the conversation without the prefix cache (default: on)",
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    set_threads(args.threads)
    config = BitNetConfig.preset(args.preset).replace(eos_token_id=None)
    params = random_packed_params(config, lm_head=default_lm_head(config))
    context = -(-(args.first + (args.turns - 1) * args.turn_tokens + args.turns * args.reply + 1) // 256) * 256
    results = {}
    for cached in (True, False) if args.baseline else (True,):
        engine = Engine(
            config,
            params,
            IdTokenizer(),
            max_batch=1,
            max_context=context,
            kv_cache="int8",
            in_child=True,
            prefix_cache=cached,
            prefill_chunk=args.prefill_chunk,
        )
        engine.start()
        try:
            # The same lengths once first (other tokens): every program they run is compiled.
            shape = (args.first, args.turn_tokens, args.turns, args.reply)
            conversation(engine, np.random.default_rng(1), config.vocab_size, *shape)
            rng = np.random.default_rng(0)
            results[cached] = conversation(
                engine, rng, config.vocab_size, args.first, args.turn_tokens, args.turns, args.reply
            )
        finally:
            engine.stop()
    print(f"{args.preset}, int8 cache, context {context}, chunks of {engine.prefill_chunk} tokens")
    print("| turn | prompt tokens | TTFT with prefix cache s | TTFT without s |")
    print("|---:|---:|---:|---:|")
    for with_, without in zip(results[True], results.get(False, [{"ttft_s": float("nan")}] * args.turns)):
        print(f"| {with_['turn']} | {with_['prompt_tokens']} | {with_['ttft_s']:.2f} | {without['ttft_s']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"prefix_cache": results[True], "none": results.get(False)}, f, indent=1)


if __name__ == "__main__":
    main()
