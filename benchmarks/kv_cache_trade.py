"""What the int8 KV cache costs on a *trained* model, against the float32 cache.

    python benchmarks/kv_cache_trade.py RUN_DIR [TEXT_FILE ...]

Loads a `bitnet-jax train` run and packs it (the serving default lm_head). On held-out text
(default: this repository's README, which no run trains on) it feeds each window of tokens one at
a time through decode steps, so that every position attends over the cache as decoding does, once
with a float32 cache and once with an int8 one (`KVCache.zeros(..., jnp.int8)`: codes and a scale
per slot and kv head). It reports the relative logit error of the int8 cache against the float32
one, next-token argmax agreement, and how many greedy continuations (64 tokens after each of 16
prompts, `generate(..., kv_cache=...)`) are identical.
"""

import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from bitnet_jax import generate
from bitnet_jax.model.serving_layers import serving_variables
from bitnet_jax.model.transformer import BitNetLM, KVCache
from bitnet_jax.serve.generate import serving_params
from bitnet_jax.serve.pack import pack
from bitnet_jax.train.run_folder import load_run


@functools.partial(jax.jit, static_argnames=("config", "serving"))
def decode_logits(variables, ids_bt, *, config, serving):
    """Logits [B, T, V] of ids fed one token per decode step through a cache of `serving.kv_cache`."""
    model = BitNetLM(config, serving)
    b, t = ids_bt.shape
    cache = KVCache.zeros(config, b, t, dtype=jnp.dtype(serving.kv_cache))

    def step(cache, i):
        token_b1 = jax.lax.dynamic_slice_in_dim(ids_bt, i, 1, axis=1)
        logits_b1v, cache = model.apply(variables, token_b1, positions_bt=jnp.full((b, 1), i), cache=cache)
        return cache, logits_b1v[:, 0]

    _, logits_tbv = jax.lax.scan(step, cache, jnp.arange(t))
    return jnp.swapaxes(logits_tbv, 0, 1)


def main(run_dir: str, texts: list[str]):
    run, params, tokenizer = load_run(run_dir)
    config = run.model
    packed = pack(config, params)
    ids = np.concatenate([tokenizer.encode(Path(t).read_text()) for t in texts])
    seq = min(256, config.max_position_embeddings)
    windows = ids[: (len(ids) // seq) * seq].reshape(-1, seq)[:16]
    prompts = [list(w[:32]) for w in windows]
    logits, greedy = {}, {}
    for kv_cache in ("float32", "int8"):
        _, serving = serving_params(config, packed, "ffi", kv_cache)
        logits[kv_cache] = np.asarray(decode_logits(serving_variables(packed), windows, config=config, serving=serving))
        greedy[kv_cache] = generate(config, packed, prompts, 64, kv_cache=kv_cache)
    ref, got = logits["float32"], logits["int8"]
    print(
        f"{run_dir}: {config.num_hidden_layers} layers x {config.hidden_size}, {config.num_key_value_heads} kv heads "
        f"of {config.head_dim}; {windows.size} held-out tokens from {', '.join(texts)}, decoded one at a time\n"
    )
    print("| KV cache | relative logit error | argmax agreement | identical greedy continuations (64 tokens) |")
    print("|---|---:|---:|---:|")
    err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    agree = np.mean(got.argmax(-1) == ref.argmax(-1))
    same = int(np.sum(np.all(greedy["int8"] == greedy["float32"], axis=1)))
    print(f"| int8 vs float32 | {err:.2%} | {agree:.1%} | {same} of {len(prompts)} |")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:] or [str(Path(__file__).resolve().parents[1] / "README.md")])
