"""`bitnet-jax serve` on 127.0.0.1: the official `openai` client, every bad input, a load test and
batch invariance, on the tiny packed Hugging Face fixture (2 layers, vocab 419).

Exactness: every greedy reply is compared token for token (through its text) with the same
request run alone through `bitnet_jax.generate`. This holds exactly, not up to near-ties, because
the two run the same per-row math: the engine prefills a request with `generate.prefill_fresh`
(or, past one chunk, `generate.prefill_chunk` a chunk at a time: the code `generate` runs) on a
cache as long as the padded prompt, and the reference call asks for
`max_context - generate_prompt_length(...)` new tokens, so that its decode cache has the
engine's length (`reference_ids`). Decoding beside other rows changes no row's numbers: activations
are quantized per token, the FFI kernels' integer sums are exact, the lm_head is the int8 kernel,
and the float work (norms, RoPE, attention over the same cache length) reduces within a row;
masked cache slots get a softmax weight of exactly 0 whatever they hold.
"""

import functools
import json
import sys
import threading
import time

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import openai
import pytest
from backend_compiles import BackendCompiles
from resident_memory import resident_mb

from bitnet_jax import generate
from bitnet_jax.errors import BitNetError
from bitnet_jax.interop.hf import generation_stop_ids
from bitnet_jax.serve.batching import Engine, GenerationRequest, sample_rows, step_widths, wait_idle
from bitnet_jax.serve.chat import chat_prompt_ids, stop_ids
from bitnet_jax.serve.generate import generate_prompt_length, sample, top_k_filter
from bitnet_jax.serve.load import load_model
from bitnet_jax.serve.server import create_app, running

MODEL = "tiny"
CONTEXT = 128


@pytest.fixture(scope="module")
def folder(packed_folder):
    return str(packed_folder)


@pytest.fixture(scope="module")
def engine(folder):
    config, params, tokenizer = load_model(folder)
    engine = Engine(config, params, tokenizer, max_batch=8, max_context=CONTEXT)
    engine.start()
    yield engine
    engine.stop()


@pytest.fixture(scope="module")
def url(engine, folder):
    with running(create_app(engine, model_name=MODEL, folder=folder)) as url:
        yield url


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def reference_ids(engine, prompt_ids, max_tokens, stops=(), **sampling) -> list[int]:
    """The request run alone through `generate`, with the engine's cache length (see the module
    docstring), cut where the engine cuts it: after max_tokens or at the first stop id."""
    settings = {key: sampling[key] for key in ("backend", "kv_cache") if key in sampling}
    new = engine.max_context - generate_prompt_length(engine.config, engine.params, len(prompt_ids), **settings)
    ids = [int(i) for i in generate(engine.config, engine.params, [list(prompt_ids)], new, **sampling)[0]]
    ids = ids[:max_tokens]
    first_stop = next((j for j, i in enumerate(ids) if i in stops), None)
    return ids if first_stop is None else ids[: first_stop + 1]


def reference_text(engine, prompt_ids, max_tokens, stops, **sampling) -> tuple[str, int, str]:
    """(text, completion_tokens, finish_reason) the server must answer (greedy by default)."""
    ids = reference_ids(engine, prompt_ids, max_tokens, stops, **sampling)
    stopped = ids[-1] in stops
    return engine.tokenizer.decode([i for i in ids if i not in stops]), len(ids), "stop" if stopped else "length"


def completion_prompt(engine, text):
    return [engine.tokenizer.bos_id, *engine.tokenizer.encode(text)]


def test_openai_client_completions_chat_and_streaming(client, engine, folder, url):
    assert [m.id for m in client.models.list().data] == [MODEL]
    stops = tuple(generation_stop_ids(folder, engine.config))

    reply = client.completions.create(model=MODEL, prompt="hello", max_tokens=12, temperature=0)
    prompt = completion_prompt(engine, "hello")
    text, produced, reason = reference_text(engine, prompt, 12, stops)
    assert (reply.choices[0].text, reply.choices[0].finish_reason) == (text, reason)
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(prompt), produced)
    assert reply.usage.total_tokens == len(prompt) + produced

    ids_reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    assert ids_reply.choices[0].text == text  # token ids in, the same reply

    messages = [{"role": "system", "content": "Hi."}, {"role": "user", "content": "hey"}]
    chat_stops = stop_ids(engine.tokenizer, engine.config, folder)
    chat_ids = chat_prompt_ids(None, messages, engine.tokenizer)  # the fixture has no template
    want, produced, reason = reference_text(engine, chat_ids, 20, chat_stops)
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
    assert chat.choices[0].message.role == "assistant"
    assert (chat.choices[0].message.content, chat.choices[0].finish_reason) == (want, reason)
    assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (len(chat_ids), produced)

    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-2].choices[0].finish_reason == reason and chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == produced
    assert len({c.id for c in chunks}) == 1

    # The wire format: `data: <json>` events, a blank line after each, `data: [DONE]` last.
    body = dict(model=MODEL, prompt="hello", max_tokens=12, temperature=0, stream=True)
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = raw.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""] and all(e.startswith("data: ") for e in events[:-1])
    pieces = [json.loads(e[6:]) for e in events[:-2]]
    assert {p["object"] for p in pieces} == {"text_completion"}
    assert "".join(p["choices"][0]["text"] for p in pieces) == text
    assert pieces[-1]["choices"][0]["finish_reason"] == reason


def test_sdk_errors_api_key_queue_and_shutdown(engine, folder):
    with running(create_app(engine, model_name=MODEL, folder=folder, api_key="s3cret")) as url:
        with pytest.raises(openai.AuthenticationError) as info:
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        assert info.value.code == "invalid_api_key"
        missing = httpx.post(url + "/v1/completions", json=_completion())
        assert missing.status_code == 401 and "no API key" in missing.json()["error"]["message"]
        assert httpx.get(url + "/health").status_code == 200  # health and the page need no key
        assert httpx.get(url + "/").status_code == 200
        ok = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert ok.completions.create(model=MODEL, prompt="hi", max_tokens=2, temperature=0).usage.completion_tokens
        with pytest.raises(openai.BadRequestError, match="temperature"):
            ok.completions.create(model=MODEL, prompt="hi", max_tokens=2, temperature=3)
        with pytest.raises(openai.NotFoundError, match="does not exist"):
            ok.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])

    # An engine that is not started never frees a slot: one slot, room for one waiting request.
    idle = Engine(engine.config, engine.params, engine.tokenizer, max_batch=1, max_context=CONTEXT, max_queue=1)
    with running(create_app(idle, model_name=MODEL)) as url:
        sdk = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        # A client that gives up while its request waits takes the request out of the queue.
        for stream in (False, True):
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(url + "/v1/completions", json=_completion(stream=stream), timeout=0.5).read()
            deadline = time.monotonic() + 30
            while idle.load()["waiting"] and time.monotonic() < deadline:
                time.sleep(0.01)
            assert idle.load()["waiting"] == 0
        assert idle.stats["cancelled"] == 2
        for _ in range(2):
            idle.submit(GenerationRequest((1, 2), 4), lambda event: None)
        with pytest.raises(openai.RateLimitError) as info:
            sdk.completions.create(model=MODEL, prompt="hi", max_tokens=2)
        assert info.value.response.headers["retry-after"] == "1"
        idle.stop()
        with pytest.raises(openai.InternalServerError, match="shutting down"):
            sdk.completions.create(model=MODEL, prompt="hi", max_tokens=2)


def _chat(**fields):
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **fields}


def _completion(**fields):
    return {"model": MODEL, "prompt": "hi", "max_tokens": 4, **fields}


# (name, method, path, body: a dict as JSON or raw bytes, status, words the message must hold)
BAD_REQUESTS = [
    ("malformed JSON", "POST", "/v1/chat/completions", b'{"model": "tiny", "messages": [', 400, "not valid JSON"),
    ("body not an object", "POST", "/v1/completions", b"[1, 2]", 400, "JSON object"),
    ("missing model", "POST", "/v1/completions", {"prompt": "hi"}, 400, "'model'"),
    ("missing messages", "POST", "/v1/chat/completions", {"model": MODEL}, 400, "'messages'"),
    ("missing prompt", "POST", "/v1/completions", {"model": MODEL}, 400, "'prompt'"),
    ("max_tokens a string", "POST", "/v1/completions", _completion(max_tokens="4"), 400, "'max_tokens'"),
    ("max_tokens a float", "POST", "/v1/completions", _completion(max_tokens=4.0), 400, "'max_tokens'"),
    ("stream not a bool", "POST", "/v1/chat/completions", _chat(stream="yes"), 400, "'stream'"),
    ("messages a string", "POST", "/v1/chat/completions", _chat(messages="hi"), 400, "'messages'"),
    (
        "content a number",
        "POST",
        "/v1/chat/completions",
        _chat(messages=[{"role": "user", "content": 5}]),
        400,
        "content",
    ),
    ("unknown model", "POST", "/v1/chat/completions", _chat(model="gpt-4o"), 404, "does not exist"),
    ("empty messages", "POST", "/v1/chat/completions", _chat(messages=[]), 400, "empty"),
    ("role tool", "POST", "/v1/chat/completions", _chat(messages=[{"role": "tool", "content": "x"}]), 400, "role"),
    ("over the context", "POST", "/v1/completions", _completion(max_tokens=CONTEXT), 400, "context is 128 tokens"),
    ("prompt over the context", "POST", "/v1/completions", _completion(prompt=[1] * 200), 400, "context is 128"),
    ("max_tokens 0", "POST", "/v1/completions", _completion(max_tokens=0), 400, "'max_tokens' is 0"),
    ("max_tokens -3", "POST", "/v1/chat/completions", _chat(max_tokens=-3), 400, "'max_tokens' is -3"),
    ("temperature < 0", "POST", "/v1/chat/completions", _chat(temperature=-0.5), 400, "'temperature' is -0.5"),
    ("temperature a string", "POST", "/v1/completions", _completion(temperature="hot"), 400, "'temperature'"),
    (
        "temperature NaN",
        "POST",
        "/v1/completions",
        b'{"model": "tiny", "prompt": "hi", "temperature": NaN}',
        400,
        "finite",
    ),
    ("top_p 0", "POST", "/v1/completions", _completion(top_p=0), 400, "'top_p' is 0"),
    ("top_p 1.5", "POST", "/v1/chat/completions", _chat(top_p=1.5), 400, "'top_p' is 1.5"),
    (
        "token id beyond vocab",
        "POST",
        "/v1/completions",
        _completion(prompt=[5, 100000]),
        400,
        "outside the vocabulary",
    ),
    ("negative token id", "POST", "/v1/completions", _completion(prompt=[-1]), 400, "outside the vocabulary"),
    ("empty id list", "POST", "/v1/completions", _completion(prompt=[]), 400, "empty"),
    ("lone surrogate", "POST", "/v1/completions", b'{"model": "tiny", "prompt": "a\\ud800b"}', 400, "cannot encode"),
    (
        "lone surrogate chat",
        "POST",
        "/v1/chat/completions",
        _chat(messages=[{"role": "user", "content": "\ud800"}]),
        400,
        "cannot encode",
    ),
    ("two prompts", "POST", "/v1/completions", _completion(prompt=["a", "b"]), 400, "one per request"),
    ("n = 2", "POST", "/v1/chat/completions", _chat(n=2), 400, "'n' is 2"),
    ("five stop strings", "POST", "/v1/completions", _completion(stop=list("abcde")), 400, "'stop'"),
    ("5 MB body", "POST", "/v1/completions", b'{"prompt": "' + b"x" * (5 << 20) + b'"}', 413, "larger than"),
    ("wrong path", "POST", "/v1/complete", _completion(), 404, "No route"),
    ("wrong method", "GET", "/v1/chat/completions", None, 405, "not allowed"),
    ("wrong method on models", "DELETE", "/v1/models", None, 405, "not allowed"),
]


def test_every_bad_input_gets_an_openai_error_and_the_server_keeps_serving(url, engine):
    failures = []
    with httpx.Client(base_url=url, timeout=60) as http:
        for name, method, path, body, status, words in BAD_REQUESTS:
            if isinstance(body, bytes):
                content = body
            else:
                content = None if body is None else json.dumps(body).encode("utf-8", "surrogatepass")
            response = http.request(method, path, content=content, headers={"content-type": "application/json"})
            error = (
                response.json().get("error", {}) if response.headers.get("content-type") == "application/json" else {}
            )
            if response.status_code != status or set(error) != {"message", "type", "param", "code"}:
                failures.append((name, response.status_code, response.text[:200]))
            elif words not in error["message"] or not error["type"]:
                failures.append((name, "message", error["message"]))
        assert not failures, failures
        good = http.post("/v1/chat/completions", json=_chat(temperature=0))
        assert good.status_code == 200 and good.json()["choices"][0]["finish_reason"] in ("stop", "length")
    assert wait_idle(engine)


def test_load_32_requests_from_8_clients(url, engine, folder):
    """8 client threads send 32 requests (prompts of 1 to 30 tokens, 1 to 60 new tokens, every
    other one streamed, two streams dropped after their first piece): each of the 30 others gets
    exactly its own reply, equal to `generate` on that request alone."""
    rng = np.random.default_rng(0)
    stops = tuple(generation_stop_ids(folder, engine.config))
    requests = []
    for i in range(32):
        prompt = [int(t) for t in rng.integers(0, 417, int(rng.integers(1, 31)))]
        requests.append(dict(prompt=prompt, max_tokens=int(rng.integers(1, 61)), stream=i % 2 == 1))
    drop = {5, 19}
    for i in drop:
        requests[i].update(max_tokens=CONTEXT - 32, stream=True)
    before = dict(engine.stats)
    replies: dict[int, list] = {}
    lock = threading.Lock()

    def run(i, http):
        body = dict(model=MODEL, temperature=0, **requests[i])
        if not body["stream"]:
            answer = http.post("/v1/completions", json=body).json()
            text, reason, usage = answer["choices"][0]["text"], answer["choices"][0]["finish_reason"], answer["usage"]
        else:
            text, reason, usage = "", None, None
            body["stream_options"] = {"include_usage": True}
            with http.stream("POST", "/v1/completions", json=body) as response:
                for line in response.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk["choices"]:
                        text += chunk["choices"][0]["text"]
                        reason = chunk["choices"][0]["finish_reason"] or reason
                        if i in drop:
                            break  # leaves mid-stream: the connection closes
                    usage = chunk.get("usage") or usage
        with lock:
            replies.setdefault(i, []).append((text, reason, usage))

    def client(worker):
        with httpx.Client(base_url=url, timeout=120) as http:
            for i in range(worker, 32, 8):
                run(i, http)

    threads = [threading.Thread(target=client, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert sorted(replies) == list(range(32)) and all(len(r) == 1 for r in replies.values())
    assert wait_idle(engine)
    after = dict(engine.stats)
    assert after.get("cancelled", 0) - before.get("cancelled", 0) == 2  # the dropped streams' slots
    assert after["completed"] - before["completed"] == 30
    assert engine.load()["kv_pages_free"] == engine.kv_pages  # and their pages: none leaked
    for i, request in enumerate(requests):
        if i in drop:
            continue
        text, reason, usage = replies[i][0]
        want, produced, want_reason = reference_text(engine, request["prompt"], request["max_tokens"], stops)
        assert (text, reason) == (want, want_reason), i
        assert (usage["prompt_tokens"], usage["completion_tokens"]) == (len(request["prompt"]), produced), i


def run_requests(engine, requests) -> list[list[int]]:
    """Submits the requests together and returns each one's generated ids, once all have ended."""
    events = {i: [] for i in range(len(requests))}
    for i, request in enumerate(requests):
        engine.submit(request, events[i].append)
    assert wait_idle(engine)
    return [[t for e in events[i] for t in e.token_ids] for i in range(len(requests))]


def test_batch_invariance_greedy_alone_equals_beside_seven_others(engine):
    """The same greedy request alone, and joining while 7 others of other lengths decode."""
    target = GenerationRequest((417, 40, 41, 42, 43, 7, 99), 40)
    others = [GenerationRequest(tuple(range(3, 3 + 4 * k)), 60 - k) for k in range(1, 8)]
    before = dict(engine.stats)
    (alone,) = run_requests(engine, [target])
    # Alone, it ran at the narrowest width: one row of the kernels per step, not eight.
    assert engine.stats["rows"] - before.get("rows", 0) == engine.stats["steps"] - before.get("steps", 0) > 0
    peak = engine.stats["peak_active"]
    engine.stats["peak_active"] = 0
    together = run_requests(engine, others + [target])
    assert engine.stats["peak_active"] == 8  # all eight decoded in the same steps
    engine.stats["peak_active"] = max(peak, 8)
    assert together[-1] == alone == reference_ids(engine, target.prompt_ids, 40)
    for request, ids in zip(others, together):
        assert ids == reference_ids(engine, request.prompt_ids, request.max_tokens)


def test_sampling_and_greedy_rows_in_one_step_draw_what_generate_draws(engine):
    """Rows that sample share steps with greedy rows (the step's sampling branch runs for all
    of them, each row at its own settings): each draws exactly what `generate` draws alone with
    its seed, and the greedy rows take their argmax."""
    requests = [
        GenerationRequest((417, 40, 41), 20),
        GenerationRequest((417, 50, 51, 52), 20, temperature=0.9, seed=3),
        GenerationRequest((417, 60), 12, temperature=1.3, top_p=0.8, seed=11),
        GenerationRequest((417, 70, 71), 20),
    ]
    got = run_requests(engine, requests)
    for request, ids in zip(requests, got):
        sampling = dict(temperature=request.temperature, top_p=request.top_p, seed=request.seed)
        assert ids == reference_ids(engine, request.prompt_ids, request.max_tokens, **sampling)
    assert got[1] != reference_ids(engine, requests[1].prompt_ids, 20)  # (it did sample)


def test_int8_kv_cache_engine_is_batch_invariant(engine):
    """With an int8 KV cache (`--kv-cache int8`), a greedy request returns the same tokens alone,
    beside three others, and through `generate` with the same cache: each slot's keys and values
    are quantized per slot and kv head, nothing depends on the other rows."""
    int8 = Engine(engine.config, engine.params, engine.tokenizer, max_batch=4, max_context=CONTEXT, kv_cache="int8")
    assert int8._cache.k_lbksh.dtype == jnp.int8
    int8.start()
    try:
        target = GenerationRequest((417, 40, 41, 42, 43, 7, 99), 30)
        others = [GenerationRequest(tuple(range(3, 3 + 5 * k)), 40 - k) for k in range(1, 4)]
        (alone,) = run_requests(int8, [target])
        together = run_requests(int8, others + [target])
        assert together[-1] == alone == reference_ids(int8, target.prompt_ids, 30, kv_cache="int8")
    finally:
        int8.stop()


@pytest.mark.parametrize("backend", ["ffi", "xla"])
def test_a_reused_row_gives_the_same_reply(engine, backend):
    """Prefill writes only a row's prompt slots, so a row that held a longer request keeps that
    request's keys and values past the next prompt; no step may read them (attention reads, or
    weighs, only the slots up to its position, each written first). One row: a long request, then
    a short one, whose reply must equal `generate`'s on a fresh cache, on either backend."""
    one = Engine(engine.config, engine.params, engine.tokenizer, max_batch=1, max_context=CONTEXT, backend=backend)
    one.start()
    try:
        short = GenerationRequest((417, 40, 41), 20)
        run_requests(one, [GenerationRequest(tuple(range(5, 45)), 70)])  # fills about 110 slots of the row
        assert run_requests(one, [short]) == [reference_ids(one, short.prompt_ids, 20, backend=backend)]
    finally:
        one.stop()


@pytest.mark.parametrize("backend", ["ffi", "xla"])
def test_a_small_kv_pool_makes_requests_wait_for_pages(engine, backend):
    """With `kv_cache_tokens` below max_batch * max_context, a request waits for the pages its
    prompt and max_tokens need (first come, first served) even while a row is free; and each
    reply is the one it gets alone, its pages wherever the pool had them free (reused, out of
    order). (The engine's replies equal `generate`'s: the tests above, on its default pool.)"""
    with pytest.raises(BitNetError, match="at least one request of the whole context, 512 tokens"):
        Engine(engine.config, engine.params, engine.tokenizer, max_context=512, kv_cache_tokens=500)
    small = Engine(
        engine.config, engine.params, engine.tokenizer, max_batch=4, max_context=512, kv_cache_tokens=800,
        backend=backend,
    )  # fmt: skip
    assert (small.page_len, small.kv_pages) == (256, 3)
    rng = np.random.default_rng(3)
    prompt = lambda n: tuple(int(i) for i in rng.integers(0, engine.config.vocab_size, n))
    # Pages: 2 (200 + 60 slots), 1, 2 (a 150-token prompt is padded to 256, + 120), 1.
    requests = [
        GenerationRequest(prompt(200), 60),
        GenerationRequest(prompt(10), 20),
        GenerationRequest(prompt(150), 120),
        GenerationRequest(prompt(5), 20),
    ]
    assert [small.pages_needed(r) for r in requests] == [2, 1, 2, 1]
    small.start()
    try:
        together = run_requests(small, requests)
        # The first two take all 3 pages; the third waits for 2, and the fourth behind it.
        assert small.stats["peak_active"] == 2
        assert small.load()["kv_pages_free"] == 3
        alone = [run_requests(small, [r])[0] for r in reversed(requests)][::-1]
        assert together == alone
        assert [len(ids) for ids in together] == [r.max_tokens for r in requests]
    finally:
        small.stop()


def test_the_kv_pool_is_resident_only_where_requests_wrote(engine):
    """The page pool is sized for the worst case (every slot at the full context); on CPU it
    starts as `ffi.zeros`, so its memory becomes resident only as requests write their keys and
    values. A 1 GiB pool then adds far less than its size to the process at start and after a
    request, whose reply is still `generate`'s. (XLA's zeros would add all of it at start.)
    Tolerance: half the pool, for what the engine compiles and loads meanwhile (in this process:
    some tens of MB on this model)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("resident memory is read from /proc (Linux)")
    c = engine.config
    slot_bytes = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 4  # float32 keys and values
    tokens = (1 << 30) // slot_bytes // CONTEXT * CONTEXT
    before = resident_mb()
    big = Engine(c, engine.params, engine.tokenizer, max_batch=2, max_context=CONTEXT, kv_cache_tokens=tokens)
    big.start()
    try:
        request = GenerationRequest((417, 40, 41), 20)
        assert run_requests(big, [request]) == [reference_ids(big, request.prompt_ids, 20)]
        assert big.kv_cache_tokens * slot_bytes >= 1 << 29
        assert resident_mb() - before < (1 << 30) / 2e6
    finally:
        big.stop()


def test_long_prompts_prefill_between_decode_steps(engine):
    """A prompt longer than one prefill chunk (64 tokens by default) is read one chunk per engine
    step, so a request already decoding keeps getting tokens meanwhile; and its reply is still exactly
    `generate`'s: each chunk runs `generate.prefill_chunk`, as `generate`'s prefill loop does on
    its fresh cache (here on the row's pages in place where the FFI kernel attends the chunk)."""
    long_engine = Engine(engine.config, engine.params, engine.tokenizer, max_batch=2, max_context=1536)
    long_engine.start()
    try:
        rng = np.random.default_rng(7)
        prompt = tuple(int(i) for i in rng.integers(0, engine.config.vocab_size, 1100))  # 12 + 17 x 64
        (alone,) = run_requests(long_engine, [GenerationRequest(prompt, 12)])  # compiles its chunk
        assert alone == reference_ids(long_engine, prompt, 12)

        # A request decodes (long enough to outlast the 18 chunks) when the long one arrives.
        stats = long_engine.stats
        short_events, long_events, steps_at_first_long = [], [], []
        short_done = threading.Event()

        def on_short(event):
            short_events.append(event)
            if event.finish_reason:
                short_done.set()

        def on_long(event):
            if not long_events:
                steps_at_first_long.append(stats["steps"])  # on the engine thread
            long_events.append(event)

        long_engine.submit(GenerationRequest((417, 40, 41, 42), 1200), on_short)
        deadline = time.monotonic() + 60
        while not short_events and time.monotonic() < deadline:
            time.sleep(0.01)
        chunks, steps_at_submit = stats["prefill_chunks"], stats["steps"]
        long_engine.submit(GenerationRequest(prompt, 12), on_long)
        assert short_done.wait(120) and wait_idle(long_engine) and not short_events[-1].error
        # In place, its first 12 tokens (padded to 64) and 17 chunks; elsewhere 5 chunks of 256.
        in_place = long_engine._chunks_in_place
        assert stats["prefill_chunks"] - chunks == (18 if in_place else 5)
        # A decode step runs after each chunk but the last, which gives the first token. (A
        # prefill in one call lets through at most 2: the step running when the request came and
        # the one before its admission.)
        assert steps_at_first_long[0] - steps_at_submit >= (17 if in_place else 4)
        assert [t for e in long_events for t in e.token_ids] == alone  # beside a decoding row too
        assert long_events[-1].finish_reason == "length"
    finally:
        long_engine.stop()


def test_steps_beside_prefilling_rows_pad_with_the_padding_row(engine):
    """Three rows decode while the fourth prefills a long prompt: the step's width is 4 and no
    row is free to pad it with (a prefilling row holds real pages), so it pads with the engine's
    padding row, whose pages are all the scratch page. (The engine once padded with free rows
    and failed every request in flight here.)"""
    four = Engine(engine.config, engine.params, engine.tokenizer, max_batch=4, max_context=1536)
    four.start()
    try:
        rng = np.random.default_rng(3)
        long = tuple(int(i) for i in rng.integers(0, engine.config.vocab_size, 700))  # 60 + 10 x 64
        requests = [GenerationRequest((417, 40 + k), 200) for k in range(3)] + [GenerationRequest(long, 5)]
        events = [[] for _ in requests]
        for request, got in zip(requests[:3], events):
            four.submit(request, got.append)
        deadline = time.monotonic() + 60
        while not all(events[:3]) and time.monotonic() < deadline:  # the three are decoding
            time.sleep(0.01)
        four.submit(requests[3], events[3].append)
        assert wait_idle(four)
        assert four.stats["prefill_chunks"] == (11 if four._chunks_in_place else 3) and four.stats["error"] == 0
        for request, got in zip(requests, events):
            ids = [t for e in got for t in e.token_ids]
            assert ids == reference_ids(four, request.prompt_ids, request.max_tokens)
    finally:
        four.stop()


@pytest.mark.parametrize("backend", ["ffi", "xla"])
def test_long_prompts_of_every_length_share_one_chunk_program(engine, backend):
    """Where the FFI kernel attends a prefill chunk, the chunk runs on the row's pages in place
    and no shape of its program depends on the prompt's length; a long prompt's first n mod 64
    tokens (the default chunk) run first as a prompt of that length would, padded to 64 (a
    short prompts' bucket, whose program they share), so that its chunks are whole. Once a
    1100-token prompt (12 + 17 x 64) has run, prompts of 352 and 608 tokens (32 + 5 x 64, 32 + 9
    x 64) compile nothing (a program per length held 8-11 MB each on 2B4T once loaded). Where
    XLA attends (the 'xla' backend, or a kernel path without SIMD attention), chunks hold 256
    tokens and run on a copy of the row's prompt slots, padded to a multiple of 256, a program
    per padded length. Both reply exactly as `generate` (the module docstring), beside a long
    prompt's leftovers in the reused pages too."""
    long_engine = Engine(engine.config, engine.params, engine.tokenizer, max_batch=1, max_context=1536, backend=backend)
    in_place = long_engine._chunks_in_place
    assert in_place == (backend == "ffi" and ffi_attention_simd())
    programs = [long_engine.prefill_programs(n) for n in (40, 64, 100, 256, 300, 512, 1100)]
    if in_place:
        assert long_engine.prefill_chunk == 64
        assert programs == [(48,), (64,), (64, "chunk"), ("chunk",), (64, "chunk"), ("chunk",), (64, "chunk")]
    else:
        assert long_engine.prefill_chunk == 256
        assert programs == [(48,), (64,), (128,), (256,), (512,), (512,), (1280,)]
    long_engine.start()
    try:
        rng = np.random.default_rng(11)
        prompts = [tuple(int(i) for i in rng.integers(0, engine.config.vocab_size, n)) for n in (1100, 352, 608)]
        references = [reference_ids(long_engine, prompt, 9, backend=backend) for prompt in prompts]
        chunks = long_engine.stats["prefill_chunks"]
        assert run_requests(long_engine, [GenerationRequest(prompts[0], 9)]) == references[:1]  # compiles a chunk
        # 12 (padded to 64) + 17 x 64 in place, 5 x 256 padded
        assert long_engine.stats["prefill_chunks"] - chunks == (18 if in_place else 5)
        # The shorter prompts run in the longest one's pages, over what it left there.
        with BackendCompiles() as compiles:
            assert run_requests(long_engine, [GenerationRequest(p, 9) for p in prompts[1:]]) == references[1:]
        assert compiles.count == (0 if in_place else 2)
    finally:
        long_engine.stop()


def test_prefill_chunk_sets_the_prompt_tokens_a_loop_reads(engine):
    """`prefill_chunk=256`: a prompt longer than 256 tokens is read 256 tokens a loop, its first n
    mod 256 first, padded to a multiple of 64 (one of the short prompts' buckets 64, 128, 192,
    256), so a row already decoding gets a step after each 256 tokens, not each 64; the replies
    are still exactly `generate`'s, since every query attends its own slots up to its position
    whatever chunk it is in (the module docstring). An engine refuses a chunk that is not a
    multiple of 64 up to 256."""
    for bad in (0, 32, 100, 512):
        with pytest.raises(BitNetError, match="prefill_chunk"):
            Engine(engine.config, engine.params, engine.tokenizer, max_batch=2, max_context=512, prefill_chunk=bad)
    big = Engine(engine.config, engine.params, engine.tokenizer, max_batch=2, max_context=1536, prefill_chunk=256)
    if not big._chunks_in_place:
        pytest.skip("chunks run in place only where the FFI kernel attends them")
    assert [big.prefill_programs(n) for n in (40, 64, 100, 256, 300, 512, 1100)] == [
        (48,),
        (64,),
        (128,),
        (256,),
        (64, "chunk"),  # 44 (padded to 64) + 256
        ("chunk",),
        (128, "chunk"),  # 76 (padded to 128) + 4 x 256
    ]
    big.start()
    try:
        rng = np.random.default_rng(7)
        prompt = tuple(int(i) for i in rng.integers(0, engine.config.vocab_size, 1100))
        reference = reference_ids(big, prompt, 12)
        assert run_requests(big, [GenerationRequest(prompt, 12)]) == [reference]  # compiles its chunk

        stats, short_events, steps_at_first = big.stats, [], []
        big.submit(GenerationRequest((417, 40, 41, 42), 400), short_events.append)
        deadline = time.monotonic() + 60
        while not short_events and time.monotonic() < deadline:
            time.sleep(0.01)
        chunks, steps_at_submit = stats["prefill_chunks"], stats["steps"]
        long_events = []

        def on_long(event):
            if not long_events:
                steps_at_first.append(stats["steps"])  # on the engine thread
            long_events.append(event)

        big.submit(GenerationRequest(prompt, 12), on_long)
        assert wait_idle(big, timeout=120) and not short_events[-1].error
        assert stats["prefill_chunks"] - chunks == 5  # the first 76 tokens and 4 chunks
        assert steps_at_first[0] - steps_at_submit >= 4  # a step after each but the last
        assert [t for e in long_events for t in e.token_ids] == reference
        assert [t for e in short_events for t in e.token_ids] == reference_ids(big, (417, 40, 41, 42), 400)
    finally:
        big.stop()


def test_prefix_cache_prefills_only_what_a_finished_request_did_not_hold(engine):
    """With prefix_cache, a finished request's pages stay with the tokens they hold (its prompt and
    its reply but the last token); a later prompt that begins with at least 64 of those tokens (a
    conversation's next turn) takes them and prefills only the rest, and replies as `generate`
    does from scratch. Cached prefixes give their pages back when requests need them, and before
    a request would take a page that no request has written (so the cache adds no resident
    memory)."""
    if not ffi_attention_simd():
        pytest.skip("prefixes are reused where the FFI kernel attends prefill chunks (AVX2, AVX-512)")
    cached = Engine(
        engine.config,
        engine.params,
        engine.tokenizer,
        max_batch=2,
        max_context=1536,
        prefix_cache=True,
        kv_cache_tokens=3072,
    )
    cached.start()
    try:
        rng = np.random.default_rng(5)
        first = tuple(int(i) for i in rng.integers(0, engine.config.vocab_size, 600))
        (reply,) = run_requests(cached, [GenerationRequest(first, 40)])
        assert reply == reference_ids(cached, first, 40)
        assert cached.load()["kv_pages_cached"] == 3  # 600 + 39 tokens held in 3 pages of 256
        # The next turn: the history, all but its last token as the engine held it, and more.
        turn = first + tuple(reply[:30]) + tuple(int(i) for i in rng.integers(0, engine.config.vocab_size, 50))
        chunks = cached.stats["prefill_chunks"]
        (got,) = run_requests(cached, [GenerationRequest(turn, 12)])
        assert got == reference_ids(cached, turn, 12)
        assert cached.stats["prefix_tokens_reused"] == 630
        assert cached.stats["prefill_chunks"] - chunks == 1  # tokens 630..679 only, where 680 take 11 (40 + 10 x 64)
        # A prompt that shares fewer than 64 tokens prefills from scratch; a full pool takes the
        # cached pages back (12 pages: the two requests need 6 and 5 of them).
        other = tuple(int(i) for i in rng.integers(0, engine.config.vocab_size, 1200))
        alone = [reference_ids(cached, p, 100) for p in (other, other[:1100])]
        assert run_requests(cached, [GenerationRequest(other, 100), GenerationRequest(other[:1100], 100)]) == alone
        # Both are cached now (6 + 5 pages; page 12 never written): a request gets a written page
        # from the least recently used prefix before it takes one no request has written.
        assert cached.load()["kv_pages_cached"] == 11 and cached._pages_written == 11
        short = GenerationRequest(tuple(range(7, 107)), 8)
        (short_reply,) = run_requests(cached, [short])
        assert short_reply == reference_ids(cached, short.prompt_ids, 8)
        # 5 pages of the other prefix, and the short request's: it held 107 >= 64 tokens (a
        # prefix is kept and taken from one prefill chunk up: shorter saves nothing).
        assert cached.load()["kv_pages_cached"] == 6 and cached._pages_written == 11
        assert cached.stats["prefix_tokens_reused"] == 630
        follow = short.prompt_ids + tuple(short_reply[:7]) + (3, 4, 5)
        chunks = cached.stats["prefill_chunks"]
        assert run_requests(cached, [GenerationRequest(follow, 8)]) == [reference_ids(cached, follow, 8)]
        assert cached.stats["prefix_tokens_reused"] == 630 + 107
        assert cached.stats["prefill_chunks"] - chunks == 1  # its last 3 tokens, in one chunk
    finally:
        cached.stop()


def test_a_conversation_over_http_prefills_only_its_new_turn(engine, folder):
    """Through the OpenAI API with prefix_cache: each turn resends the conversation, rendered
    again; the second turn takes the first one's pages (the client's copy of the reply
    tokenizes as it was sampled) and both replies are `generate`'s."""
    if not ffi_attention_simd():
        pytest.skip("prefixes are reused where the FFI kernel attends prefill chunks (AVX2, AVX-512)")
    chatty = Engine(engine.config, engine.params, engine.tokenizer, max_batch=2, max_context=1024, prefix_cache=True)
    chatty.start()
    try:
        with running(create_app(chatty, model_name=MODEL, folder=folder)) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
            stops = stop_ids(engine.tokenizer, engine.config, folder)
            messages = [{"role": "user", "content": "hello there, " * 100}]
            first = chat_prompt_ids(None, messages, engine.tokenizer)
            assert len(first) > 300
            for _ in range(2):
                want, _, _ = reference_text(chatty, chat_prompt_ids(None, messages, engine.tokenizer), 16, stops)
                reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
                assert reply.choices[0].message.content == want
                messages += [{"role": "assistant", "content": want}, {"role": "user", "content": "and again"}]
        assert chatty.stats["prefix_tokens_reused"] >= len(first)
    finally:
        chatty.stop()


def ffi_attention_simd() -> bool:
    from bitnet_jax.kernels import ffi
    from bitnet_jax.kernels.ops import ATTENTION_SIMD_ISAS

    return ffi.selected_isa() in ATTENTION_SIMD_ISAS


def test_stop_strings_and_seeded_sampling(client, engine):
    prompt = completion_prompt(engine, "hello")
    free = client.completions.create(model=MODEL, prompt=prompt, max_tokens=30, temperature=0).choices[0].text
    stop = free[9:12]
    cut = client.completions.create(model=MODEL, prompt=prompt, max_tokens=30, temperature=0, stop=["zzzz", stop])
    assert cut.choices[0].text == free[: free.index(stop)] and cut.choices[0].finish_reason == "stop"
    # Streamed token by token, text that may begin the stop string is held back, never sent.
    streamed = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=30, temperature=0, stop=stop, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text

    # Seeded sampling is reproducible; a top_p that keeps one token is greedy decoding.
    sampled = dict(temperature=0.9, top_p=0.8, seed=1234)
    a = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, **sampled).choices[0].text
    assert client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, **sampled).choices[0].text == a
    narrow = client.completions.create(model=MODEL, prompt=prompt, max_tokens=30, temperature=1.5, top_p=1e-6)
    assert narrow.choices[0].text == free


@pytest.mark.parametrize("ffi", [False, True], ids=["xla-cuts", "ffi-cuts"])
def test_sample_rows_draws_what_generate_sample_draws(ffi):
    """Each row of `sample_rows` (settings per row) is `generate.sample` (settings per call) on
    that row alone with the key `generate` would use: so a seeded request draws in the server
    what it draws in `generate`, whatever shares its step; with the cuts in XLA ops or by the
    FFI kernel (both take what `ops.ffi_cuts` says)."""
    draw_rows = jax.jit(functools.partial(sample_rows, ffi=ffi))
    draw_one = jax.jit(functools.partial(sample, ffi=ffi), static_argnums=(2, 3, 4))
    logits_bv = jax.random.normal(jax.random.PRNGKey(0), (3, 50)) * 3
    keys_b2 = jnp.stack([jax.random.PRNGKey(s) for s in (1, 2, 3)])
    temperature_b, top_p_b = jnp.array([0.0, 0.7, 1.3]), jnp.array([1.0, 0.9, 1.0])
    token_b, next_b2 = draw_rows(logits_bv, keys_b2, temperature_b, top_p_b)
    for row in range(3):
        key, draw = jax.random.split(keys_b2[row])
        t, p = float(temperature_b[row]), float(top_p_b[row])
        want = draw_one(logits_bv[row : row + 1], draw, t, None, p if p < 1 else None)
        assert int(token_b[row]) == int(want[0]) and np.array_equal(next_b2[row], key)
    greedy_b, _ = draw_rows(logits_bv, keys_b2, jnp.zeros(3), top_p_b)  # the all-greedy branch
    assert np.array_equal(greedy_b, np.argmax(logits_bv, axis=-1))
    # With a top_k per row (0: none), as `sample`'s top_k, before the top_p cut.
    top_k_b = jnp.array([3, 5, 0], jnp.int32)
    token_b, _ = draw_rows(logits_bv, keys_b2, temperature_b, top_p_b, top_k_b)
    for row in range(3):
        _, draw = jax.random.split(keys_b2[row])
        t, p, k = float(temperature_b[row]), float(top_p_b[row]), int(top_k_b[row])
        args = (t, k or None, p if p < 1 else None)
        want = draw_one(logits_bv[row : row + 1], draw, *args)
        assert int(token_b[row]) == int(want[0])


@pytest.mark.parametrize("ffi", [False, True], ids=["xla-cuts", "ffi-cuts"])
def test_sample_rows_cuts_as_the_filters_do(ffi):
    """`sample_rows` makes its top-k and top-p cuts as thresholds on one array of keys (not as
    filtered copies of the rows, `top_k_filter` then `top_p_filter`, as `generate.sample` does):
    the same token for every row and key, over rows with ties, -0.0, -inf and NaN-free extremes,
    greedy rows beside sampled ones, each cut alone, both, and neither. With `ffi`, one kernel
    call cuts every row of `sample_rows` (its greedy rows asking for no cut) where `sample` calls
    it for one row with its settings."""
    rng = np.random.default_rng(7)
    v = 3000
    rows = [
        rng.standard_normal(v) * 2,
        np.round(rng.standard_normal(v) * 2) / 2,  # many ties
        rng.standard_normal(v) * 8,
        rng.standard_normal(v) * 0.3,
        np.where(rng.random(v) < 0.4, -np.inf, rng.standard_normal(v) * 3),
        rng.standard_normal(v),
    ]
    rows[5][:50] = -0.0
    rows[5][50:100] = 0.0
    logits_bv = jnp.asarray(np.stack(rows).astype(np.float32))
    # (temperature, top_k (0: none), top_p) per row.
    settings = [(0.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.9), (1.0, 40, 0.5), (0.9, 2, 0.999), (1.0, 0, 1e-6)]
    temperature_b, top_k_b, top_p_b = (jnp.asarray(x) for x in zip(*settings))
    top_k_b = top_k_b.astype(jnp.int32)
    draw_rows = jax.jit(functools.partial(sample_rows, ffi=ffi))
    draw_one = jax.jit(functools.partial(sample, ffi=ffi), static_argnums=(2, 3, 4))
    for seed in range(6):
        keys_b2 = jax.random.split(jax.random.PRNGKey(seed), len(rows))
        token_b, _ = draw_rows(logits_bv, keys_b2, temperature_b, top_p_b, top_k_b)
        for row, (t, k, p) in enumerate(settings):
            _, draw = jax.random.split(keys_b2[row])
            want = draw_one(logits_bv[row : row + 1], draw, t, k or None, p if p < 1 else None)
            assert int(token_b[row]) == int(want[0]), (seed, row)


def test_top_k_only_where_the_engine_takes_it(engine):
    """An engine built without top_k (the server: the OpenAI API has none) holds no top-k code in
    its programs and refuses a request that asks for it, saying so."""
    with pytest.raises(BitNetError, match="without a top-k cut"):
        engine.check(GenerationRequest((417, 40), 4, temperature=1.0, top_k=5))
    with pytest.raises(BitNetError, match="top_k=0"):
        engine.check(GenerationRequest((417, 40), 4, top_k=0))


def test_top_k_filter_cuts_where_lax_top_k_does():
    """`generate.top_k_filter` (a k per row, found by bisection) keeps what `sample`'s
    `jax.lax.top_k` cut keeps: every value at least the k-th largest, ties and -0.0 / 0.0 alike,
    -inf rows and k past the vocabulary included; k = 0 leaves a row as it is."""
    rng = np.random.default_rng(4)
    rows = [rng.normal(size=64) * 5, np.round(rng.normal(size=64)), np.zeros(64), rng.normal(size=64)]
    rows[2][:3] = -0.0
    rows[3][10:] = -np.inf
    logits = jnp.asarray(np.stack(rows).astype(np.float32))
    for k in (1, 2, 7, 31, 64, 100):
        got = jax.jit(top_k_filter)(logits, jnp.full(4, k, jnp.int32))
        kth = jax.lax.top_k(logits, min(k, 64))[0][:, -1:]
        assert np.array_equal(np.isfinite(got), np.isfinite(jnp.where(logits < kth, -jnp.inf, logits))), k
    kept = jax.jit(top_k_filter)(logits, jnp.array([0, 0, 0, 0], jnp.int32))
    assert np.array_equal(kept, logits)


def test_step_widths(engine):
    assert step_widths(1) == (1,)
    assert step_widths(2) == (1, 2)
    assert step_widths(8) == (1, 2, 4, 8)
    assert step_widths(6) == (1, 2, 4, 6)
    assert step_widths(9) == (1, 2, 4, 8, 9)
    # The engine's rows include a padding row past its max_batch, but a step never holds more than
    # max_batch decoding rows: a wider program would be compiled, loaded and never run.
    assert engine.step_widths == (1, 2, 4, 8)


def test_page_is_served(url):
    page = httpx.get(url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/v1/chat/completions" in page.text and "<script src" not in page.text  # no CDN, one file
    health = {"status": "ok", "slots": 8, "active": 0, "waiting": 0, "kv_pages": 8, "kv_pages_free": 8}
    health["kv_pages_cached"] = 0  # (with --prefix-cache, the finished requests' pages it keeps)
    assert httpx.get(url + "/health").json() == health
