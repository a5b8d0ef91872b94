"""Serving benchmarks: `bitnet-jax bench kernels` and `bitnet-jax bench generate`.

Both compare our FFI kernels with XLA's dense path in the same run. Thread count: the kernels run
on XLA's intra-op pool, whose size follows the CPUs this process may use, so `--threads N`
restricts the process to N CPUs (`os.sched_setaffinity`) before JAX starts.

Kernels are timed with their weights cycling through copies that together exceed the last-level
cache (`working_set_mb`), so GB/s is weight traffic from DRAM, as in a real model whose layers
stream past the cache one after another; each timed call runs a chain of calls inside one jit,
so Python dispatch is not in the numbers.

Both print their figures against this machine's limits, measured in the same run
(bench/machine.py): kernel GB/s against the streaming read bandwidth and GOPS against the int8
multiply-add peak of the kernel's path; decode tok/s against the roofline, read bandwidth / bytes
read per token (bench/roofline.py), and prefill's ternary-matmul GOPS against the int8 peak.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import numpy as np

from bitnet_jax.bench.machine import MachineLimits
from bitnet_jax.bench.profile import DecodeProfile, profile_decode
from bitnet_jax.bench.roofline import decode_bytes, decode_context, matmul_ops, ternary_ops_per_token
from bitnet_jax.errors import BitNetError

# 2B4T: K x N of q/o, k/v, gate/up, down, and the tied lm_head.
KERNEL_SHAPES = ((2560, 2560), (2560, 640), (2560, 6912), (6912, 2560), (2560, 128256))
KERNEL_ROWS = (1, 8, 128)
_WORKING_SET = 640 << 20  # > the 300 MB L3 of the largest machine seen here
_MAX_CHAIN = 256
# A chain's float32 outputs [M, N] are all live in the XLA program's temporary buffer, allocated at
# every call. Past 32 MB (the ceiling of glibc's mmap threshold) it is mapped afresh each time and
# the kernel's time would hold its page faults: 8 outputs of 256 x 6912 took 1.1-1.3x the time of
# 4 (benchmarks/RESULTS.md, "`bench kernels` at 256 rows timed page faults").
_OUTPUT_BUDGET = 16 << 20


def set_threads(threads: int | None) -> int:
    """Restricts this process to `threads` CPUs (before JAX computes anything); returns the count."""
    available = sorted(os.sched_getaffinity(0))
    if threads is None:
        return len(available)
    if threads < 1:
        raise BitNetError(f"--threads {threads}: expected a positive number of threads (at most {len(available)}).")
    if threads > len(available):
        raise BitNetError(f"--threads {threads}: this process may use only {len(available)} CPUs.")
    # XLA sizes its CPU thread pool from the allowed CPUs when its backend starts (at the first
    # computation), so this must run before anything is computed in this process.
    os.sched_setaffinity(0, available[:threads])
    return threads


# --- kernels ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class KernelTiming:
    kernel: str  # "ternary", "ternary-g64", "int8", "int4", "xla_f32", "xla_bf16"
    isa: str  # kernel path, or "xla"
    M: int
    K: int
    N: int
    threads: int
    median_us: float
    weight_bytes: int
    gb_s: float  # weight bytes / median time
    working_set_mb: float
    times_us: tuple[float, ...]
    gops: float = 0.0  # 10^9 operations / s: 2 * M * K * N per call (a multiply and an add per term)
    # Against this machine's limits (`with_kernel_limits`): the read bandwidth on as many threads,
    # and the int8 multiply-add peak of this kernel's path (None for XLA's float dots).
    read_gb_s: float | None = None
    of_read_gb_s: float | None = None
    int8_peak_gops: float | None = None
    of_int8_peak: float | None = None
    # The read bandwidth measured again after the timings (`with_kernel_limits(..., after)`).
    read_gb_s_after: float | None = None
    of_read_gb_s_after: float | None = None


def _chain(fn, reps: int):
    """jit of `reps` calls of fn(x, w_i, *rest) over distinct weight buffers, summed lightly."""
    import jax

    def chained(x, weights, *rest):
        total = 0.0
        for w in weights:
            total = total + fn(x, w, *rest)[..., :1]
        return total

    return jax.jit(chained)


def time_calls(call, repeats: int) -> list[float]:
    """Seconds of `repeats` calls of `call` (each waited for), after one call that compiles and warms up."""
    import jax

    jax.block_until_ready(call())  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(call())
        times.append(time.perf_counter() - start)
    return times


def bench_kernels(
    *,
    rows=KERNEL_ROWS,
    shapes=KERNEL_SHAPES,
    isas: list[str] | None = None,
    repeats: int = 5,
    xla: bool = True,
    seed: int = 0,
) -> list[KernelTiming]:
    """Times the serving kernels on every SIMD path (default: all this CPU runs; the scalar twin,
    a correctness reference, only when asked for) and XLA's dense f32 and bf16 dot on the same
    shapes. The lm_head shape (N = 128256) runs the int8 and the int4 kernels, the others
    the ternary one."""
    import jax.numpy as jnp

    from bitnet_jax.kernels import ffi

    threads = len(os.sched_getaffinity(0))
    isas = isas or [isa for isa in ffi.available_isas() if isa != "scalar"] or ["scalar"]
    rng = np.random.default_rng(seed)
    previous = os.environ.get("BITNET_JAX_ISA")
    results = []
    try:
        for k, n in shapes:
            for kernel, weight, fn in _kernel_variants(rng, k, n):
                nbytes = sum(a.nbytes for a in weight)
                for m in rows:
                    x = jnp.asarray(rng.standard_normal((m, k), np.float32))
                    reps = _reps(nbytes, m, 4 * m * n)
                    weights = [tuple(a.copy() for a in weight) for _ in range(reps)]
                    call = _chain(fn, reps)
                    for isa in isas:
                        os.environ["BITNET_JAX_ISA"] = isa
                        times = time_calls(lambda weights=weights: call(x, weights), repeats)
                        results.append(_timing(kernel, isa, m, k, n, threads, times, reps, nbytes))
                    del weights
            for m in rows if xla else ():
                x = jnp.asarray(rng.standard_normal((m, k), np.float32))
                for name, dtype in (("xla_f32", jnp.float32), ("xla_bf16", jnp.bfloat16)):
                    dense = jnp.asarray(rng.standard_normal((k, n), np.float32), dtype)
                    reps = _reps(dense.nbytes, m, 4 * m * n)
                    denses = [dense.copy() for _ in range(reps)]
                    call = _chain(lambda x, w: jnp.dot(x.astype(w.dtype), w, preferred_element_type=jnp.float32), reps)
                    times = time_calls(lambda denses=denses: call(x, denses), repeats)
                    results.append(_timing(name, "xla", m, k, n, threads, times, reps, dense.nbytes))
                    del denses, dense
    finally:
        if previous is None:
            os.environ.pop("BITNET_JAX_ISA", None)
        else:
            os.environ["BITNET_JAX_ISA"] = previous
    return results


GROUP_BENCH_K = 64  # the group size bench kernels times the group-scale kernel at (the ablations' default)


def _kernel_variants(rng, k: int, n: int) -> list:
    """(kernel name, weight arrays, fn(x, weights)) for a shape: the ternary kernel with one scale
    and with a scale per 64 inputs ('ternary-g64'), or for the lm_head shape (N > 100,000) the
    int8 and the int4 kernels on the same random rows."""
    import jax.numpy as jnp

    from bitnet_jax.kernels import ffi, layout

    if n <= 100_000:
        t_nk = rng.integers(-1, 2, (n, k), dtype=np.int8)
        packed = jnp.asarray(layout.pack_ternary(t_nk))
        variants = [("ternary", (packed, jnp.ones((1,), jnp.float32)), lambda x, w, n=n: ffi.ternary_matmul(x, *w, n))]
        if k % GROUP_BENCH_K == 0:  # the same codes with a scale per 64 inputs (weight_quant='group:64')
            tiles = jnp.asarray(layout.pack_ternary_tiles(t_nk))
            scales = jnp.asarray(layout.tile_group_scales(rng.uniform(0.5, 1.5, (k // GROUP_BENCH_K, n))))
            variants.append(("ternary-g64", (tiles, scales), lambda x, w, n=n: ffi.ternary_group_matmul(x, *w, n)))
        return variants
    w_nk = rng.standard_normal((n, k), np.float32)
    w8, scale8 = layout.quantize_int8_rows(w_nk)
    q4, scale4 = layout.quantize_int4_groups(w_nk)
    return [
        ("int8", (jnp.asarray(layout.pack_int8(w8)), jnp.asarray(scale8)), lambda x, w: ffi.int8_matmul(x, *w)),
        ("int4", (jnp.asarray(layout.pack_int4(q4)), jnp.asarray(scale4)), lambda x, w: ffi.int4_matmul(x, *w)),
    ]


def _reps(nbytes: int, m: int, out_bytes: int) -> int:
    """Calls chained in one timed program: enough distinct weight copies (nbytes each) that one row
    reads them from memory, not from a cache; for batched rows (compute-bound) at most 8, and no
    more outputs (out_bytes each) than _OUTPUT_BUDGET holds."""
    reps = min(_MAX_CHAIN, max(2, math.ceil(_WORKING_SET / nbytes)))
    if m == 1:
        return reps
    return max(1, min(reps, 8, _OUTPUT_BUDGET // out_bytes))


def _timing(kernel, isa, m, k, n, threads, times, reps, nbytes) -> KernelTiming:
    per_call = [t / reps for t in times]
    median = float(np.median(per_call))
    return KernelTiming(
        kernel,
        isa,
        m,
        k,
        n,
        threads,
        median * 1e6,
        nbytes,
        nbytes / median / 1e9,
        reps * nbytes / 2**20,
        tuple(t * 1e6 for t in per_call),
        matmul_ops(m, k, n) / median / 1e9,
    )


def with_kernel_limits(r: KernelTiming, limits: MachineLimits, after: MachineLimits | None = None) -> KernelTiming:
    """`r` with the machine's read bandwidth on its thread count and its path's int8 peak; with
    `after` (the limits measured again after the timings), also that reading's bandwidth."""
    read = limits.read_gb_s(r.threads)
    read_after = after.read_gb_s(r.threads) if after is not None else None
    peak = None if r.isa == "xla" else limits.int8_peak_gops(r.isa, r.threads)
    return dataclasses.replace(
        r,
        read_gb_s=read,
        of_read_gb_s=r.gb_s / read if read else None,
        int8_peak_gops=peak,
        of_int8_peak=r.gops / peak if peak else None,
        read_gb_s_after=read_after,
        of_read_gb_s_after=r.gb_s / read_after if read_after else None,
    )


def _percent(fraction: float | None) -> str:
    return "-" if fraction is None else f"{100 * fraction:.0f}%"


def kernels_table(results: list[KernelTiming]) -> str:
    """Markdown: one row per (shape, M), one column per kernel / ISA, plus speedups over XLA f32."""
    columns = []
    for r in results:
        key = r.kernel if r.isa == "xla" else f"{r.kernel}:{r.isa}"
        if key not in columns:
            columns.append(key)
    by_key = {(r.K, r.N, r.M, r.kernel if r.isa == "xla" else f"{r.kernel}:{r.isa}"): r for r in results}
    ours = [c for c in columns if not c.startswith("xla")]
    header = ["K x N", "M", "ours us (GB/s)"] + [f"{c} us (GB/s)" for c in columns if c.startswith("xla")]
    header.append("best ours vs xla_f32")
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for k, n, m in dict.fromkeys((r.K, r.N, r.M) for r in results):
        cells, best = [], None
        for c in ours:
            r = by_key.get((k, n, m, c))
            if r and (best is None or r.median_us < best.median_us):
                best = r
        cells.append(f"{best.median_us:.0f} ({best.gb_s:.1f}) {best.kernel}:{best.isa}" if best else "-")
        for c in (c for c in columns if c.startswith("xla")):
            r = by_key.get((k, n, m, c))
            cells.append(f"{r.median_us:.0f} ({r.gb_s:.1f})" if r else "-")
        f32 = by_key.get((k, n, m, "xla_f32"))
        ratio = f"{f32.median_us / best.median_us:.1f}x" if f32 and best else "-"
        lines.append(f"| {k} x {n} | {m} | " + " | ".join(cells) + f" | {ratio} |")
    per_isa = [
        "",
        "Per kernel path: weight GB/s against the machine's read bandwidth on as many threads (read before",
        "the timings and again after them), and GOPS",
        "(2 * M * K * N / time) against the int8 multiply-add peak of the path (bench/machine.py):",
        "",
        "| K x N | M | path | us | GB/s | of read BW | of read BW after | GOPS | of int8 peak |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for k, n, m in dict.fromkeys((r.K, r.N, r.M) for r in results):
        for c in ours:
            r = by_key.get((k, n, m, c))
            if r is not None:
                per_isa.append(
                    f"| {k} x {n} | {m} | {c} | {r.median_us:.0f} | {r.gb_s:.1f} | {_percent(r.of_read_gb_s)} "
                    f"| {_percent(r.of_read_gb_s_after)} | {r.gops:.1f} | {_percent(r.of_int8_peak)} |"
                )
    return "\n".join(lines + per_isa)


# --- generation ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GenerateTiming:
    backend: str  # "ffi", "xla-packed" (the XLA integer path), "pallas" (its Pallas kernel) or "xla" (dense)
    lm_head: str
    threads: int
    prompt_tokens: int
    new_tokens: int
    prefill_tok_s: float
    decode_tok_s: float
    peak_rss_mb: float  # MB (10^6 bytes, as the 2B4T model card counts) while serving, after building the weights
    weight_mb: float  # MB (10^6 bytes)
    isa: str
    # What a decoded token reads (bench/roofline.py: counted from the parameter arrays and the
    # cache's shape), MB (10^6 bytes), at the mean context of the timed decode steps.
    layers_mb: float = 0.0
    head_mb: float = 0.0
    other_mb: float = 0.0
    kv_mb: float = 0.0
    decode_context: float = 0.0
    # Their sum, derived (`__post_init__`) rather than passed, so that it cannot disagree with
    # them; a field (not a property) so that the JSON rows keep it, in this place.
    mb_per_token: float = dataclasses.field(init=False)
    # Prefill: the ternary matmuls' int8 operations over the whole prefill time (a lower bound on
    # the matmuls' own rate: attention, norms and the lm_head row are in the time too).
    prefill_ternary_gops: float = 0.0
    # Against this machine's limits (`with_generate_limits`).
    read_gb_s: float | None = None
    roofline_tok_s: float | None = None  # read_gb_s / mb_per_token
    decode_of_roofline: float | None = None
    # The read bandwidth measured again after the timed runs, and decode against the roofline it
    # gives: on a shared host the bandwidth can move between the two readings, and a decode
    # figure is only as sure as the two agree.
    read_gb_s_after: float | None = None
    decode_of_roofline_after: float | None = None
    int8_peak_gops: float | None = None  # the FFI path's, on as many threads
    prefill_of_int8_peak: float | None = None
    profile: DecodeProfile | None = None  # `profile=True`, FFI backend: the decode step's pieces
    kv_cache: str = "float32"  # the FFI model's KV cache dtype (ops.KV_CACHES)
    # FFI backend: seconds to compile the generate program, in a child process, before building
    # the weights (the child's start included; less where the program came from the persistent
    # compilation cache), and that cache's folder.
    compile_s: float | None = None
    compilation_cache: str | None = None
    # Decode tok/s of each timed run, in the order run; with several prompt lengths, the runs of
    # one round (one run of each length) share an index (`context_table`).
    decode_runs_tok_s: tuple[float, ...] = ()
    # How each token was picked, as `generate` takes it (temperature 0: greedy).
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "mb_per_token", self.layers_mb + self.head_mb + self.other_mb + self.kv_mb)


# 81 bytes whose four 2-bit fields are all valid ternary codes (0, 1, 2).
_VALID_CODE_BYTES = np.array(
    [a | b << 2 | c << 4 | d << 6 for a in range(3) for b in range(3) for c in range(3) for d in range(3)], np.uint8
)


# 225 bytes whose two nibbles are both valid int4 codes (1 .. 15: q = -7 .. 7).
_INT4_CODE_BYTES = np.array([a | b << 4 for a in range(1, 16) for b in range(1, 16)], np.uint8)


def random_packed_params(config, *, lm_head: str = "int8", seed: int = 0, abstract: bool = False) -> dict:
    """Random packed serving parameters of the config's shape, built without float weights.

    Each array is filled a slice at a time in 64-byte-aligned host memory, which JAX adopts
    without a copy (as `packed_folder.load_packed` does), so building holds no second copy of anything.
    With `abstract`, the same tree of `jax.ShapeDtypeStruct`s, for compiling first.
    """
    import jax

    from bitnet_jax.kernels import layout, ops
    from bitnet_jax.serve.host_memory import aligned_empty, release_freed_memory

    rng = np.random.default_rng(seed)

    def make(shape, dtype, fill_rows=None):
        """A [rows, ...] array whose slices `fill_rows(shape of a slice)` fills, or ones."""
        if abstract:
            return jax.ShapeDtypeStruct(shape, np.dtype(dtype))
        out = aligned_empty(shape, dtype)
        if fill_rows is None:
            out[...] = 1
        else:
            rows = max(1, (16 << 20) // max(out[0].nbytes, 1))
            for start in range(0, shape[0], rows):
                out[start : start + rows] = fill_rows(out[start : start + rows].shape)
        return jax.device_put(out)

    d, f, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    heads = config.num_attention_heads * config.head_dim
    ones = lambda *shape: make(shape, np.float32)
    params: dict = {
        "layers": {
            "self_attn": {"attn_sub_norm": {"weight": ones(layers, heads)}},
            "mlp": {"ffn_sub_norm": {"weight": ones(layers, f)}},
            "input_layernorm": {"weight": ones(layers, d)},
            "post_attention_layernorm": {"weight": ones(layers, d)},
        },
        "norm": {"weight": ones(d)},
    }
    codes = lambda shape: _VALID_CODE_BYTES[rng.integers(0, 81, shape, dtype=np.uint8)]
    group = config.weight_group_size
    for block, names in config.linear_shapes.items():
        for name, (k, n) in names.items():
            g, row_bytes = layout.packed_shape(n, k, grouped=bool(group))
            scale = lambda shape, k=k: np.full(shape, 1.0 / math.sqrt(k), np.float32)
            scale_shape = (layers, *layout.group_scales_shape(n, k // group)) if group else (layers, 1)
            params["layers"][block][name] = {
                "w_packed": make((layers, g, row_bytes), np.uint8, codes),
                "w_scale": make(scale_shape, np.float32, scale),
            }
    v = config.vocab_size
    table, shared = ops.head_table(lm_head)
    if table == "int8":
        head = {
            "w_int8": make((v, -(-d // 64) * 64), np.int8, lambda shape: rng.integers(-127, 128, shape, np.int8)),
            "w_scale": make((v,), np.float32, lambda shape: np.full(shape, 0.02 / 127, np.float32)),
        }
    elif table == "int4":
        row_bytes = layout.int4_row_bytes(d)
        groups = row_bytes * 2 // layout.INT4_GROUP_K
        head = {  # nibbles 1..15 (q = -7..7) in both halves of every byte
            "w_int4": make((v, row_bytes), np.uint8, lambda shape: _INT4_CODE_BYTES[rng.integers(0, 225, shape)]),
            "w_scale": make((v, groups), np.float16, lambda shape: np.full(shape, 0.02 / 7, np.float16)),
        }
    if table is not None:
        params["embed_tokens" if shared else "lm_head"] = head
    if not shared:
        import ml_dtypes

        normal = lambda shape: (rng.standard_normal(shape, np.float32) * 0.02).astype(ml_dtypes.bfloat16)
        params["embed_tokens"] = {"embedding": make((v, d), ml_dtypes.bfloat16, normal)}
    release_freed_memory()  # the random slices
    return params


def dense_params(config, packed: dict, dtype) -> dict:
    """Dense XLA-path parameters (weight_quant='none') holding the same weights as `packed`."""
    import jax.numpy as jnp

    from bitnet_jax.model.serving_layers import float_rows, ternary_codes

    out = {"layers": {}, "norm": packed["norm"], "embed_tokens": {}}
    for key, value in packed["layers"].items():
        if key not in ("self_attn", "mlp"):
            out["layers"][key] = value
            continue
        out["layers"][key] = {}
        for name, p in value.items():
            if "w_packed" not in p:
                out["layers"][key][name] = p
                continue
            k, n = config.linear_shapes[key][name]
            kernels = []
            for layer in range(p["w_packed"].shape[0]):
                linear = {"w_packed": p["w_packed"][layer], "w_scale": p["w_scale"][layer]}
                t, scale = ternary_codes(linear, k, n, config.weight_quant)  # scale [1] or, per group, [K / G, N]
                scale_kn = np.repeat(scale, k // scale.shape[0], axis=0) if scale.ndim == 2 else scale[0]
                kernels.append(jnp.asarray(t.T * scale_kn, dtype))
            out["layers"][key][name] = {"kernel": jnp.stack(kernels)}
    out["embed_tokens"]["embedding"] = jnp.asarray(float_rows(packed["embed_tokens"], config.hidden_size), dtype)
    return out


def bench_generate(config, backend: str, *, prompt_tokens: int = 128, **kwargs) -> GenerateTiming:
    """`bench_generate_contexts` at one prompt length."""
    (timing,) = bench_generate_contexts(config, backend, prompt_lengths=(prompt_tokens,), **kwargs)
    return timing


def bench_generate_contexts(
    config,
    backend: str,
    *,
    lm_head: str | None = None,
    prompt_lengths: tuple[int, ...] = (128,),
    new_tokens: int = 128,
    repeats: int = 3,
    xla_dtype: str = "float32",
    seed: int = 0,
    profile: bool = False,
    kv_cache: str | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> list[GenerateTiming]:
    """Prefill and decode speed of one backend on random weights of the config's shape (its
    weight_quant decides the packed scales: per tensor, or per group of inputs), after a prompt
    of each of `prompt_lengths`: 'ffi' (packed weights on the FFI kernels), 'xla-packed' (the same
    packed weights on the XLA integer path), 'pallas' (the XLA integer path with the ternary
    matmuls as the Pallas kernel) or 'xla' (dense float weights in XLA ops).

    One program per prompt length generates 1 + new_tokens tokens, streaming them: prefill
    tokens/s = prompt tokens / time to the first token; decode tokens/s = new_tokens / time from
    the first token to the last; medians of `repeats` runs after a warm-up run. The lengths take
    turns, round after round, in alternating order (A B, then B A), so that a shared host's
    minutes fall on all of them alike and their decode rates compare run by run
    (`decode_runs_tok_s`, `context_table`). Peak RSS is the high-water mark over a length's runs
    (/proc/self/clear_refs before each), from just after the weights are built; with several
    lengths the process also holds the other lengths' programs and what glibc kept of their
    buffers (on the Zen 4, 2B4T: +14 MB at 128 tokens and +55 at 2048, beside 128,2048), so the
    serving peak of one prompt length is a run of that length alone.
    `lm_head` is the FFI model's (default: the serving default, `ops.default_lm_head`).
    `profile` (FFI backend): also time the pieces of a decode step alone (bench/profile.py).
    `kv_cache`: the FFI model's KV cache dtype (default float32). `temperature`, `top_k`, `top_p`:
    how every run picks its tokens, as `generate` takes them (default greedy); the timed program
    holds the sampling.
    """
    import gc

    import jax
    import jax.numpy as jnp

    from bitnet_jax.kernels.ops import default_lm_head
    from bitnet_jax.serve.generate import (
        check_sampling,
        compile_generate,
        generate,
        generate_prompt_length,
        kv_cache_dtype,
        serving_params,
    )

    if not prompt_lengths or min(prompt_lengths) < 1 or len(set(prompt_lengths)) != len(prompt_lengths):
        raise BitNetError(f"prompt lengths {prompt_lengths}: expected distinct positive lengths.")
    check_sampling(temperature, top_k, top_p)
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    lm_head = lm_head or default_lm_head(config)
    prompts = [np.random.default_rng(seed).integers(0, config.vocab_size, (1, n)) for n in prompt_lengths]
    compile_s = [None] * len(prompts)
    serve_backend = None  # the default for packed parameters: the FFI kernels on CPU
    if backend in ("xla-packed", "pallas"):
        params = random_packed_params(config, lm_head=lm_head, seed=seed)
        serve_backend = isa = "xla" if backend == "xla-packed" else "pallas"
    elif backend == "ffi":
        from bitnet_jax.kernels import ffi

        # As `bitnet-jax generate` serves: compile from the shapes (in a child process), then make
        # the weights.
        shapes = random_packed_params(config, lm_head=lm_head, seed=seed, abstract=True)
        for i, prompt in enumerate(prompts):
            start = time.perf_counter()
            compile_generate(
                config, shapes, prompt, 1 + new_tokens, **sampling, streaming=True, kv_cache=kv_cache, in_child=True
            )
            compile_s[i] = time.perf_counter() - start
        params = random_packed_params(config, lm_head=lm_head, seed=seed)
        isa = ffi.selected_isa()
    else:
        kv_cache = None  # the dense path's cache has the weights' dtype
        packed = random_packed_params(config, lm_head=lm_head, seed=seed)
        config = config.replace(weight_quant="none")
        params = dense_params(config, packed, jnp.dtype(xla_dtype))
        del packed
        config = config.replace(tie_word_embeddings=True)
        lm_head, isa = f"tied {xla_dtype}", "xla"
    gc.collect()
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    traffic = decode_bytes(config, params, kv_cache_dtype(params, serving_params(config, params, None, kv_cache)[1]))
    peaks = [0.0] * len(prompts)

    def run(i):
        token_times = []
        reset_peak_rss()
        start = time.perf_counter()
        on_tokens = lambda _: token_times.append(time.perf_counter())
        generate(
            config,
            params,
            prompts[i],
            1 + new_tokens,
            **sampling,
            seed=seed,
            on_tokens=on_tokens,
            backend=serve_backend,
            kv_cache=kv_cache,
        )
        peaks[i] = max(peaks[i], peak_rss_mb())
        return token_times[0] - start, token_times[-1] - token_times[0]

    order = list(range(len(prompts)))
    for i in order:
        run(i)  # warm up (and compile, for the dense path)
    runs = [[] for _ in prompts]  # (prefill s, decode s) of each timed run, per length
    for round_ in range(repeats):
        for i in order if round_ % 2 == 0 else order[::-1]:
            runs[i].append(run(i))
    results = []
    for i, prompt_tokens in enumerate(prompt_lengths):
        prefill_s, decode_s = np.median(runs[i], axis=0)
        context = decode_context(prompt_tokens, new_tokens)
        pieces = None
        if profile and backend == "ffi":  # after the timed runs and their peaks: the pieces are not serving
            prompt_slots = generate_prompt_length(
                config, params, prompt_tokens, backend=serve_backend, kv_cache=kv_cache
            )
            pieces = profile_decode(
                config,
                params,
                position=prompt_tokens + (new_tokens - 1) // 2,  # the middle of the timed steps
                cache_slots=prompt_slots + 1 + new_tokens,  # as `generate` allocates
                step_ms=1e3 * decode_s / new_tokens,
                kv_cache=kv_cache,
            )
        results.append(
            GenerateTiming(
                backend,
                lm_head,
                len(os.sched_getaffinity(0)),
                prompt_tokens,
                new_tokens,
                prompt_tokens / prefill_s,
                new_tokens / decode_s,
                peaks[i],
                weight_bytes / 1e6,
                isa,
                layers_mb=traffic.layers / 1e6,
                head_mb=traffic.head / 1e6,
                other_mb=traffic.other / 1e6,
                kv_mb=traffic.kv_per_slot * context / 1e6,
                decode_context=context,
                prefill_ternary_gops=ternary_ops_per_token(config) * prompt_tokens / prefill_s / 1e9,
                profile=pieces,
                kv_cache=kv_cache or "float32",
                compile_s=compile_s[i],
                compilation_cache=jax.config.jax_compilation_cache_dir,
                decode_runs_tok_s=tuple(new_tokens / d for _, d in runs[i]),
                **sampling,
            )
        )
    return results


def with_generate_limits(
    r: GenerateTiming, limits: MachineLimits, after: MachineLimits | None = None
) -> GenerateTiming:
    """`r` with its decode roofline (read bandwidth on its thread count / bytes per token) and,
    for the FFI backend, its prefill against the int8 peak of its kernel path; with `after` (the
    limits measured again once the runs were done), decode against that reading's roofline too."""
    read = limits.read_gb_s(r.threads)
    roofline = read * 1e3 / r.mb_per_token if read and r.mb_per_token else None
    read_after = after.read_gb_s(r.threads) if after is not None else None
    roofline_after = read_after * 1e3 / r.mb_per_token if read_after and r.mb_per_token else None
    peak = limits.int8_peak_gops(r.isa, r.threads) if r.backend == "ffi" else None
    return dataclasses.replace(
        r,
        read_gb_s=read,
        roofline_tok_s=roofline,
        decode_of_roofline=r.decode_tok_s / roofline if roofline else None,
        read_gb_s_after=read_after,
        decode_of_roofline_after=r.decode_tok_s / roofline_after if roofline_after else None,
        int8_peak_gops=peak,
        prefill_of_int8_peak=r.prefill_ternary_gops / peak if peak else None,
    )


def reset_peak_rss():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # not Linux: the peak then includes building the weights


def peak_rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e6  # kB (KiB) -> MB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6


def limits_tables(results: list[GenerateTiming]) -> str:
    """Decode against the memory roofline and prefill against the int8 peak (results joined with
    the machine's limits by `with_generate_limits`)."""
    lines = [
        "Decode against memory bandwidth: MB read per token = decoder-layer weights + lm_head + other",
        "(norms, an embedding row) + KV cache at the mean context of the timed steps; roofline =",
        "read GB/s on as many threads / MB per token; read again after the runs, the last two columns",
        "(where the two readings differ, the host's bandwidth moved during the run).",
        "",
        "| backend | MB/token: layers + head + other + KV (context) = total | read GB/s | roofline tok/s "
        "| decode tok/s | of roofline | read GB/s after | of roofline after |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.backend} | {r.layers_mb:.1f} + {r.head_mb:.1f} + {r.other_mb:.2f} + {r.kv_mb:.1f} "
            f"({r.decode_context:g}) = {r.mb_per_token:.1f} | {_number(r.read_gb_s, '.1f')} "
            f"| {_number(r.roofline_tok_s, '.1f')} | {r.decode_tok_s:.2f} | {_percent(r.decode_of_roofline)} "
            f"| {_number(r.read_gb_s_after, '.1f')} | {_percent(r.decode_of_roofline_after)} |"
        )
    lines += [
        "",
        "Prefill against the int8 multiply-add peak: ternary-matmul GOPS = 2 * K * N per BitLinear and",
        "prompt token / the whole prefill time (attention and the rest are in that time too).",
        "",
        "| backend | path | threads | prefill tok/s | ternary GOPS | int8 peak GOPS | of peak |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.backend} | {r.isa} | {r.threads} | {r.prefill_tok_s:.1f} | {r.prefill_ternary_gops:.1f} "
            f"| {_number(r.int8_peak_gops, ',.0f')} | {_percent(r.prefill_of_int8_peak)} |"
        )
    return "\n".join(lines)


def context_table(results: list[GenerateTiming]) -> str:
    """Decode after each longer prompt against decode after the shortest, per backend with more
    than one length: the ratio of the medians, the ratios of the runs taken in the same round
    (median and range: one round's runs share the host's minute), and the ratio the roofline
    allows (MB read per token after the shortest / after this one: a decode at a steady share of
    the bandwidth). Empty where no backend ran several lengths."""
    lines = []
    for backend in dict.fromkeys(r.backend for r in results):
        rows = sorted((r for r in results if r.backend == backend), key=lambda r: r.prompt_tokens)
        if len(rows) < 2:
            continue
        base = rows[0]
        if not lines:
            lines += [
                f"Decode against context: after each prompt / after the shortest ({base.prompt_tokens} tokens); "
                "per round: the runs of one",
                "round (the lengths take turns), median and range; roofline: the bytes read per token after "
                "the shortest / after this one.",
                "",
                "| backend | prompt tokens | decode tok/s | of the shortest's | per round | roofline allows |",
                "|---|---:|---:|---:|---:|---:|",
            ]
        for r in rows[1:]:
            paired = [a / b for a, b in zip(r.decode_runs_tok_s, base.decode_runs_tok_s, strict=True)]
            per_round = (
                f"{_percent(float(np.median(paired)))} ({_percent(min(paired))}-{_percent(max(paired))})"
                if paired
                else "-"
            )
            of_base = _percent(r.decode_tok_s / base.decode_tok_s)
            allows = _percent(base.mb_per_token / r.mb_per_token)
            rate = f"{r.decode_tok_s:.2f}"
            lines.append(f"| {backend} | {r.prompt_tokens} | {rate} | {of_base} | {per_round} | {allows} |")
    return "\n".join(lines)


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _head_and_cache(r: GenerateTiming) -> str:
    return r.lm_head if r.kv_cache == "float32" else f"{r.lm_head}, {r.kv_cache} KV cache"


def generate_table(results: list[GenerateTiming]) -> str:
    lines = [
        "| backend | lm_head | path | threads | prefill tok/s | decode tok/s | peak RSS MB | weights MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.backend} | {_head_and_cache(r)} | {r.isa} | {r.threads} | {r.prefill_tok_s:.1f} "
            f"({r.prompt_tokens}-token prompt) | {r.decode_tok_s:.2f} ({r.new_tokens} tokens) | "
            f"{r.peak_rss_mb:.0f} | {r.weight_mb:.0f} |"
        )
    for text in sorted({sampling_text(r.temperature, r.top_k, r.top_p) for r in results} - {"greedy"}):
        lines += ["", f"Tokens picked by sampling: {text}."]
    ffi_rows = [r for r in results if r.backend == "ffi"]
    for other, name in (("xla", "XLA dense"), ("xla-packed", "the XLA integer path")):
        other_rows = [r for r in results if r.backend == other]
        if ffi_rows and other_rows:
            lines.append("")
            lines.append(
                f"FFI vs {name}: decode {ffi_rows[0].decode_tok_s / other_rows[0].decode_tok_s:.1f}x, "
                f"prefill {ffi_rows[0].prefill_tok_s / other_rows[0].prefill_tok_s:.1f}x."
            )
    return "\n".join(lines)


def sampling_text(temperature: float, top_k: int | None = None, top_p: float | None = None) -> str:
    """How a benchmark's tokens were picked (bench generate, bench serve): "greedy", or the
    temperature and the cuts asked for (None: none)."""
    if temperature == 0:
        return "greedy"
    cuts = [f"top_k {top_k}"] * (top_k is not None) + [f"top_p {top_p:g}"] * (top_p is not None)
    return ", ".join([f"temperature {temperature:g}", *cuts])


def write_json(
    path: str, results, limits: MachineLimits | None = None, limits_after: MachineLimits | None = None
) -> None:
    """One object per result; with `limits`, each also carries them ("machine_limits"), and with
    `limits_after` the limits measured again after the runs ("machine_limits_after")."""
    rows = [dataclasses.asdict(r) for r in results]
    if limits is not None:
        rows = [{**row, "machine_limits": dataclasses.asdict(limits)} for row in rows]
    if limits_after is not None:
        rows = [{**row, "machine_limits_after": dataclasses.asdict(limits_after)} for row in rows]
    with open(path, "w") as f:
        json.dump(rows, f, indent=2)
