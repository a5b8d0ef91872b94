"""JAX's persistent compilation cache for the serving commands (`generate`, `chat`, `serve`,
`bench generate`).

A process that finds its programs in the cache skips XLA's compiler: it starts faster (2B4T's
`generate` program: 3.4-3.7 s -> 0.5-0.6 s on an Ice Lake Xeon) and, more to the point, never
pulls the compiler's code and working memory into its address space, which a served model
otherwise carries to the end: 2B4T's peak RSS after a 2048-token prompt (int8 KV cache)
1241 -> 1193 MB on the same machine (benchmarks/RESULTS.md). (`generate` and `bench generate`
compile their generate program in a child process, `serve/compile_child.py`, and keep the
executable in this folder, so that a first start keeps the compiler out too and a later one loads
it without compiling or lowering anything: 1173 MB at both on a Zen 4.)

The cache lives in a folder per build of the compiled extension (`bitnet_jax._ffi_ext`): a cached
program calls our FFI kernels by name, so a rebuilt extension (new kernels, perhaps a new calling
contract behind the same name) must not run programs compiled against the old one. JAX's own key
covers the rest (the program, jax and jaxlib versions, the backend, compile options).
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys

import jax

# `--compilation-cache` values that turn the cache off.
OFF = ("off", "none", "")


@functools.cache
def extension_build_id() -> str:
    """A short digest of the compiled extension's file ('no-extension' where it is not built)."""
    try:
        from bitnet_jax import _ffi_ext
    except ImportError:
        return "no-extension"
    with open(_ffi_ext.__file__, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:16]


def default_compilation_cache_dir() -> str:
    from bitnet_jax.train.run_folder import default_cache_dir

    return os.path.join(default_cache_dir(), "xla", f"jax-{jax.__version__}-ext-{extension_build_id()}")


def enable_compilation_cache(directory: str | None = None) -> str | None:
    """Turns on JAX's persistent compilation cache for this process and returns its folder.

    `directory`: None for the default (under $BITNET_JAX_CACHE, else $XDG_CACHE_HOME/bitnet_jax,
    else ~/.cache/bitnet_jax: `xla/jax-<version>-ext-<extension build>`), a folder, or one of OFF.
    A cache the user set up (`JAX_COMPILATION_CACHE_DIR` or `jax_compilation_cache_dir`) is left
    as it is. A folder that cannot be made gives a warning on stderr and no cache (None), not an
    error: the cache only saves time and memory. Call it before anything is compiled: JAX reads
    the setting at its first compile.
    """
    configured = jax.config.jax_compilation_cache_dir
    if configured:
        return configured
    if directory is not None and directory.strip().lower() in OFF:
        return None
    try:
        directory = directory or default_compilation_cache_dir()
        os.makedirs(directory, exist_ok=True)
    except OSError as e:  # a read-only home, say: serve without the cache rather than not at all
        print(f"warning: no compilation cache ({e}); pass --compilation-cache DIR or off", file=sys.stderr)
        return None
    jax.config.update("jax_compilation_cache_dir", directory)
    return directory
