"""Compiling the generate program in a child process (serve/compile_child.py): the program this
process would have compiled, loaded without compiling anything here, and a clear fallback."""

import io
import sys

import jax
import numpy as np
import pytest
from backend_compiles import BackendCompiles

from bitnet_jax.bench.serve import random_packed_params
from bitnet_jax.model.config import BitNetConfig
from bitnet_jax.serve import compile_child
from bitnet_jax.serve import generate as generate_module
from bitnet_jax.serve.generate import compile_generate, generate

CONFIG = BitNetConfig(
    vocab_size=300,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    bos_token_id=1,
    eos_token_id=2,
)
PROMPTS = [[5, 9, 11] * 7, [7] * 12]  # two rows of different lengths: the 32-token bucket
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def params():
    return random_packed_params(CONFIG, lm_head="int8-tied", seed=3)


@pytest.fixture
def fresh_programs():
    """No compiled generate program left from another test: neither the module's nor jax's (which
    keeps what it compiled for a lowering, with no compile event the next time)."""
    generate_module._executables.clear()
    jax.clear_caches()
    yield
    generate_module._executables.clear()


@pytest.mark.parametrize("sampling", [dict(), dict(temperature=0.8, top_k=40, seed=5)], ids=["greedy", "sampled"])
def test_compiled_in_a_child_generates_what_compiling_here_does(params, fresh_programs, sampling):
    seed = sampling.pop("seed", 0)
    with BackendCompiles() as compiles:
        compile_generate(
            CONFIG, params, PROMPTS, NEW_TOKENS, streaming=True, kv_cache="int8", in_child=True, **sampling
        )
        streamed = []
        got = generate(
            CONFIG, params, PROMPTS, NEW_TOKENS, on_tokens=streamed.append, kv_cache="int8", seed=seed, **sampling
        )
    assert compiles.count == 0  # neither compile_generate nor generate compiled in this process
    assert len(generate_module._executables) == 1

    generate_module._executables.clear()
    jax.clear_caches()
    with BackendCompiles() as compiles:
        want = generate(
            CONFIG, params, PROMPTS, NEW_TOKENS, on_tokens=lambda _: None, kv_cache="int8", seed=seed, **sampling
        )
    assert compiles.count >= 1
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.stack(streamed, axis=1), got)


def test_the_executable_store(params, fresh_programs, monkeypatch, tmp_path):
    """The child gets this process's JAX configuration as set with jax.config.update (here a
    compilation cache folder of its own), compiles with JAX's persistent cache off (an executable
    read from it would serialize without its code) and the executable is kept in the folder: the
    next call loads it without a child, and one that cannot be loaded is compiled again."""
    jax.jit(lambda x: x + 1)(1)  # this process's own cache is set up at its first compile: not the folder below
    cache = tmp_path / "xla-cache"
    store = cache / compile_child._STORE
    settings = dict(jax_compilation_cache_dir=str(cache), jax_persistent_cache_min_compile_time_secs=0.0)
    before = {name: jax.config.values[name] for name in settings}
    compile_twice = lambda: compile_generate(CONFIG, params, PROMPTS, NEW_TOKENS, in_child=True)

    def start_again():
        generate_module._executables.clear()
        jax.clear_caches()

    try:
        for name, value in settings.items():
            jax.config.update(name, value)
        with BackendCompiles() as compiles:
            compile_twice()
        assert compiles.count == 0
        assert not [p.name for p in cache.iterdir() if p.name.startswith("jit__generate")]  # not in JAX's cache
        (executable,) = store.iterdir()
        want = generate(CONFIG, params, PROMPTS, NEW_TOKENS)

        start_again()
        children = []
        command = compile_child._child_command
        monkeypatch.setattr(compile_child, "_child_command", lambda path: children.append(path) or command(path))
        with BackendCompiles() as compiles:
            compile_twice()
        assert compiles.count == 0 and not children  # loaded from the store
        np.testing.assert_array_equal(generate(CONFIG, params, PROMPTS, NEW_TOKENS), want)

        start_again()
        executable.write_bytes(executable.read_bytes()[:1000])  # a run killed while it was written, say
        with BackendCompiles() as compiles:
            compile_twice()
        assert compiles.count == 0 and len(children) == 1  # compiled in a child again, and stored
        assert list(store.iterdir()) == [executable] and executable.stat().st_size > 1000
        np.testing.assert_array_equal(generate(CONFIG, params, PROMPTS, NEW_TOKENS), want)

        start_again()  # another request (more new tokens): another executable
        compile_generate(CONFIG, params, PROMPTS, NEW_TOKENS + 1, in_child=True)
        assert len(children) == 2 and len(list(store.iterdir())) == 2
    finally:
        for name, value in settings.items():
            jax.config.update(name, before[name])


def test_chat_compiles_in_a_child(fresh_programs, packed_folder):
    """`chat_loop(in_child=True)`, as `bitnet-jax chat` runs it: the same replies, and no program
    compiled in this process."""
    from bitnet_jax.serve.chat import chat_loop
    from bitnet_jax.serve.load import load_model

    folder = packed_folder
    config, params, tokenizer = load_model(str(folder))

    def chat(in_child):
        turns, out = iter(["hello there", "and again", ""]), io.StringIO()
        assert (
            chat_loop(
                config,
                params,
                tokenizer,
                str(folder),
                max_new_tokens=5,
                read=lambda _: next(turns),
                write=out,
                in_child=in_child,
            )
            == 0
        )
        return out.getvalue()

    with BackendCompiles() as compiles:
        got = chat(in_child=True)
    assert compiles.count == 0
    generate_module._executables.clear()
    jax.clear_caches()
    with BackendCompiles() as compiles:
        assert got == chat(in_child=False)
    assert compiles.count >= 1  # the same turns compile here without a child


def test_the_serving_engine_compiles_in_a_child(fresh_programs, packed_folder):
    """`Engine(in_child=True)`, as `bitnet-jax serve` runs it: the same replies from its decode
    steps (both widths), its prefill and the chunked prefill of a long prompt, and no program
    compiled in this process."""
    from bitnet_jax.serve.batching import Engine, GenerationRequest, wait_idle
    from bitnet_jax.serve.load import load_model

    config, params, tokenizer = load_model(str(packed_folder))
    requests = [
        GenerationRequest((417, 40, 41, 42), 12),
        GenerationRequest(tuple(range(5, 305)), 6),  # longer than a prefill chunk (256 tokens)
        GenerationRequest((417, 7), 10, temperature=0.9, seed=3),
    ]

    def serve(in_child):
        engine = Engine(config, params, tokenizer, max_batch=2, max_context=512, in_child=in_child)
        engine.start()
        try:
            events = {i: [] for i in range(len(requests))}
            for i, request in enumerate(requests):
                engine.submit(request, events[i].append)
            assert wait_idle(engine, timeout=300)
            assert engine.stats["prefill_chunks"] >= 2
            return [[t for e in events[i] for t in e.token_ids] for i in range(len(requests))]
        finally:
            engine.stop()

    with BackendCompiles() as compiles:
        got = serve(in_child=True)
    assert compiles.count == 0
    jax.clear_caches()
    with BackendCompiles() as compiles:
        assert serve(in_child=False) == got
    assert compiles.count >= 1
    assert [len(ids) for ids in got] == [12, 6, 10]


def test_several_programs_compile_in_one_child(params, fresh_programs, monkeypatch):
    """`compile_all_in_child`, as the serving engine's warm-up calls it: two programs (two
    requests of other lengths) from one child, each the program compiling it here gives."""
    children = []
    command = compile_child._child_command
    monkeypatch.setattr(compile_child, "_child_command", lambda folder: children.append(folder) or command(folder))
    monkeypatch.setattr(compile_child, "_stored_path", lambda request: None)  # nothing kept for other tests
    requests = [
        generate_module._Request.make(CONFIG, params, PROMPTS, new, 0.0, None, None, None, False, None, None)
        for new in (NEW_TOKENS, NEW_TOKENS + 3)
    ]
    abstract = lambda args: jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), args)
    calls = [(generate_module._generate, abstract(r.args()), r.static) for r in requests]
    with BackendCompiles() as compiles:
        executables = compile_child.compile_all_in_child(calls)
    assert compiles.count == 0 and len(children) == 1
    for executable, request in zip(executables, requests, strict=True):
        got = jax.tree.map(np.asarray, executable(*request.args()))
        want = jax.tree.map(np.asarray, generate_module._generate(*request.args(), **request.static))
        jax.tree.map(np.testing.assert_array_equal, got, want)


def test_the_store_key_covers_what_the_executable_depends_on(monkeypatch, tmp_path):
    """A stored executable is named by the request and by what it was compiled from and for: this
    package's source (the function is read from it) and the host CPU (XLA:CPU compiles for it; a
    cache folder may be shared between machines)."""
    before = jax.config.values["jax_compilation_cache_dir"]
    try:
        jax.config.update("jax_compilation_cache_dir", str(tmp_path))
        path = compile_child._stored_path(b"request")
        assert path.startswith(str(tmp_path / compile_child._STORE))
        assert compile_child._stored_path(b"request") == path
        assert compile_child._stored_path(b"another request") != path
        monkeypatch.setattr(compile_child, "_host_cpu", lambda: "another CPU")
        assert compile_child._stored_path(b"request") != path
        monkeypatch.undo()
        monkeypatch.setattr(compile_child, "_package_source_digest", lambda: "edited source")
        assert compile_child._stored_path(b"request") != path
        jax.config.update("jax_compilation_cache_dir", None)
        assert compile_child._stored_path(b"request") is None  # no cache folder, no store
    finally:
        jax.config.update("jax_compilation_cache_dir", before)


@pytest.mark.parametrize(
    "command, message",
    [
        (
            [sys.executable, "-c", "import sys; sys.exit('no compiler in this child')"],
            r"failed \(exit 1\).*no compiler",
        ),
        (["/nonexistent/python"], r"failed to start it.*/nonexistent/python"),
    ],
    ids=["child-exits", "no-interpreter"],
)
def test_a_failed_child_warns_and_compiles_here(params, fresh_programs, monkeypatch, command, message):
    monkeypatch.setattr(compile_child, "_child_command", lambda result_path: command)
    monkeypatch.setattr(compile_child, "_stored_path", lambda request: None)  # whatever another test kept
    with BackendCompiles() as compiles:
        with pytest.warns(RuntimeWarning, match=rf"(?s){message}.*compiling in this process instead"):
            compile_generate(CONFIG, params, PROMPTS, NEW_TOKENS, in_child=True)
    assert compiles.count >= 1
    want = generate(CONFIG, params, PROMPTS, NEW_TOKENS, backend="xla")
    np.testing.assert_array_equal(generate(CONFIG, params, PROMPTS, NEW_TOKENS), want)


def test_where_a_child_does_not_apply(params):
    """Arguments with shardings of their own (the child compiles for the default device) and functions
    that are not a module's top-level name get None or a clear error, before any child starts."""
    request = generate_module._Request.make(
        CONFIG, params, PROMPTS, NEW_TOKENS, 0.0, None, None, None, False, None, None
    )
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    placed = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), request.args())
    assert compile_child.compile_in_child(generate_module._generate, placed, request.static) is None

    local = jax.jit(lambda x: x + 1)
    with pytest.raises(ValueError, match="top-level name"):
        compile_child.compile_in_child(local, (jax.ShapeDtypeStruct((2,), np.float32),), {})
