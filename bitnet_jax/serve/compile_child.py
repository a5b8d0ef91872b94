"""Compiling a jitted function in a child process, so that XLA's compiler never enters this one.

A process that compiles an XLA program keeps the compiler's footprint to its end: for 2B4T's
`generate` program on CPU some 40 MB of jaxlib's compiler code paged in, the heap glibc keeps
after compiling, and JAX's cached jaxprs and lowerings, about 75 MB in all (benchmarks/RESULTS.md).
A served model would carry it beside its weights. `compile_in_child` runs the compile in a fresh
interpreter instead (`python -m bitnet_jax.serve.compile_child`): the child imports the function
by name, lowers and compiles it for abstract arguments, and hands back the executable serialized
(`jax.experimental.serialize_executable`), which this process loads without compiling.

The child gets this process's JAX configuration (every value that differs from its own, so also
the persistent compilation cache folder, which it then reads and fills) and the environment
(XLA_FLAGS, BITNET_JAX_ISA), so it compiles the program this process would have. It costs a
second interpreter's start (about a second and a half) on top of the compile.

With the persistent compilation cache on, a program already in it is not compiled at all: this
process reads it from the cache (JAX's own path, which also keeps the compiler out). The child
cannot hand such a program over, because an executable read from the cache serializes without
its code on jaxlib 0.10 (loading it here fails with "Function ... not found" when it runs), so
a child that finds its program in the cache says so instead, and a marker file (under the cache
folder, named by a digest of the request) lets later calls skip the child. (A marker outliving
its cache entry only costs memory: this process then compiles the program itself.)
"""

from __future__ import annotations

import hashlib
import importlib
import os
import pickle
import subprocess
import sys
import tempfile

import jax

import bitnet_jax


class ChildCompileError(RuntimeError):
    """The child process did not deliver an executable (its stderr ends the message)."""


def compile_in_child(fn, abstract_args: tuple, static: dict) -> jax.stages.Compiled | None:
    """`fn.lower(*abstract_args, **static).compile()`, run in a child process and loaded here.

    `fn` is a `jax.jit`-ed function at the top level of a module (the child imports it by name);
    `abstract_args` is a tree of `jax.ShapeDtypeStruct` without shardings; `static` holds the
    static keyword arguments (picklable). Returns None where the caller should compile as
    usual: the program is in the persistent compilation cache (compiling it only reads it), or
    this does not apply (a backend other than CPU, arguments placed by a sharding or a mesh in
    scope, settings that cannot be pickled). Raises `ChildCompileError` if the child fails.
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
    marker = _cached_marker(request)
    if marker is not None and os.path.exists(marker):
        return None

    with tempfile.TemporaryDirectory(prefix="bitnet-jax-compile-") as folder:
        result_path = os.path.join(folder, "executable.pkl")
        try:
            child = subprocess.run(_child_command(result_path), input=request, capture_output=True)
        except OSError as e:  # no interpreter to start (an embedded Python), no processes left
            raise ChildCompileError(f"compiling {module}.{name} in a child process failed to start it: {e}") from e
        if child.returncode == _IN_THE_CACHE:
            if marker is not None:
                try:
                    os.makedirs(os.path.dirname(marker), exist_ok=True)
                    open(marker, "w").close()
                except OSError:
                    pass  # a read-only cache folder: the next call asks a child again
            return None
        if child.returncode != 0 or not os.path.exists(result_path):
            stderr = child.stderr.decode(errors="replace").strip().splitlines()
            tail = "\n".join(stderr[-15:]) or "(no output)"
            raise ChildCompileError(
                f"compiling {module}.{name} in a child process failed (exit {child.returncode}):\n{tail}"
            )
        with open(result_path, "rb") as f:
            payload, in_tree, out_tree = pickle.load(f)

    from jax.experimental import serialize_executable

    # The program may call our FFI kernels, which must be registered before it loads.
    if "bitnet_jax.kernels.ffi" not in sys.modules:
        try:
            importlib.import_module("bitnet_jax.kernels.ffi")
        except ImportError:
            pass  # not built: a program that calls the kernels fails to load, as it would to compile
    return serialize_executable.deserialize_and_load(payload, in_tree, out_tree)


# The child's exit status for "the program is in the persistent compilation cache".
_IN_THE_CACHE = 3


def _cached_marker(request: bytes) -> str | None:
    """The marker file saying that this request's program is in the persistent compilation
    cache, or None where no cache is on."""
    folder = jax.config.jax_compilation_cache_dir
    if not folder or not jax.config.jax_enable_compilation_cache:
        return None
    return os.path.join(folder, "bitnet_jax-in-cache", hashlib.sha256(request).hexdigest())


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
    fn = getattr(importlib.import_module(request["module"]), request["name"])
    cache_hits = []
    jax.monitoring.register_event_listener(
        lambda event, **_: cache_hits.append(event) if event == "/jax/compilation_cache/cache_hits" else None
    )
    compiled = fn.lower(*request["args"], **request["static"]).compile()
    if cache_hits:
        sys.exit(_IN_THE_CACHE)

    from jax.experimental import serialize_executable

    serialized = serialize_executable.serialize(compiled)
    partial = result_path + ".partial"
    with open(partial, "wb") as f:
        pickle.dump(serialized, f)
    os.replace(partial, result_path)  # the parent never reads a half-written file


if __name__ == "__main__":
    _main(sys.argv[1])
