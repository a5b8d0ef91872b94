"""This machine's limits, measured by `bench generate` and `bench kernels` in their own run.

- Streaming read bandwidth: a buffer far larger than the last-level cache (1 GiB, or 8x the LLC
  where that is more) read whole, on 1 thread and on every thread this process may use, with each
  kernel path's vector loads (`bitnet_read_bandwidth`, xla_ffi/machine.cc), twice: with the
  hardware prefetcher alone, and fetching each stream READ_AHEAD_BYTES ahead into L2 as the
  kernels fetch theirs. Which reads faster differs between hosts and, on a shared one, from minute
  to minute (a loaded Zen 4: 7 against 20 GB/s on one thread; quiet: 30 against 18), so the limit
  is the faster of the two. GB/s = bytes / the median pass; the first pass is a warm-up and is
  dropped. Every pass returns the sum of the bytes it read, checked against the sum the buffer was
  filled to have: a pass that skipped bytes is an error, never a fast pass.
- int8 multiply-add peak: a register-resident loop of the multiply-add instruction each kernel
  path uses (vpdpbusd on AVX-512 VNNI, vpmaddubsw on AVX2, a scalar multiply-add), on 1 thread and
  on all (`bitnet_int8_peak`). Counted as matmul GOPS are: 2 int8 operations (a multiply and an
  add) per multiply-add.

Decode is bounded by read bandwidth / bytes read per token, prefill by the int8 peak
(bitnet_jax/bench/roofline.py joins these with the benchmarks' timings). Threads come from XLA's
intra-op pool, as the kernels' do, so `set_threads` (bench/serve.py) limits both.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import os

import numpy as np

from bitnet_jax.errors import BitNetError

_FILL_BLOCK = 1 << 20  # the buffer repeats one random block of this many bytes
READ_AHEAD_BYTES = 32 << 10  # as the int8 kernels' weight stream (xla_ffi/gemm_x86.cc)
_PEAK_A, _PEAK_B = 3, -5  # the loop's operands: a (u8) times b + u (s8) in accumulator u


@dataclasses.dataclass(frozen=True)
class PathLimits:
    path: str  # kernel path ("avx2", "avx512", "scalar", ...)
    instruction: str  # what the int8 peak loop runs on it
    threads: int
    read_gb_s: float  # 10^9 bytes / s, median pass: the faster of the two reads below
    int8_peak_gops: float  # 10^9 int8 operations / s (2 per multiply-add), median pass
    read_hw_gb_s: float | None = None  # the hardware prefetcher alone
    read_ahead_gb_s: float | None = None  # fetching READ_AHEAD_BYTES ahead (None: the scalar loop does not)


@dataclasses.dataclass(frozen=True)
class MachineLimits:
    cpu: str
    buffer_mb: float  # the read buffer, MB (10^6 bytes)
    rows: tuple[PathLimits, ...]

    def read_gb_s(self, threads: int) -> float | None:
        """The best read bandwidth measured on `threads` threads (over paths), or None."""
        found = [r.read_gb_s for r in self.rows if r.threads == threads]
        return max(found) if found else None

    def int8_peak_gops(self, path: str, threads: int) -> float | None:
        for r in self.rows:
            if r.path == path and r.threads == threads:
                return r.int8_peak_gops
        return None


@contextlib.contextmanager
def forced_path(path: str | None):
    """Runs the body with BITNET_JAX_ISA=path (the kernels read it at every call), then restores it."""
    previous = os.environ.get("BITNET_JAX_ISA")
    if path is not None:
        os.environ["BITNET_JAX_ISA"] = path
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("BITNET_JAX_ISA", None)
        else:
            os.environ["BITNET_JAX_ISA"] = previous


def _u64(words_p2) -> np.ndarray:
    """[..., 2] uint32 (low, high) -> [...] uint64."""
    words = np.asarray(words_p2).astype(np.uint64)
    return words[..., 0] | (words[..., 1] << np.uint64(32))


def read_passes(buffer, threads: int, passes: int, read_ahead: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Reads `buffer` (uint8 [n], a jax array or numpy) `passes` times on `threads` threads, with the
    selected kernel path's loads, each stream fetched `read_ahead` bytes ahead into L2 (0: not);
    returns (seconds [passes] float64, byte sums [passes] uint64)."""
    import jax
    import jax.numpy as jnp

    from bitnet_jax.kernels import ffi  # noqa: F401  (registers the FFI targets)

    out_types = (jax.ShapeDtypeStruct((passes,), jnp.float32), jax.ShapeDtypeStruct((passes, 2), jnp.uint32))
    seconds, sums = jax.ffi.ffi_call("bitnet_read_bandwidth", out_types)(
        buffer, threads=np.int64(threads), read_ahead=np.int64(read_ahead)
    )
    return np.asarray(seconds, np.float64), _u64(sums)


def int8_peak_passes(
    iterations: int, threads: int, passes: int, a: int = _PEAK_A, b: int = _PEAK_B
) -> tuple[np.ndarray, np.ndarray, int]:
    """Runs the selected path's int8 multiply-add loop (`iterations` rounds) on each of `threads`
    threads, `passes` times; returns (seconds [passes] float64, the threads' summed results
    [passes] int64, multiply-adds of one thread's loop)."""
    import jax
    import jax.numpy as jnp

    from bitnet_jax.kernels import ffi  # noqa: F401  (registers the FFI targets)

    out_types = (
        jax.ShapeDtypeStruct((passes,), jnp.float32),
        jax.ShapeDtypeStruct((passes, 2), jnp.uint32),
        jax.ShapeDtypeStruct((2,), jnp.uint32),
    )
    call = jax.ffi.ffi_call("bitnet_int8_peak", out_types)
    seconds, results, macs = call(
        iterations=np.int64(iterations), threads=np.int64(threads), a=np.int64(a), b=np.int64(b)
    )
    return np.asarray(seconds, np.float64), _u64(results).view(np.int64), int(_u64(macs))


def llc_bytes() -> int | None:
    """The largest cache of CPU 0 as Linux reports it (sysfs), or None where it does not."""
    sizes = []
    for index in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*"):
        try:
            with open(os.path.join(index, "size")) as f:
                text = f.read().strip()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes) if sizes else None


def default_buffer_bytes() -> int:
    """1 GiB, or 8x the last-level cache where that is more: far past every cache."""
    return max(1 << 30, 8 * (llc_bytes() or 0))


def filled_buffer(nbytes: int):
    """(uint8 [nbytes] on the CPU device, the sum of its bytes): one random block repeated, written
    into 64-byte-aligned memory that JAX adopts without a copy."""
    import jax

    from bitnet_jax.serve.host_memory import aligned_empty

    if nbytes < 1:
        raise BitNetError(f"read buffer of {nbytes} bytes: expected at least 1.")
    block = np.random.default_rng(0).integers(0, 256, min(nbytes, _FILL_BLOCK), dtype=np.uint8)
    host = aligned_empty((nbytes,), np.uint8)
    whole, tail = nbytes // block.size, nbytes % block.size
    host[: whole * block.size].reshape(whole, block.size)[:] = block
    host[whole * block.size :] = block[:tail]
    total = int(block.sum(dtype=np.uint64)) * whole + int(block[:tail].sum(dtype=np.uint64))
    return jax.device_put(host), total


def read_gb_s(buffer, expected_sum: int, threads: int, passes: int = 7, read_ahead: int = 0) -> float:
    """Read GB/s of `buffer` on `threads` threads (streams fetched `read_ahead` bytes ahead): bytes /
    the median of passes 2.., each pass's byte sum checked against `expected_sum`."""
    seconds, sums = read_passes(buffer, threads, passes, read_ahead)
    if not np.all(sums == np.uint64(expected_sum % (1 << 64))):
        raise BitNetError(
            f"bitnet_read_bandwidth returned byte sums {sums.tolist()}, expected {expected_sum} for every "
            "pass: the bandwidth kernel did not read the whole buffer (a bug; please report it)."
        )
    return buffer.size / float(np.median(seconds[1:] if passes > 1 else seconds)) / 1e9


def int8_peak_gops(threads: int, passes: int = 6, seconds_per_pass: float = 0.05) -> float:
    """The selected path's int8 multiply-add peak on `threads` threads, in GOPS (2 per multiply-add),
    from the median of passes 2.. of about `seconds_per_pass` each (tests/test_machine_limits.py
    checks the loop's result against its arithmetic)."""
    probe, _, _ = int8_peak_passes(4096, 1, 2)
    iterations = max(1, int(4096 * seconds_per_pass / max(float(probe[-1]), 1e-6)))
    seconds, _, macs = int8_peak_passes(iterations, threads, passes)
    return 2 * macs * threads / float(np.median(seconds[1:] if passes > 1 else seconds)) / 1e9


def measure_limits(
    paths: list[str] | None = None,
    thread_counts: list[int] | None = None,
    buffer_bytes: int | None = None,
    passes: int = 7,
) -> MachineLimits:
    """Read bandwidth and int8 peak on each kernel path (default: the SIMD paths this CPU runs) and
    thread count (default: 1 and all this process may use)."""
    from bitnet_jax import _ffi_ext
    from bitnet_jax.bench.train import cpu_name
    from bitnet_jax.kernels import ffi

    instructions = _ffi_ext.int8_peak_instructions()
    available = ffi.available_isas()
    paths = paths or [p for p in available if p != "scalar"] or ["scalar"]
    unknown = [p for p in paths if p not in available]
    if unknown:
        raise BitNetError(f"kernel paths {unknown}: this CPU runs {available}; choose among those.")
    everyone = len(os.sched_getaffinity(0))
    thread_counts = thread_counts or sorted({1, everyone})
    buffer, expected = filled_buffer(buffer_bytes or default_buffer_bytes())
    rows = []
    try:
        for path in paths:
            with forced_path(path):
                for threads in thread_counts:
                    hw = read_gb_s(buffer, expected, threads, passes)
                    ahead = None if path == "scalar" else read_gb_s(buffer, expected, threads, passes, READ_AHEAD_BYTES)
                    rows.append(
                        PathLimits(
                            path,
                            instructions.get(path, "?"),
                            threads,
                            max(hw, ahead or 0.0),
                            int8_peak_gops(threads),
                            read_hw_gb_s=hw,
                            read_ahead_gb_s=ahead,
                        )
                    )
    finally:
        size = buffer.size
        del buffer
    return MachineLimits(cpu_name(), size / 1e6, tuple(rows))


def limits_table(limits: MachineLimits) -> str:
    lines = [
        f"Machine limits measured in this run ({limits.cpu}; read buffer {limits.buffer_mb:,.0f} MB; "
        "int8 ops = 2 per multiply-add):",
        "",
        "| path | threads | read GB/s | (hardware prefetch / fetched ahead) | int8 peak GOPS | peak loop |",
        "|---|---:|---:|---|---:|---|",
    ]

    def gb_s(value):
        return "-" if value is None else f"{value:.1f}"

    for r in limits.rows:
        lines.append(
            f"| {r.path} | {r.threads} | {r.read_gb_s:.1f} | {gb_s(r.read_hw_gb_s)} / {gb_s(r.read_ahead_gb_s)} "
            f"| {r.int8_peak_gops:,.0f} | {r.instruction} |"
        )
    return "\n".join(lines)
