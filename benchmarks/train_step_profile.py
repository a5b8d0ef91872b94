"""Where a QAT train step's time goes on CPU, beside the same model in full precision.

    python benchmarks/train_step_profile.py [--config configs/tiny.py] [--set KEY=VALUE ...] [--repeats 5]

Two measurements of the run's model with its quantizers (QAT) and with them off (FP), on one
device, f32 or the run's compute dtype:

1. Interleaved medians of three jitted programs per side: the forward pass alone (the loss), the
   forward and backward pass (`jax.value_and_grad` of the loss), and the whole train step (that
   plus gradient clipping and AdamW: `train.step.make_train_step`, donated, as `bench train`
   times it). Backward = the second minus the first; the optimizer = the third minus the second.
   Interleaved with them: every matmul of the step alone (`step_matmuls`: the same shapes and
   dtype, as many FLOPs as `bench.train.train_step_flops` counts, in one program) and one
   1024 x 1024 x 1024 dot, which `bench train` takes for the peak on a 2-core CPU.
2. A `jax.profiler` trace of a few whole steps per side: the thread time of each XLA op (a fused
   kernel or a dot), grouped by what it computes, as named by the op's `op_name` metadata in the
   compiled HLO (the Flax module path: `q_proj`, `self_attn`, ...). Thread time adds up XLA's
   threads and every layer of the scan, so read the shares; they do not add up to wall time.

Prints two markdown tables (benchmarks/RESULTS.md, "Training throughput").
"""

from __future__ import annotations

import argparse
import collections
import glob
import re
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from bitnet_jax.bench.train import full_precision, random_batch, train_step_flops
from bitnet_jax.model.transformer import BitNetLM, init_params
from bitnet_jax.train.run_config import load_run_config
from bitnet_jax.train.step import make_optimizer, make_train_step, training_loss

PARTS = (
    "BitLinear: matmuls (fwd + bwd)",
    "BitLinear: quantizers, rescale, casts",
    "lm_head: matmuls",
    "attention: QK^T and PV matmuls",
    "attention: RoPE, mask, softmax",
    "RMSNorms",
    "MLP: squared ReLU x up",
    "scan: zero-filling stacked residual buffers",
    "scan: layer slices, residual copies",
    "loss (softmax over V), embedding, optimizer, other",
)


def part_of(name: str, op_name: str, opcode: str, is_dot: bool) -> str:
    """The PARTS entry of an XLA op, from its name, op_name metadata and opcode."""
    if re.search(r"/(q|k|v|o|gate|up|down)_proj(/|$)", op_name):
        return PARTS[0] if is_dot else PARTS[1]
    if "embed_tokens.attend" in op_name or "tied_logits" in op_name or "lm_head" in op_name:
        return PARTS[2] if is_dot else PARTS[9]
    if "self_attn/" in op_name and "sub_norm" not in op_name:
        return PARTS[3] if is_dot else PARTS[4]
    if "norm/" in op_name or op_name.endswith("norm"):
        return PARTS[5]
    if "mlp/" in op_name:
        return PARTS[6]
    # Outside the layers, a broadcast of a constant: the buffer a scan stacks per-layer
    # residuals into, filled (with zeros) before the loop overwrites it.
    if name.startswith("wrapped_broadcast"):
        return PARTS[7]
    scan_ops = ("copy", "broadcast", "dynamic-slice", "dynamic-update-slice", "while", "tuple", "bitcast")
    if "index_in_dim" in op_name or "while" in op_name or (not op_name and opcode in scan_ops):
        return PARTS[8]
    if not op_name and name.startswith(("copy", "wrapped_copy")):
        return PARTS[8]
    return PARTS[9]


def hlo_ops(hlo_text: str) -> dict[str, str]:
    """{instruction name: PARTS entry} for every instruction of a compiled HLO module."""
    with_dot, current, rows = set(), None, []
    for line in hlo_text.splitlines():
        head = re.match(r"^(?:ENTRY )?%(\S+) .*\{$", line)
        if head:
            current = head.group(1)
            continue
        instr = re.match(r"^\s*(?:ROOT )?%(\S+) = (.*)$", line)
        if not instr:
            continue
        rest = instr.group(2)
        if rest.startswith("("):  # a tuple type: skip to its closing parenthesis
            depth = 0
            for i, ch in enumerate(rest):
                depth += ch == "("
                depth -= ch == ")"
                if depth == 0:
                    rest = rest[i + 1 :]
                    break
        opcode = rest.strip().split(" ", 1)[-1].split("(", 1)[0]
        if opcode in ("dot", "convolution"):
            with_dot.add(current)
        calls = re.search(r"calls=%([\w.\-]+)", line)
        op_name = re.search(r'op_name="([^"]*)"', line)
        rows.append((instr.group(1), opcode, calls and calls.group(1), op_name.group(1) if op_name else ""))
    return {
        name: part_of(name, op_name, opcode, opcode in ("dot", "convolution") or called in with_dot)
        for name, opcode, called, op_name in rows
    }


def traced_parts(compiled, state, batch, steps: int) -> tuple[dict[str, float], tuple]:
    """Thread ms per step of each PARTS entry over `steps` traced calls of `compiled`."""
    parts = hlo_ops(compiled.as_text())
    with tempfile.TemporaryDirectory() as folder:
        jax.profiler.start_trace(folder)
        for _ in range(steps):
            *state, loss = compiled(*state, batch)
            jax.block_until_ready(loss)
        jax.profiler.stop_trace()
        (path,) = glob.glob(f"{folder}/**/*.xplane.pb", recursive=True)
        profile = jax.profiler.ProfileData.from_file(path)
    ms = collections.Counter()
    for plane in profile.planes:
        for line in plane.lines:
            for event in line.events:
                if event.name in parts:
                    ms[parts[event.name]] += event.duration_ns / 1e6 / steps
    return dict(ms), tuple(state)


def step_matmuls(config, batch_size: int, seq_len: int, dtype):
    """(a jitted function of no arguments' operands, the operands, its FLOPs): every product of a
    train step, forward and backward, at the step's shapes. M = B * T rows; per linear layer
    [K, N] the forward x W, dX = g W^T and dW = x^T g; per layer, attention's Q K^T and P V and
    their four backward products, batched over B * N; the lm_head like a linear layer."""
    c, m = config, batch_size * seq_len
    t, h, bn = seq_len, c.head_dim, batch_size * c.num_attention_heads
    linears = [kn for block in c.linear_shapes.values() for kn in block.values()] * c.num_hidden_layers
    linears.append((c.hidden_size, c.vocab_size))
    products = []  # [(a shape, b shape)], batched over a leading axis
    for k, n in linears:
        products += [((1, m, k), (1, k, n)), ((1, m, n), (1, n, k)), ((1, k, m), (1, m, n))]
    for _ in range(c.num_hidden_layers):
        products += [((bn, t, h), (bn, h, t))] * 2 + [((bn, t, t), (bn, t, h))] * 4
    rng = np.random.default_rng(0)
    operands = [
        tuple(jnp.asarray(rng.standard_normal(shape, np.float32), dtype) for shape in pair) for pair in products
    ]
    flops = sum(2 * a[0] * a[1] * a[2] * b[2] for a, b in products)

    def run(operands):
        return [jnp.einsum("bmk,bkn->bmn", a, b, preferred_element_type=jnp.float32) for a, b in operands]

    return jax.jit(run), operands, flops


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/tiny.py")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--trace-steps", type=int, default=3)
    args = parser.parse_args()

    run = load_run_config(args.config, args.set)
    sides = {"QAT": run.model, "FP": full_precision(run.model)}
    batch = random_batch(run)
    optimizer = make_optimizer(run)
    dtype = run.compute_dtype
    programs, states = {}, {}
    for side, config in sides.items():
        model = BitNetLM(config, remat=run.remat, scan_layers=run.scan_layers)
        loss = lambda p, b, model=model: training_loss(p, model, b, run.z_loss, dtype)[0]
        params = init_params(config)
        states[side] = (params, jax.jit(optimizer.init)(params))
        step = make_train_step(model, optimizer, z_loss=run.z_loss, compute_dtype=dtype, donate=True)
        programs[side] = {
            "forward": jax.jit(loss),
            "forward + backward": jax.jit(jax.value_and_grad(loss)),
            "whole step": step.lower(*states[side], batch).compile(),
        }

    matmuls, operands, flops = step_matmuls(run.model, run.batch_size, run.seq_len, dtype)
    assert flops == train_step_flops(run.model, run.batch_size, run.seq_len), "step_matmuls counts another model"
    square = [np.ones((1, 1024, 1024), np.float32).astype(dtype)] * 2
    extras = {
        "the step's matmuls alone": (matmuls, (operands,), flops),
        "one 1024^3 dot": (jax.jit(lambda a, b: jnp.einsum("bmk,bkn->bmn", a, b)), square, 2 * 1024**3),
    }

    def call(side, what):
        start = time.perf_counter()
        if side is None:
            fn, fn_args, _ = extras[what]
            jax.block_until_ready(fn(*fn_args))
            return time.perf_counter() - start
        if what == "whole step":
            *state, loss = programs[side][what](*states[side], batch)
            states[side] = tuple(state)
        else:
            loss = programs[side][what](states[side][0], batch)
        jax.block_until_ready(loss)
        return time.perf_counter() - start

    order = [(side, what) for what in programs["QAT"] for side in sides] + [(None, what) for what in extras]
    for key in order:  # compile, warm up
        call(*key), call(*key)
    times = collections.defaultdict(list)
    for _ in range(args.repeats):
        for key in order:
            times[key].append(call(*key) * 1e3)
    ms = {key: float(np.median(t)) for key, t in times.items()}

    m = run.model
    print(
        f"{m.num_hidden_layers} layers x {m.hidden_size} wide, vocab {m.vocab_size}, batch {run.batch_size} x "
        f"{run.seq_len}, {dtype}, median of {args.repeats} interleaved runs\n"
    )
    print("| program | QAT (ms) | FP (ms) | QAT / FP |\n|---|---:|---:|---:|")
    rows = [(what, ms["QAT", what], ms["FP", what]) for what in programs["QAT"]]
    fb, f, s = "forward + backward", "forward", "whole step"
    rows += [
        ("backward (= fwd+bwd - fwd)", ms["QAT", fb] - ms["QAT", f], ms["FP", fb] - ms["FP", f]),
        ("clip + AdamW (= step - fwd+bwd)", ms["QAT", s] - ms["QAT", fb], ms["FP", s] - ms["FP", fb]),
    ]
    for what, qat, fp in rows:
        print(f"| {what} | {qat:.1f} | {fp:.1f} | {qat / fp:.2f}x |")
    print()
    for what, (_, _, what_flops) in extras.items():
        rate = what_flops / 1e9 / (ms[None, what] / 1e3)
        print(f"{what}: {what_flops / 1e9:.3g} GFLOP in {ms[None, what]:.1f} ms, {rate:.1f} GFLOP/s")

    traced = {}
    for side in sides:
        traced[side], states[side] = traced_parts(programs[side]["whole step"], states[side], batch, args.trace_steps)
    print(f"\nXLA op thread time per whole step, traced over {args.trace_steps} steps per side:\n")
    print("| part | QAT (ms) | QAT share | FP (ms) | FP share |\n|---|---:|---:|---:|---:|")
    totals = {side: sum(traced[side].values()) for side in sides}
    for part in PARTS:
        qat, fp = traced["QAT"].get(part, 0.0), traced["FP"].get(part, 0.0)
        print(f"| {part} | {qat:.0f} | {100 * qat / totals['QAT']:.0f}% | {fp:.0f} | {100 * fp / totals['FP']:.0f}% |")
    print(f"| total | {totals['QAT']:.0f} | | {totals['FP']:.0f} | |")


if __name__ == "__main__":
    main()
