"""Benchmarks measured side by side in one process: `bitnet-jax bench train`.

Timings are medians over interleaved repeats (A, B, A, B, ...), so drift on a shared machine
hits both sides alike; ratios compare the two sides of one run, never numbers from another run.

Model FLOPs utilization (MFU) joins two things of the same run: the model's FLOPs per step,
counted from the config's shapes (`train_step_flops`), and the devices' matmul peak, measured by
timing XLA dots of large square matrices in f32 and bf16 (`matmul_peak`), interleaved with the
train steps on the same mesh, so the dots and the steps share the machine's devices, threads and
load.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
import time

import jax
import numpy as np

from bitnet_jax.errors import BitNetError
from bitnet_jax.model.transformer import BitNetLM
from bitnet_jax.train.run_config import RunConfig

PEAK_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class MatmulPeak:
    """The matmul rate of the devices a bench runs on: one n x n x n dot per device, all at once."""

    dtype: str  # operands' dtype, "float32" or "bfloat16" (f32 accumulation, as BitLinear's dots)
    size: int  # n
    devices: int
    gflops: float  # 10^9 FLOP/s, all devices: devices * 2 n^3 / the median time
    times_ms: tuple[float, ...]


@dataclasses.dataclass(frozen=True)
class StepTiming:
    name: str  # "qat" or "fp"
    weight_quant: str
    act_quant: str
    act_bits: int
    median_ms: float
    tokens_per_s: float
    times_ms: tuple[float, ...]
    compute_dtype: str = "float32"  # the run's; it decides which peak applies
    gflop_per_step: float = 0.0  # train_step_flops / 10^9
    gflops: float = 0.0  # achieved: gflop_per_step / the median step time in seconds
    mfu_f32: float | None = None  # gflops / the f32 peak (a fraction, not a percentage)
    mfu_bf16: float | None = None  # gflops / the bf16 peak
    peaks: tuple[MatmulPeak, ...] = ()  # measured in the same run, interleaved with the steps
    compile_s: float = 0.0  # the train step's lower() + compile(), before any step ran
    # The compiled step's dots by their operands' element type, {"bf16": n, "f32": m}: under
    # bfloat16 compute an f32 dot is one XLA:CPU upcast (benchmarks/dot_layouts.py).
    dot_operand_types: dict[str, int] = dataclasses.field(default_factory=dict)


def train_step_flops(config, batch_size: int, seq_len: int) -> int:
    """Model FLOPs of one train step (forward + backward) on `batch_size` x `seq_len` tokens:

        6 * P * B * T  +  12 * L * B * T^2 * N * H

    P: matmul parameters, L * (sum of in * out over a layer's BitLinears: q, k, v, o, gate, up,
    down) + D * V for the lm_head (tied or not: the tied head is still a [D, V] product; the
    embedding lookup is a gather, no FLOPs). Each such weight costs 2 FLOPs (a multiply and an
    add) per token forward and 4 backward (the input gradient and the weight gradient): 6.

    Attention, per layer forward: scores Q K^T and the probabilities times V, each 2 * B * T * T
    * N * H FLOPs (N query heads; grouped KV heads change no count). The full T x T square: our
    attention masks the causal half instead of skipping it, so XLA computes all of it. Backward
    is twice forward (dQ and dK; dP and dV): 3 * 4 = 12.

    Not counted (as in the usual MFU): norms, RoPE, softmax, the activation function, the
    quantizers, the Hadamard rotation (adds), the loss and the optimizer update, and the forward
    recomputed by `remat` (MFU counts the model's FLOPs, not what the hardware redoes).
    Gradient accumulation changes nothing: its micro-batches add up to the same tokens.
    """
    c = config
    per_layer = sum(k * n for block in c.linear_shapes.values() for k, n in block.values())
    matmul_params = c.num_hidden_layers * per_layer + c.hidden_size * c.vocab_size
    tokens = batch_size * seq_len
    attention = 12 * c.num_hidden_layers * batch_size * seq_len**2 * c.num_attention_heads * c.head_dim
    return 6 * matmul_params * tokens + attention


def full_precision(model):
    """The run's model with quantization off: the baseline `bench train` times beside it."""
    return model.replace(weight_quant="none", act_quant="none")


def random_batch(run: RunConfig, seed: int = 0) -> dict:
    """A training batch of the run's shape: random ids, one segment per row."""
    rng = np.random.default_rng(seed)
    shape = (run.batch_size, run.seq_len)
    return {
        "inputs": rng.integers(0, run.model.vocab_size, shape, dtype=np.int32),
        "targets": rng.integers(0, run.model.vocab_size, shape, dtype=np.int32),
        "segment_ids": np.ones(shape, np.int32),
    }


def bench_train(
    run: RunConfig, *, repeats: int = 5, warmup: int = 2, seed: int = 0, peak_min_s: float = 0.03
) -> list[StepTiming]:
    """Train-step time of the run's model with its quantization (QAT) and with quantization off
    (the same model as a full-precision baseline), on the same random batch of the run's shape,
    with each side's model FLOPs per step and its MFU against the f32 and the bf16 matmul peak.

    Both sides run as `bitnet-jax train` runs them: on the run's mesh (`RunConfig.mesh`, e.g.
    several simulated CPU devices), with its shardings, and donating parameters and optimizer
    state to each step. Each side is compiled and warmed up first, and the peak dots sized
    (`peak_min_s`, see `matmul_peak`); then the two steps and the two dots alternate `repeats`
    times.
    """
    from bitnet_jax.train import sharding
    from bitnet_jax.train.step import make_optimizer, make_train_step

    if repeats < 1 or warmup < 0:
        raise BitNetError(
            f"bench_train: repeats={repeats}, warmup={warmup}; expected repeats >= 1 "
            "(timed steps per side) and warmup >= 0."
        )
    sides = {"qat": run.model, "fp": full_precision(run.model)}
    batch = random_batch(run, seed)
    optimizer = make_optimizer(run)
    mesh = sharding.make_mesh(run.mesh)
    sharding.check_batch(run.batch_size, run.grad_accum_steps, mesh)
    states, compile_s, dot_types = {}, {}, {}
    for name, config in sides.items():
        model = BitNetLM(config, remat=run.remat, scan_layers=run.scan_layers)
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
        start = time.perf_counter()
        step = step.lower(*state, side_batch).compile()  # ahead of time, so that it is timed alone
        compile_s[name] = time.perf_counter() - start
        dot_types[name] = dot_operand_types(step.as_text())
        for _ in range(warmup + 1):
            state = _timed(step, state, side_batch)[0]
        states[name] = (step, state, side_batch)
    dots = {dtype: _PeakDot.sized(dtype, mesh, peak_min_s) for dtype in PEAK_DTYPES}

    times = {name: [] for name in sides}
    dot_times = {dtype: [] for dtype in dots}
    for _ in range(repeats):
        for name, (step, state, side_batch) in states.items():
            state, seconds = _timed(step, state, side_batch)
            states[name] = (step, state, side_batch)
            times[name].append(seconds * 1e3)
        for dtype, dot in dots.items():
            dot_times[dtype].append(dot.seconds() * 1e3)

    peaks = tuple(dot.peak(dot_times[dtype]) for dtype, dot in dots.items())
    peak_gflops = {p.dtype: p.gflops for p in peaks}
    tokens = run.batch_size * run.seq_len
    timings = []
    for name, config in sides.items():
        median_ms = float(np.median(times[name]))
        gflop = train_step_flops(config, run.batch_size, run.seq_len) / 1e9
        gflops = gflop / (median_ms / 1e3)
        timings.append(
            StepTiming(
                name,
                config.weight_quant,
                config.act_quant,
                config.act_bits,
                median_ms,
                tokens / (median_ms / 1e3),
                tuple(times[name]),
                compute_dtype=run.compute_dtype,
                gflop_per_step=gflop,
                gflops=gflops,
                mfu_f32=gflops / peak_gflops["float32"],
                mfu_bf16=gflops / peak_gflops["bfloat16"],
                peaks=peaks,
                compile_s=compile_s[name],
                dot_operand_types=dot_types[name],
            )
        )
    return timings


_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\w+)\[")
_DOT = re.compile(r"\bdot\(%([\w.\-]+), %([\w.\-]+)\)")


def dot_operand_types(hlo_text: str) -> dict[str, int]:
    """{element type: count} of the dots in an optimized HLO module's text (a compiled program's
    `as_text()`), by the type of their operands (both have one: XLA converts mixed operands
    first), fused computations included. HLO instruction names are unique in a module."""
    types = {}
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.match(line)
        if match:
            types[match.group(1)] = match.group(2)
    counts = collections.Counter()
    for line in hlo_text.splitlines():
        dot = _DOT.search(line)
        if dot and _INSTRUCTION.match(line):
            counts[types.get(dot.group(1), "?")] += 1
    return dict(sorted(counts.items()))


def _timed(step, state, batch):
    start = time.perf_counter()
    params, opt_state, loss = step(*state, batch)
    jax.block_until_ready(loss)
    return (params, opt_state), time.perf_counter() - start


def matmul_peak(
    dtype: str = "float32", mesh=None, *, repeats: int = 5, min_s: float = 0.03, max_size: int = 8192
) -> MatmulPeak:
    """The matmul peak of `mesh`'s devices (default: the first device) in `dtype`: a jitted XLA
    dot of two random n x n matrices per device, all devices at once, timed `repeats` times after
    a warm-up; GFLOP/s = devices * 2 n^3 / the median time.

    n doubles from 256 until one dot takes at least `min_s` seconds or n reaches `max_size`, so
    that the dot is large enough to run at the device's full rate (n = 1024 or 2048 on a 2-core
    CPU; faster devices go further). bf16 operands accumulate in f32, as BitLinear's dots do.
    """
    if repeats < 1:
        raise BitNetError(f"matmul_peak: repeats={repeats}; expected at least 1 timed dot.")
    dot = _PeakDot.sized(dtype, mesh, min_s, max_size)
    return dot.peak([dot.seconds() * 1e3 for _ in range(repeats)])


@dataclasses.dataclass(frozen=True)
class _PeakDot:
    """One compiled peak dot and its operands: [devices, n, n] split over every device."""

    dtype: str
    size: int
    devices: int
    fn: object
    a_dnn: jax.Array
    b_dnn: jax.Array

    @classmethod
    def sized(cls, dtype: str, mesh=None, min_s: float = 0.03, max_size: int = 8192) -> "_PeakDot":
        if dtype not in PEAK_DTYPES:
            raise BitNetError(f"matmul peak dtype {dtype!r}: expected one of {PEAK_DTYPES}.")
        size = min(256, max_size)
        while True:
            dot = cls.build(dtype, size, mesh)
            dot.seconds()  # compile, warm up
            if size >= max_size or dot.seconds() >= min_s:
                return dot
            size = min(2 * size, max_size)

    @classmethod
    def build(cls, dtype: str, size: int, mesh=None) -> "_PeakDot":
        import jax.numpy as jnp
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        if mesh is None:
            mesh = Mesh(np.array(jax.devices()[:1]), ("d",))
        # The leading axis over all mesh axes: each device multiplies its own pair, no communication.
        split = NamedSharding(mesh, PartitionSpec(tuple(mesh.axis_names)))
        devices = mesh.devices.size
        rng = np.random.default_rng(size)
        a_dnn, b_dnn = (
            jax.device_put(rng.standard_normal((devices, size, size), np.float32).astype(jnp.dtype(dtype)), split)
            for _ in range(2)
        )
        fn = jax.jit(
            lambda a, b: jnp.einsum("dmk,dkn->dmn", a, b, preferred_element_type=jnp.float32),
            out_shardings=split,
        )
        return cls(dtype, size, devices, fn, a_dnn, b_dnn)

    def seconds(self) -> float:
        start = time.perf_counter()
        jax.block_until_ready(self.fn(self.a_dnn, self.b_dnn))
        return time.perf_counter() - start

    def peak(self, times_ms) -> MatmulPeak:
        flops = self.devices * 2 * self.size**3
        gflops = flops / 1e9 / (float(np.median(times_ms)) / 1e3)
        return MatmulPeak(self.dtype, self.size, self.devices, gflops, tuple(times_ms))


def train_table(run: RunConfig, timings: list[StepTiming]) -> str:
    """A markdown table of `bench_train`'s result, with the QAT / FP ratio and the matmul peaks
    under it."""
    by_name = {t.name: t for t in timings}
    m = run.model
    lines = [
        f"Train step, {m.num_hidden_layers} layers x {m.hidden_size} wide "
        f"({'scanned' if run.scan_layers else 'unrolled'}), vocab {m.vocab_size}, "
        f"batch {run.batch_size} x {run.seq_len} tokens, {cpu_name()} ({jax.default_backend()}, "
        f"{os.cpu_count()} cores), mesh (data, fsdp, tensor) = {_mesh_shape(run)} over "
        f"{jax.device_count()} device(s), median of {len(timings[0].times_ms)} interleaved runs",
        "",
        "| model | weights | activations | step (ms) | tokens/s | GFLOP / step | GFLOP/s | MFU (f32 peak) "
        "| MFU (bf16 peak) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    labels = {"qat": "QAT (BitNet b1.58)", "fp": "full precision"}
    for t in timings:
        acts = "none" if t.act_quant == "none" else f"{t.act_quant}, {t.act_bits}-bit"
        lines.append(
            f"| {labels[t.name]} | {t.weight_quant} | {acts} | {t.median_ms:.1f} | {t.tokens_per_s:,.0f} "
            f"| {t.gflop_per_step:.3g} | {t.gflops:,.1f} | {_percent(t.mfu_f32)} | {_percent(t.mfu_bf16)} |"
        )
    ratio = by_name["qat"].median_ms / by_name["fp"].median_ms
    lines += ["", f"QAT / full-precision step time: {ratio:.2f}x (target: at most 1.25x)"]
    compiles = ", ".join(f"{labels[t.name].split(' (')[0]} {t.compile_s:.1f} s" for t in timings)
    lines.append(f"Compile time of the train step: {compiles}.")
    if any(t.dot_operand_types for t in timings):
        kinds = "; ".join(
            f"{labels[t.name].split(' (')[0]} " + ", ".join(f"{n} {dtype}" for dtype, n in t.dot_operand_types.items())
            for t in timings
        )
        lines.append(f"Dots in the compiled step, by operand type: {kinds}.")
        if timings[0].compute_dtype == "bfloat16" and any(t.dot_operand_types.get("f32") for t in timings):
            lines.append(
                "(Under bfloat16 compute, an f32 dot is one XLA:CPU upcast: it runs a bf16 dot natively only "
                "with no transpose in front of it; benchmarks/dot_layouts.py.)"
            )
    peaks = timings[0].peaks
    if peaks:
        p = peaks[0]
        rates = ", ".join(f"{q.dtype} {q.gflops:,.1f} GFLOP/s (n = {q.size})" for q in peaks)
        lines.append(
            f"Matmul peak (XLA dot of n x n matrices on each of {p.devices} device(s), median of "
            f"{len(p.times_ms)}, interleaved with the steps): {rates}. The model computes in "
            f"{timings[0].compute_dtype}: MFU against the {_short(timings[0].compute_dtype)} peak applies."
        )
    return "\n".join(lines)


def _percent(fraction: float | None) -> str:
    return "-" if fraction is None else f"{100 * fraction:.1f}%"


def _short(dtype: str) -> str:
    return {"float32": "f32", "bfloat16": "bf16"}.get(dtype, dtype)


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
