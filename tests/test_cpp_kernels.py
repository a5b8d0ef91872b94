"""The C++ kernel test (xla_ffi/tests/kernel_test.cc): every kernel path exact against a naive
product on odd shapes,

  * built for this machine and run under AddressSanitizer and UndefinedBehaviorSanitizer (no
    out-of-bounds access or undefined behaviour on the way), one test per path, a path this CPU
    cannot run skipped with the reason;
  * cross-built for aarch64 (xla_ffi/cmake/aarch64-linux-gnu.cmake) and run under qemu-user: the
    scalar and both NEON paths exact there, on an emulated core with the dot-product extension
    and on one without, where the run-time check must leave that path out. Skipped, with the
    reason, where the cross compiler or qemu is not installed (.ci/run installs them).
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax.ffi
import pytest
from cpu_paths import KNOWN_ISAS, skip_unless_runs

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ROOT / "xla_ffi"
ARM_CXX = "aarch64-linux-gnu-g++"
ARM_SYSROOT = "/usr/aarch64-linux-gnu"  # where Debian's cross packages put the ARM libc and libstdc++
QEMU = "qemu-aarch64"


def _cmake() -> str:
    found = shutil.which("cmake") or str(Path(sys.executable).parent / "cmake")
    assert os.path.exists(found), "cmake is needed for the C++ tests (pip install '.[test]' installs it)"
    return found


def _env() -> dict:
    # The venv's cmake and ninja come first, even when pytest was not started from the venv.
    return dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


def _build_kernel_test(build: Path, *cmake_args: str) -> Path:
    generator = ["-G", "Ninja"] if shutil.which("ninja") or (Path(sys.executable).parent / "ninja").exists() else []
    for command in (
        [
            _cmake(),
            "-S",
            str(SOURCES),
            "-B",
            str(build),
            *generator,
            "-DBITNET_JAX_BUILD_PYTHON=OFF",
            "-DBITNET_JAX_BUILD_TESTS=ON",
            *cmake_args,
        ],
        [_cmake(), "--build", str(build), "--target", "kernel_test", "-j", "2"],
    ):
        done = subprocess.run(command, capture_output=True, text=True, env=_env())
        assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout}{done.stderr}"
    return build / "kernel_test"


def _checked_paths(output: str) -> dict[str, str]:
    """kernel_test's verdict per path: 'checked' or 'not checked', from its lines
    '<path>: checked N shapes' / '<path>: not checked, <why>'. Every known path must have one."""
    verdicts = dict(re.findall(r"^(\w+): (checked|not checked)\b", output, re.M))
    assert set(verdicts) == set(KNOWN_ISAS), (
        f"kernel_test reported paths {sorted(verdicts)}, expected {list(KNOWN_ISAS)}:\n{output}"
    )
    return verdicts


@pytest.fixture(scope="module")
def sanitized_run(tmp_path_factory):
    """kernel_test built for this machine with -DBITNET_JAX_SANITIZE=ON, run once."""
    binary = _build_kernel_test(
        tmp_path_factory.mktemp("kernel_test") / "build",
        "-DCMAKE_BUILD_TYPE=RelWithDebInfo",
        "-DBITNET_JAX_SANITIZE=ON",
    )
    return subprocess.run(
        [str(binary)],
        capture_output=True,
        text=True,
        env=dict(_env(), ASAN_OPTIONS="detect_leaks=1", UBSAN_OPTIONS="print_stacktrace=1"),
    )


@pytest.mark.parametrize("isa", KNOWN_ISAS)
def test_kernels_exact_under_asan_and_ubsan(sanitized_run, isa):
    output = sanitized_run.stdout + sanitized_run.stderr
    assert sanitized_run.returncode == 0, output
    assert sanitized_run.stdout.strip().endswith("OK"), output
    verdicts = _checked_paths(sanitized_run.stdout)
    skip_unless_runs(isa, [name for name, verdict in verdicts.items() if verdict == "checked"], "kernel_test")
    assert re.search(rf"^{isa}: checked \d+ shapes$", sanitized_run.stdout, re.M), output


def _elf_machine(binary: Path) -> int:
    header = binary.read_bytes()[:20]
    assert header[:4] == b"\x7fELF", f"{binary} is not an ELF file"
    return int.from_bytes(header[18:20], "little")  # e_machine


def test_kernels_exact_on_aarch64_under_qemu(tmp_path):
    missing = [tool for tool in (ARM_CXX, QEMU) if shutil.which(tool) is None]
    if missing:
        pytest.skip(
            f"cannot cross-check the aarch64 build: {' and '.join(missing)} not installed "
            "(Debian: apt-get install g++-aarch64-linux-gnu qemu-user; .ci/run does it as root)"
        )
    binary = _build_kernel_test(
        tmp_path / "build",
        "-DCMAKE_BUILD_TYPE=Release",
        f"-DCMAKE_TOOLCHAIN_FILE={SOURCES / 'cmake' / 'aarch64-linux-gnu.cmake'}",
    )
    assert _elf_machine(binary) == 183, "the cross build did not produce an AArch64 binary"  # EM_AARCH64
    # qemu's "max" core has the dot-product extension; the Cortex-A57 (Armv8.0-A) does not, and
    # the run-time check (getauxval) must leave that path out there.
    for cpu, has_dot in (("max", True), ("cortex-a57", False)):
        run = subprocess.run([QEMU, "-cpu", cpu, "-L", ARM_SYSROOT, str(binary)], capture_output=True, text=True)
        output = f"qemu-aarch64 -cpu {cpu}:\n{run.stdout}{run.stderr}"
        assert run.returncode == 0, output
        assert run.stdout.strip().endswith("OK"), output
        assert _checked_paths(run.stdout) == {
            "scalar": "checked",
            "avx2": "not checked",
            "avx512": "not checked",
            "neon": "checked",
            "neon_dot": "checked" if has_dot else "not checked",
        }, output
        if not has_dot:
            assert re.search(r"^neon_dot: not checked, this CPU cannot run it$", run.stdout, re.M), output


def test_ffi_handlers_compile_for_aarch64(tmp_path):
    """`pip install .` on aarch64 compiles every kernel source, not only kernel_test's: the FFI
    handlers (and quantize.h, which they include) must build there as well. ffi_ext.cc, the
    nanobind glue, needs the target's Python headers and holds no kernel code."""
    if shutil.which(ARM_CXX) is None:
        pytest.skip(
            f"cannot cross-compile for aarch64: {ARM_CXX} not installed "
            "(Debian: apt-get install g++-aarch64-linux-gnu; .ci/run does it as root)"
        )
    sources = sorted(p for p in SOURCES.glob("*.cc") if p.name != "ffi_ext.cc")
    assert {"matmul.cc", "act_quant.cc", "gemm.cc", "cpu_isa.cc"} <= {p.name for p in sources}
    # All at once: each compile is one process, so they share the CPU cores.
    compiles = {
        source: subprocess.Popen(
            [
                ARM_CXX,
                "-std=c++17",
                "-O2",
                "-Wall",
                "-Wextra",
                "-isystem",
                jax.ffi.include_dir(),
                "-c",
                str(source),
                "-o",
                str(tmp_path / f"{source.stem}.o"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for source in sources
    }
    errors = {source: done.communicate()[1] for source, done in compiles.items()}
    for source, done in compiles.items():
        assert done.returncode == 0, f"{source.name} does not compile for aarch64:\n{errors[source]}"
