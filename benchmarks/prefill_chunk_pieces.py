"""Where a long prompt's prefill chunk spends its time, by chunk size: the serving engine's chunk
program (`_prefill_chunk_in_place`: a chunk of C tokens on a row's pages, its queries attending
in place) beside its two large pieces, each jitted and timed alone on the same random 2B4T weights:

  ternary matmuls   every BitLinear of the 30 layers on C activation rows (the kernels unpack
                    and read each layer's 2-bit weights once per call, whatever C is)
  attention         the FFI attention kernel of the 30 layers for C queries at positions
                    start..start+C-1 over an int8 paged cache (each query reads its own slots)
  rest              the chunk minus the two: norms, RoPE, the cache writes, the embedding lookup,
                    residuals, the head's skipped branch, dispatch

    python benchmarks/prefill_chunk_pieces.py [--chunks 64,256] [--starts 0,1024,1792] [--repeats 5]

Every figure is a median of --repeats calls, per token (ms / C), and each chunk size's beside the
last size's as a ratio; the sizes are timed in turn at each start, in one process.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from bitnet_jax.bench.profile import _chained, _median_ms, ternary_matmuls_ms
from bitnet_jax.bench.serve import random_packed_params, set_threads
from bitnet_jax.bench.server import IdTokenizer
from bitnet_jax.kernels import ffi
from bitnet_jax.kernels.ops import default_lm_head
from bitnet_jax.model.config import BitNetConfig
from bitnet_jax.serve import batching
from bitnet_jax.serve.generate import sampling_key


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="b1.58-2b4t")
    parser.add_argument("--chunks", default="64,256")
    parser.add_argument("--starts", default="0,1024,1792", help="the first position of the timed chunks")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    threads = set_threads(args.threads)
    chunks = [int(c) for c in args.chunks.split(",")]
    starts = [int(s) for s in args.starts.split(",")]
    config = BitNetConfig.preset(args.preset).replace(eos_token_id=None)
    context = -(-(max(starts) + max(chunks) + 1) // 256) * 256
    engine = batching.Engine(
        config,
        random_packed_params(config, lm_head=default_lm_head(config)),
        IdTokenizer(),
        max_batch=1,
        max_context=context,
        kv_cache="int8",
        prefill_chunk=min(chunks),
    )
    if not engine._chunks_in_place:
        raise SystemExit("this CPU's kernels do not attend chunks in place (no SIMD attention): nothing to time")
    serving = engine._serving
    # Random keys and values in every slot: a query at a late start reads written slots, as in
    # a real prompt (the pool's untouched pages would read as the zero page, from the cache).
    rng = np.random.default_rng(0)
    fill = lambda x: (
        rng.integers(-127, 128, x.shape, dtype=np.int8) if x.dtype == jnp.int8 else rng.uniform(0.01, 0.02, x.shape)
    )
    engine._cache = jax.tree.map(lambda x: jnp.asarray(fill(x), x.dtype), engine._cache)
    pages_p = np.arange(1, engine._pages_bp.shape[1] + 1, dtype=np.int32)  # the row's pages, in order
    layers_l = jnp.arange(config.num_hidden_layers, dtype=jnp.int32)

    @jax.jit
    def attention(q_1cnh, positions_1c, cache):
        def layer(q, index):
            out = ffi.decode_attention(
                q,
                cache.k_lbksh,
                cache.v_lbksh,
                index,
                positions_1c,
                k_scale_lbks=cache.k_scale_lbks,
                v_scale_lbks=cache.v_scale_lbks,
                cache_pages_bp=pages_p[None],
            )
            return _chained(q, out), None

        return jax.lax.scan(layer, q_1cnh, layers_l)[0]

    rows = []
    for start in starts:
        for c in chunks:
            # The whole chunk first: its cache fills the slots the attention piece then reads.
            whole = _chunk_ms(engine, config, pages_p, context, c, start, args.repeats, rng)
            mm = ternary_matmuls_ms(config, engine.params, serving, c, args.repeats, rng)
            q = jnp.asarray(rng.standard_normal((1, c, config.num_attention_heads, config.head_dim), np.float32))
            positions = jnp.asarray(start + np.arange(c, dtype=np.int32))[None]
            att = _median_ms(attention, (q, positions, engine._cache), args.repeats)
            rows.append((start, c, whole, mm, att))

    print(
        f"{args.preset}, int8 cache, {threads} threads, per token of a chunk (ms), "
        f"medians of {args.repeats}; (x) = beside chunks of {chunks[-1]} at the same start"
    )
    print("| start | chunk | chunk ms/token | ternary matmuls | attention | rest |")
    print("|---:|---:|---:|---:|---:|---:|")
    by_key = {(s, c): (w, m, a) for s, c, w, m, a in rows}
    for start, c, whole, mm, att in rows:
        ref = by_key[start, chunks[-1]]
        ref_c = chunks[-1]
        cells = []
        for value, ref_value in (
            (whole, ref[0]),
            (mm, ref[1]),
            (att, ref[2]),
            (whole - mm - att, ref[0] - ref[1] - ref[2]),
        ):
            cell = f"{value / c:.2f}"
            if c != ref_c and ref_value > 0:
                cell += f" ({(value / c) / (ref_value / ref_c):.2f}x)"
            cells.append(cell)
        print(f"| {start} | {c} | " + " | ".join(cells) + " |")


def _chunk_ms(engine, config, pages_p, context, c, start, repeats, rng) -> float:
    """Median ms of the engine's in-place chunk program for C tokens at `start`, after a warm-up
    (compile) call; the cache is donated and the returned one taken, as the engine runs it."""
    args = (pages_p, rng.integers(0, config.vocab_size, (1, c)).astype(np.int32), np.array([context], np.int32))
    args += (np.int32(start), np.zeros((1, config.vocab_size), np.float32), sampling_key(0))
    args += (np.float32(0), np.float32(1), None)
    times = []
    for i in range(repeats + 1):
        t = time.perf_counter()
        token, _, _, engine._cache = batching._prefill_chunk_in_place(
            engine._variables, engine._cache, *args, config=config, serving=engine._serving
        )
        jax.block_until_ready(token)
        if i:
            times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1e3


if __name__ == "__main__":
    main()
