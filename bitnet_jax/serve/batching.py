"""Continuous batching: many requests share one jitted decode step over a fixed number of slots.

The engine owns a paged KV cache and one thread that loops. The cache is a pool of pages of
`page_len` slots (256, or the whole context when it is shorter); a request holds the pages its
prompt and `max_tokens` need, from admission until it ends, and each of the `max_batch` rows
reads its request's pages through a page table (`KVCache`'s pages [B, P]; the FFI attention
kernel reads them in place). The pool holds `kv_cache_tokens` slots (default `max_batch *
max_context`: every row can reach the full context at once); a smaller pool bounds the memory
while any one request may still use the whole context, and requests wait for pages as they wait
for rows. Page 0 is scratch: the rows a step runs as padding, and a row's pages past its
allocation, point there. On CPU the pool starts as `ffi.zeros`, whose memory becomes resident
only where keys and values are written: the process holds the pages that requests have used
(freed pages are taken again first), not the worst case.

  1. admit: while a row is free and the pool has the pages the oldest waiting request needs
     (first come, first served), it takes them; one jitted prefill writes its prompt into its
     pages (`generate.prefill_fresh` on a fresh batch-1 cache as long as the padded prompt) and
     samples its first token. A prompt longer than one prefill
     chunk (`prefill_chunk` tokens, 64 by default) is written one chunk per loop instead
     (`generate.prefill_chunk`, the same math), oldest first, so that the rows already decoding
     get a step after every chunk rather than waiting for the whole prompt. Where the FFI kernel
     attends a chunk, the chunk runs on the row's pages in place, one compiled program for
     prompts of every length; elsewhere (XLA attention, whose work grows with the slots it
     scores) on a copy of the row's prompt slots, a program per padded length, in chunks of 256;
  2. step: one jitted decode step runs the rows that hold a request, each at its own position
     with its own temperature, top-p and random key. The step is compiled for a few widths
     (1, 2, 4, ... up to `max_batch`, all at start-up) and runs at the narrowest that holds the
     active rows, padded with free rows whose results are ignored; it names the cache rows it
     reads and writes (their page tables), so a lone request costs one row of the kernels, and
     the FFI attention kernel reads only each row's filled slots, in place;
  3. each request takes its token, turns it into text (`StreamDecoder`), and leaves when it meets
     a stop id, a stop string, `max_tokens` or a cancel; its row and pages are free for the
     next admit (with `prefix_cache`, its pages stay with the tokens they hold until the pool
     needs them, and a prompt that begins with those tokens takes them and prefills the rest).

Batch invariance: a greedy request gets the same tokens alone or beside others, at any step
width. Every operation of a row's forward pass is computed per row (activations are quantized
per token, the kernels' integer sums are exact, norms, attention and the lm_head reduce within a
row; the FFI attention kernel's sums are cut at fixed slot indices, whatever the batch and
wherever the pages lie, since a page holds whole chunks), the
prefill runs at batch 1 on a cache as long as the padded prompt, and unused cache slots are
masked to exactly zero weight. `bitnet_jax.generate` on one prompt with `generate_prompt_length(...) +
max_new_tokens == max_context` runs the same per-row math (tests/test_server.py checks both).

Requests come in through `submit` from any thread and leave through their `on_event` callback,
called on the engine thread; JAX releases the GIL while a step runs, so an asyncio server
thread stays responsive.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from bitnet_jax.errors import BitNetError
from bitnet_jax.kernels.ops import computation_platform, ffi_cuts
from bitnet_jax.model.config import BitNetConfig
from bitnet_jax.model.serving_layers import is_packed, serving_variables
from bitnet_jax.model.transformer import BitNetLM, KVCache, join_pages, page_slots
from bitnet_jax.serve.generate import (
    NUCLEUS_TOKENS,
    PREFILL_CHUNK,
    categorical_tokens,
    chunks_attend_in_place,
    ffi_cut,
    greedy_tokens,
    key_values,
    kv_cache_dtype,
    nucleus_tokens,
    padded_prompt_length,
    prefill_chunk,
    prefill_fresh,
    sampling_key,
    serving_params,
    straight_line_gumbel,
    top_k_threshold,
    top_p_threshold,
    unsigned_keys,
)
from bitnet_jax.serve.host_memory import map_large_blocks, release_freed_memory
from bitnet_jax.serve.pack import pack
from bitnet_jax.serve.streaming import StreamDecoder

logger = logging.getLogger(__name__)

# A long prompt prefilled in place runs its first n mod `prefill_chunk` tokens as a short prompt
# would, padded to a multiple of this (one of the short prompts' buckets: 64, 128, 192 or 256; 64
# alone in the default 64-token chunks): 4 programs at most for the heads, each shared with short
# prompts, where the 10 buckets held 8-11 MB each once loaded (a server meeting prompts of
# 300-2000 tokens in 256-token chunks peaked 54 MB higher with them); an average of 32 tokens of
# padding a long prompt.
_HEAD_STEP = 64

# Prompt tokens a loop reads where chunks run in place (`Engine(prefill_chunk=...)`). On 2B4T (Zen 4,
# 2 threads, int8 cache; benchmarks/RESULTS.md, "Shorter prefill chunks"), 64 against 256: a
# stream decoding beside a 2048-token prompt waits at most 0.6 s for a token, not 2.0; a
# conversation's next turn (72 new tokens) prefills 2 x 64 tokens, not 256 (0.6 s against 2.2); the
# server peaks 10-28 MB lower (smaller temporaries). The cost: a 2000-token prompt alone takes
# ~3% longer (the matmuls read and unpack every layer's weights once per chunk; RESULTS, "What a
# 64-token chunk costs, found"; the lm_head is read only in the chunk that holds the prompt's last
# token: `generate.prefill_chunk`), and beside decoding rows it waits for a decode step after each chunk.
DEFAULT_PREFILL_CHUNK = 64

# Slots per page of the engine's KV cache: whole chunks of the FFI attention kernel (128 slots)
# and the length long prompts are padded to a multiple of, so a row of any context is whole pages.
PAGE_LEN = 256


class QueueFull(BitNetError):
    """Every slot is busy and the waiting queue is at its bound: try again later."""


class EngineStopped(BitNetError):
    """The engine is shutting down and takes no new requests."""


class ContextTooLong(BitNetError):
    """The prompt plus max_tokens do not fit in the server's context."""


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    """What one client asks for (already tokenized)."""

    prompt_ids: tuple[int, ...]
    max_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int | None = None  # sample from the k most likely tokens only
    seed: int = 0
    stop_ids: tuple[int, ...] = ()  # the reply ends after one of these (its text is not shown)
    stop_strings: tuple[str, ...] = ()  # the reply ends before the first of these in its text


@dataclasses.dataclass(frozen=True)
class Event:
    """A piece of a reply, delivered in order; the last one has `finish_reason` set.

    finish_reason: 'stop' (a stop id or stop string), 'length' (max_tokens), 'cancelled', or
    'error' (then `error` says why). `token_ids` are the tokens sampled since the previous event,
    a final stop id included; `text` is their text, less what a stop string cuts off (text that
    might begin a stop string is held back until it is known not to).
    """

    text: str
    token_ids: tuple[int, ...] = ()
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


class Ticket:
    """A submitted request; `cancel()` (from any thread) frees its slot at the next step."""

    def __init__(self, engine: "Engine", request: GenerationRequest, on_event: Callable[[Event], None]):
        self.request = request
        self._engine = engine
        self._on_event = on_event
        self.cancelled = False

    def cancel(self) -> None:
        self._engine._cancel(self)


@dataclasses.dataclass
class _Active:
    """A request in a slot, with its reply so far."""

    ticket: Ticket
    decoder: StreamDecoder
    completion_tokens: int = 0
    text: str = ""  # the reply's text so far (before any stop string)
    sent: int = 0  # characters of `text` already delivered
    new_ids: list = dataclasses.field(default_factory=list)  # sampled since the last event
    reply_ids: list = dataclasses.field(default_factory=list)  # every token sampled (with prefix_cache)
    prefill: "_Prefill | None" = None  # a long prompt still being prefilled, chunk by chunk
    pages: list = dataclasses.field(default_factory=list)  # the pool pages it holds, in slot order


@dataclasses.dataclass
class _Prefill:
    """A prompt longer than one prefill chunk, right-padded, and where its next chunk starts."""

    prompt_1t: np.ndarray
    order: int  # admissions before it: the oldest is prefilled first
    start: int = 0
    logits_1v: jax.Array | None = None  # carried between chunks; the next-token logits after the last


class Engine:
    """Fixed slots, one decode step for all of them; see the module docstring.

    Making one sets glibc's malloc, for the whole process, to map blocks of 4 MiB and more apart
    and unmap them when freed (`host_memory.map_large_blocks`): the steps' temporaries then go
    back to the OS rather than staying in the heap.

    Args:
      config, params, tokenizer: as `bitnet_jax.load_model` returns them. Training parameters
        that the serving kernels take are packed here, once (`pack`'s default int8 lm_head).
      max_batch: slots (rows of the KV cache, rows of every decode step).
      max_context: the longest prompt plus reply a request may have. It is rounded down to a
        length prompts are padded to (a multiple of 16, or of 256 above 256) and capped at the
        model's `max_position_embeddings`.
      kv_cache_tokens: KV cache slots in the page pool, shared by all rows (default `max_batch *
        max_context`); rounded down to whole pages, and at least one request of `max_context`.
      max_queue: requests that may wait for a slot; `submit` raises QueueFull beyond them.
      backend: 'ffi', 'xla' or None, as for `generate`.
      kv_cache: the KV cache's dtype, 'float32' (default) or 'int8' (a quarter of the memory), as for `generate`.
      prefix_cache: keep a finished request's pages, and the tokens they hold, until their pages
        are needed; a later request whose prompt begins with at least `prefill_chunk` of those
        tokens (a conversation's next turn, which resends the history) takes the pages and
        prefills only the rest. Only where long prompts' chunks run in place (the FFI kernel
        attends them). A prefix gives its pages back before a request takes a page that no
        request has written, so the cache holds no memory that requests had not made resident.
      prefill_chunk: where long prompts' chunks run in place, the tokens a chunk holds (64, 128,
        192 or 256; None: DEFAULT_PREFILL_CHUNK, 64): a prompt longer than one chunk is read one
        chunk per loop, with a decode step for the other rows after each, so a decoding row waits
        about one chunk's time at most for its next token while a prompt is read (on 2B4T, Zen
        4, 2 threads: 0.4-0.6 s for 64 tokens, 1.8-2.0 s for 256), and the prompt's own first
        token comes a decode step later for every chunk (DEFAULT_PREFILL_CHUNK says what each
        costs). Elsewhere chunks hold PREFILL_CHUNK (256) tokens.
      top_k: whether requests may ask for a top-k cut (`GenerationRequest.top_k`); without it the
        programs hold no top-k code (the OpenAI API has no top_k; on 2B4T the cut's code in the
        engine's programs cost some 20 MB of resident memory at 8 clients).
    """

    def __init__(
        self,
        config: BitNetConfig,
        params,
        tokenizer,
        *,
        max_batch: int = 8,
        max_context: int = 2048,
        max_queue: int = 64,
        backend: str | None = None,
        kv_cache: str | None = None,
        kv_cache_tokens: int | None = None,
        in_child: bool = False,
        prefix_cache: bool = False,
        prefill_chunk: int | None = None,
        top_k: bool = False,
    ):
        prefill_chunk = DEFAULT_PREFILL_CHUNK if prefill_chunk is None else prefill_chunk
        if max_batch < 1:
            raise BitNetError(f"max_batch={max_batch}: expected at least 1 slot.")
        if prefill_chunk % _HEAD_STEP or not _HEAD_STEP <= prefill_chunk <= PREFILL_CHUNK:
            raise BitNetError(
                f"prefill_chunk={prefill_chunk}: expected a multiple of {_HEAD_STEP} "
                f"from {_HEAD_STEP} to {PREFILL_CHUNK} tokens."
            )
        if max_queue < 0:
            raise BitNetError(f"max_queue={max_queue}: expected 0 or more waiting requests.")
        context = _round_down(min(int(max_context), config.max_position_embeddings))
        if context < 16:
            raise BitNetError(f"max_context={max_context}: expected at least 16 tokens.")
        map_large_blocks()
        if not is_packed(params) and config.weight_quant in ("tensor", "channel") and config.act_quant == "token":
            # Once, as `bitnet-jax chat` does: the int8 lm_head kernel, like the ternary ones,
            # computes each row alone, which keeps replies independent of the batch.
            params = pack(config, params)
        params, serving = serving_params(config, params, backend, kv_cache)
        self.config, self.params, self.tokenizer = config, params, tokenizer
        self.max_batch, self.max_context, self.max_queue = max_batch, context, max_queue
        self._serving = serving
        self._variables = serving_variables(params) if serving is not None else {"params": params}
        self._cache_dtype = kv_cache_dtype(params, serving)
        self.page_len = min(context, PAGE_LEN)  # a multiple of 16, or 256: whole attention chunks
        pool_tokens = max_batch * context if kv_cache_tokens is None else int(kv_cache_tokens)
        self.kv_pages = pool_tokens // self.page_len
        if self.kv_pages < context // self.page_len:
            raise BitNetError(
                f"kv_cache_tokens={kv_cache_tokens}: the KV cache must hold at least one request of the whole "
                f"context, {context} tokens (pages of {self.page_len})."
            )
        # Row 0 of the pool is the scratch page.
        self._in_child = in_child
        self._programs: dict = {}  # with in_child: (program, argument shapes) -> callable
        self._pool = dict(
            config=config,
            rows=1 + self.kv_pages,
            page_len=self.page_len,
            dtype=self._cache_dtype,
            lazy=_lazy_zeros(params),
        )
        if in_child:  # its shapes until start(), which compiles its zeros with the warm-up's programs
            self._cache = jax.eval_shape(functools.partial(_zero_cache, **self._pool))
        else:
            self._cache = self._call(_zero_cache, (), self._pool)
        self._free_pages = list(range(self.kv_pages, 0, -1))  # popped from the end: lowest first
        # Per-row state, and one row more: row max_batch, never a request's, whose pages are all
        # the scratch page, pads a decode step to its compiled width (a free row would not always
        # do: the rows that hold no decoding request may be prefilling a long prompt).
        b = max_batch + 1
        self._padding_row = max_batch
        self._pages_bp = np.zeros((b, context // self.page_len), np.int32)  # 0: the scratch page
        self._tokens_b = np.zeros(b, np.int32)
        self._positions_b = np.zeros(b, np.int32)  # where each row's token in _tokens_b is written
        self._temperature_b = np.zeros(b, np.float32)
        self._top_p_b = np.ones(b, np.float32)
        self._top_k_b = np.zeros(b, np.int32)  # 0: no top-k cut
        self._top_k = top_k
        self._keys_b2 = np.zeros((b, 2), np.uint32)
        self._slots: list[_Active | None] = [None] * max_batch
        self._admissions = itertools.count()
        self._widths = step_widths(max_batch)  # a step holds at most max_batch decoding rows
        self._waiting: collections.deque[Ticket] = collections.deque()
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._prefill_programs: set = set()  # the prefills that have run (as `prefill_programs` names them)
        # Whether a long prompt's chunks run on the row's pages in place (_prefill_chunk_in_place):
        # where the FFI kernel attends them, reading each query's slots up to its position.
        self._chunks_in_place = chunks_attend_in_place(config, serving, self._cache_dtype, prefill_chunk)
        self.prefill_chunk = prefill_chunk if self._chunks_in_place else PREFILL_CHUNK
        # Finished requests' pages and the tokens they hold, least recently used first.
        self._prefix_cache = prefix_cache and self._chunks_in_place
        self._prefixes: list[tuple[np.ndarray, list[int]]] = []
        self._pages_written = 0  # pages 1.. this one have been taken by a request
        self.stats = collections.Counter()  # submitted, completed, cancelled, error, steps, rows, tokens, peak_active

    # -- the client side (any thread) -------------------------------------------------------

    def submit(self, request: GenerationRequest, on_event: Callable[[Event], None]) -> Ticket:
        """Queues a request; `on_event` gets its reply, on the engine thread. Raises BitNetError
        for a request the model cannot take, QueueFull or EngineStopped."""
        self.check(request)
        ticket = Ticket(self, request, on_event)
        with self._lock:
            if self._stopping:
                raise EngineStopped("The server is shutting down and takes no new requests.")
            # Those beyond the free slots wait (a slot is taken at the engine's next admit).
            if len(self._waiting) - sum(a is None for a in self._slots) >= self.max_queue:
                raise QueueFull(
                    f"All {self.max_batch} slots are busy and {len(self._waiting)} requests are waiting "
                    f"(the queue holds {self.max_queue}): retry later."
                )
            self._waiting.append(ticket)
            self.stats["submitted"] += 1
            self._wakeup.notify()
        return ticket

    def check(self, request: GenerationRequest) -> None:
        """Raises BitNetError (a message for the client) if the request cannot run here."""
        prompt, vocab = request.prompt_ids, self.config.vocab_size
        if not prompt:
            raise BitNetError("The prompt is empty: expected at least one token.")
        bad = [i for i in prompt if not 0 <= i < vocab]
        if bad:
            raise BitNetError(f"The prompt has token ids outside the vocabulary [0, {vocab}): {bad[:5]}.")
        if request.max_tokens < 1:
            raise BitNetError(f"max_tokens={request.max_tokens}: expected at least 1.")
        if len(prompt) + request.max_tokens > self.max_context:
            raise ContextTooLong(
                f"The prompt has {len(prompt)} tokens and max_tokens is {request.max_tokens}, but this server's "
                f"context is {self.max_context} tokens: shorten the prompt or ask for at most "
                f"{max(self.max_context - len(prompt), 0)} tokens."
            )
        if not request.temperature >= 0 or not np.isfinite(request.temperature):
            raise BitNetError(f"temperature={request.temperature}: expected a finite number >= 0.")
        if not 0 < request.top_p <= 1:
            raise BitNetError(f"top_p={request.top_p}: expected a number in (0, 1].")
        if request.top_k is not None and not (isinstance(request.top_k, (int, np.integer)) and request.top_k >= 1):
            raise BitNetError(f"top_k={request.top_k!r}: expected an integer >= 1, or None.")
        if request.top_k is not None and not self._top_k:
            raise BitNetError(f"top_k={request.top_k}: this engine samples without a top-k cut (Engine(top_k=True)).")

    @property
    def running(self) -> bool:
        """Whether the engine thread is serving (started, not stopping, not failed)."""
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def load(self) -> dict:
        """Slots in use and requests waiting."""
        with self._lock:
            active = sum(a is not None for a in self._slots)
            return {
                "slots": self.max_batch,
                "active": active,
                "waiting": len(self._waiting),
                "kv_pages": self.kv_pages,
                "kv_pages_free": self._available_pages(),
                "kv_pages_cached": sum(len(pages) for _, pages in self._prefixes),
            }

    def _cancel(self, ticket: Ticket) -> None:
        with self._lock:
            ticket.cancelled = True
            if ticket in self._waiting:
                self._waiting.remove(ticket)
                self.stats["cancelled"] += 1
            self._wakeup.notify()

    # -- the engine thread ------------------------------------------------------------------

    def start(self) -> None:
        """Compiles the decode step and the shortest prefill, then starts the engine thread."""
        self._warm_up()
        self._thread = threading.Thread(target=self._run, name="bitnet-jax-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Takes no new requests, ends the ones in flight with finish_reason 'cancelled', and
        waits (at most `timeout` seconds) for the thread to finish its current step."""
        with self._lock:
            self._stopping = True
            self._wakeup.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def _warm_up(self) -> None:
        # Row 0 takes a one-token prompt and gives its pages back, then a step of every width runs
        # (on the padding row: they write the scratch page).
        first = self.tokenizer.bos_id or 0
        request = GenerationRequest((first,), 1)
        prompt_1t = np.full((1, padded_prompt_length(1)), first, np.int32)
        padding = lambda width: np.full(width, self._padding_row, np.int32)
        if self._in_child:  # the warm-up's programs all at once (_compile), not one after the other
            steps = [self._step_call(padding(w), np.zeros(w, np.int32)) for w in self._widths]
            self._compile([(_zero_cache, (), self._pool), self._prefill_call(0, prompt_1t, 1, request), *steps])
            self._cache = self._call(_zero_cache, (), self._pool)
        pages, _ = self._take_pages(0, request)
        self._prefill_row(0, prompt_1t, request)
        self._free_row_pages(0, pages)
        for width in self._widths:
            self._run_step(padding(width), np.zeros(width, np.int32))
        jax.block_until_ready(self._cache)
        release_freed_memory()  # what compiling the steps freed (some 100 MB glibc would keep)
        self.stats.clear()

    @property
    def step_widths(self) -> tuple[int, ...]:
        """The widths its decode step is compiled for (`step_widths(max_batch)`): a step of n
        decoding rows runs at the narrowest that holds them."""
        return self._widths

    @property
    def kv_cache_tokens(self) -> int:
        """Slots in the page pool (the scratch page not counted)."""
        return self.kv_pages * self.page_len

    def pages_needed(self, request: GenerationRequest) -> int:
        """Pool pages a request holds: its padded prompt (prefill writes the padding too) and
        every token of its reply."""
        n = len(request.prompt_ids)
        return -(-max(padded_prompt_length(n), n + request.max_tokens) // self.page_len)

    def prefill_programs(self, prompt_tokens: int) -> tuple:
        """The compiled prefills that a prompt of this many tokens runs, each named by its padded
        length, or "chunk" for the one program of the chunks that run in place (a long prompt's
        first n mod `prefill_chunk` tokens run as a prompt of that length would, then its whole
        chunks)."""
        t = padded_prompt_length(prompt_tokens)
        if t <= self.prefill_chunk or not self._chunks_in_place:
            return (t,)
        head = prompt_tokens % self.prefill_chunk
        return ((_head_length(head),) if head else ()) + ("chunk",)

    def _available_pages(self) -> int:
        """Free pages, and the cached prefixes' (taken back when needed)."""
        return len(self._free_pages) + sum(len(pages) for _, pages in self._prefixes)

    def _take_pages(self, row: int, request: GenerationRequest) -> tuple[list[int], int]:
        """The pages row `row` takes for `request`, and how many of its prompt's first tokens they
        already hold (a cached prefix's: `prefix_cache`)."""
        need = self.pages_needed(request)
        pages, reused = self._take_prefix(request.prompt_ids, need)
        while len(pages) < need:
            # A page that no request has written yet becomes resident when written: before taking
            # one, the least recently used prefix gives its pages back, so that the cached
            # prefixes hold only memory that requests have already made resident. (Pages are
            # first taken lowest first and freed pages are taken again first, so the free pages
            # above `_pages_written` are the unwritten ones, under the written ones in the list.)
            if self._prefixes and (not self._free_pages or self._free_pages[-1] > self._pages_written):
                self._free_pages.extend(reversed(self._prefixes.pop(0)[1]))
                continue
            pages.append(self._free_pages.pop())
            self._pages_written = max(self._pages_written, pages[-1])
        self._pages_bp[row, : len(pages)] = pages
        return pages, reused

    def _take_prefix(self, prompt_ids, need: int) -> tuple[list[int], int]:
        """The cached prefix that shares the most leading tokens with the prompt, if at least
        `prefill_chunk` (fewer save less than a chunk's padding may cost): its first `need` pages (the
        rest are freed) and the shared count, at most all but the prompt's last token (whose
        logits the prefill must compute)."""
        if not self._prefixes:
            return [], 0
        prompt = np.asarray(prompt_ids, np.int64)
        shared = []
        for ids, _ in self._prefixes:
            m = min(len(ids), len(prompt) - 1)
            differ = np.flatnonzero(ids[:m] != prompt[:m])
            shared.append(int(differ[0]) if differ.size else m)
        best = int(np.argmax(shared))
        if shared[best] < self.prefill_chunk:
            return [], 0
        _, pages = self._prefixes.pop(best)
        self._free_pages.extend(reversed(pages[need:]))
        self.stats["prefix_tokens_reused"] += shared[best]
        return pages[:need], shared[best]

    def _free_row_pages(self, row: int, pages: list[int], cached_ids=None) -> None:
        """Row `row`'s pages back to the pool; with `cached_ids`, the tokens its slots 0.. hold,
        kept as a cached prefix instead."""
        self._pages_bp[row] = 0
        if cached_ids is not None and len(cached_ids) >= self.prefill_chunk:
            self._prefixes.append((np.asarray(cached_ids, np.int64), pages))
        else:
            self._free_pages.extend(reversed(pages))

    def _run(self) -> None:
        try:
            while True:
                with self._lock:
                    while not self._stopping and not self._waiting and not any(self._slots):
                        self._wakeup.wait()
                    if self._stopping:
                        break
                    # First come, first served: a request that waits for pages holds back the
                    # later ones, whose pages would otherwise keep it waiting.
                    admitted, free_pages = [], self._available_pages()
                    for row, active in enumerate(self._slots):
                        if active is not None or not self._waiting:
                            continue
                        need = self.pages_needed(self._waiting[0].request)
                        if need > free_pages:
                            break
                        free_pages -= need
                        admitted.append((row, self._waiting.popleft()))
                for row, ticket in admitted:
                    self._admit(row, ticket)
                self._drop_cancelled()
                self._prefill_next_chunk()
                rows = self._decoding_rows()
                if rows:
                    for row, token in zip(rows, self._step(rows)):
                        self._take(row, int(token))
        except Exception as e:  # a failed step: every request in flight gets the error
            logger.exception("the serving engine failed")
            self._end_all("error", f"The server's engine failed: {type(e).__name__}: {e}")
            with self._lock:
                self._stopping = True
            raise
        self._end_all("cancelled", "The server is shutting down.")

    def _admit(self, row: int, ticket: Ticket) -> None:
        if ticket.cancelled:
            return
        request = ticket.request
        active = self._slots[row] = _Active(ticket, StreamDecoder(self.tokenizer))
        active.pages, reused = self._take_pages(row, request)
        n = len(request.prompt_ids)
        # (Past a reused prefix, chunks start anywhere: room for the last one's padding.)
        prompt_1t = np.zeros((1, padded_prompt_length(n) + (self.prefill_chunk if reused else 0)), np.int32)
        prompt_1t[0, :n] = request.prompt_ids
        if prompt_1t.shape[1] > self.prefill_chunk:
            # Chunk by chunk, one per engine step (`_prefill_next_chunk`), so that the rows
            # already decoding keep getting tokens while a long prompt is read; past a cached
            # prefix, from its end.
            active.prefill = _Prefill(prompt_1t, next(self._admissions), start=reused)
            return
        self._guarded_prefill(row, lambda: self._prefill_row(row, prompt_1t, request), prompt_1t.shape[1])

    def _guarded_prefill(self, row: int, prefill: Callable[[], int | None], program) -> None:
        """Runs a prefill of row `row` (`program`: which compiled prefill it runs, a padded
        length or "chunk"); its first token, if it returns one, goes to the request. A failure
        ends that request alone."""
        try:
            token = prefill()
        except Exception as e:
            logger.exception("prefill failed")
            self._finish(row, "error", error=f"Prefill failed: {type(e).__name__}: {e}")
            return
        if program not in self._prefill_programs:  # compiled just now: hand back what compiling freed
            self._prefill_programs.add(program)
            release_freed_memory()
        if token is not None:
            self._take(row, token)

    def _prefill_row(self, row: int, prompt_1t: np.ndarray, request: GenerationRequest) -> int:
        call = self._prefill_call(row, prompt_1t, len(request.prompt_ids), request)
        token, key_2, self._cache = self._call(*call)
        return self._started(row, int(token), key_2, request)

    def _prefill_call(self, row: int, prompt_1t: np.ndarray, length: int, request: GenerationRequest) -> tuple:
        """The prefill of row `row` with the first `length` tokens of prompt_1t (its bucket's
        padded length), sampling as `request` asks."""
        args = (
            self._variables,
            self._cache,
            self._pages_bp[row],
            prompt_1t,
            np.array([length], np.int32),
            sampling_key(request.seed),
            np.float32(request.temperature),
            np.float32(request.top_p),
            self._top_k_arg(np.int32(request.top_k or 0)),
        )
        return _prefill_slot, args, dict(config=self.config, serving=self._serving, cache_dtype=self._cache_dtype)

    def _started(self, row: int, token: int, key_2, request: GenerationRequest) -> int:
        """Row `row`'s prompt is in the cache and `token` sampled after it: the row decodes next."""
        self._tokens_b[row], self._positions_b[row] = token, len(request.prompt_ids)
        self._temperature_b[row], self._top_p_b[row] = request.temperature, request.top_p
        self._top_k_b[row] = request.top_k or 0
        self._keys_b2[row] = np.asarray(key_2)
        return token

    def _prefill_next_chunk(self) -> None:
        """The next chunk of the long prompt admitted first (of those still being prefilled)."""
        pending = [row for row, a in enumerate(self._slots) if a is not None and a.prefill is not None]
        if not pending:
            return
        row = min(pending, key=lambda r: self._slots[r].prefill.order)
        active = self._slots[row]
        state, request = active.prefill, active.ticket.request
        n = len(request.prompt_ids)
        c = self.prefill_chunk
        head = n % c if self._chunks_in_place and state.start == 0 else 0  # (not past a prefix)
        if head:
            # In place, a chunk may start anywhere: the prompt's first n mod c tokens go first,
            # as a prompt of that length would (padded to _HEAD_STEP: a short prompts' bucket,
            # whose program they share; its token and key are not used), so that every chunk
            # after them is whole (a 300-token prompt in chunks of 256: 64 + 256 tokens, not 512).
            head_1t = np.zeros((1, _head_length(head)), np.int32)
            head_1t[0, :head] = request.prompt_ids[:head]

            def first_tokens() -> None:
                _, _, self._cache = self._call(*self._prefill_call(row, head_1t, head, request))
                state.start = head
                self.stats["prefill_chunks"] += 1

            self._guarded_prefill(row, first_tokens, head_1t.shape[1])
            return

        def chunk() -> int | None:
            logits_1v = state.logits_1v
            if self._chunks_in_place:
                program, prompt = _prefill_chunk_in_place, state.prompt_1t[:, state.start : state.start + c]
            else:
                program, prompt = _prefill_chunk, state.prompt_1t
            token, key_2, state.logits_1v, self._cache = self._call(
                program,
                (
                    self._variables,
                    self._cache,
                    self._pages_bp[row],
                    prompt,
                    np.array([len(request.prompt_ids)], np.int32),
                    np.int32(state.start),
                    logits_1v if logits_1v is not None else np.zeros((1, self.config.vocab_size), np.float32),
                    sampling_key(request.seed),
                    np.float32(request.temperature),
                    np.float32(request.top_p),
                    self._top_k_arg(np.int32(request.top_k or 0)),
                ),
                dict(config=self.config, serving=self._serving),
            )
            state.start += c
            self.stats["prefill_chunks"] += 1
            if state.start < n:
                return None
            active.prefill = None
            return self._started(row, int(token), key_2, request)

        self._guarded_prefill(row, chunk, "chunk" if self._chunks_in_place else state.prompt_1t.shape[1])

    def _decoding_rows(self) -> list[int]:
        return [row for row, a in enumerate(self._slots) if a is not None and a.prefill is None]

    def _step(self, active: list[int]) -> np.ndarray:
        """One token for each of the rows `active` (decoding), at the narrowest compiled width that
        holds them; returns their tokens, in that order."""
        width = next(w for w in self._widths if w >= len(active))
        rows_w = np.array(active + [self._padding_row] * (width - len(active)), np.int32)
        # The padding rows (position 0, every page the scratch page) write slot 0 of the scratch page.
        token_w, keys_w2 = self._run_step(rows_w, self._positions_b[rows_w])
        taken = rows_w[: len(active)]
        self._keys_b2[taken] = keys_w2[: len(active)]
        self._tokens_b[taken] = token_w[: len(active)]
        self._positions_b[taken] += 1
        self.stats["steps"] += 1
        self.stats["rows"] += width  # rows computed, padding included
        self.stats["peak_active"] = max(self.stats["peak_active"], len(active))
        return token_w[: len(active)]

    def _run_step(self, rows_w: np.ndarray, positions_w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        token_w, keys_w2, self._cache = self._call(*self._step_call(rows_w, positions_w))
        return np.asarray(token_w), np.asarray(keys_w2)

    def _top_k_arg(self, top_k):
        """A program's top_k argument: as given where the engine takes top_k, else None."""
        return top_k if self._top_k else None

    def _step_call(self, rows_w: np.ndarray, positions_w: np.ndarray) -> tuple:
        args = (
            self._variables,
            self._cache,
            self._pages_bp[rows_w],
            self._tokens_b[rows_w],
            positions_w,
            self._keys_b2[rows_w],
            self._temperature_b[rows_w],
            self._top_p_b[rows_w],
            self._top_k_arg(self._top_k_b[rows_w]),
        )
        return _decode_step, args, dict(config=self.config, serving=self._serving)

    def _call(self, program, args: tuple, static: dict):
        """program(*args, **static). With `in_child`, through an executable compiled in a child
        process (serve/compile_child.py) for these arguments' shapes, kept for the engine's life
        (and in the compilation cache folder, where one is on, for the next start): the engine's
        process then never holds XLA's compiler."""
        if not self._in_child:
            return program(*args, **static)
        key = _program_key(program, args)
        if key not in self._programs:
            self._compile([(program, args, static)])
        return self._programs[key](*args)

    def _compile(self, calls: list[tuple]) -> None:
        """With `in_child`: the programs of `calls` (program, args, static) not compiled yet, in
        child processes, one per CPU (a child is mostly an interpreter starting and compiles: one
        CPU), the programs dealt out among them, each child compiling its share one after the other
        (one interpreter start for several programs)."""
        from bitnet_jax.serve.compile_child import compiled_all_in_child_or_none

        todo = {}
        for program, args, static in calls:
            key = _program_key(program, args)
            if key not in self._programs:
                abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), args)
                todo[key] = (program, abstract, static)
        if not todo:
            return

        def compile_share(keys):
            calls = [todo[key] for key in keys]
            compiled = compiled_all_in_child_or_none(calls)
            return [c or functools.partial(program, **static) for c, (program, _, static) in zip(compiled, calls)]

        workers = max(1, min(len(todo), len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1))
        shares = [list(todo)[w::workers] for w in range(workers)]
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            for keys, compiled in zip(shares, pool.map(compile_share, shares)):
                self._programs.update(zip(keys, compiled))

    def _take(self, row: int, token: int) -> None:
        """Row `row`'s request takes its next sampled token."""
        active = self._slots[row]
        request = active.ticket.request
        active.completion_tokens += 1
        active.new_ids.append(token)
        if self._prefix_cache:
            active.reply_ids.append(token)
        self.stats["tokens"] += 1
        if active.ticket.cancelled:
            self._finish(row, "cancelled")
        elif token in request.stop_ids:
            self._finish(row, "stop", text=self._text(active, active.decoder.flush(), final=True)[0])
        else:
            text, stopped = self._text(active, active.decoder.push(token), final=False)
            if stopped:
                self._finish(row, "stop", text=text)
            elif active.completion_tokens >= request.max_tokens:
                tail, stopped = self._text(active, active.decoder.flush(), final=True)
                self._finish(row, "stop" if stopped else "length", text=text + tail)
            elif text:
                self._emit(active, Event(text, tuple(active.new_ids)))
                active.new_ids.clear()

    @staticmethod
    def _text(active: _Active, piece: str, final: bool) -> tuple[str, bool]:
        """(text that may be delivered now, whether a stop string ended the reply)."""
        active.text += piece
        stops = active.ticket.request.stop_strings
        hits = [i for i in (active.text.find(s, active.sent) for s in stops) if i >= 0]
        if hits:
            end, stopped = min(hits), True
        else:
            # Hold back the longest tail that could still grow into a stop string.
            tail = active.text[active.sent :]
            hold = 0 if final else max((_overlap(tail, s) for s in stops), default=0)
            end, stopped = len(active.text) - hold, False
        text, active.sent = active.text[active.sent : end], end
        return text, stopped

    def _finish(self, row: int, reason: str, *, text: str = "", error: str | None = None) -> None:
        active = self._slots[row]
        self._slots[row] = None
        cached = None
        if self._prefix_cache and reason in ("stop", "length") and active.prefill is None:
            # Its slots hold the prompt and every sampled token but the last (written by the step
            # that would have come next).
            cached = (*active.ticket.request.prompt_ids, *active.reply_ids[:-1])
        self._free_row_pages(row, active.pages, cached)
        self._temperature_b[row], self._top_p_b[row], self._top_k_b[row] = 0.0, 1.0, 0
        self.stats["completed" if reason in ("stop", "length") else reason] += 1
        event = Event(
            text,
            tuple(active.new_ids),
            reason,
            len(active.ticket.request.prompt_ids),
            active.completion_tokens,
            error,
        )
        self._emit(active, event)

    def _emit(self, active: _Active, event: Event) -> None:
        try:
            active.ticket._on_event(event)
        except Exception:  # the client side is gone (e.g. its event loop closed)
            logger.debug("on_event failed; cancelling the request", exc_info=True)
            active.ticket.cancelled = True

    def _drop_cancelled(self) -> None:
        for row, active in enumerate(self._slots):
            if active is not None and active.ticket.cancelled:
                self._finish(row, "cancelled")

    def _end_all(self, reason: str, error: str) -> None:
        for row, active in enumerate(self._slots):
            if active is not None:
                self._finish(row, reason, error=error)
        with self._lock:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for ticket in waiting:
            self.stats[reason] += 1
            try:
                ticket._on_event(Event("", finish_reason=reason, error=error))
            except Exception:
                pass


def _head_length(head: int) -> int:
    """The padded length that a long prompt's first `head` tokens (n mod `prefill_chunk`) run at."""
    return -(-head // _HEAD_STEP) * _HEAD_STEP


def step_widths(max_batch: int) -> tuple[int, ...]:
    """The widths the decode step is compiled for: powers of two below `max_batch`, and it."""
    widths = [1]
    while widths[-1] * 2 < max_batch:
        widths.append(widths[-1] * 2)
    return tuple(widths) + ((max_batch,) if max_batch > 1 else ())


def _round_down(context: int) -> int:
    step = 16 if context <= 256 else 256
    return context // step * step


def _overlap(text: str, stop: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `stop`."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0


def sample_rows(logits_bv, keys_b2, temperature_b, top_p_b, top_k_b=None, *, ffi=False):
    """`generate.sample` with sampling settings per row: greedy where temperature is 0, else
    softmax sampling at the row's temperature from its top_k most likely tokens (top_k_b, 0 or
    None: all), then from the smallest set of those whose probability reaches its top_p. Each
    row splits its own key as `generate` splits its one key, so a row seeded like a `generate`
    call (with the same `ffi`) draws what that call draws. Returns (token_b, next keys_b2).

    The sampling work (the top-k and top-p cuts, Gumbel noise over the vocabulary) runs only in
    steps where some row needs it (`lax.cond`): an all-greedy step is an argmax. `ffi`: the cuts
    by the FFI kernel (`generate.ffi_cut`; `ops.ffi_cuts` says where), one call for every row's
    two cuts, rather than XLA's halvings, and the argmaxes by the FFI kernel too
    (`generate.greedy_tokens`)."""
    split_b22 = jax.vmap(jax.random.split)(keys_b2)
    keys_b2, draw_b2 = split_b22[:, 0], split_b22[:, 1]
    greedy_b = greedy_tokens(logits_bv, ffi=ffi)
    sampling_b = temperature_b > 0
    no_cut_b1 = jnp.zeros((logits_bv.shape[0], 1), jnp.uint32)  # a key threshold every token passes

    def kept(ukey_bv, kth_b1):  # the row's values, -inf where the top-k cut drops them
        return jnp.where(ukey_bv < kth_b1, -jnp.inf, key_values(ukey_bv))

    def cuts_in_xla(ukey_bv):  # (top-k cut, top-p cut, no nucleus) by XLA's halvings
        kth_b1 = no_cut_b1
        if top_k_b is not None:
            cutting = jnp.any(sampling_b & (top_k_b > 0))
            kth_b1 = jax.lax.cond(cutting, top_k_threshold, lambda *_: no_cut_b1, ukey_bv, top_k_b)
            kth_b1 = jnp.where(top_k_b[:, None] > 0, kth_b1, no_cut_b1)

        def nucleus(ukey_bv, kth_b1, top_p_b):
            x_bv = kept(ukey_bv, kth_b1)
            e_bv = jnp.exp(x_bv - jnp.max(x_bv, axis=-1, keepdims=True))
            return jnp.where(top_p_b[:, None] < 1.0, top_p_threshold(e_bv, ukey_bv, top_p_b), no_cut_b1)

        narrowing = jnp.any(sampling_b & (top_p_b < 1.0))
        return kth_b1, jax.lax.cond(narrowing, nucleus, lambda *_: no_cut_b1, ukey_bv, kth_b1, top_p_b), None

    def cuts_by_kernel(ukey_bv):  # both cuts in one kernel call, as one key (the top-k cut's slot: none)
        # Greedy rows take no cut: their settings may ask for one that nothing would use.
        top_k_cut_b = jnp.zeros_like(top_p_b, jnp.int32) if top_k_b is None else jnp.maximum(top_k_b, 0)
        top_k_cut_b = jnp.where(sampling_b, top_k_cut_b, 0)
        top_p_cut_b = jnp.where(sampling_b, top_p_b, 1.0)
        cutting = jnp.any((top_k_cut_b > 0) | (top_p_cut_b < 1.0))
        b = ukey_bv.shape[0]
        uncut = (  # what the kernel says of a row without a cut: more than NUCLEUS_TOKENS kept
            no_cut_b1,
            (jnp.full((b, NUCLEUS_TOKENS), ukey_bv.shape[1], jnp.int32), jnp.full((b,), NUCLEUS_TOKENS + 1, jnp.int32)),
        )
        cut = functools.partial(ffi_cut, kept=NUCLEUS_TOKENS)
        return (no_cut_b1, *jax.lax.cond(cutting, cut, lambda *_: uncut, ukey_bv, top_k_cut_b, top_p_cut_b))

    def categorical_rows(final_bv, nucleus):  # each row's draw (`categorical_tokens`) with its own key
        whole = lambda: jax.vmap(functools.partial(categorical_tokens, ffi=ffi))(draw_b2, final_bv)
        if nucleus is None or not straight_line_gumbel(draw_b2[0], final_bv.shape[1]):
            return whole()
        kept_bk, count_b = nucleus
        # Only where every sampled row keeps few tokens (decided for the step, not per row: under
        # vmap a cond would run both branches).
        few = jnp.all(~sampling_b | (count_b <= NUCLEUS_TOKENS))
        row = lambda key, final_v, kept_k, count: nucleus_tokens(key, final_v[None], kept_k[None], count[None])[0]
        return jax.lax.cond(few, lambda: jax.vmap(row)(draw_b2, final_bv, kept_bk, count_b), whole)

    def draw(_):
        # The one [B, V] array the cuts read: the keys of the scaled logits (`unsigned_keys`), from
        # which each step reads the values again (`key_values`), fused where it reads them. A cut
        # is a threshold key per row, not a filtered copy of the row: at 8 rows of a 128,256-token
        # vocabulary each [B, V] array is 4 MB of the decode step's temporary buffer. (The FFI
        # kernel computes the rows' masses itself, rather than reading a second such array.)
        scaled_bv = logits_bv.astype(jnp.float32) / jnp.where(sampling_b, temperature_b, 1.0)[:, None]
        ukey_bv = unsigned_keys(scaled_bv)
        kth_b1, cut_b1, nucleus = (cuts_by_kernel if ffi else cuts_in_xla)(ukey_bv)
        final_bv = jnp.where(ukey_bv < cut_b1, -jnp.inf, kept(ukey_bv, kth_b1))
        return jnp.where(sampling_b, categorical_rows(final_bv, nucleus), greedy_b)

    token_b = jax.lax.cond(jnp.any(sampling_b), draw, lambda _: greedy_b, None)
    return token_b, keys_b2


def _row_prompt_part(cache: KVCache, pages_p, slots: int) -> KVCache:
    """The first `slots` slots of the row whose pages are `pages_p` [P]: [L, 1, K, slots(, H)] per array."""

    return jax.tree.map(lambda c: join_pages(c[:, pages_p], 1)[:, None, :, :slots], cache)


def _write_row_prompt_part(cache: KVCache, pages_p, part: KVCache) -> KVCache:
    """`part` ([L, 1, K, T(, H)] per array) written into slots 0..T-1 of the row whose pages are `pages_p`."""

    def write(c, x):
        t = x.shape[3]
        rows_t, slots_t = page_slots(pages_p[None], jnp.arange(t)[None], c.shape[3])
        # Two advanced indices around a slice: the indexed dims come first, [T, L, K, ...].
        return c.at[:, rows_t[0], :, slots_t[0]].set(jnp.moveaxis(x[:, 0], 2, 0), unique_indices=True)

    return jax.tree.map(write, cache, part)


# Prefill writes only a row's prompt slots; the slots past them keep what an earlier request left.
# No step reads them before writing them: a decode step writes its position's slot before
# attending, the FFI attention reads only slots up to the position, and the XLA attention's mask
# gives the others weight zero (their values are finite: written by earlier requests, or the
# cache's initial zeros). So a reply is the same as on a zeroed row (test_server.py checks), and
# prefill neither copies nor zeroes a whole row of the context.


def _program_key(program, args: tuple) -> tuple:
    """What tells an engine's compiled programs apart: the weights and the cache (args[:2]) keep
    their shapes for the engine's life, so the program and the other arguments' shapes (None
    for an argument left out: a top_k on an engine without it)."""
    return program.__name__, tuple(None if x is None else (np.shape(x), np.dtype(x.dtype)) for x in args[2:])


def _sample_row(logits_1v, key_2, temperature, top_p, top_k, serving):
    """`sample_rows` for a prefill's one row, its settings scalars (top_k None: no top-k cut
    compiled in): (its token, its next key)."""
    top_k_1 = None if top_k is None else top_k[None]
    token_1, key_12 = sample_rows(
        logits_1v, key_2[None], temperature[None], top_p[None], top_k_1, ffi=ffi_cuts(serving)
    )
    return token_1[0], key_12[0]


def _lazy_zeros(params) -> bool:
    """Whether the page pool can take `ffi.zeros`: it lives on CPU, where the FFI targets are."""
    if computation_platform(params) != "cpu":
        return False
    try:
        from bitnet_jax.kernels import ffi  # noqa: F401  (registers the targets)
    except ImportError:
        return False
    return True


@functools.partial(jax.jit, static_argnames=("config", "rows", "page_len", "dtype", "lazy"))
def _zero_cache(*, config, rows, page_len, dtype, lazy):
    """The engine's page pool, zeroed: a program (rather than eager zeros), so that it too can be
    compiled in a child. With `lazy` (on CPU) the zeros are `ffi.zeros`, which leave the pool's
    memory to become resident page by page as requests write their keys and values, rather than
    all of it at start (XLA's zeros write every byte)."""
    if lazy:
        from bitnet_jax.kernels import ffi

        return ffi.zeros(jax.eval_shape(lambda: KVCache.zeros(config, rows, page_len, dtype=dtype)))
    return KVCache.zeros(config, rows, page_len, dtype=dtype)


@functools.partial(jax.jit, static_argnames=("config", "serving", "cache_dtype"), donate_argnames=("cache",))
def _prefill_slot(
    variables, cache, pages_p, prompt_1t, length_1, key_2, temperature, top_p, top_k, *, config, serving, cache_dtype
):
    """Prefills the row whose pages are `pages_p`; (first token, its row's next key, cache)."""
    model = BitNetLM(config, serving)
    # The prompt's slots of a fresh row, as `generate` starts from.
    logits_1v, fresh = prefill_fresh(model, variables, prompt_1t, length_1, prompt_1t.shape[1], cache_dtype)
    cache = _write_row_prompt_part(cache, pages_p, fresh)
    return *_sample_row(logits_1v, key_2, temperature, top_p, top_k, serving), cache


@functools.partial(jax.jit, static_argnames=("config", "serving"), donate_argnames=("cache",))
def _prefill_chunk(
    variables,
    cache,
    pages_p,
    prompt_1t,
    length_1,
    start,
    logits_1v,
    key_2,
    temperature,
    top_p,
    top_k,
    *,
    config,
    serving,
):
    """One chunk of a long prompt into the row whose pages are `pages_p`, as `prefill_fresh` runs
    it: on a copy of the row's first T slots (T the padded prompt's length), zeroed before the
    first chunk, so that XLA's attention scores T slots, not the row's whole context. Returns (a
    token sampled from the logits so far, its row's next key, the logits, cache): the token is
    the request's first once the last chunk has run."""
    model = BitNetLM(config, serving)
    part = _row_prompt_part(cache, pages_p, prompt_1t.shape[1])
    part = jax.tree.map(lambda c: jnp.where(start == 0, jnp.zeros_like(c), c), part)
    chunk_1c = jax.lax.dynamic_slice_in_dim(prompt_1t, start, PREFILL_CHUNK, axis=1)
    part, logits_1v = prefill_chunk(model, variables, chunk_1c, length_1, start, part, logits_1v)
    cache = _write_row_prompt_part(cache, pages_p, part)
    return *_sample_row(logits_1v, key_2, temperature, top_p, top_k, serving), logits_1v, cache


@functools.partial(jax.jit, static_argnames=("config", "serving"), donate_argnames=("cache",))
def _prefill_chunk_in_place(
    variables,
    cache,
    pages_p,
    chunk_1c,
    length_1,
    start,
    logits_1v,
    key_2,
    temperature,
    top_p,
    top_k,
    *,
    config,
    serving,
):
    """`_prefill_chunk` on the row's pages as they lie, for a chunk that the FFI kernel attends:
    the chunk's slots are written into their page and each query reads the slots up to its
    position in place, the bits it gets in `prefill_fresh` (the kernel's sums are cut at fixed
    slot indices, wherever the pages lie). No shape depends on the prompt's length: one program
    for every long prompt, where a program per multiple of 256 tokens held 8-11 MB each once
    loaded (a 2B4T server that met prompts of 300-2000 tokens: 1408 -> 1261 MB peak RSS,
    benchmarks/RESULTS.md). Nor is the row's prompt copied in and out at each chunk (80 MB at a
    2048-token prompt with an int8 cache, within the noise of the chunk's 1.8 s)."""
    model = BitNetLM(config, serving)
    cache, logits_1v = prefill_chunk(
        model, variables, chunk_1c, length_1, start, cache, logits_1v, cache_pages_bp=pages_p[None]
    )
    return *_sample_row(logits_1v, key_2, temperature, top_p, top_k, serving), logits_1v, cache


@functools.partial(jax.jit, static_argnames=("config", "serving"), donate_argnames=("cache",))
def _decode_step(
    variables, cache, pages_bp, tokens_b, positions_b, keys_b2, temperature_b, top_p_b, top_k_b, *, config, serving
):
    """One token for each row whose pages are `pages_bp` [B, P]: row b's token is written at its
    position and the next sampled."""
    model = BitNetLM(config, serving)
    logits_b1v, cache = model.apply(
        variables, tokens_b[:, None], positions_bt=positions_b[:, None], cache=cache, cache_pages_bp=pages_bp
    )
    token_b, keys_b2 = sample_rows(logits_b1v[:, 0], keys_b2, temperature_b, top_p_b, top_k_b, ffi=ffi_cuts(serving))
    return token_b, keys_b2, cache


def wait_idle(engine: Engine, timeout: float = 30.0) -> bool:
    """Waits until no request is in a slot or waiting (for tests and clean shutdowns)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        load = engine.load()
        if not load["active"] and not load["waiting"]:
            return True
        time.sleep(0.01)
    return False
