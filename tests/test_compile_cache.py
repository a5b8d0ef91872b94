"""The serving commands' persistent compilation cache (serve/compile_cache.py) and the host-built
sampling key that keeps a cached server from compiling anything at its first request."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from bitnet_jax.cli import main
from bitnet_jax.serve import compile_cache
from bitnet_jax.serve.generate import sampling_key

FIXTURES = Path(__file__).parent / "fixtures" / "hf"


@pytest.mark.parametrize("seed", [0, 1, 7, 12345, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40 + 5, -1, -5, -(2**31)])
def test_sampling_key_is_prngkey(seed):
    """The same key bits as jax.random.PRNGKey, so a seed draws what it drew before: negative
    seeds and seeds past 32 bits included (32-bit mode keeps the low 32 bits)."""
    np.testing.assert_array_equal(sampling_key(seed), np.asarray(jax.random.PRNGKey(seed)))


def test_default_folder_is_per_jax_version_and_extension_build(monkeypatch, tmp_path):
    """A rebuilt extension (new kernels behind the same FFI names) gets a fresh folder: the name
    carries a digest of the extension's file, and the jax version."""
    from bitnet_jax import _ffi_ext

    monkeypatch.setenv("BITNET_JAX_CACHE", str(tmp_path))
    digest = hashlib.sha256(Path(_ffi_ext.__file__).read_bytes()).hexdigest()[:16]
    assert compile_cache.default_compilation_cache_dir() == str(
        tmp_path / "xla" / f"jax-{jax.__version__}-ext-{digest}"
    )


def test_a_configured_cache_is_left_as_it_is():
    """The test session sets JAX_COMPILATION_CACHE_DIR (conftest.py): neither a folder nor 'off'
    replaces the user's own cache."""
    configured = jax.config.jax_compilation_cache_dir
    assert configured
    assert compile_cache.enable_compilation_cache("/nonexistent/elsewhere") == configured
    assert compile_cache.enable_compilation_cache("off") == configured
    assert jax.config.jax_compilation_cache_dir == configured


def _fresh_process(code: str, cache_root: Path) -> subprocess.CompletedProcess:
    """`code` in a new Python without the test session's cache, logging compiles (and cache hits).
    It runs in `cache_root`, not the checkout, so that `import bitnet_jax` finds the installed
    package (with its compiled extension), not the source folder (`python -c` puts the working
    folder first on sys.path)."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    # The tiny model compiles in well under JAX's default 1 s threshold for caching a program.
    env.update(BITNET_JAX_CACHE=str(cache_root), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_LOG_COMPILES="1")
    cache_root.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=cache_root, timeout=600
    )


def test_off_leaves_jax_without_a_cache(tmp_path):
    code = (
        "import jax\nfrom bitnet_jax.serve.compile_cache import enable_compilation_cache\n"
        "print(enable_compilation_cache('off'), jax.config.jax_compilation_cache_dir)"
    )
    run = _fresh_process(code, tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["None", "None"]
    assert not (tmp_path / "xla").exists()


def test_a_folder_that_cannot_be_made_warns_and_serves_without_a_cache(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code = (
        "import jax\nfrom bitnet_jax.serve.compile_cache import enable_compilation_cache\n"
        f"print(enable_compilation_cache({str(blocker / 'xla')!r}), jax.config.jax_compilation_cache_dir)"
    )
    run = _fresh_process(code, tmp_path / "cwd")
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["None", "None"]
    assert "warning: no compilation cache" in run.stderr and "--compilation-cache" in run.stderr


def test_generate_reuses_its_program_and_compiles_nothing_else(tmp_path):
    """`bitnet-jax generate` twice on a packed folder: neither run compiles anything itself, with
    the same tokens. The first compiles its generate program in a child process
    (serve/compile_child.py), which keeps the executable in the cache folder; the second loads it
    from there (and builds its sampling key on the host: no seeding program)."""
    packed = tmp_path / "packed"
    assert main(["convert", str(FIXTURES / "packed_bitlinear"), str(packed)]) == 0
    code = (
        "import sys\nfrom bitnet_jax.cli import main\n"
        f"sys.exit(main(['generate', '--model', {str(packed)!r}, '--prompt', 'hello', '--max-new-tokens', '5']))"
    )
    first, second = (_fresh_process(code, tmp_path / "cache") for _ in range(2))
    for run in (first, second):
        assert run.returncode == 0, run.stderr
        assert not [line for line in run.stderr.splitlines() if line.startswith("Compiling ")], run.stderr
    (folder,) = (tmp_path / "cache" / "xla").iterdir()
    assert len(list((folder / "bitnet_jax-executables").iterdir())) == 1
    assert first.stdout == second.stdout
