"""What sampling a token costs the serving engine: `sample_rows` (the decode step's sampling) on
random logits over a vocabulary, with the top-k / top-p cuts in XLA ops (`ffi=False`) and by the
FFI kernel (`ffi=True`, `xla_ffi/sampling.cc`), side by side in one process, in alternated rounds.

    python benchmarks/sampling_cost.py [--rows 1,8] [--vocab 128256] [--scale 2] [--repeats 25] [--rounds 2]

Random normal logits times --scale: at 2 a top_p 0.9 nucleus holds tens of thousands of tokens
(random weights' flat rows), at 6 a few dozen, as a trained model's often does; a row whose cuts
keep at most `generate.NUCLEUS_TOKENS` draws its Gumbel noise for those alone on the FFI path.

Prints, per row count and sampling setting, each path's median ms over its rounds (the range of
the rounds' medians) and whether both drew the same tokens. Greedy and temperature-only rows take
no cut (the two paths run the same ops there).
"""

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from bitnet_jax.serve.batching import sample_rows

SETTINGS = (  # (name, temperature, top_p, top_k (0: none))
    ("greedy", 0.0, 1.0, 0),
    ("temperature 1", 1.0, 1.0, 0),
    ("temperature 0.8, top_p 0.9", 0.8, 0.9, 0),
    ("top_k 40, top_p 0.95", 0.8, 0.95, 40),
)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,8")
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--scale", type=float, default=2.0, help="the random logits' standard deviation")
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    paths = {name: jax.jit(functools.partial(sample_rows, ffi=ffi)) for name, ffi in (("xla", False), ("ffi", True))}
    print("| rows | sampling | cuts in XLA ops, ms | the kernel, ms | same tokens |")
    print("|---:|---|---:|---:|---|")
    for b in (int(r) for r in args.rows.split(",")):
        logits = jnp.asarray(rng.standard_normal((b, args.vocab), np.float32) * args.scale)
        keys = jnp.stack([jax.random.PRNGKey(i) for i in range(b)])
        for name, temperature, top_p, top_k in SETTINGS:
            operands = (
                logits,
                keys,
                jnp.full((b,), temperature, jnp.float32),
                jnp.full((b,), top_p, jnp.float32),
                jnp.full((b,), top_k, jnp.int32),
            )
            tokens = {path: np.asarray(fn(*operands)[0]) for path, fn in paths.items()}  # compiles
            medians = {path: [] for path in paths}
            for _ in range(args.rounds):
                for path, fn in paths.items():
                    times = []
                    for _ in range(args.repeats):
                        start = time.perf_counter()
                        fn(*operands)[0].block_until_ready()
                        times.append(time.perf_counter() - start)
                    medians[path].append(1e3 * float(np.median(times)))
            cells = [f"{np.median(m):.2f} ({min(m):.2f}-{max(m):.2f})" for m in medians.values()]
            same = np.array_equal(tokens["xla"], tokens["ffi"])
            print(f"| {b} | {name} | {cells[0]} | {cells[1]} | {'yes' if same else 'no'} |")


if __name__ == "__main__":
    main()
