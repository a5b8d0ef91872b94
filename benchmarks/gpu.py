"""What bitnet-jax does on an NVIDIA GPU, measured in one run against the GPU's own limits.

    PYTHONPATH=. python benchmarks/gpu.py [--out DIR] [--skip train,serve,kernels]

Needs no compiled extension (nothing here uses the CPU FFI kernels), so it runs from a source
checkout on a machine whose JAX sees a GPU. Every figure is measured in this run:

1. limits: HBM read bandwidth (a jitted int32 sum over 4 GiB, median of 7) and the XLA matmul
   peak in bf16 and f32 (`bench.train.matmul_peak`);
2. kernels: the ternary matmul of each 2B4T projection (decode, M = 1, and a 128-token prefill
   chunk) on the XLA integer path and on the Pallas kernel, exact against each other, timed as
   30 layers read at their index inside one jitted loop (as a decode step reads them), with GB/s
   of packed weights against the HBM bandwidth, beside what the loop alone costs per layer;
3. exact: greedy tokens of both packed backends on the same weights, which must be equal;
   serve: `bench_generate` on the 2B4T shape (random weights, prompt 128, 64 new tokens) for
   the XLA integer path, the Pallas kernel and dense bf16 weights, decode against the roofline
   (bandwidth / bytes a token reads);
4. train: `bench_train` MFU of QAT and the full-precision baseline in bf16 against the
   measured matmul peaks, for the 700M preset's shape at 8 x 1024 tokens (--train-preset,
   --train-batch).

Prints markdown tables and writes gpu.json to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from bitnet_jax.bench.serve import bench_generate, time_calls
from bitnet_jax.bench.train import bench_train, matmul_peak
from bitnet_jax.kernels import layout, ops
from bitnet_jax.model.config import BitNetConfig
from bitnet_jax.train.run_config import RunConfig


def _median_s(fn, repeats: int) -> float:
    return float(np.median(time_calls(fn, repeats)))


def read_gb_s(nbytes: int = 4 << 30) -> float:
    x = jnp.ones((nbytes // 4,), jnp.int32)
    total = jax.jit(lambda x: jnp.sum(x))
    return nbytes / _median_s(lambda: total(x), 7) / 1e9


def limits() -> dict:
    out = {"device": jax.devices()[0].device_kind, "read_gb_s": read_gb_s()}
    for dtype in ("bfloat16", "float32"):
        out[f"matmul_{dtype}_tflops"] = matmul_peak(dtype).gflops / 1e3
    return out


def kernels(read: float, preset: str, layers: int = 30) -> list[dict]:
    """Per projection and M: the XLA integer path against the Pallas kernel on the same stacked
    weights, one loop over the layers per call (as the decode scan reads them)."""
    config = BitNetConfig.preset(preset)
    rng = np.random.default_rng(0)
    rows = []
    shapes = {(k, n) for block in config.linear_shapes.values() for k, n in block.values()}
    # What the loop itself costs per layer (a trivial body reading the layer's scale), so that
    # the kernels' own times can be told from it.
    scale = jnp.full((layers, 1), 0.02, jnp.float32)
    empty = jax.jit(lambda s: jax.lax.fori_loop(0, layers, lambda i, acc: acc + s[i], jnp.zeros((1,), jnp.float32)))
    loop_us = _median_s(lambda: empty(scale), 5) / layers * 1e6
    print(json.dumps({"loop_us_per_layer": loop_us}), flush=True)
    for k, n in sorted(shapes):
        g, row_bytes = layout.packed_ternary_shape(n, k)
        w = jnp.asarray(rng.integers(0, 256, (layers, g, row_bytes), dtype=np.uint8) & 0b10101010)  # codes 0 / 2
        for m in (1, 8, 128):
            x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
            results = {}
            for backend in ("xla", "pallas"):

                def run(x, w, scale, backend=backend):
                    def body(i, acc):
                        return acc + ops.ternary_linear(x, w, scale, n, 8, backend, i)

                    return jax.lax.fori_loop(0, layers, body, jnp.zeros((m, n), jnp.float32))

                call = jax.jit(run)
                results[backend] = (np.asarray(call(x, w, scale)), _median_s(lambda call=call: call(x, w, scale), 5))
            per_layer_s = {b: t / layers for b, (_, t) in results.items()}
            gb_s = {b: g * row_bytes / s / 1e9 for b, s in per_layer_s.items()}
            rows.append(
                {
                    "k": k,
                    "n": n,
                    "m": m,
                    "loop_us": loop_us,
                    "exact": bool(np.array_equal(results["xla"][0], results["pallas"][0])),
                    "xla_us": per_layer_s["xla"] * 1e6,
                    "pallas_us": per_layer_s["pallas"] * 1e6,
                    "xla_gb_s": gb_s["xla"],
                    "pallas_gb_s": gb_s["pallas"],
                    "pallas_of_read": gb_s["pallas"] / read,
                    "int8_tops_pallas": 2 * m * k * n / per_layer_s["pallas"] / 1e12,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def serving_exact(preset: str) -> dict:
    """Greedy tokens of the XLA integer path and of the Pallas kernel on the same random packed
    weights: every logit is the same float on both, so the tokens must be equal."""
    from bitnet_jax.bench.serve import random_packed_params
    from bitnet_jax.kernels.ops import default_lm_head
    from bitnet_jax.serve.generate import generate

    config = BitNetConfig.preset(preset)
    params = random_packed_params(config, lm_head=default_lm_head(config))
    prompt = np.random.default_rng(1).integers(0, config.vocab_size, (2, 40))
    tokens = {b: np.asarray(generate(config, params, prompt, 12, backend=b)) for b in ("xla", "pallas")}
    out = {"equal": bool(np.array_equal(tokens["xla"], tokens["pallas"])), "xla": tokens["xla"].tolist()}
    print(json.dumps(out), flush=True)
    return out


def serve(read: float, preset: str, backends: list[str]) -> list[dict]:
    config = BitNetConfig.preset(preset)
    rows = []
    for backend in backends:
        extra = {"xla_dtype": "bfloat16"} if backend == "xla" else {}
        r = bench_generate(config, backend, prompt_tokens=128, new_tokens=64, repeats=3, **extra)
        row = dataclasses.asdict(r)
        row["gpu_roofline_tok_s"] = read * 1e3 / r.mb_per_token
        row["decode_of_gpu_roofline"] = r.decode_tok_s / row["gpu_roofline_tok_s"]
        row.pop("profile", None)
        rows.append(row)
        keys = ("backend", "prefill_tok_s", "decode_tok_s", "mb_per_token", "gpu_roofline_tok_s")
        print(json.dumps({k: row[k] for k in keys}), flush=True)
    return rows


def train(preset: str, batch: int, seq: int) -> list[dict]:
    run = RunConfig.from_dict(
        {"model": {"preset": preset}, "batch_size": batch, "seq_len": seq, "compute_dtype": "bfloat16"},
        source="benchmarks/gpu.py",
    )
    rows = []
    for t in bench_train(run, repeats=5):
        row = dataclasses.asdict(t)
        row.pop("peaks")
        row.update(preset=preset, batch=batch, seq_len=seq, peaks=[dataclasses.asdict(p) for p in t.peaks])
        rows.append(row)
        keys = ("preset", "name", "compute_dtype", "median_ms", "tokens_per_s", "gflops", "mfu_f32", "mfu_bf16")
        print(json.dumps({k: row[k] for k in keys}), flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: kernels, exact, serve, train")
    parser.add_argument("--preset", default="b1.58-2b4t", help="the model shape of kernels and serve")
    parser.add_argument("--serve-backends", default="xla-packed,pallas,xla", help="bench_generate backends")
    parser.add_argument("--train-preset", default="b1.58-700m")
    parser.add_argument("--train-batch", default="8x1024", help="batch x sequence length of the train steps")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    print(f"jax {jax.__version__}, devices {jax.devices()}", flush=True)
    report = {"jax": jax.__version__, "limits": limits()}
    print(json.dumps(report["limits"]), flush=True)
    read = report["limits"]["read_gb_s"]
    batch, seq = map(int, args.train_batch.split("x"))
    parts = {
        "kernels": lambda: kernels(read, args.preset),
        "exact": lambda: serving_exact(args.preset),
        "serve": lambda: serve(read, args.preset, args.serve_backends.split(",")),
        "train": lambda: train(args.train_preset, batch, seq),
    }
    failed = False
    for name, part in parts.items():
        if name in skip:
            continue
        try:
            report[name] = part()
        except Exception:  # one part failing still reports the others
            traceback.print_exc()
            report[name] = {"error": traceback.format_exc()[-4000:]}
            failed = True
        with open(os.path.join(args.out, "gpu.json"), "w") as f:
            json.dump(report, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
