"""The decode-attention FFI kernel alone, as a decoded token of the 2B4T shape calls it: one query
row, 30 layers (one jitted loop over the layer index, so no Python dispatch between layers),
20 query heads over 5 kv heads of dim 128, at a given context, on a float32 or int8 cache.
Prints the median time per token and the cache bytes it read per second. With --queries T, a
prefill chunk instead: T queries at the positions context - T .. context - 1, each attending its
own slots; it prints the time per chunk and per token and the multiply-adds a second (QK and PV).

    python benchmarks/decode_attention.py [--context 2080] [--cache int8|float32] [--queries 1] [--repeats 7]

Used for the A/B runs of xla_ffi/attention_kernel.cc (swap the extension between runs);
`bitnet-jax bench generate --profile` is the figure of record (the attention piece there also
holds the cache writes and the mask).
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from bitnet_jax.kernels import ffi

LAYERS, KV_HEADS, HEAD_DIM, HEADS = 30, 5, 128, 20


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=2080, help="slots each query attends (position + 1)")
    parser.add_argument("--cache", choices=("int8", "float32"), default="int8")
    parser.add_argument("--queries", type=int, default=1, help="query rows: 1 is a decode step, more a prefill chunk")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    if not 1 <= args.queries <= args.context:
        parser.error(f"--queries must be in [1, --context], got {args.queries}")
    slots = args.context + 32  # a cache longer than the context, as generate's
    rng = np.random.default_rng(0)
    shape = (LAYERS, 1, KV_HEADS, slots, HEAD_DIM)
    if args.cache == "int8":
        k, v = (jnp.asarray(rng.integers(-127, 128, shape, dtype=np.int8)) for _ in range(2))
        scales = [jnp.asarray(rng.uniform(0.01, 0.02, shape[:-1]).astype(np.float32)) for _ in range(2)]
    else:
        k, v = (jnp.asarray(rng.normal(size=shape).astype(np.float32)) for _ in range(2))
        scales = [None, None]
    q = jnp.asarray(rng.normal(size=(1, args.queries, HEADS, HEAD_DIM)).astype(np.float32))
    positions = jnp.arange(args.context - args.queries, args.context, dtype=jnp.int32)[None]

    @jax.jit
    def token(q, k, v, k_scale, v_scale):
        def layer(index, q):  # each layer's output feeds the next query, so no call is skipped
            out = ffi.decode_attention(q, k, v, index, positions, k_scale_lbks=k_scale, v_scale_lbks=v_scale)
            return q + 1e-3 * out

        return jax.lax.fori_loop(0, LAYERS, layer, q)

    token(q, k, v, *scales).block_until_ready()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        token(q, k, v, *scales).block_until_ready()
        times.append(time.perf_counter() - start)
    seconds = float(np.median(times))
    if args.queries > 1:
        attended = sum(range(args.context - args.queries + 1, args.context + 1))  # slots over the queries
        macs = LAYERS * HEADS * attended * HEAD_DIM * 2
        print(
            f"{args.cache} cache, {args.queries} queries ending at context {args.context}: {seconds * 1e3:.1f} ms "
            f"per chunk ({LAYERS} layers), {seconds / args.queries * 1e3:.2f} ms per token, "
            f"{macs / seconds / 1e9:.1f} G multiply-adds/s "
            f"(median of {args.repeats}; fastest {min(times) * 1e3:.1f} ms)"
        )
        return
    read = LAYERS * KV_HEADS * args.context * HEAD_DIM * 2 * k.dtype.itemsize
    print(
        f"{args.cache} cache, context {args.context}: {seconds * 1e3:.2f} ms per token ({LAYERS} layers), "
        f"{read / seconds / 1e9:.1f} GB/s of cache read (median of {args.repeats}; fastest {min(times) * 1e3:.2f} ms)"
    )


if __name__ == "__main__":
    main()
