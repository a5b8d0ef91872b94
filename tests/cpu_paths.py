"""The kernel paths of xla_ffi/cpu_isa.cc, for tests that check every one of them.

Tests parametrize over all of KNOWN_ISAS and call `skip_unless_runs` for each: a path this
machine cannot run shows up as a skip with its reason, never as a silent pass. A path the CPU
advertises (in /proc/cpuinfo) but the kernels do not offer fails instead: that is a broken
dispatch or an x86 build without its SIMD code, not a missing feature.
"""

from __future__ import annotations

import platform

import pytest

# Every path, as BITNET_JAX_ISA names it (cpu_isa.cc).
KNOWN_ISAS = ("scalar", "avx2", "avx512")

# The /proc/cpuinfo flags of what cpu_isa.cc asks __builtin_cpu_supports for, per path.
_CPUINFO_FLAGS = {
    "scalar": set(),
    "avx2": {"avx2"},
    "avx512": {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"},
}


def _cpuinfo_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def skip_unless_runs(isa: str, runs: list[str], who: str) -> None:
    """Skips the calling test, saying why, if `isa` is not among the paths `runs` (what `who`,
    the kernels under test, reported this CPU runs)."""
    unknown = set(runs) - set(KNOWN_ISAS)
    assert not unknown, f"{who} runs paths {sorted(unknown)} that tests/cpu_paths.py does not know: add them"
    if isa in runs:
        return
    machine = platform.machine()
    if machine in ("x86_64", "AMD64") and _CPUINFO_FLAGS[isa] <= _cpuinfo_flags():
        pytest.fail(
            f"{who}: /proc/cpuinfo lists {sorted(_CPUINFO_FLAGS[isa])}, but the kernels do not "
            f"offer {isa} (they run {', '.join(runs)}): the dispatch in xla_ffi/cpu_isa.cc or the "
            "x86-64 build of the SIMD paths is broken"
        )
    pytest.skip(f"{who}: this CPU ({machine}) cannot run {isa}; it runs {', '.join(runs)}")
