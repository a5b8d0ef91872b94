"""Compiling a jitted function in a child process, so that XLA's compiler never enters this one.

A process that compiles an XLA program keeps the compiler's footprint to its end: for 2B4T's
`generate` program on CPU some 40 MB of jaxlib's compiler code paged in, the heap glibc keeps
after compiling, and JAX's cached jaxprs and lowerings, about 75 MB in all (benchmarks/RESULTS.md).
A served model would carry it beside its weights. `compile_in_child` runs the compile in a fresh
interpreter instead (`python -m bitnet_jax.serve.compile_child`): the child imports the function
by name, lowers and compiles it for abstract arguments, and hands back the executable serialized
(`jax.experimental.serialize_executable`), which this process loads without compiling. `generate`,
`chat` (serve/generate.py) and the `serve` engine (serve/batching.py) compile this way.

The child gets this process's JAX configuration (every value that differs from its own, but
with JAX's persistent cache off: see below) and the environment (XLA_FLAGS, BITNET_JAX_ISA), so
it compiles the program this process would have. It costs a second interpreter's start (about a
second and a half) on top of the compile.

With a compilation cache folder (`jax_compilation_cache_dir`, which the serving commands set:
serve/compile_cache.py) the executable is also kept there, under `bitnet_jax-executables/`, named
by a digest of the request, this package's source, the jax, jaxlib and extension builds and the
host CPU, and a later call loads it from there without a child. JAX's own persistent cache cannot
serve here: on jaxlib 0.10 an executable read from it serializes without its code (loading it in
another process fails with "Function ... not found" when it runs), and a process that reads it
itself must lower the program first, which costs it some 23 MB that stay (benchmarks/RESULTS.md).
So the child compiles with JAX's cache off. A stored executable that cannot be read or loaded is
removed and compiled again.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import os
import pickle
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings

import jax
import jaxlib

import bitnet_jax
from bitnet_jax.serve.compile_cache import extension_build_id


class ChildCompileError(RuntimeError):
    """The child process did not deliver an executable (its stderr ends the message)."""


def compile_in_child(fn, abstract_args: tuple, static: dict) -> jax.stages.Compiled | None:
    """`fn.lower(*abstract_args, **static).compile()`, run in a child process and loaded here.

    `fn` is a `jax.jit`-ed function at the top level of a module (the child imports it by name);
    `abstract_args` is a tree of `jax.ShapeDtypeStruct` without shardings; `static` holds the
    static keyword arguments (picklable). With a compilation cache folder on, an executable
    stored there by an earlier call for the same request loads without a child. Returns None
    where this does not apply and the caller should compile as usual (a backend other than CPU,
    arguments placed by a sharding or a mesh in scope, settings that cannot be pickled). Raises
    `ChildCompileError` if the child fails.
    """
    if jax.default_backend() != "cpu" or not jax.sharding.get_abstract_mesh().empty:
        return None
    if any(getattr(x, "sharding", None) is not None for x in jax.tree.leaves(abstract_args)):
        return None
    module, name = fn.__module__, fn.__qualname__
    if getattr(importlib.import_module(module), name, None) is not fn:
        raise ValueError(f"{module}.{name} is not the function to compile: it must be a module's top-level name")
    try:
        request = pickle.dumps(
            dict(
                package=bitnet_jax.__file__,
                module=module,
                name=name,
                args=abstract_args,
                static=static,
                config=dict(jax.config.values),
            )
        )
    except (pickle.PicklingError, TypeError, AttributeError):
        return None
    stored = _stored_path(request)
    if stored is not None and os.path.exists(stored):
        try:
            return _load(stored)
        except Exception:  # truncated, corrupt or unreadable: compile it again
            with contextlib.suppress(OSError):
                os.remove(stored)

    with tempfile.TemporaryDirectory(prefix="bitnet-jax-compile-") as folder:
        result_path = os.path.join(folder, "executable.pkl")
        try:
            child = subprocess.run(_child_command(result_path), input=request, capture_output=True)
        except OSError as e:  # no interpreter to start (an embedded Python), no processes left
            raise ChildCompileError(f"compiling {module}.{name} in a child process failed to start it: {e}") from e
        if child.returncode != 0 or not os.path.exists(result_path):
            stderr = child.stderr.decode(errors="replace").strip().splitlines()
            tail = "\n".join(stderr[-15:]) or "(no output)"
            raise ChildCompileError(
                f"compiling {module}.{name} in a child process failed (exit {child.returncode}):\n{tail}"
            )
        try:
            compiled = _load(result_path)
        except Exception as e:  # whatever failed, the caller may compile here instead
            raise ChildCompileError(
                f"the executable compiled for {module}.{name} in a child process did not load: {e}"
            ) from e
        if stored is not None:
            _store(result_path, stored)
    return compiled


def compiled_in_child_or_none(fn, abstract_args: tuple, static: dict) -> jax.stages.Compiled | None:
    """`compile_in_child`, with a failed child turned into a warning and None (the caller then
    compiles in this process)."""
    try:
        return compile_in_child(fn, abstract_args, static)
    except ChildCompileError as e:
        warnings.warn(f"{e}\ncompiling in this process instead", RuntimeWarning, stacklevel=3)
        return None


def _load(path: str) -> jax.stages.Compiled:
    """The executable `_main` serialized at `path`, loaded here."""
    from jax.experimental import serialize_executable

    # The program may call our FFI kernels, which must be registered before it loads.
    if "bitnet_jax.kernels.ffi" not in sys.modules:
        try:
            importlib.import_module("bitnet_jax.kernels.ffi")
        except ImportError:
            pass  # not built: a program that calls the kernels fails to load, as it would to compile
    with open(path, "rb") as f:
        payload, in_tree, out_tree = pickle.load(f)
    return serialize_executable.deserialize_and_load(payload, in_tree, out_tree)


# The folder under the compilation cache that keeps executables compiled in a child.
_STORE = "bitnet_jax-executables"


def _stored_path(request: bytes) -> str | None:
    """Where the executable for `request` is kept, or None where no compilation cache is on."""
    folder = jax.config.jax_compilation_cache_dir
    if not folder or not jax.config.jax_enable_compilation_cache:
        return None
    digest = hashlib.sha256(request)
    for part in (_package_source_digest(), jax.__version__, jaxlib.__version__, extension_build_id(), _host_cpu()):
        digest.update(b"\0" + part.encode())
    return os.path.join(folder, _STORE, digest.hexdigest() + ".pkl")


def _store(result_path: str, stored: str) -> None:
    """Copies the child's executable into the store (atomically: a reader never sees half a file)."""
    try:
        os.makedirs(os.path.dirname(stored), exist_ok=True)
        partial = f"{stored}.{os.getpid()}-{threading.get_ident()}.partial"  # one writer per name
        shutil.copyfile(result_path, partial)
        os.replace(partial, stored)
    except OSError:
        pass  # a read-only cache folder: the next call compiles in a child again


@functools.cache
def _package_source_digest() -> str:
    """A digest of this package's Python source: the function compiled is read from it."""
    digest = hashlib.sha256()
    root = os.path.dirname(os.path.abspath(bitnet_jax.__file__))
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                digest.update(os.path.relpath(path, root).encode() + b"\0")
                with open(path, "rb") as f:
                    digest.update(f.read())
    return digest.hexdigest()


@functools.cache
def _host_cpu() -> str:
    """The host CPU's model and features: XLA:CPU compiles for the CPU it runs on, so a cache folder
    shared between machines must not hand one CPU's executable to another."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def _child_command(result_path: str) -> list[str]:
    # -P: the working folder does not go first on sys.path, where a source checkout (without the
    # compiled extension) would shadow the installed package.
    return [sys.executable, "-P", "-m", "bitnet_jax.serve.compile_child", result_path]


def _main(result_path: str) -> None:
    request = pickle.load(sys.stdin.buffer)
    if os.path.realpath(bitnet_jax.__file__) != os.path.realpath(request["package"]):
        sys.exit(f"the child imported bitnet_jax from {bitnet_jax.__file__}, the parent from {request['package']}")
    for key, value in request["config"].items():  # before anything starts a backend
        if jax.config.values.get(key) != value:
            jax.config.update(key, value)
    # JAX's persistent cache off: an executable read from it would serialize without its code.
    jax.config.update("jax_enable_compilation_cache", False)
    fn = getattr(importlib.import_module(request["module"]), request["name"])
    compiled = fn.lower(*request["args"], **request["static"]).compile()

    from jax.experimental import serialize_executable

    serialized = serialize_executable.serialize(compiled)
    partial = result_path + ".partial"
    with open(partial, "wb") as f:
        pickle.dump(serialized, f)
    os.replace(partial, result_path)  # the parent never reads a half-written file


if __name__ == "__main__":
    _main(sys.argv[1])
