import contextlib
import os
import shutil
import tempfile

import pytest
from cpu_paths import KNOWN_ISAS, skip_unless_runs
from xla_flags import FAST_COMPILE, with_flags

# Tests run on CPU with float32 matmuls at full precision.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
# Compile the tests' programs with LLVM's optimization turned down (tests/xla_flags.py says why
# that changes no result); a user's own XLA_FLAGS stay and come first.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = with_flags(FAST_COMPILE)

# One persistent compilation cache for the session, this process and the subprocesses it starts
# (they inherit the environment): the tests build many programs more than once (each `train` run
# jits its step anew, init_params jits each time), and at the tiny sizes here compiling is most of
# a run's time. A hit is the executable that the same program, options and flags compiled to, so
# no result can change; jax still reports it as a backend compile, so tests that count compiles
# count the same. Set in the environment before jax is imported; removed at the end.
_COMPILATION_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _COMPILATION_CACHE = tempfile.mkdtemp(prefix="bitnet-jax-tests-xla-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _COMPILATION_CACHE


# Two workers (pytest-xdist, `-n` in pyproject.toml's addopts) share the suite on a 2-core machine:
# most of a test's time is XLA compiling on one thread. Tests are handed out a whole file at a time
# (a module's fixtures, often a trained tiny model, are built once, on one worker), except that
# the files in SHARED_SESSION_FIXTURES go to one worker together, so that the session fixture they
# share is built once. The grouping is our own scheduler (xdist's public hook below), not
# `--dist loadgroup`: that one marks a group by rewriting a private field of the test item, which
# pytest 9.2 no longer reads, so every test was dealt out alone and both workers built the same
# fixtures (the 8-device runs and the sanitized kernel build each twice).
SHARED_SESSION_FIXTURES = {"test_sharding.py": "one_device_cli_run", "test_multiprocess.py": "one_device_cli_run"}
# Handed out first, longest first, so that the longest files do not start last and leave one
# worker idle at the end (seconds per file: the last `--durations=0` run).
LONGEST_FIRST = (
    "test_sharding.py",
    "test_multiprocess.py",
    "test_serving.py",
    "test_cpp_kernels.py",
    "test_hadamard.py",
)


def _work_unit(nodeid: str) -> str:
    path = nodeid.split("::", 1)[0]
    return SHARED_SESSION_FIXTURES.get(os.path.basename(path), path)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files keep their order


def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class FileGroups(LoadScopeScheduling):
        """xdist's scope scheduling with a work unit per file, or per SHARED_SESSION_FIXTURES group."""

        def _split_scope(self, nodeid: str) -> str:
            return _work_unit(nodeid)

    return FileGroups(config, log)


def pytest_unconfigure(config):
    if _COMPILATION_CACHE is not None:
        shutil.rmtree(_COMPILATION_CACHE, ignore_errors=True)


@contextlib.contextmanager
def _environ(name: str, value: str):
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """tiny_run.CORPUS_FILES as a text folder, and one tokenizer / token cache (BITNET_JAX_CACHE)
    for every test that trains on it: the tokenizer is trained once."""
    from tiny_run import CORPUS_FILES

    from bitnet_jax.data.pipeline import stdlib_root

    root = tmp_path_factory.mktemp("tiny_corpus")
    corpus = root / "corpus"
    corpus.mkdir()
    for name in CORPUS_FILES:
        shutil.copy(stdlib_root() / name, corpus / f"{name}.txt")
    return {"corpus": str(corpus), "cache": str(root / "cache")}


@pytest.fixture(scope="module")
def tiny_env(tiny_corpus, tmp_path_factory, request):
    """{"root": a fresh folder for this module's runs, "corpus": the tiny corpus}, with the shared
    tokenizer / token cache set as BITNET_JAX_CACHE while the module's tests run."""
    os.environ["BITNET_JAX_CACHE"] = tiny_corpus["cache"]
    yield {"root": tmp_path_factory.mktemp(request.module.__name__), "corpus": tiny_corpus["corpus"]}
    os.environ.pop("BITNET_JAX_CACHE", None)


@pytest.fixture(scope="session")
def one_device_cli_run(tiny_corpus, tmp_path_factory):
    """`bitnet-jax train` with sharded_runs.CLI_SETTINGS on one device, uninterrupted: the run that
    test_sharding.py's run resumed on another mesh and test_multiprocess.py's two-process run must
    equal. Trained once for both."""
    import sharded_runs

    from bitnet_jax import cli

    out = tmp_path_factory.mktemp("one_device") / "whole"
    with _environ("BITNET_JAX_CACHE", tiny_corpus["cache"]):
        assert cli.main(sharded_runs.cli_args(tiny_corpus["corpus"], str(out))) == 0
    return out


@pytest.fixture(scope="session")
def packed_folder(tmp_path_factory):
    """tests/fixtures/hf/packed_bitlinear converted by `bitnet-jax convert` (2-bit layers, its
    tokenizer beside them): the serving tests' model. Tests read it; one that changes a file
    copies the folder first."""
    from pathlib import Path

    from bitnet_jax.cli import main

    out = tmp_path_factory.mktemp("packed") / "m"
    assert main(["convert", str(Path(__file__).parent / "fixtures" / "hf" / "packed_bitlinear"), str(out)]) == 0
    return out


@pytest.fixture(params=KNOWN_ISAS)
def isa(request, monkeypatch):
    """Each kernel path (BITNET_JAX_ISA) in turn; the ones this CPU cannot run skip with the reason."""
    from bitnet_jax.kernels import ffi

    skip_unless_runs(request.param, ffi.available_isas(), "bitnet_jax._ffi_ext")
    monkeypatch.setenv("BITNET_JAX_ISA", request.param)
    assert ffi.selected_isa() == request.param
    return request.param
