"""What an operand's layout costs XLA:CPU's dots, f32 and bf16, at a train step's shapes.

    python benchmarks/dot_layouts.py [--m 2048 --k 704 --n 256] [--repeats 15]

A train step's backward pass multiplies by transposed operands: BitLinear's dx = g @ W^T and
dW = x^T @ g. This times a linear layer's products (an [M, K] input x, a [K, N] kernel w, the
output's gradient g) in float32 and in bfloat16 with float32 accumulation
(`preferred_element_type`, as BitLinear asks), each backward product written two ways: with the
transpose spelled out (`jnp.dot(g, w.T)`) and as a `lax.dot_general` that contracts the operands
as they lie. Each is a jitted program of its own, interleaved round by round (medians). Beside
each: the element type its compiled dot runs in, read from the optimized HLO
(`bench.train.dot_operand_types`, which `bench train` prints for a whole step). XLA:CPU hands a
bfloat16 dot to its YNNPACK library only where no transpose stands in front of it and upcasts
the others to float32 (xla/backends/cpu/ynn_support.cc, `IsDotSupportedByYnn`): dx written as a
contraction runs in bfloat16, dW (the left operand's contracting dimension first) in float32
either way.

Prints one markdown table (benchmarks/RESULTS.md, "bfloat16 dots with a transposed operand").
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from bitnet_jax.bench.train import dot_operand_types


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--m", type=int, default=2048, help="rows: batch x sequence tokens")
    parser.add_argument("--k", type=int, default=704)
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    m, k, n = args.m, args.k, args.n

    rng = np.random.default_rng(0)
    x_mk = rng.standard_normal((m, k), np.float32)  # a linear layer's input
    w_kn = rng.standard_normal((k, n), np.float32)  # its kernel
    g_mn = rng.standard_normal((m, n), np.float32)  # the gradient of its output
    dot = functools.partial(jax.lax.dot_general, preferred_element_type=jnp.float32)
    f32 = jnp.float32
    forms = {  # name: (product, its operands), each written as the code might write it
        "forward: jnp.dot(x, w)": (lambda x, w: jnp.dot(x, w, preferred_element_type=f32), (x_mk, w_kn)),
        "dx: jnp.dot(g, w.T)": (lambda g, w: jnp.dot(g, w.T, preferred_element_type=f32), (g_mn, w_kn)),
        "dx: dot_general(g, w), N contracted": (lambda g, w: dot(g, w, (((1,), (1,)), ((), ()))), (g_mn, w_kn)),
        "dW: jnp.dot(x.T, g)": (lambda x, g: jnp.dot(x.T, g, preferred_element_type=f32), (x_mk, g_mn)),
        "dW: dot_general(x, g), M contracted": (lambda x, g: dot(x, g, (((0,), (0,)), ((), ()))), (x_mk, g_mn)),
    }
    cases = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        for form, (product, operands) in forms.items():
            fn = jax.jit(product)
            operands = tuple(jnp.asarray(a, dtype) for a in operands)
            jax.block_until_ready(fn(*operands))
            (runs_in,) = dot_operand_types(fn.lower(*operands).compile().as_text())  # one dot a program
            cases[jnp.dtype(dtype).name, form] = (fn, operands, runs_in)

    times = {key: [] for key in cases}
    for _ in range(args.repeats):
        for key, (fn, operands, _) in cases.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*operands))
            times[key].append(time.perf_counter() - start)

    flops = 2 * m * k * n
    print(f"M x K x N = {m} x {k} x {n}, {jax.devices()[0].device_kind}, median of {args.repeats} interleaved rounds\n")
    print("| operands | product | ms | GFLOP/s | vs forward | the compiled dot runs in |")
    print("|---|---|---:|---:|---:|---|")
    for dtype in ("float32", "bfloat16"):
        forward = float(np.median(times[dtype, next(iter(forms))]))
        for form in forms:
            median = float(np.median(times[dtype, form]))
            rate = flops / median / 1e9
            runs_in = cases[dtype, form][2]
            print(f"| {dtype} | {form} | {median * 1e3:.2f} | {rate:.0f} | {median / forward:.2f}x | {runs_in} |")


if __name__ == "__main__":
    main()
