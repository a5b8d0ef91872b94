"""Benchmarks measured side by side in one process: `bitnet-jax bench train`.

Timings are medians over interleaved repeats (A, B, A, B, ...), so drift on a shared machine
hits both sides alike; ratios compare the two sides of one run, never numbers from another run.
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import numpy as np

from bitnet_jax.errors import BitNetError
from bitnet_jax.model.transformer import BitNetLM
from bitnet_jax.train.run_config import RunConfig


@dataclasses.dataclass(frozen=True)
class StepTiming:
    name: str  # "qat" or "fp"
    weight_quant: str
    act_quant: str
    act_bits: int
    median_ms: float
    tokens_per_s: float
    times_ms: tuple[float, ...]


def bench_train(run: RunConfig, *, repeats: int = 5, warmup: int = 2, seed: int = 0) -> list[StepTiming]:
    """Train-step time of the run's model with its quantization (QAT) and with quantization off
    (the same model as a full-precision baseline), on the same random batch of the run's shape.

    Both sides run as `bitnet-jax train` runs them: on the run's mesh (`RunConfig.mesh`, e.g.
    several simulated CPU devices), with its shardings, and donating parameters and optimizer
    state to each step. Each side is compiled and warmed up first; then the two steps alternate
    `repeats` times.
    """
    from bitnet_jax.train import sharding
    from bitnet_jax.train.step import make_optimizer, make_train_step

    if repeats < 1 or warmup < 0:
        raise BitNetError(
            f"bench_train: repeats={repeats}, warmup={warmup}; expected repeats >= 1 "
            "(timed steps per side) and warmup >= 0."
        )
    fp_model = run.model.replace(weight_quant="none", act_quant="none")
    sides = {"qat": run.model, "fp": fp_model}
    rng = np.random.default_rng(seed)
    shape = (run.batch_size, run.seq_len)
    batch = {
        "inputs": rng.integers(0, run.model.vocab_size, shape, dtype=np.int32),
        "targets": rng.integers(0, run.model.vocab_size, shape, dtype=np.int32),
        "segment_ids": np.ones(shape, np.int32),
    }
    optimizer = make_optimizer(run)
    mesh = sharding.make_mesh(run.mesh)
    sharding.check_batch(run.batch_size, run.grad_accum_steps, mesh)
    states = {}
    for name, config in sides.items():
        model = BitNetLM(config, remat=run.remat)
        shardings = sharding.train_shardings(model, optimizer, mesh)
        step = make_train_step(
            model,
            optimizer,
            grad_accum_steps=run.grad_accum_steps,
            z_loss=run.z_loss,
            compute_dtype=run.compute_dtype,
            shardings=shardings,
            donate=True,
        )
        params = sharding.init_sharded(model, seed, shardings.params)
        state = (params, jax.jit(optimizer.init, out_shardings=shardings.opt_state)(params))
        side_batch = sharding.global_batch(batch, shardings.batch)
        for _ in range(warmup + 1):  # the first call compiles
            state = _timed(step, state, side_batch)[0]
        states[name] = (step, state, side_batch)

    times = {name: [] for name in sides}
    for _ in range(repeats):
        for name, (step, state, side_batch) in states.items():
            state, seconds = _timed(step, state, side_batch)
            states[name] = (step, state, side_batch)
            times[name].append(seconds * 1e3)

    tokens = run.batch_size * run.seq_len
    timings = []
    for name, config in sides.items():
        median_ms = float(np.median(times[name]))
        timings.append(
            StepTiming(
                name,
                config.weight_quant,
                config.act_quant,
                config.act_bits,
                median_ms,
                tokens / (median_ms / 1e3),
                tuple(times[name]),
            )
        )
    return timings


def _timed(step, state, batch):
    start = time.perf_counter()
    params, opt_state, loss = step(*state, batch)
    jax.block_until_ready(loss)
    return (params, opt_state), time.perf_counter() - start


def train_table(run: RunConfig, timings: list[StepTiming]) -> str:
    """A markdown table of `bench_train`'s result, with the QAT / FP ratio under it."""
    by_name = {t.name: t for t in timings}
    m = run.model
    lines = [
        f"Train step, {m.num_hidden_layers} layers x {m.hidden_size} wide, vocab {m.vocab_size}, "
        f"batch {run.batch_size} x {run.seq_len} tokens, {cpu_name()} ({jax.default_backend()}, "
        f"{os.cpu_count()} cores), mesh (data, fsdp, tensor) = {_mesh_shape(run)} over "
        f"{jax.device_count()} device(s), median of {len(timings[0].times_ms)} interleaved runs",
        "",
        "| model | weights | activations | step (ms) | tokens/s |",
        "|---|---|---|---:|---:|",
    ]
    labels = {"qat": "QAT (BitNet b1.58)", "fp": "full precision"}
    for t in timings:
        acts = "none" if t.act_quant == "none" else f"{t.act_quant}, {t.act_bits}-bit"
        lines.append(f"| {labels[t.name]} | {t.weight_quant} | {acts} | {t.median_ms:.1f} | {t.tokens_per_s:,.0f} |")
    ratio = by_name["qat"].median_ms / by_name["fp"].median_ms
    lines += ["", f"QAT / full-precision step time: {ratio:.2f}x (target: at most 1.25x)"]
    return "\n".join(lines)


def _mesh_shape(run: RunConfig) -> tuple[int, ...]:
    from bitnet_jax.train import sharding

    return tuple(sharding.make_mesh(run.mesh).devices.shape)


def cpu_name() -> str:
    """The CPU model as Linux reports it (benchmarks differ between machines; say which)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()
