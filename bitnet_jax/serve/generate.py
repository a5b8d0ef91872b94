"""Autoregressive generation: a prefill plus a decode loop, in one jitted program with a KV cache.

Prompts of different lengths are right-padded into one [B, T] batch. Every row keeps its own
positions: the prefill (in chunks for longer prompts: `long_prompt_chunk`) writes slots 0..T-1 of the
cache and reads each row's next-token logits at its last real token; decode step i writes row b's
token at slot `len_b + i`, the slot that the causal mask (`slot <= position`) exposes next, so pad
slots are overwritten before any query can see them.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from bitnet_jax.errors import BitNetError
from bitnet_jax.kernels.ops import ServingSpec, computation_platform, ffi_attends, ffi_cuts, serving_backend
from bitnet_jax.model.config import BitNetConfig
from bitnet_jax.model.serving_layers import is_packed, lm_head_kind, serving_variables
from bitnet_jax.model.transformer import BitNetLM, KVCache
from bitnet_jax.serve.host_memory import release_freed_memory
from bitnet_jax.serve.pack import pack

# Longer prompts are prefilled this many tokens at a time (and padded to a multiple of it): the
# attention scores of a chunk are [chunk, cache slots], where a whole 2048-token prompt's were
# [2048, slots] (0.35 GB per tensor for 2B4T), and the activations stay small.
PREFILL_CHUNK = 256
# Prompt lengths up to PREFILL_CHUNK are padded up to a bucket, so that prompts of similar length
# share one compiled program: (up to this length, a multiple of this step). Every bucket is a
# program that `generate` compiles and the batching engine keeps loaded, and a loaded 2B4T prefill
# program holds 8-11 MB of XLA's heap (benchmarks/RESULTS.md, "A program per prompt length"): 10
# buckets rather than 16, at 5% more prefill work for prompts of 20-250 tokens (8 buckets, with
# steps of 64 above 128, cost 11% more and put the 8-client p90 time to first token 25% later).
_LENGTH_BUCKETS = ((64, 16), (PREFILL_CHUNK, 32))
# Where the FFI kernel attends a prefill chunk (its SIMD paths: each query reads its own slots in
# place, whatever chunk holds it), a longer prompt is padded to a multiple of this many tokens
# rather than of PREFILL_CHUNK (a 300-token prompt computes 320 tokens, not 512), and what is past
# its whole PREFILL_CHUNK-token chunks is read in chunks of it (`prefill`): a token costs 3-5% more
# in 64-token chunks than in 256 (the matmuls read every layer's weights once a chunk;
# benchmarks/RESULTS.md, "What a 64-token chunk costs, found").
IN_PLACE_CHUNK = 64


def generate(
    config: BitNetConfig,
    params,
    prompt_ids,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    stop_ids: Sequence[int] | None = None,
    on_tokens: Callable[[np.ndarray], None] | None = None,
    backend: str | None = None,
    kv_cache: str | None = None,
    in_child: bool = False,
) -> np.ndarray:
    """Generates `max_new_tokens` tokens after each prompt.

    Args:
      prompt_ids: one prompt (a sequence of ints) or a batch (a sequence of sequences, or an int
        array [B, T]); prompts may differ in length.
      temperature: 0 for greedy decoding; otherwise softmax sampling at this temperature,
        restricted to the `top_k` most likely tokens and / or the smallest set whose
        probability reaches `top_p`.
      stop_ids: a row stops after emitting one of these; its remaining slots hold the first stop id.
      on_tokens: called with each step's tokens (int32 numpy [B]), in order, as they are
        generated (for streaming), on CPU from a thread of its own; every call has returned
        when `generate` returns. If it raises, generation stops within a step and
        `generate` raises that exception.
      backend: 'ffi' (our C++ ternary kernels as XLA custom calls, CPU only), 'xla' (XLA ops
        only) or 'pallas' (decode's ternary matmuls as a Pallas kernel for NVIDIA GPUs, the rest
        as 'xla'). Packed parameters (`bitnet_jax.serve.pack`) run the integer serving model either way;
        unset, `ops.serving_backend` picks 'ffi' on CPU and 'xla' on GPU / TPU (and for
        group:G weight scales with G not a multiple of 64, which the kernels do not take), from the platform of the
        params' devices (or the mesh, or the default backend). Training parameters default to
        the fake-quant forward in XLA ops, and with 'ffi' or 'pallas' are packed first (lm_head
        kept in float), which costs a conversion per call: pack once for repeated use.
      kv_cache: the serving KV cache's dtype, 'float32' (default) or 'int8' (a quarter of the
        memory and of the bytes read per token at long context; each slot's keys and values
        per kv head quantized by their absmax, `model.transformer.quantize_kv`). Serving models
        only: training parameters on the XLA path keep a cache of their own dtype.
      in_child: a program not compiled yet is compiled in a child process, as `compile_generate`
        says.

    Returns:
      int32 numpy array [B, max_new_tokens] of the new tokens only.

    The program is compiled once per batch size, prompt-length bucket, `max_new_tokens` and
    sampling settings (see `compile_generate` to compile it before the weights are loaded).
    """
    request = _Request.make(
        config,
        params,
        prompt_ids,
        max_new_tokens,
        temperature,
        top_k,
        top_p,
        stop_ids,
        on_tokens is not None,
        backend,
        kv_cache,
    )
    stream = next(_stream_ids)
    args = request.args(seed, stream)
    run = lambda: np.asarray(_executable(request.static, args, in_child=in_child)(*args))
    if request.static["streaming"] == "ffi":
        from bitnet_jax.kernels.ffi import TokenStream

        with TokenStream(stream, on_tokens):
            return run()
    if on_tokens is not None:
        _streams[stream] = on_tokens
    try:
        return run()
    finally:
        _streams.pop(stream, None)


def compile_generate(
    config: BitNetConfig,
    params,
    prompt_ids,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_ids: Sequence[int] | None = None,
    streaming: bool = False,
    backend: str | None = None,
    kv_cache: str | None = None,
    in_child: bool = False,
) -> None:
    """Compiles, without running it, the program that `generate` runs for these arguments.

    `params` may be abstract (`jax.ShapeDtypeStruct` leaves, e.g. from `packed_folder.read_packed_folder`)
    and only the shape of `prompt_ids` matters (the length is bucketed). Compiling before the
    weights are loaded keeps the compiler's working memory (100-150 MB, whatever the model size)
    off the serving peak; `streaming` says whether `generate` will get an `on_tokens` callback.
    `in_child`: compile in a child process (`serve.compile_child`; on CPU, for arguments without
    a placement of their own), so that this process never holds the compiler's code and memory
    (2B4T after a 2048-token prompt: peak RSS 1242 -> 1168 MB); it costs an interpreter's start.
    If the child fails, a warning says why and the program is compiled here.
    """
    request = _Request.make(
        config, params, prompt_ids, max_new_tokens, temperature, top_k, top_p, stop_ids, streaming, backend, kv_cache
    )
    _executable(request.static, request.args(), in_child=in_child)


@dataclasses.dataclass(frozen=True)
class _Request:
    """One `generate` call's arguments, checked and put in the shape of `_generate`'s."""

    params: object
    prompt_bt: np.ndarray
    lengths_b: np.ndarray
    static: dict

    @classmethod
    def make(
        cls,
        config,
        params,
        prompt_ids,
        max_new_tokens,
        temperature,
        top_k,
        top_p,
        stop_ids,
        streaming,
        backend,
        kv_cache,
    ) -> "_Request":
        prompts = _as_prompt_list(prompt_ids)
        _check_request(config, prompts, max_new_tokens, temperature, top_k, top_p, stop_ids)
        params, serving = serving_params(config, params, backend, kv_cache)
        lengths_b = np.array([len(p) for p in prompts], np.int32)
        chunk = long_prompt_chunk(config, serving, kv_cache_dtype(params, serving))
        t = padded_prompt_length(int(lengths_b.max()), chunk)
        prompt_bt = np.zeros((len(prompts), t), np.int32)
        for row, prompt in zip(prompt_bt, prompts):
            row[: len(prompt)] = prompt
        static = dict(
            config=config,
            serving=serving,
            max_new_tokens=int(max_new_tokens),
            sampling=(float(temperature), top_k, top_p),
            stop_ids=tuple(int(s) for s in (stop_ids or ())),
            streaming=_stream_path(params) if streaming else None,
            prefill_chunk=chunk,
        )
        return cls(params, prompt_bt, lengths_b, static)

    def args(self, seed: int = 0, stream: int = 0) -> tuple:
        return self.params, self.prompt_bt, self.lengths_b, sampling_key(seed), np.int32(stream)


def _placement(x):
    sharding = getattr(x, "sharding", None)
    if sharding is None or sharding == jax.sharding.SingleDeviceSharding(jax.devices()[0]):
        return None  # numpy, abstract, or on the default device: the compiled program's default
    return sharding


# Compiled `_generate` programs, least recently used first. Each holds some 10-20 MB of code,
# hence the bound. (jit's own cache is bypassed: an ahead-of-time compile does not fill it.)
_executables: collections.OrderedDict = collections.OrderedDict()
_MAX_EXECUTABLES = 8


def _executable(static: dict, args: tuple, in_child: bool = False):
    """The compiled program for these static settings and arguments: it depends on the settings,
    the mesh, and every argument's tree, shape, dtype and (non-default) placement. `in_child`:
    compile it in a child process where that applies (`compile_generate`)."""
    leaves, tree = jax.tree.flatten(args)
    key = (
        tuple(sorted(static.items())),
        jax.sharding.get_abstract_mesh(),
        tree,
        tuple((tuple(x.shape), np.dtype(x.dtype), _placement(x)) for x in leaves),
    )
    if key in _executables:
        _executables.move_to_end(key)
        return _executables[key]
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=_placement(x)), args)
    compiled = _compiled_in_child(abstract, static) if in_child else None
    if compiled is None:
        compiled = _generate.lower(*abstract, **static).compile()
        release_freed_memory()  # the compiler's working memory (~100 MB)
    _executables[key] = compiled
    while len(_executables) > _MAX_EXECUTABLES:
        _executables.popitem(last=False)
    return compiled


def _compiled_in_child(abstract: tuple, static: dict):
    """`_generate` compiled by `compile_child.compile_in_child`, or None where that does not
    apply or the child failed (with a warning: the caller then compiles here)."""
    from bitnet_jax.serve.compile_child import compiled_in_child_or_none

    return compiled_in_child_or_none(_generate, abstract, static)


# Streams of running `generate` calls, by an id passed into the program (an argument, so that a
# new callback does not mean a new program).
_stream_ids = itertools.count(1)


def _stream_path(params) -> str:
    """How a program streams its tokens: 'ffi' on CPU, where a step queues them for a Python
    thread (`kernels.ffi.TokenStream`; an io_callback, which runs Python on XLA's thread, cost
    0.6-0.8 ms a step of a 2B4T-shaped model); 'callback' (io_callback) elsewhere."""
    return "ffi" if computation_platform(params) == "cpu" else "callback"


# `on_tokens` of the running calls on the 'callback' path.
_streams: dict[int, Callable[[np.ndarray], None]] = {}


def _emit_stream(stream_and_tokens):
    stream_and_tokens = np.asarray(stream_and_tokens)  # one transfer: [stream id, tokens...]
    _streams[int(stream_and_tokens[0])](stream_and_tokens[1:])


def serving_params(config: BitNetConfig, params, backend: str | None, kv_cache: str | None = None):
    """(params, ServingSpec or None) for the requested backend and KV cache dtype (None: float32),
    on the params' platform."""
    platform = computation_platform(params)
    group_size = config.weight_group_size
    kv_cache = kv_cache or "float32"
    if is_packed(params):
        backend = serving_backend(platform, backend, group_size=group_size)
        return params, ServingSpec(backend, lm_head_kind(params), config.act_bits, platform, kv_cache)
    if backend not in ("ffi", "pallas"):
        serving_backend(platform, backend)  # checks the name
        if kv_cache != "float32":
            raise BitNetError(
                f"kv_cache={kv_cache!r} is for serving models (packed, or backend='ffi'); training parameters "
                "on the XLA path keep a cache of their own dtype."
            )
        return params, None
    serving_backend(platform, backend, group_size=group_size)  # raises where the kernels cannot run
    if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params)):
        raise BitNetError(
            f"backend={backend!r} with abstract training parameters: pack them first (bitnet_jax.serve.pack), "
            "or pass packed shapes."
        )
    return pack(config, params, lm_head="float"), ServingSpec(backend, "float", config.act_bits, platform, kv_cache)


def kv_cache_dtype(params, serving: ServingSpec | None):
    """The KV cache's dtype: serving's `kv_cache` (float32 unless asked); training parameters their
    own dtype (bf16 stays bf16). `serving` as `serving_params` returns it."""
    return jnp.dtype(serving.kv_cache) if serving is not None else params["embed_tokens"]["embedding"].dtype


@functools.partial(
    jax.jit,
    static_argnames=("config", "serving", "max_new_tokens", "sampling", "stop_ids", "streaming", "prefill_chunk"),
)
def _generate(
    params,
    prompt_bt,
    lengths_b,
    rng,
    stream,
    *,
    config,
    serving,
    max_new_tokens,
    sampling,
    stop_ids,
    streaming,
    prefill_chunk,
):
    model = BitNetLM(config, serving)
    b, t = prompt_bt.shape
    variables = serving_variables(params) if serving is not None else {"params": params}
    logits_bv, cache = prefill_fresh(
        model, variables, prompt_bt, lengths_b, t + max_new_tokens, kv_cache_dtype(params, serving), chunk=prefill_chunk
    )
    stop_ids_arr = jnp.asarray(stop_ids if stop_ids else (-1,), jnp.int32)
    fill = stop_ids[0] if stop_ids else 0

    def emit(i, logits_bv, out_bn, done_b, rng):
        rng, key = jax.random.split(rng)
        token_b = jnp.where(done_b, fill, sample(logits_bv, key, *sampling, ffi=ffi_cuts(serving)))
        if streaming:
            stream_and_tokens = jnp.concatenate([stream[None], token_b])
            if streaming == "ffi":
                from bitnet_jax.kernels.ffi import push_tokens

                push_tokens(stream_and_tokens)
            else:  # "callback"
                io_callback(_emit_stream, None, stream_and_tokens, ordered=True)
        done_b = done_b | jnp.isin(token_b, stop_ids_arr)
        return out_bn.at[:, i].set(token_b), done_b, rng

    out_bn = jnp.full((b, max_new_tokens), fill, jnp.int32)
    out_bn, done_b, rng = emit(0, logits_bv, out_bn, jnp.zeros((b,), bool), rng)

    def cond(state):
        i, _, _, done_b, _ = state
        return (i < max_new_tokens) & ~jnp.all(done_b)

    def body(state):
        i, out_bn, cache, done_b, rng = state
        positions_b1 = (lengths_b + i - 1)[:, None]
        previous_b1 = jax.lax.dynamic_slice_in_dim(out_bn, i - 1, 1, axis=1)
        logits_b1v, cache = model.apply(variables, previous_b1, positions_bt=positions_b1, cache=cache)
        out_bn, done_b, rng = emit(i, logits_b1v[:, 0], out_bn, done_b, rng)
        return i + 1, out_bn, cache, done_b, rng

    _, out_bn, _, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), out_bn, cache, done_b, rng))
    return out_bn


def sampling_key(seed: int):
    """`jax.random.PRNGKey(seed)`, built on the host where that is exact: JAX's default threefry
    key in 32-bit mode is [0, seed mod 2^32]. PRNGKey runs two small jitted programs, and their
    compiling, at a process's first request, pulls about 20 MB of XLA's compiler into memory
    that a server whose own programs came from the persistent compilation cache never needs
    (serve/compile_cache.py). Other key implementations and 64-bit mode take PRNGKey itself."""
    if jax.config.jax_default_prng_impl != "threefry2x32" or jax.config.jax_enable_x64:
        return jax.random.PRNGKey(seed)
    return np.array([0, seed % 2**32], np.uint32)


def chunks_attend_in_place(config: BitNetConfig, serving: ServingSpec | None, cache_dtype, chunk: int) -> bool:
    """Whether the FFI kernel attends prefill chunks of `chunk` queries over a cache of
    `cache_dtype` (`ops.ffi_attends`), each query reading its own slots up to its position in
    place, whatever chunk holds it. `serving` as `serving_params` returns it (None: XLA)."""
    if serving is None:
        return False
    q = jax.ShapeDtypeStruct((1, chunk, config.num_attention_heads, config.head_dim), jnp.float32)
    return ffi_attends(serving.backend, q, jax.ShapeDtypeStruct((1,), cache_dtype))


def long_prompt_chunk(config: BitNetConfig, serving: ServingSpec | None, cache_dtype) -> int:
    """The chunk that `generate` pads prompts longer than PREFILL_CHUNK to a multiple of, and reads
    what is past their whole PREFILL_CHUNK-token chunks in (`prefill`): IN_PLACE_CHUNK where such
    chunks attend in place (`chunks_attend_in_place`), else PREFILL_CHUNK."""
    in_place = chunks_attend_in_place(config, serving, cache_dtype, IN_PLACE_CHUNK)
    return IN_PLACE_CHUNK if in_place else PREFILL_CHUNK


def generate_prompt_length(
    config: BitNetConfig, params, longest: int, *, backend: str | None = None, kv_cache: str | None = None
) -> int:
    """The length T that `generate(config, params, ..., backend=, kv_cache=)` pads a batch whose
    longest prompt has `longest` tokens to: its cache holds T + max_new_tokens slots."""
    params, serving = serving_params(config, params, backend, kv_cache)
    return padded_prompt_length(longest, long_prompt_chunk(config, serving, kv_cache_dtype(params, serving)))


def padded_prompt_length(longest: int, chunk: int | None = None) -> int:
    """The length T that prompts of at most `longest` tokens are right-padded to: a bucket of
    _LENGTH_BUCKETS up to PREFILL_CHUNK (16, 32, 48, 64, 96, 128, 160, 192, 224, 256), a multiple
    of `chunk` beyond (default PREFILL_CHUNK; `prefill` takes those in chunks of it)."""
    step = next((step for limit, step in _LENGTH_BUCKETS if longest <= limit), chunk or PREFILL_CHUNK)
    return -(-longest // step) * step


def prefill(model: BitNetLM, variables: dict, prompt_bt, lengths_b, cache: KVCache, attend_slots=None, *, chunk=None):
    """Writes right-padded prompts [B, T] (T from `padded_prompt_length`) into cache slots
    0..T-1; returns (each row's next-token logits at its last real token [B, V], cache).
    `attend_slots` (static): attention reads only the first that many slots of the cache
    (`BitNetLM`; T for a cache longer than the prompt, as `prefill_fresh` passes). A T of more
    than PREFILL_CHUNK tokens is read in chunks: whole chunks of PREFILL_CHUNK tokens first,
    then the rest in chunks of `chunk` (static, default PREFILL_CHUNK; a divisor of T and of
    PREFILL_CHUNK: `long_prompt_chunk`).

    Traced inside a jitted program: `generate`'s, and the continuous-batching engine's
    (`serve.batching`), which prefills one slot with it so that its rows get this very math."""
    b, t = prompt_bt.shape
    if t <= PREFILL_CHUNK:
        return model.apply(variables, prompt_bt, cache=cache, logits_index_b=lengths_b - 1, attend_slots=attend_slots)
    chunk = chunk or PREFILL_CHUNK
    if t % chunk:
        raise ValueError(f"prefill: a padded prompt of {t} tokens is not whole chunks of {chunk}")
    # A chunk's matmuls read every layer's weights once, so a token costs less in wider chunks:
    # whole PREFILL_CHUNK-token chunks as far as they go, then the rest in chunks of `chunk`.
    wide = PREFILL_CHUNK if PREFILL_CHUNK % chunk == 0 else chunk

    def chunks(size, first, count, state):
        def one_chunk(i, state):
            start = first + i * size
            chunk_bc = jax.lax.dynamic_slice_in_dim(prompt_bt, start, size, axis=1)
            return prefill_chunk(model, variables, chunk_bc, lengths_b, start, *state, attend_slots=attend_slots)

        return jax.lax.fori_loop(0, count, one_chunk, state)

    logits_bv = jnp.zeros((b, model.config.vocab_size), jnp.float32)
    state = chunks(wide, 0, t // wide, (cache, logits_bv))
    if t % wide:
        state = chunks(chunk, t - t % wide, t % wide // chunk, state)
    cache, logits_bv = state
    return logits_bv, cache


def prefill_chunk(
    model: BitNetLM,
    variables: dict,
    chunk_bc,
    lengths_b,
    start,
    cache: KVCache,
    logits_bv,
    *,
    attend_slots=None,
    cache_pages_bp=None,
):
    """One step of `prefill` for prompts longer than PREFILL_CHUNK: their tokens [start, start +
    C), `chunk_bc` [B, C] (C as `prefill` reads them; the batching engine may run other sizes),
    written into the cache (into each row's pages `cache_pages_bp` [B, P] for a paged cache);
    returns (cache, logits), where a row's logits [B, V] become its next-token logits at the
    chunk that holds its last token and are kept otherwise. Nothing in it depends on the
    prompt's length, so one compiled chunk serves prompts of every length. (The batching engine
    runs a long prompt's chunks one at a time, between decode steps.)"""
    c = chunk_bc.shape[1]
    positions_bc = jnp.broadcast_to(start + jnp.arange(c, dtype=jnp.int32), chunk_bc.shape)
    last_b = lengths_b - 1 - start
    here_b = (last_b >= 0) & (last_b < c)  # the rows whose last prompt token is in the chunk
    chunk_logits_bv, cache = model.apply(
        variables,
        chunk_bc,
        positions_bt=positions_bc,
        cache=cache,
        cache_pages_bp=cache_pages_bp,
        logits_index_b=jnp.clip(last_b, 0, c - 1),
        attend_slots=attend_slots,
        logits_when=jnp.any(here_b),
    )
    return cache, jnp.where(here_b[:, None], chunk_logits_bv, logits_bv)


def prefill_fresh(model: BitNetLM, variables: dict, prompt_bt, lengths_b, slots: int, dtype, *, chunk=None):
    """`prefill` into a new zeroed cache: (next-token logits [B, V], a KVCache with `slots` slots a
    row, at least the padded prompt's T: both callers size the context to hold it).

    Prefill attends over the prompt's T slots only (`attend_slots`), not over the whole context:
    for a 128-token prompt in a 2048-slot row that is 16 times less attention work. The math is
    that of a prefill into a T-slot cache, and the cache is written in place: no second,
    prompt-sized cache is made and copied into it (80 MB at a 2048-token prompt with an int8
    cache; on the FFI backend XLA had laid that copy over prefill's attention scores, so it was
    not what set the peak there). The slots past T stay zero; decode steps write a slot
    before they read it. `generate` and the batching engine both start rows here, so a prompt
    gets the same math in both. `chunk`: as `prefill` takes it."""
    t = prompt_bt.shape[1]
    cache = KVCache.zeros(model.config, prompt_bt.shape[0], slots, dtype=dtype)
    return prefill(model, variables, prompt_bt, lengths_b, cache, attend_slots=t, chunk=chunk)


def greedy_tokens(logits_bv: jax.Array, *, ffi: bool = False) -> jax.Array:
    """`jnp.argmax(logits_bv, axis=-1)` as int32 [B]: the first index of each row's maximum, or of
    its first NaN where it has one, -0.0 and 0.0 being equal, as argmax has it.

    Two plain integer reductions (the largest key, then the smallest index that holds it) instead
    of argmax's one reduction over (value, index) pairs, which XLA:CPU runs an element at a time:
    over a 128,256-token vocabulary, 0.07 ms a row instead of 0.58 ms on a Zen 4 (1.4% of a 2B4T
    decode step). The key orders floats as integers (the bits, with the magnitude bits of
    negatives flipped), after mapping -0.0 to 0.0 and every NaN to the largest key: a float
    maximum would not do, for XLA:CPU's does not propagate NaN. XLA:CPU writes the keys and the
    indices out as two [B, V] arrays before reducing them (8 MB of a decode step's temporary
    buffer at 8 rows); `ffi` (`ops.ffi_cuts` says where) takes the same answer from one pass of
    the FFI kernel instead (`ffi.argmax`). tests/test_generate.py checks both against argmax,
    ties, zeros, infinities and NaNs included."""
    if ffi:
        from bitnet_jax.kernels import ffi as kernels  # only here: the XLA backends never load the extension

        return kernels.argmax(logits_bv)
    key_bv = _order_keys(logits_bv)
    top_b1 = jnp.max(key_bv, axis=-1, keepdims=True)
    index_bv = jax.lax.broadcasted_iota(jnp.int32, key_bv.shape, key_bv.ndim - 1)
    return jnp.min(jnp.where(key_bv == top_b1, index_bv, key_bv.shape[-1]), axis=-1)


def _order_keys(x_bv: jax.Array) -> jax.Array:
    """int32 keys in the order of the float values of `x_bv`: the bits, with the magnitude bits
    of negatives flipped, after mapping -0.0 to 0.0 and every NaN to the largest key."""
    x_bv = jnp.where(x_bv == 0, 0.0, x_bv).astype(jnp.float32)
    bits_bv = jax.lax.bitcast_convert_type(x_bv, jnp.int32)
    key_bv = jnp.where(bits_bv < 0, bits_bv ^ jnp.int32(0x7FFFFFFF), bits_bv)
    return jnp.where(jnp.isnan(x_bv), jnp.iinfo(jnp.int32).max, key_bv)


def unsigned_keys(x_bv: jax.Array) -> jax.Array:
    """`_order_keys` as uint32 in the same order (the sign bit flipped): what the cuts bisect."""
    return jax.lax.bitcast_convert_type(_order_keys(x_bv) ^ jnp.int32(-0x80000000), jnp.uint32)


def key_values(ukey_bv: jax.Array) -> jax.Array:
    """The float32 values whose `unsigned_keys` are `ukey_bv`: the values themselves, but 0.0 for
    -0.0 and one NaN for every NaN (a sum, a comparison or an argmax of ours tells neither apart)."""
    key_bv = jax.lax.bitcast_convert_type(ukey_bv, jnp.int32) ^ jnp.int32(-0x80000000)
    bits_bv = jnp.where(key_bv < 0, key_bv ^ jnp.int32(0x7FFFFFFF), key_bv)
    return jax.lax.bitcast_convert_type(bits_bv, jnp.float32)


def top_p_threshold(e_bv: jax.Array, ukey_bv: jax.Array, top_p_b: jax.Array) -> jax.Array:
    """The cut of `top_p_filter` as a key [B, 1]: a row keeps the tokens whose `unsigned_keys` are
    at least it. `e_bv` [B, V]: each token's unnormalized probability, exp(x - max), 0 for a token
    cut before (where the row has -inf); `ukey_bv`: the keys of the row's values (of any value
    for a token whose e is 0, so a cut made before need not be in them)."""
    target_b1 = top_p_b[:, None] * jnp.sum(e_bv, axis=-1, keepdims=True)

    def halve(_, bounds):  # the threshold's key lies in [low, high]; the mass above high is below the target
        low_b1, high_b1 = bounds
        mid_b1 = low_b1 + (high_b1 - low_b1) // 2
        below_b1 = jnp.sum(jnp.where(ukey_bv > mid_b1, e_bv, 0.0), axis=-1, keepdims=True) < target_b1
        return jnp.where(below_b1, low_b1, mid_b1 + 1), jnp.where(below_b1, mid_b1, high_b1)

    bounds = (jnp.zeros_like(target_b1, jnp.uint32), jnp.max(ukey_bv, axis=-1, keepdims=True))
    return jax.lax.fori_loop(0, 32, halve, bounds)[1]


def ffi_cut(ukey_bv: jax.Array, top_k_b: jax.Array, top_p_b: jax.Array, kept: int = 0):
    """`top_k_threshold` and then `top_p_threshold` as one key per row [B, 1] (the larger of the
    two: a row keeps the tokens whose `unsigned_keys` reach it), by the FFI kernel
    (`ffi.sampling_cut`: a radix select, where the halvings pass over the row 32 times; 0.2-0.3
    ms a row of 128,256 tokens against 1.5 on a Zen 4). `ukey_bv`: the keys of the scaled logits;
    top_k_b int32 [B] (0: no top-k cut), top_p_b float32 [B] (1: no top-p cut). Its top-p sums are
    in double, so it and the halvings' float32 sums agree but where the cut lies within float32
    rounding of top_p. The masses are those the halvings weigh, exp(x - max x) of the row (whose
    maximum the top-k cut always keeps), computed by the kernel with its own exp (2 ulp from exact,
    where XLA's is another): XLA no longer writes them out, a [B, V] array of a decode step's
    temporary buffer. Returns (cut_b1, (kept_bk, count_b)): the tokens each row keeps, where at
    most `kept` (`ffi.sampling_cut`), for `draw_after_cut`."""
    from bitnet_jax.kernels import ffi  # only here: the XLA backends never load the extension

    cut_b1, kept_bk, count_b = ffi.sampling_cut(ukey_bv, top_k_b, top_p_b, kept)
    return cut_b1, (kept_bk, count_b)


def top_p_filter(scaled_bv: jax.Array, top_p_b: jax.Array) -> jax.Array:
    """`scaled_bv` (float32 logits [B, V], after the temperature) with -inf outside each row's
    nucleus: the smallest set of most probable tokens whose probability reaches the row's top_p.
    A token is kept when the probability of the tokens above it is below top_p, so tokens of
    equal logit are kept or dropped together, and the most probable is always kept. Rows whose
    top_p is 1 or more are returned as they are.

    The cut is found without sorting the row (`top_p_threshold`): the kept tokens are those whose
    logit is at least a threshold t, the least value at which the mass above t is below top_p;
    that mass only falls as t rises, so 32 halvings of the logits' ordered int32 keys
    (`_order_keys`, read as unsigned) find t exactly, each one masked sum over the row. Over a
    128,256-token vocabulary on a Zen 4 that is 0.6-0.7 ms a row, where sorting the row took 27
    ms (as long as the whole 2B4T decode step). Masses are unnormalized (exp(x - max), against
    top_p times their sum)."""
    e_bv = jnp.exp(scaled_bv - jnp.max(scaled_bv, axis=-1, keepdims=True))
    ukey_bv = unsigned_keys(scaled_bv)
    threshold_b1 = top_p_threshold(e_bv, ukey_bv, top_p_b)
    return jnp.where((top_p_b[:, None] < 1.0) & (ukey_bv < threshold_b1), -jnp.inf, scaled_bv)


def top_k_threshold(ukey_bv: jax.Array, top_k_b: jax.Array) -> jax.Array:
    """The k-th largest of each row's `unsigned_keys` `ukey_bv` [B, V], as [B, 1] (top_k_b int32
    [B]; at most V), by 32 halvings: the largest key t that at least k keys reach. For k = 0, the
    row's largest key."""
    k_b1 = jnp.minimum(top_k_b, ukey_bv.shape[-1])[:, None]

    def halve(_, bounds):  # the k-th largest key lies in [low, high]; at least k keys reach low
        low_b1, high_b1 = bounds
        span_b1 = high_b1 - low_b1
        mid_b1 = low_b1 + span_b1 // 2 + span_b1 % 2  # above low while low < high
        enough_b1 = jnp.sum(ukey_bv >= mid_b1, axis=-1, keepdims=True) >= k_b1
        return jnp.where(enough_b1, mid_b1, low_b1), jnp.where(enough_b1, high_b1, mid_b1 - 1)

    bounds = (jnp.zeros_like(k_b1, jnp.uint32), jnp.max(ukey_bv, axis=-1, keepdims=True))
    return jax.lax.fori_loop(0, 32, halve, bounds)[0]


def top_k_filter(scaled_bv: jax.Array, top_k_b: jax.Array) -> jax.Array:
    """`scaled_bv` (float32 logits [B, V]) with -inf below each row's k-th largest value (top_k_b
    int32 [B]; 0 leaves the row as it is): the cut of `sample`'s `jax.lax.top_k`, every value
    equal to the k-th kept, for a k that may differ per row. The k-th largest is found as
    `top_p_filter` finds its cut, by 32 halvings of the ordered keys (`top_k_threshold`)."""
    ukey_bv = unsigned_keys(scaled_bv)
    kth_b1 = top_k_threshold(ukey_bv, top_k_b)
    return jnp.where((top_k_b[:, None] > 0) & (ukey_bv < kth_b1), -jnp.inf, scaled_bv)


def categorical_tokens(key: jax.Array, scaled_bv: jax.Array, *, ffi: bool = False) -> jax.Array:
    """`jax.random.categorical(key, scaled_bv, axis=-1)` as int32 ([B], or a scalar for one row
    [V]): the same Gumbel noise from the same key (`gumbel_noise`), so the same token, with
    `greedy_tokens` for its argmax (0.5 ms a row less over a 128,256-token vocabulary; `ffi` as
    there)."""
    return greedy_tokens(gumbel_noise(key, scaled_bv.shape) + scaled_bv, ffi=ffi)


def gumbel_noise(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """`jax.random.gumbel(key, shape, jnp.float32)`, the same bits, in straight-line code.

    On CPU, JAX computes the Threefry hash behind its random bits in a loop of five trips, each
    reading and writing two uint32 arrays of the whole shape, and XLA keeps four such arrays
    live: 16 MB of a decode step's temporary buffer for 8 rows of a 128,256-token vocabulary. The
    same hash unrolled (`_threefry_2x32`) is elementwise work that XLA fuses into the reduction
    that reads the noise, and stores nothing. This is JAX's default generator, as JAX configures
    it by default (the "threefry2x32" implementation, partitionable counters, Gumbel noise from
    one uniform draw); for a key or a configuration other than that (a typed key, another
    generator), or a shape of 2**32 values or more, it calls `jax.random.gumbel`.
    tests/test_generate.py checks the bits against it."""
    size = int(np.prod(shape))
    if not straight_line_gumbel(key, size):
        return jax.random.gumbel(key, shape, jnp.float32)
    # The counter of each value is its index in the flattened shape (the high word 0).
    return _gumbel_at(key, jax.lax.iota(jnp.uint32, size).reshape(shape))


def straight_line_gumbel(key: jax.Array, size: int) -> bool:
    """Whether `gumbel_noise(key, shape)` of `size` values is `_gumbel_at` of their indices."""
    return (
        key.dtype == jnp.uint32
        and key.shape == (2,)
        and jax.config.jax_default_prng_impl == "threefry2x32"
        and jax.config.jax_threefry_partitionable
        and not jax.config.jax_high_dynamic_range_gumbel
        and size < 2**32
    )


def _gumbel_at(key: jax.Array, counter: jax.Array) -> jax.Array:
    """The values of `gumbel_noise(key, shape)` at the flat indices `counter` (uint32, any shape),
    under `straight_line_gumbel`: the same elementwise arithmetic on the same counters."""
    bits1, bits2 = _threefry_2x32(key[0], key[1], jnp.zeros_like(counter), counter)
    # A uniform draw in [tiny, 1) as `jax.random.uniform(key, shape, float32, tiny, 1)` makes it
    # from the 23 high bits; then -log(-log(u)).
    one_bits = np.float32(1.0).view(np.uint32)
    unit = jax.lax.bitcast_convert_type(((bits1 ^ bits2) >> np.uint32(9)) | one_bits, jnp.float32) - np.float32(1.0)
    tiny = np.float32(np.finfo(np.float32).tiny)
    uniform = jnp.maximum(tiny, unit * (np.float32(1.0) - tiny) + tiny)
    return -jnp.log(-jnp.log(uniform))


# The most tokens a row may keep for its draw to take the Gumbel noise of those alone
# (`nucleus_tokens`); a row that keeps more draws over the whole vocabulary.
NUCLEUS_TOKENS = 1024


def nucleus_tokens(key: jax.Array, final_bv: jax.Array, kept_bk: jax.Array, count_b: jax.Array) -> jax.Array:
    """`categorical_tokens(key, final_bv)` [B], the same token, where each row keeps (is finite at)
    only the tokens `kept_bk` [B, K] lists (ascending; `count_b` [B] of them, each at most K, the
    rest of the row -inf): the Gumbel noise of those K values a row (`_gumbel_at` of their flat
    indices) rather than of the whole vocabulary, which on CPU is 0.33 ms a row of 128,256 tokens
    (most of what sampling a token costs). The other tokens, -inf, cannot be drawn; the first of
    the largest is the same token, for the kept ones are in index order. Under
    `straight_line_gumbel(key, B * V)` only (else the noise is `jax.random.gumbel`'s)."""
    b, v = final_bv.shape
    valid_bk = jnp.arange(kept_bk.shape[1])[None] < count_b[:, None]
    index_bk = jnp.where(valid_bk, kept_bk, 0)
    x_bk = jnp.where(valid_bk, jnp.take_along_axis(final_bv, index_bk, axis=1), -jnp.inf)
    counter_bk = jnp.arange(b, dtype=jnp.uint32)[:, None] * np.uint32(v) + index_bk.astype(jnp.uint32)
    pick_b = greedy_tokens(_gumbel_at(key, counter_bk) + x_bk)
    return jnp.take_along_axis(index_bk, pick_b[:, None], axis=1)[:, 0]


def draw_after_cut(key: jax.Array, final_bv: jax.Array, nucleus=None, *, ffi: bool = False) -> jax.Array:
    """`categorical_tokens(key, final_bv, ffi=ffi)` [B]; with `nucleus` (kept_bk, count_b) from the
    FFI cut, by `nucleus_tokens` in a call where every row kept at most its K tokens."""
    whole = functools.partial(categorical_tokens, ffi=ffi)
    if nucleus is None or not straight_line_gumbel(key, final_bv.size):
        return whole(key, final_bv)
    kept_bk, count_b = nucleus
    small = jnp.all(count_b <= kept_bk.shape[1])
    return jax.lax.cond(small, nucleus_tokens, lambda key, final_bv, *_: whole(key, final_bv), key, final_bv, *nucleus)


def _threefry_2x32(k1, k2, x1, x2):
    """The Threefry-2x32 block cipher (20 rounds; Salmon et al., "Parallel random numbers: as easy
    as 1, 2, 3", 2011) of the counter words (x1, x2) under the key (k1, k2), all uint32:
    five groups of four add-rotate-xor rounds, a key word injected after each."""
    rotations = ((13, 15, 26, 6), (17, 29, 16, 24))
    schedule = (k1, k2, k1 ^ k2 ^ np.uint32(0x1BD11BDA))
    x1, x2 = x1 + schedule[0], x2 + schedule[1]
    for group in range(5):
        for r in rotations[group % 2]:
            x1 = x1 + x2
            x2 = x1 ^ ((x2 << np.uint32(r)) | (x2 >> np.uint32(32 - r)))
        x1 = x1 + schedule[(group + 1) % 3]
        x2 = x2 + schedule[(group + 2) % 3] + np.uint32(group + 1)
    return x1, x2


def sample(
    logits_bv: jax.Array,
    key: jax.Array,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    *,
    ffi: bool = False,
) -> jax.Array:
    """Greedy (temperature 0) or temperature / top-k / top-p sampling; int32 [B]. `ffi`: the cuts
    and the argmax by the FFI kernels (`ffi_cut`, `greedy_tokens`; `ops.ffi_cuts` says where), as
    the batching engine takes them."""
    if temperature == 0.0:
        return greedy_tokens(logits_bv, ffi=ffi)
    logits_bv = logits_bv.astype(jnp.float32) / temperature
    if ffi and (top_k or (top_p is not None and top_p < 1.0)):  # top_k None or >= 1 (`check_sampling`)
        b = logits_bv.shape[0]
        ukey_bv = unsigned_keys(logits_bv)
        top_k_b = jnp.full((b,), top_k or 0, jnp.int32)
        top_p_b = jnp.full((b,), 1.0 if top_p is None else top_p, jnp.float32)
        cut_b1, nucleus = ffi_cut(ukey_bv, top_k_b, top_p_b, kept=NUCLEUS_TOKENS)
        return draw_after_cut(key, jnp.where(ukey_bv < cut_b1, -jnp.inf, key_values(ukey_bv)), nucleus, ffi=True)
    if top_k is not None and top_k < logits_bv.shape[-1]:
        kth_b1 = jax.lax.top_k(logits_bv, top_k)[0][:, -1:]
        logits_bv = jnp.where(logits_bv < kth_b1, -jnp.inf, logits_bv)
    if top_p is not None and top_p < 1.0:
        logits_bv = top_p_filter(logits_bv, jnp.full(logits_bv.shape[:1], top_p, jnp.float32))
    return categorical_tokens(key, logits_bv, ffi=ffi)


def _as_prompt_list(prompt_ids) -> list[list[int]]:
    if isinstance(prompt_ids, (np.ndarray, jax.Array)):
        array = np.asarray(prompt_ids)
        if array.ndim == 1:
            array = array[None]
        if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
            raise BitNetError(f"prompt_ids: expected an integer array [B, T]; found {array.dtype} {array.shape}.")
        return [list(map(int, row)) for row in array]
    prompts = list(prompt_ids)
    if prompts and all(isinstance(p, (int, np.integer)) for p in prompts):
        prompts = [prompts]
    if not prompts:
        raise BitNetError("prompt_ids is empty: expected at least one prompt of at least one token.")
    result = []
    for prompt in prompts:
        ids = list(prompt)
        if not all(isinstance(i, (int, np.integer)) for i in ids):
            raise BitNetError(f"prompt_ids: expected integer token ids; found {ids[:5]}...")
        result.append([int(i) for i in ids])
    return result


def _check_request(config, prompts, max_new_tokens, temperature, top_k, top_p, stop_ids):
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise BitNetError(f"max_new_tokens={max_new_tokens!r}: expected an integer >= 1.")
    for row, prompt in enumerate(prompts):
        if not prompt:
            raise BitNetError(f"Prompt {row} is empty: expected at least one token (e.g. the BOS id).")
        bad = [i for i in prompt if not 0 <= i < config.vocab_size]
        if bad:
            raise BitNetError(
                f"Prompt {row} has token ids outside the vocabulary [0, {config.vocab_size}): {bad[:5]}. "
                "Was it encoded with this model's tokenizer?"
            )
        if len(prompt) + max_new_tokens > config.max_position_embeddings:
            raise BitNetError(
                f"Prompt {row} has {len(prompt)} tokens and {max_new_tokens} new tokens were asked for, "
                f"but the model's context is {config.max_position_embeddings} tokens: shorten the prompt "
                f"or ask for at most {max(config.max_position_embeddings - len(prompt), 0)} new tokens."
            )
    for s in stop_ids or ():
        if not 0 <= int(s) < config.vocab_size:
            raise BitNetError(f"stop id {s} is outside the vocabulary [0, {config.vocab_size}).")
    check_sampling(temperature, top_k, top_p)


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raises BitNetError unless `generate` takes these sampling settings."""
    if not temperature >= 0:
        raise BitNetError(f"temperature={temperature}: expected a number >= 0 (0 means greedy).")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise BitNetError(f"top_k={top_k!r}: expected a positive integer or None.")
    if top_p is not None and not 0 < top_p <= 1:
        raise BitNetError(f"top_p={top_p!r}: expected a number in (0, 1] or None.")
