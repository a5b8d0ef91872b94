"""Compiling the generate program in a child process (serve/compile_child.py): the program this
process would have compiled, loaded without compiling anything here, and a clear fallback."""

import sys

import jax
import numpy as np
import pytest

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


class BackendCompiles:
    """Counts the programs this process compiles (jax reports a read from the persistent
    compilation cache as a compile too)."""

    def __enter__(self):
        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._listener)
        return self

    def _listener(self, event, _, **kwargs):
        if event.endswith("backend_compile_duration"):
            self.count += 1

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._listener)


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


def test_the_persistent_cache(params, fresh_programs, monkeypatch, tmp_path):
    """The child gets this process's JAX configuration as set with jax.config.update (here a
    compilation cache folder of its own and a zero compile-time threshold), so it writes the
    program there. Then the program is in the cache: the next child says so instead of handing
    it over, and this process reads it from the cache; a marker file then skips the child."""
    jax.jit(lambda x: x + 1)(1)  # this process's own cache is set up at its first compile: not the folder below
    cache = tmp_path / "xla-cache"
    settings = dict(jax_compilation_cache_dir=str(cache), jax_persistent_cache_min_compile_time_secs=0.0)
    before = {name: jax.config.values[name] for name in settings}
    compile_twice = lambda: compile_generate(CONFIG, params, PROMPTS, NEW_TOKENS, in_child=True)
    try:
        for name, value in settings.items():
            jax.config.update(name, value)
        with BackendCompiles() as compiles:
            compile_twice()
        assert compiles.count == 0
        assert [p.name for p in cache.iterdir() if p.name.startswith("jit__generate")]
        assert not (cache / "bitnet_jax-in-cache").exists()
        from_child = generate(CONFIG, params, PROMPTS, NEW_TOKENS)

        generate_module._executables.clear()
        jax.clear_caches()
        with BackendCompiles() as compiles:
            compile_twice()
        assert compiles.count == 1  # here, from the cache (the child found it there)
        assert len(list((cache / "bitnet_jax-in-cache").iterdir())) == 1
        np.testing.assert_array_equal(generate(CONFIG, params, PROMPTS, NEW_TOKENS), from_child)

        generate_module._executables.clear()
        jax.clear_caches()
        monkeypatch.setattr(compile_child, "_child_command", lambda _: pytest.fail("a child was started"))
        with BackendCompiles() as compiles:
            compile_twice()
        assert compiles.count == 1
    finally:
        for name, value in before.items():
            jax.config.update(name, value)


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
