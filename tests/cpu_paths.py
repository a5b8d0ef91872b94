"""The kernel paths of xla_ffi/cpu_isa.cc, for tests that check every one of them.

Tests parametrize over all of KNOWN_ISAS and call `skip_unless_runs` for each: a path this
machine cannot run shows up as a skip with its reason, never as a silent pass. A path the CPU
advertises (in /proc/cpuinfo) but the kernels do not offer fails instead: that is a broken
dispatch or a build without its SIMD code, not a missing feature.
"""

from __future__ import annotations

import platform

import pytest

# Every path, as BITNET_JAX_ISA names it (cpu_isa.cc).
KNOWN_ISAS = ("scalar", "avx2", "avx512", "neon", "neon_dot")

_X86 = ("x86_64", "AMD64")
_ARM = ("aarch64", "arm64")

# Per SIMD path: the machines whose builds hold it, and the /proc/cpuinfo flags of what cpu_isa.cc
# checks (__builtin_cpu_supports on x86-64, getauxval(AT_HWCAP) on aarch64).
_PATHS = {
    "avx2": (_X86, {"avx2"}),
    "avx512": (_X86, {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"}),
    "neon": (_ARM, {"asimd"}),
    "neon_dot": (_ARM, {"asimd", "asimddp"}),
}


def _cpuinfo_flags() -> set[str]:
    """The CPU's feature flags: the `flags` line on x86, `Features` on ARM."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def skip_unless_runs(isa: str, runs: list[str], who: str) -> None:
    """Skips the calling test, saying why, if `isa` is not among the paths `runs` (what `who`,
    the kernels under test, reported this CPU runs)."""
    unknown = set(runs) - set(KNOWN_ISAS)
    assert not unknown, f"{who} runs paths {sorted(unknown)} that tests/cpu_paths.py does not know: add them"
    assert "scalar" in runs, f"{who} does not run the scalar path, which every build holds (it runs {runs})"
    if isa in runs:
        return
    machine = platform.machine()
    machines, flags = _PATHS[isa]
    if machine not in machines:
        pytest.skip(f"{who}: {isa} is built for {machines[0]} only, not {machine}; it runs {', '.join(runs)}")
    if flags <= _cpuinfo_flags():
        pytest.fail(
            f"{who}: /proc/cpuinfo lists {sorted(flags)}, but the kernels do not offer {isa} (they "
            f"run {', '.join(runs)}): the dispatch in xla_ffi/cpu_isa.cc or the {machine} build of "
            "the SIMD paths is broken"
        )
    pytest.skip(f"{who}: this CPU ({machine}) cannot run {isa}; it runs {', '.join(runs)}")
