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
second and a half) on top of the compile; `compile_all_in_child` compiles several programs in one
child, one start for all of them (the `serve` engine's warm-up: one child per CPU).

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
    return compile_all_in_child([(fn, abstract_args, static)])[0]


def compile_all_in_child(calls: list[tuple]) -> list[jax.stages.Compiled | None]:
    """`compile_in_child` for each (fn, abstract_args, static) of `calls`, those not stored all in
    one child, one after the other: one interpreter start (and import of jax) for all of them.
    The results in the order of `calls`, None for a call where a child does not apply. Raises
    `ChildCompileError` if the child fails (then none of its programs is returned).
    """
    results: list[jax.stages.Compiled | None] = [None] * len(calls)
    if jax.default_backend() != "cpu" or not jax.sharding.get_abstract_mesh().empty:
        return results
    config = dict(jax.config.values)
    todo = []  # (index in calls, request, where it is stored, name)
    for i, (fn, abstract_args, static) in enumerate(calls):
        if any(getattr(x, "sharding", None) is not None for x in jax.tree.leaves(abstract_args)):
            continue
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
                    config=config,
                )
            )
        except (pickle.PicklingError, TypeError, AttributeError):
            continue
        stored = _stored_path(request)
        if stored is not None and os.path.exists(stored):
            try:
                results[i] = _load(stored)
                continue
            except Exception:  # truncated, corrupt or unreadable: compile it again
                with contextlib.suppress(OSError):
                    os.remove(stored)
        todo.append((i, request, stored, f"{module}.{name}"))
    if not todo:
        return results

    names = ", ".join(sorted({name for *_, name in todo}))
    with tempfile.TemporaryDirectory(prefix="bitnet-jax-compile-") as folder:
        try:
            child = subprocess.run(
                _child_command(folder), input=pickle.dumps([request for _, request, _, _ in todo]), capture_output=True
            )
        except OSError as e:  # no interpreter to start (an embedded Python), no processes left
            raise ChildCompileError(f"compiling {names} in a child process failed to start it: {e}") from e
        paths = [_result_path(folder, k) for k in range(len(todo))]
        if child.returncode != 0 or not all(os.path.exists(path) for path in paths):
            stderr = child.stderr.decode(errors="replace").strip().splitlines()
            tail = "\n".join(stderr[-15:]) or "(no output)"
            raise ChildCompileError(f"compiling {names} in a child process failed (exit {child.returncode}):\n{tail}")
        for (i, _, stored, name), path in zip(todo, paths, strict=True):
            try:
                results[i] = _load(path)
            except Exception as e:  # whatever failed, the caller may compile here instead
                message = f"the executable compiled for {name} in a child process did not load: {e}"
                raise ChildCompileError(message) from e
            if stored is not None:
                _store(path, stored)
    return results


def compiled_in_child_or_none(fn, abstract_args: tuple, static: dict) -> jax.stages.Compiled | None:
    """`compile_in_child`, with a failed child turned into a warning and None (the caller then
    compiles in this process)."""
    return compiled_all_in_child_or_none([(fn, abstract_args, static)], stacklevel=4)[0]


def compiled_all_in_child_or_none(calls: list[tuple], stacklevel: int = 3) -> list[jax.stages.Compiled | None]:
    """`compile_all_in_child`, with a failed child turned into a warning and Nones."""
    try:
        return compile_all_in_child(calls)
    except ChildCompileError as e:
        warnings.warn(f"{e}\ncompiling in this process instead", RuntimeWarning, stacklevel=stacklevel)
        return [None] * len(calls)


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


def _child_command(folder: str) -> list[str]:
    # -P: the working folder does not go first on sys.path, where a source checkout (without the
    # compiled extension) would shadow the installed package.
    return [sys.executable, "-P", "-m", "bitnet_jax.serve.compile_child", folder]


def _result_path(folder: str, k: int) -> str:
    """Where the child leaves the executable of the k-th request it was given."""
    return os.path.join(folder, f"executable-{k}.pkl")


def _main(folder: str) -> None:
    requests = [pickle.loads(request) for request in pickle.load(sys.stdin.buffer)]
    for request in requests:
        if os.path.realpath(bitnet_jax.__file__) != os.path.realpath(request["package"]):
            sys.exit(f"the child imported bitnet_jax from {bitnet_jax.__file__}, the parent from {request['package']}")
    for key, value in requests[0]["config"].items():  # before anything starts a backend (one for all)
        if jax.config.values.get(key) != value:
            jax.config.update(key, value)
    # JAX's persistent cache off: an executable read from it would serialize without its code.
    jax.config.update("jax_enable_compilation_cache", False)

    from jax.experimental import serialize_executable

    for k, request in enumerate(requests):
        fn = getattr(importlib.import_module(request["module"]), request["name"])
        compiled = fn.lower(*request["args"], **request["static"]).compile()
        serialized = serialize_executable.serialize(compiled)
        result_path = _result_path(folder, k)
        partial = result_path + ".partial"
        with open(partial, "wb") as f:
            pickle.dump(serialized, f)
        os.replace(partial, result_path)  # the parent never reads a half-written file


if __name__ == "__main__":
    _main(sys.argv[1])
