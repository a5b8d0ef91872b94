"""`bitnet-jax serve`: the OpenAI HTTP API (FastAPI on uvicorn) over the continuous-batching engine.

Routes:
  GET  /                     the chat page (static/index.html: HTML + JS, no CDN, no build step)
  GET  /health               {"status": "ok", "slots", "active", "waiting"} (503 once stopping)
  GET  /v1/models            the one model served
  POST /v1/completions       prompt (text, or token ids) -> text; `stream` as server-sent events
  POST /v1/chat/completions  messages -> the assistant's reply, through the model's chat template

Request and response bodies follow OpenAI's (chunks of `stream: true` included, ending with
`data: [DONE]`; `stream_options.include_usage` adds the usage chunk). Sampling: `max_tokens`
(`max_completion_tokens` for chat), `temperature` in [0, 2] (0 is greedy; OpenAI's default 1),
`top_p` in (0, 1], `seed` (unset: a random one), `stop` (a string or up to 4), `n` = 1. Unknown
fields are ignored, as OpenAI's own clients send some that do not matter here.

Every error is `{"error": {"message", "type", "param", "code"}}` with OpenAI's status codes:
400 (bad JSON, a missing or mistyped field, a bad value, a prompt that does not fit the
context), 401 (an API key is set and the request lacks it), 404 (unknown model or path), 405,
413 (a body over `max_body_bytes`), 429 with Retry-After (every slot busy and the queue full),
503 (shutting down).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import importlib.resources
import json
import logging
import os
import random
import signal
import threading
import time
import uuid
from typing import Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from bitnet_jax.errors import BitNetError
from bitnet_jax.serve.batching import ContextTooLong, Engine, EngineStopped, Event, GenerationRequest, QueueFull
from bitnet_jax.serve.chat import chat_prompt_ids, chat_template, stop_ids

logger = logging.getLogger(__name__)

API_KEY_ENV = "BITNET_JAX_API_KEY"
MAX_BODY_BYTES = 1 << 20  # 1 MiB: a full 4096-token context is ~20 KB of text or ids
_MAX_STOP_STRINGS = 4  # as OpenAI


# -- request bodies ------------------------------------------------------------------------------


class _Body(BaseModel):
    # strict: "5" is not a number and 5.0 is not an integer; NaN and inf are refused.
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class _StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: _StreamOptions | None = None


class CompletionBody(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None


class _TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant"]
    content: str | list[_TextPart]


class ChatBody(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False


_FIELDS = set(CompletionBody.model_fields) | set(ChatBody.model_fields) | set(ChatMessage.model_fields) | {"text"}


# -- errors --------------------------------------------------------------------------------------


class APIError(Exception):
    """An error answered in OpenAI's format."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _validation_error(exc: RequestValidationError) -> APIError:
    first = exc.errors()[0]
    if first["type"] == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return APIError(400, f"The request body is not valid JSON ({detail}).", code="invalid_json")
    loc = [str(x) for x in first["loc"][1:] if isinstance(x, int) or x in _FIELDS]
    param = ".".join(loc) or None
    if first["type"] == "missing":
        return APIError(400, f"Missing required parameter: '{param}'.", code="missing_required_parameter", param=param)
    if not loc:  # the body itself: not a JSON object
        return APIError(400, f"The request body must be a JSON object ({first['msg']}).", code="invalid_type")
    value = first.get("input")
    shown = json.dumps(value)[:80] if isinstance(value, (int, float, str, bool, type(None))) else type(value).__name__
    return APIError(400, f"Invalid '{param}': {first['msg']} (found {shown}).", code="invalid_type", param=param)


_STATUS_CODES = {404: "not_found", 405: "method_not_allowed"}


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        where = f"{request.method} {request.url.path}"
        if exc.status_code == 404:
            message = f"No route {where}: the API is GET /v1/models, POST /v1/completions, POST /v1/chat/completions."
        elif exc.status_code == 405:
            allowed = (exc.headers or {}).get("Allow", "?")
            message = f"{where}: method not allowed (allowed: {allowed})."
        else:
            message = str(exc.detail)
        code = _STATUS_CODES.get(exc.status_code)
        return APIError(exc.status_code, message, code=code, headers=exc.headers).response()

    @app.exception_handler(Exception)
    async def crashed(request, exc: Exception):
        logger.exception("unhandled error")
        return APIError(500, f"Internal server error: {type(exc).__name__}.", type="server_error").response()


class _BodyLimit:
    """ASGI middleware: reads the request body first and answers 413 beyond `max_bytes`."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = APIError(
            413,
            f"The request body is larger than this server accepts ({self.max_bytes} bytes).",
            code="request_too_large",
        )
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await too_large.response()(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending its body
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await too_large.response()(scope, receive, send)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # then http.disconnect, when the client leaves

        await self.app(scope, replay, send)


# -- the app -------------------------------------------------------------------------------------


def create_app(
    engine: Engine,
    *,
    model_name: str,
    folder: str | None = None,
    api_key: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> FastAPI:
    """The FastAPI app serving `engine` (started by the caller) as `model_name`.

    `folder` is the model folder: its chat template (tokenizer_config.json) and its stop ids
    (generation_config.json); without one, a plain transcript and the config's EOS ids."""
    from bitnet_jax.interop.hf import generation_stop_ids

    config, tokenizer = engine.config, engine.tokenizer
    template = chat_template(folder) if folder else None
    chat_stops = stop_ids(tokenizer, config, folder)
    completion_stops = tuple(generation_stop_ids(folder, config) if folder else config.eos_ids)
    page = importlib.resources.files("bitnet_jax.serve").joinpath("static/index.html").read_text(encoding="utf-8")
    created = int(time.time())

    app = FastAPI(title="bitnet-jax", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_BodyLimit, max_bytes=max_body_bytes)
    _install_error_handlers(app)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            what = "no API key" if not given else "an incorrect API key"
            raise APIError(
                401,
                f"This server needs an API key and the request has {what}: send 'Authorization: Bearer <key>'.",
                code="invalid_api_key",
            )

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return HTMLResponse(page)

    @app.get("/health")
    async def health():
        if not engine.running:  # stopping, or the engine failed (its log says why)
            return JSONResponse({"status": "unavailable", **engine.load()}, status_code=503)
        return {"status": "ok", **engine.load()}

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models():
        return {"object": "list", "data": [_model_card(model_name, created, engine.max_context)]}

    @app.get("/v1/models/{name:path}", dependencies=[Depends(authorize)])
    async def model(name: str):
        _check_model(name, model_name)
        return _model_card(model_name, created, engine.max_context)

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(body: CompletionBody, request: Request):
        _check_common(body, model_name)
        if body.echo:
            raise APIError(400, "'echo' is not supported by this server.", param="echo", code="unsupported_parameter")
        if body.logprobs is not None:
            raise APIError(
                400, "'logprobs' is not supported by this server.", param="logprobs", code="unsupported_parameter"
            )
        prompt_ids = _completion_prompt(body.prompt, tokenizer)
        max_tokens = 16 if body.max_tokens is None else body.max_tokens  # OpenAI's default
        generation = _generation(body, prompt_ids, max_tokens, completion_stops)
        return await _respond(engine, request, body, generation, model_name, chat=False)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(body: ChatBody, request: Request):
        _check_common(body, model_name)
        if body.logprobs:
            raise APIError(
                400, "'logprobs' is not supported by this server.", param="logprobs", code="unsupported_parameter"
            )
        if not body.messages:
            raise APIError(
                400, "'messages' is empty: expected at least one message.", param="messages", code="invalid_value"
            )
        messages = [{"role": m.role, "content": _content(m.content)} for m in body.messages]
        try:
            prompt_ids = chat_prompt_ids(template, messages, tokenizer)
        except BitNetError as e:
            raise APIError(400, str(e), param="messages", code="invalid_value") from None
        except Exception as e:  # the tokenizer refused the text (e.g. a lone surrogate)
            raise APIError(400, f"The tokenizer cannot encode these messages ({e}).", param="messages") from None
        limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        max_tokens = engine.max_context - len(prompt_ids) if limit is None else limit
        generation = _generation(body, prompt_ids, max(max_tokens, 1), chat_stops)
        return await _respond(engine, request, body, generation, model_name, chat=True)

    return app


def _model_card(name: str, created: int, context: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "bitnet-jax", "max_model_len": context}


def _check_model(name: str, model_name: str) -> None:
    if name != model_name:
        raise APIError(
            404,
            f"The model '{name}' does not exist here: this server serves '{model_name}'.",
            param="model",
            code="model_not_found",
        )


def _check_common(body: _Sampling, model_name: str) -> None:
    _check_model(body.model, model_name)
    if body.n != 1:
        raise APIError(
            400, f"'n' is {body.n}: this server returns one choice per request (n=1).", param="n", code="invalid_value"
        )
    if not 0 <= body.temperature <= 2:
        raise APIError(
            400,
            f"'temperature' is {body.temperature}: expected a number from 0 to 2.",
            param="temperature",
            code="invalid_value",
        )
    if not 0 < body.top_p <= 1:
        raise APIError(
            400, f"'top_p' is {body.top_p}: expected a number in (0, 1].", param="top_p", code="invalid_value"
        )
    for name in ("max_tokens", "max_completion_tokens"):
        value = getattr(body, name, None)
        if value is not None and value < 1:
            raise APIError(400, f"'{name}' is {value}: expected an integer >= 1.", param=name, code="invalid_value")
    stops = [body.stop] if isinstance(body.stop, str) else body.stop or []
    if len(stops) > _MAX_STOP_STRINGS or not all(stops):
        raise APIError(
            400,
            f"'stop': expected up to {_MAX_STOP_STRINGS} non-empty strings; found {stops!r}.",
            param="stop",
            code="invalid_value",
        )


def _content(content) -> str:
    return content if isinstance(content, str) else "".join(part.text for part in content)


def _completion_prompt(prompt, tokenizer) -> list[int]:
    """Token ids of a completions prompt: text (BOS first, as `bitnet-jax generate` does) or ids."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise APIError(
                400,
                f"'prompt' holds {len(prompt)} prompts: this server takes one per request.",
                param="prompt",
                code="invalid_value",
            )
        prompt = prompt[0]
    if isinstance(prompt, list):
        if not prompt:
            raise APIError(400, "'prompt' is an empty list of token ids.", param="prompt", code="invalid_value")
        return prompt
    try:
        ids = tokenizer.encode(prompt)
    except Exception as e:
        raise APIError(
            400, f"The tokenizer cannot encode 'prompt' ({e}).", param="prompt", code="invalid_value"
        ) from None
    return ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + ids


def _generation(body: _Sampling, prompt_ids, max_tokens: int, stops: tuple[int, ...]) -> GenerationRequest:
    stop_strings = [body.stop] if isinstance(body.stop, str) else body.stop or []
    return GenerationRequest(
        tuple(prompt_ids),
        max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        seed=random.getrandbits(32) if body.seed is None else body.seed,
        stop_ids=stops,
        stop_strings=tuple(stop_strings),
    )


async def _respond(
    engine: Engine, request: Request, body: _Sampling, generation: GenerationRequest, model: str, *, chat: bool
):
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Event] = asyncio.Queue()
    try:
        ticket = engine.submit(generation, lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
    except ContextTooLong as e:
        raise APIError(400, str(e), param="max_tokens", code="context_length_exceeded") from None
    except QueueFull as e:
        raise APIError(
            429, str(e), type="rate_limit_error", code="rate_limit_exceeded", headers={"Retry-After": "1"}
        ) from None
    except EngineStopped as e:
        raise APIError(503, str(e), type="server_error", code="service_unavailable") from None
    except BitNetError as e:
        raise APIError(400, str(e), param="prompt" if not chat else "messages", code="invalid_value") from None
    reply = _Reply(model, chat, len(generation.prompt_ids))
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            _sse(reply, events, ticket, include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    final = None
    try:
        final = await _until_finished(request, events, reply)
    finally:
        if final is None:  # the client left, or the server is stopping this task
            ticket.cancel()
    if final is None:
        return Response(status_code=499)  # nobody is listening
    if final.finish_reason in ("cancelled", "error"):
        raise APIError(
            503, final.error or "The request was cancelled.", type="server_error", code="service_unavailable"
        )
    return reply.whole(final)


async def _until_finished(request: Request, events: asyncio.Queue, reply: "_Reply") -> Event | None:
    """Collects a reply's text; returns its last event, or None if the client disconnected."""
    disconnected = asyncio.ensure_future(_disconnect(request))
    try:
        while True:
            next_event = asyncio.ensure_future(events.get())
            done, _ = await asyncio.wait({next_event, disconnected}, return_when=asyncio.FIRST_COMPLETED)
            if next_event not in done:
                next_event.cancel()
                return None
            event = next_event.result()
            reply.text.append(event.text)
            if event.finish_reason is not None:
                return event
    finally:
        disconnected.cancel()


async def _disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _sse(reply: "_Reply", events: asyncio.Queue, ticket, include_usage: bool):
    """Server-sent events of a streamed reply; the slot is freed if the client goes away."""
    finished = False
    try:
        if reply.chat:
            yield _data(reply.chunk({"role": "assistant", "content": ""}, None, include_usage))
        while True:
            event = await events.get()
            if event.finish_reason in ("cancelled", "error"):
                yield _data(
                    APIError(503, event.error or "cancelled", type="server_error", code="service_unavailable").body()
                )
                break
            if event.text:
                delta = {"content": event.text} if reply.chat else event.text
                yield _data(reply.chunk(delta, None, include_usage))
            if event.finish_reason is not None:
                yield _data(reply.chunk({} if reply.chat else "", event.finish_reason, include_usage))
                if include_usage:
                    yield _data({**reply.header(chat_chunk=True), "choices": [], "usage": reply.usage(event)})
                break
        finished = True
        yield "data: [DONE]\n\n"
    finally:
        if not finished:
            ticket.cancel()


def _data(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class _Reply:
    """The OpenAI response objects of one request."""

    def __init__(self, model: str, chat: bool, prompt_tokens: int):
        self.model, self.chat, self.prompt_tokens = model, chat, prompt_tokens
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.text: list[str] = []

    def header(self, *, chat_chunk: bool) -> dict:
        kind = ("chat.completion.chunk" if chat_chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "system_fingerprint": None}

    def usage(self, final: Event) -> dict:
        return {
            "prompt_tokens": final.prompt_tokens,
            "completion_tokens": final.completion_tokens,
            "total_tokens": final.prompt_tokens + final.completion_tokens,
        }

    def chunk(self, delta, finish_reason: str | None, include_usage: bool) -> dict:
        if self.chat:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": delta, "logprobs": None, "finish_reason": finish_reason}
        chunk = {**self.header(chat_chunk=True), "choices": [choice]}
        if include_usage:
            chunk["usage"] = None
        return chunk

    def whole(self, final: Event) -> dict:
        text = "".join(self.text)
        if self.chat:
            message = {"role": "assistant", "content": text, "refusal": None}
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": final.finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": final.finish_reason}
        return {**self.header(chat_chunk=False), "choices": [choice], "usage": self.usage(final)}


# -- running it ----------------------------------------------------------------------------------


@contextlib.contextmanager
def running(app: FastAPI, host: str = "127.0.0.1", port: int = 0, *, log_level: str = "warning"):
    """Serves `app` from a background thread until the block ends; yields its base URL
    ("http://127.0.0.1:PORT"). Port 0 takes a free port. For tests, benchmarks and notebooks:
    the `serve` command runs uvicorn in the main thread instead, where it handles signals."""
    import socket

    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    # log_config=None: uvicorn's loggers propagate to what the caller set up, instead of uvicorn
    # binding handlers to the sys.stderr of the moment (pytest's capture, closed after a test).
    config = uvicorn.Config(app, log_config=None, log_level=log_level, timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise BitNetError(f"The server did not start on {host}:{sock.getsockname()[1]}.")
            time.sleep(0.01)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def serve(
    model: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch: int = 8,
    max_context: int = 2048,
    max_queue: int = 64,
    api_key: str | None = None,
    model_name: str | None = None,
    backend: str | None = None,
    kv_cache: str | None = None,
    kv_cache_tokens: int | None = None,
    prefix_cache: bool = True,
    prefill_chunk: int | None = None,
    shutdown_timeout: float = 10.0,
    log_level: str = "info",
) -> int:
    """Loads a model folder and serves it until Ctrl-C or SIGTERM; returns 0 after a clean stop.

    On the signal the server stops accepting connections, lets requests in flight finish for up
    to `shutdown_timeout` seconds, then cancels the rest and stops the engine."""
    import uvicorn

    from bitnet_jax.serve.host_memory import map_large_blocks
    from bitnet_jax.serve.load import load_model

    map_large_blocks()  # from the start: the blocks freed while loading are handed back too
    config, params, tokenizer = load_model(model)
    engine = Engine(
        config,
        params,
        tokenizer,
        max_batch=max_batch,
        max_context=max_context,
        max_queue=max_queue,
        backend=backend,
        kv_cache=kv_cache,
        kv_cache_tokens=kv_cache_tokens,
        prefix_cache=prefix_cache,
        prefill_chunk=prefill_chunk,
        in_child=True,  # XLA's compiler stays out of the server's process (serve/compile_child.py)
    )
    del params
    name = model_name or os.path.basename(os.path.normpath(model))
    print(
        f"Compiling the decode step for {max_batch} slots of up to {engine.max_context} tokens "
        f"({engine.kv_cache_tokens} KV cache slots)...",
        flush=True,
    )
    engine.start()
    app = create_app(engine, model_name=name, folder=model, api_key=api_key)
    server = uvicorn.Server(
        uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=shutdown_timeout)
    )
    # uvicorn handles SIGINT / SIGTERM (a graceful stop) and then raises the signal again for the
    # handler that was there before it: make that one a no-op, so that the stop ends in exit 0.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        print(f"Serving '{name}' at http://{host}:{port}/ (OpenAI API under /v1; Ctrl-C stops)", flush=True)
        server.run()
    finally:
        engine.stop(timeout=shutdown_timeout)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("Stopped.", flush=True)
    return 0
