"""The C++ kernel test (xla_ffi/tests/kernel_test.cc) built and run under AddressSanitizer and
UndefinedBehaviorSanitizer: every kernel path this CPU runs, exact against a naive product on
odd shapes, with no out-of-bounds access or undefined behaviour on the way."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _cmake() -> str:
    found = shutil.which("cmake") or str(Path(sys.executable).parent / "cmake")
    assert os.path.exists(found), "cmake is needed for the C++ tests (pip install '.[test]' installs it)"
    return found


def test_kernels_exact_under_asan_and_ubsan(tmp_path):
    build = tmp_path / "build"
    generator = ["-G", "Ninja"] if shutil.which("ninja") or (Path(sys.executable).parent / "ninja").exists() else []
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    subprocess.run([_cmake(), "-S", str(ROOT / "xla_ffi"), "-B", str(build), *generator,
                    "-DCMAKE_BUILD_TYPE=RelWithDebInfo", "-DBITNET_JAX_BUILD_PYTHON=OFF",
                    "-DBITNET_JAX_BUILD_TESTS=ON", "-DBITNET_JAX_SANITIZE=ON"],
                   check=True, capture_output=True, env=env)
    subprocess.run([_cmake(), "--build", str(build), "--target", "kernel_test", "-j", "2"],
                   check=True, capture_output=True, env=env)
    result = subprocess.run([str(build / "kernel_test")], capture_output=True, text=True,
                            env=dict(env, ASAN_OPTIONS="detect_leaks=1", UBSAN_OPTIONS="print_stacktrace=1"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("OK")
    assert "scalar: checked" in result.stdout
