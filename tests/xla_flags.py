"""XLA_FLAGS for the test processes and the subprocesses they start.

The suite's models are tiny, so most of a test's time is XLA:CPU compiling, and most of that is
LLVM optimizing the generated code. FAST_COMPILE turns LLVM's optimization down (level 0, no
expensive passes): compiles take about half the time, and the suite took 14% less (1160 -> 995 s
on a 2-core Zen 4). It changes how fast a program runs, not what it computes: XLA's own HLO
passes (fusion, layout, the order of reductions) run as before, and LLVM reorders no float
arithmetic at any level without fast-math, which XLA:CPU leaves off. The FFI kernels are built by
CMake and are not affected. Benchmarks and users get XLA's defaults; no test here times anything
against a threshold.
"""

from __future__ import annotations

import os

FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def with_flags(*flags: str) -> str:
    """This process's XLA_FLAGS with `flags` added, e.g. a simulated device count for a subprocess,
    without dropping FAST_COMPILE or the flags a user set."""
    return " ".join(part for part in (os.environ.get("XLA_FLAGS", ""), *flags) if part)


def device_count_flags(devices: int) -> str:
    """This process's XLA_FLAGS plus `devices` simulated CPU devices, for a subprocess's environment."""
    return with_flags(f"--xla_force_host_platform_device_count={devices}")
