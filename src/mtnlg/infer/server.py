"""An OpenAI-compatible HTTP server (FastAPI + uvicorn) over the continuous-batching :class:`Engine`.

::

    POST /v1/completions        prompt (str | [str] | [int] | [[int]]) -> text_completion
    POST /v1/chat/completions   messages (system/user/assistant) -> chat.completion (the one chat template)
    POST /v1/poem               the opening lines of a poem -> more lines of the same form (an mtnlg extension)
    GET /v1/models  GET /metrics  POST /tokenize  POST /detokenize  GET /health  GET / (the web page)

The protocol lives in :mod:`mtnlg.infer.fields` (reading and checking fields) and
:mod:`mtnlg.infer.protocol` (requests, tokenizing, rendering); this module is the app.
With an API key set, every route but ``/health`` and the page needs ``Authorization: Bearer KEY``.
JSON routes need ``Content-Type: application/json`` (so a cross-site form cannot post to them). A body
over ``INLINE_BODY_BYTES`` is parsed and tokenized in a worker thread, so a long prompt never stalls the
event loop; a smaller one (~50 us of work) inline, since the thread hop costs more than that and, under
a burst, waits for the GIL behind the engine. A client that disconnects cancels its
requests, streamed or not, and frees their KV-cache slots at the engine's next step.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from mtnlg.checkpoint.inference import pretrained_tokenizer
from mtnlg.checkpoint.resolve import resolve_checkpoint
from mtnlg.errors import ConfigError
from mtnlg.infer.httpd import DRAIN_CAP, BackgroundServer, run_app
from mtnlg.infer.metrics import render_metrics
from mtnlg.infer.scheduler import Engine, EngineStopped, Output, QueueFull, RequestTooLong, merge_outputs
from mtnlg.infer.protocol import (ABORTED, MAX_BODY_BYTES, ApiError, Choice, GenerationRequest, TextCodec, bad,
                                  error_body, get_field, int_list, openers, parse_chat, parse_completion,
                                  parse_json, parse_poem_request, render_choice, render_delta, seeded, sse,
                                  too_large, usage)

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).parent / "web"
WEB_FILES = {"chat.css": "text/css", "chat.js": "text/javascript"}
JSON_ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/poem", "/tokenize", "/detokenize")
INLINE_BODY_BYTES = 8 << 10  # bodies up to this size are parsed and tokenized on the event loop
MAX_POEMS_WAITING = 8  # poem requests are answered one at a time; more than this waiting get 429
KNOWN_ROUTES = (*JSON_ROUTES, "/v1/models", "/health", "/metrics", "/")


def error_response(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)


def is_open(path: str) -> bool:
    """The routes that never need the key: the health check and the static page."""
    return path in ("/health", "/") or path.startswith("/web/")


async def read_body(request: Request) -> bytes:
    """The body, at most 1 MiB (413 beyond; the rest is read and dropped so the client gets the answer)."""
    chunks, size = [], 0
    receive = request.receive
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise ApiError(400, "the client went away", code="client_disconnected")
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            more = msg.get("more_body", False)
            while more and size <= DRAIN_CAP:
                msg = await receive()
                size += len(msg.get("body", b""))
                more = msg.get("more_body", False) and msg["type"] == "http.request"
            raise too_large("exceeds the limit")
        chunks.append(chunk)
        if not msg.get("more_body", False):
            return b"".join(chunks)


async def _wait_disconnect(receive: Callable) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class OpenAIServer:
    """Request handling shared by the endpoints: prepare (in a thread), submit to the engine, collect or stream."""

    def __init__(self, engine: Engine, model_name: str):
        self.engine = engine
        self.codec = TextCodec(engine.tokenizer)
        self.model_name = model_name
        self.created = int(time.time())
        self.http_requests: dict[tuple[str, int], int] = {}
        self.poem_slots = threading.BoundedSemaphore(1 + MAX_POEMS_WAITING)

    def check_model(self, body: dict[str, Any]) -> None:
        model = get_field(body, "model", "str")
        if model is not None and model not in (self.model_name, ""):
            raise ApiError(404, f"The model '{model}' does not exist; this server serves '{self.model_name}'",
                           type_="not_found_error", param="model", code="model_not_found")

    # -- runs in a worker thread ------------------------------------------------------------------------
    def prepare(self, raw: bytes, parse: Callable[..., GenerationRequest]) -> tuple[GenerationRequest, list[Choice]]:
        """Parse, validate and tokenize one generation request; the choices it asks for."""
        body = parse_json(raw)
        self.check_model(body)
        req = parse(body, self.codec)
        longest = max(len(p) for p in req.prompts)
        if req.max_tokens is None:
            req.max_tokens = max(self.engine.max_model_len - longest, 1)
        try:
            self.engine.check_length(longest, req.max_tokens)
        except RequestTooLong as e:
            raise bad(req.max_tokens_name, str(e)) from None
        if req.num_choices > self.engine.max_queue:
            raise bad("n", f"this request asks for {req.num_choices} generations ({len(req.prompts)} prompts x "
                           f"n={req.n}); this server takes at most {self.engine.max_queue} at once "
                           f"(serve.max_queue): send fewer prompts or a smaller n")
        prefixes = [self.codec.decode(p) if req.echo else "" for p in req.prompts]
        choices = [Choice(i * req.n + j, p, prefixes[i]) for i, p in enumerate(req.prompts) for j in range(req.n)]
        return req, choices

    # -- on the event loop ------------------------------------------------------------------------------
    def submit(self, req: GenerationRequest, choices: list[Choice]) -> asyncio.Queue:
        """Submit every choice; their outputs arrive on one queue as (choice, [Output])."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        if self.engine.queue_depth + len(choices) > self.engine.max_queue:
            raise ApiError(429, f"the server is busy ({self.engine.queue_depth} requests waiting); retry later",
                           type_="rate_limit_error", code="rate_limit_exceeded", headers={"Retry-After": "1"})
        submitted = []
        try:
            for c in choices:
                c.req = self.engine.submit(c.prompt_ids, seeded(req.params, c.index, req.n), req.max_tokens,
                                           sink=lambda outs, c=c: queue.put_nowait((c, outs)), loop=loop)
                submitted.append(c.req)
        except BaseException as e:
            for r in submitted:
                r.cancel()
            if isinstance(e, QueueFull):
                raise ApiError(429, str(e), type_="rate_limit_error", code="rate_limit_exceeded",
                               headers={"Retry-After": "1"}) from None
            if isinstance(e, EngineStopped):
                raise ApiError(503, str(e), type_="server_error", code="service_unavailable") from None
            if isinstance(e, ConfigError):
                raise bad("prompt", str(e)) from None
            raise
        return queue

    @staticmethod
    async def collect(choices: list[Choice], queue: asyncio.Queue, receive: Callable) -> bool:
        """Wait for every choice to finish; False (and everything cancelled) if the client goes away first."""
        pending = len(choices)
        watcher = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            while pending:
                getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    return False
                c, outs = getter.result()
                pending -= sum(c.add(o) for o in outs)
            return True
        finally:
            watcher.cancel()
            for c in choices:
                if c.req is not None and c.finish_reason is None:
                    c.req.cancel()

    async def respond(self, request: Request, raw: bytes, parse: Callable[..., GenerationRequest]) -> Any:
        with self.engine.incoming():  # the engine holds its next step for this request (bounded)
            if len(raw) <= INLINE_BODY_BYTES:  # ~50 us: a thread hop would cost more than the work
                req, choices = self.prepare(raw, parse)
            else:
                req, choices = await run_in_threadpool(self.prepare, raw, parse)
            queue = self.submit(req, choices)
        chat, rid, created = req.chat, f"{'chatcmpl' if req.chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
                "model": self.model_name}
        if req.stream:
            def chunk(choice_list: list[dict], use: dict | None = None) -> dict:
                return {**head, "choices": choice_list, **({"usage": use} if req.include_usage else {})}

            offsets = {c.index: len(c.prefix) for c in choices}

            def render(c: Choice, o: Output) -> dict:
                d = render_delta(req, self.codec, c, o, offsets[c.index])
                offsets[c.index] += len(o.text)
                return d

            return _sse_response(choices, queue, chunk, openers(req, choices), render,
                                 (lambda: usage(choices, req.prompts)) if req.include_usage else None)
        if not await self.collect(choices, queue, request.receive):
            return Response(status_code=499)  # nobody is listening
        if any(c.finish_reason == "abort" for c in choices):
            raise ApiError(503, ABORTED["error"]["message"], type_="server_error", code="generation_aborted")
        out = [render_choice(req, self.codec, c) for c in sorted(choices, key=lambda c: c.index)]
        return {**head, "object": "chat.completion" if chat else "text_completion", "choices": out,
                "usage": usage(choices, req.prompts)}


async def _coalesced(queue: asyncio.Queue) -> list[tuple[Choice, Output]]:
    """Wait for output, then take everything queued so far, merged into one event per choice: when the
    client side falls behind the engine, several tokens travel in one SSE event instead of many."""
    items = [await queue.get()]
    while not queue.empty():
        items.append(queue.get_nowait())
    merged: dict[int, tuple[Choice, list[Output]]] = {}
    for c, outs in items:
        merged.setdefault(c.index, (c, []))[1].extend(outs)
    return [(c, merge_outputs(outs)) for c, outs in merged.values()]


def _sse_response(choices: list[Choice], queue: asyncio.Queue, chunk: Callable[..., dict], opening: list[dict],
                  render: Callable[[Choice, Output], dict], use: Callable[[], dict] | None) -> StreamingResponse:
    """The SSE body: the opening chunks, one chunk per engine output, the usage chunk when asked, then
    ``[DONE]``. A client that goes away cancels its unfinished requests at once, freeing their slots."""

    async def events() -> AsyncIterator[str]:
        pending = len(choices)
        try:
            for opener in opening:
                yield sse(chunk([opener], None))
            while pending:
                for c, o in await _coalesced(queue):
                    if o.finish_reason == "abort":
                        yield sse(ABORTED)
                        return
                    if o.finish_reason is not None:
                        c.finish_reason, c.completion_tokens = o.finish_reason, o.completion_tokens
                        pending -= 1
                    yield sse(chunk([render(c, o)], None))
            if use is not None:
                yield sse(chunk([], use()))
            yield "data: [DONE]\n\n"
        finally:
            for c in choices:
                if c.req is not None and c.finish_reason is None:
                    c.req.cancel()

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class GuardMiddleware:
    """Pure ASGI (so streaming and disconnects pass straight through): the Bearer key on every route but
    /health and the page, ``Content-Type: application/json`` on JSON routes (415), the declared body size
    (413), HTTP request counting for /metrics, and a JSON 500 instead of a traceback if anything escapes.
    A rejected body is read and dropped (up to ``DRAIN_CAP``) before answering, so every client sees the
    answer instead of a connection reset."""

    def __init__(self, app: Any, srv: OpenAIServer, api_key: str | None):
        self.app, self.srv, self.api_key = app, srv, api_key

    def reject(self, scope: dict) -> tuple[ApiError, int | None] | None:
        path, headers = scope.get("path", ""), dict(scope.get("headers") or [])
        if self.api_key and not is_open(path):
            scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                return ApiError(401, "Incorrect or missing API key: this server needs its API key (sent as "
                                "'Authorization: Bearer <key>'; on the web page, enter it in the API key box)",
                                code="invalid_api_key"), None
        if scope.get("method") != "POST" or path not in JSON_ROUTES:
            return None
        ctype = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if ctype != b"application/json":
            shown = ctype.decode("latin-1")[:60] or "none"
            return ApiError(415, f"the body must be JSON sent with 'Content-Type: application/json' (got {shown})",
                            param="Content-Type", code="unsupported_media_type"), None
        length = headers.get(b"content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                return bad("Content-Length", "the Content-Length header is not a number"), None
            if n > MAX_BODY_BYTES:
                return too_large(f"is {n} bytes"), n
        return None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        started = False

        async def send_wrapper(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                _count(self.srv, path, message["status"])
            await send(message)

        rejected = self.reject(scope)
        if rejected is not None:
            e, declared = rejected
            headers = dict(e.headers)
            expects = dict(scope.get("headers") or []).get(b"expect", b"").lower() == b"100-continue"
            if expects:  # the client waits for our go-ahead before sending the body: answer without it
                headers["Connection"] = "close"
            elif declared is None or declared <= DRAIN_CAP:
                await _drain(receive)
            else:
                headers["Connection"] = "close"
            await error_response(e.status, e.message, e.type, e.param, e.code, headers)(scope, receive, send_wrapper)
            return
        try:
            await self.app(scope, receive, send_wrapper)
        except Exception:
            log.exception("unhandled error on %s", path)
            if not started:
                await error_response(500, "internal server error", type_="server_error")(scope, receive, send_wrapper)


async def _drain(receive: Callable) -> None:
    size = 0
    while size <= DRAIN_CAP:
        msg = await receive()
        size += len(msg.get("body", b""))
        if msg["type"] != "http.request" or not msg.get("more_body", False):
            return


def _count(srv: OpenAIServer, path: str, status: int) -> None:
    key = (path if path in KNOWN_ROUTES else "other", status)
    srv.http_requests[key] = srv.http_requests.get(key, 0) + 1


# -- the app -----------------------------------------------------------------------------------------------
def create_app(engine: Engine, model_name: str = "mtnlg", api_key: str | None = None) -> FastAPI:
    """The FastAPI app over ``engine`` (an :class:`Engine` or an :class:`~mtnlg.infer.engine_core.EngineClient`).
    The engine loop starts with the app and drains (in-flight requests finish) at shutdown."""
    api_key = api_key if api_key is not None else (os.environ.get("MTNLG_API_KEY") or None)
    srv = OpenAIServer(engine, model_name)
    codec = srv.codec

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        engine.start()
        yield
        await asyncio.get_running_loop().run_in_executor(None, engine.shutdown)

    app = FastAPI(title="mtnlg", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = srv
    app.state.engine = engine
    app.add_middleware(GuardMiddleware, srv=srv, api_key=api_key)

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, e: ApiError):
        return error_response(e.status, e.message, e.type, e.param, e.code, e.headers)

    @app.exception_handler(ConfigError)
    async def config_error(_request: Request, e: ConfigError):
        return error_response(400, str(e))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, e: StarletteHTTPException):
        type_ = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_response(e.status_code, str(e.detail), type_, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def any_error(_request: Request, e: Exception):
        log.error("unhandled %s: %s", type(e).__name__, e)
        return error_response(500, "internal server error", type_="server_error")

    # -- pages, health, metrics -----------------------------------------------------------------------
    @app.get("/")
    async def index():
        return FileResponse(WEB_DIR / "index.html", media_type="text/html")

    @app.get("/web/{name}")
    async def web_file(name: str):
        if name not in WEB_FILES:
            raise ApiError(404, f"no such file: {name}", type_="not_found_error")
        return FileResponse(WEB_DIR / name, media_type=WEB_FILES[name])

    @app.get("/health")
    async def health():
        if not engine.healthy:
            return error_response(503, "the generation engine stopped after an internal error; restart the server",
                                  type_="server_error", code="engine_dead")
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": srv.created,
                                            "owned_by": "mtnlg", "max_model_len": engine.max_model_len}]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(render_metrics(srv.engine, srv.http_requests), media_type="text/plain; version=0.0.4")

    # -- tokenizer (in worker threads: a 1 MiB prompt does not block other requests) ---------------------
    def tokenize_body(raw: bytes) -> dict[str, Any]:
        body = parse_json(raw)
        if "messages" in body:
            ids = codec.chat_prompt(body["messages"])
        else:
            prompt = body.get("prompt")
            if not isinstance(prompt, str):
                raise bad("prompt", "'prompt' must be a string (or send 'messages')")
            ids = codec.encode(prompt)
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.max_model_len}

    def detokenize_body(raw: bytes) -> dict[str, Any]:
        body = parse_json(raw)
        if "tokens" not in body:
            raise bad("tokens", "'tokens' (an array of token ids) is required")
        return {"prompt": codec.decode(codec.check_ids(int_list(body, "tokens"), "tokens"))}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        return await run_in_threadpool(tokenize_body, await read_body(request))

    @app.post("/detokenize")
    async def detokenize(request: Request):
        return await run_in_threadpool(detokenize_body, await read_body(request))

    # -- generation -------------------------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(request: Request):
        return await srv.respond(request, await read_body(request), parse_completion)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await srv.respond(request, await read_body(request), parse_chat)

    def poem_body(raw: bytes) -> dict[str, Any]:
        body = parse_json(raw)
        srv.check_model(body)
        req = parse_poem_request(body, codec.vocab_size)
        if not srv.poem_slots.acquire(blocking=False):
            raise ApiError(429, "the server is busy writing other poems; retry later", type_="rate_limit_error",
                           code="rate_limit_exceeded", headers={"Retry-After": "1"})
        try:
            lines = srv.engine.poem(req.text, req.lines, req.params)  # one at a time, beside the batch
        except ConfigError as e:
            raise ApiError(422, str(e), param="prompt", code="poem_form_failed") from None
        except EngineStopped as e:
            raise ApiError(503, str(e), type_="server_error", code="service_unavailable") from None
        finally:
            srv.poem_slots.release()
        return {"id": f"poem-{uuid.uuid4().hex}", "object": "poem", "created": int(time.time()), "model": model_name,
                "lines": lines, "text": "".join(lines)}

    @app.post("/v1/poem")
    async def poem(request: Request):
        return await run_in_threadpool(poem_body, await read_body(request))

    return app


def serve(checkpoint: str, cfg: Any, device: torch.device, dtype: torch.dtype, api_key: str | None = None) -> None:
    """Serve the model at ``checkpoint`` (anything ``from_pretrained`` loads) on ``device`` in ``dtype`` with a
    :class:`~mtnlg.config.ServeConfig` until interrupted. The engine runs in its own process as
    ``cfg.engine_process`` says (auto: on the CPU; :mod:`mtnlg.infer.engine_core`), and then only it loads
    the weights: this process holds the tokenizer."""
    # The engine thread runs Python between its kernels; with the default 5 ms GIL switch interval the
    # HTTP thread would wait up to 5 ms for every hand-off, which shows up directly in TTFT and ITL.
    sys.setswitchinterval(0.0005)
    kwargs = dict(max_batch=cfg.max_batch, max_model_len=cfg.max_model_len, max_queue=cfg.max_queue,
                  kv_cache_mb=cfg.kv_cache_mb)
    resolved = resolve_checkpoint(checkpoint)  # once: both processes load the same checkpoint of a live run
    if cfg.engine_process == "true" or (cfg.engine_process == "auto" and device.type == "cpu"):
        from mtnlg.infer.engine_core import EngineClient

        engine: Any = EngineClient(str(resolved.path), device, dtype, pretrained_tokenizer(resolved), **kwargs)
    else:
        from mtnlg.api import MegatronLmModel
        from mtnlg.device import decode_threads

        lm = MegatronLmModel.from_pretrained(resolved, device=device, dtype=dtype)
        decode_threads(lm.model)
        engine = Engine(lm, **kwargs)
    app = create_app(engine, cfg.model_name, api_key if api_key is not None else cfg.api_key)
    run_app(app, host=cfg.host, port=cfg.port)


__all__ = ["BackgroundServer", "GuardMiddleware", "OpenAIServer", "create_app", "serve"]
