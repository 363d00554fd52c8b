"""An OpenAI-compatible HTTP server (FastAPI + uvicorn) over the continuous-batching :class:`Engine`.

::

    POST /v1/completions        prompt (str | [str] | [int] | [[int]]) -> text_completion
    POST /v1/chat/completions   messages (system/user/assistant) -> chat.completion (the one chat template)
    POST /v1/poem               the opening lines of a poem -> more lines of the same form (an mtnlg extension)
    GET /v1/models  GET /metrics  POST /tokenize  POST /detokenize  GET /health  GET / (the web page)

The protocol lives in :mod:`mtnlg.infer.fields` (reading and checking fields) and
:mod:`mtnlg.infer.protocol` (requests, tokenizing, rendering); :mod:`mtnlg.infer.guard` is the app's
outer layer (checks, counting, and the two generation routes answered without FastAPI's layers),
:mod:`mtnlg.infer.sse` the event stream; this module is the app.
With an API key set, every route but ``/health`` and the page needs ``Authorization: Bearer KEY``.
JSON routes need ``Content-Type: application/json`` (so a cross-site form cannot post to them). A body
over ``INLINE_BODY_BYTES`` is parsed and tokenized in a worker thread, so a long prompt never stalls the
event loop; a smaller one (~50 us of work) inline, since the thread hop costs more than that and, under
a burst, waits for the GIL behind the engine. A client that disconnects cancels its
requests, streamed or not, and frees their KV-cache slots at the engine's next step.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from mtnlg.checkpoint.inference import pretrained_tokenizer
from mtnlg.checkpoint.resolve import resolve_checkpoint
from mtnlg.errors import ConfigError
from mtnlg.infer.guard import GuardMiddleware, Slices, error_response, generation_route, read_body
from mtnlg.infer.httpd import BackgroundServer, run_app
from mtnlg.infer.metrics import render_metrics
from mtnlg.infer.sse import event_stream, wait_disconnect
from mtnlg.infer.scheduler import Engine, EngineStopped, Output, QueueFull, RequestTooLong
from mtnlg.infer.protocol import (ABORTED, ApiError, Choice, GenerationRequest, TextCodec, bad, get_field, int_list,
                                  openers, parse_chat, parse_completion, parse_json, parse_poem_request,
                                  render_choice, render_delta, seeded, usage)

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).parent / "web"
WEB_FILES = {"chat.css": "text/css", "chat.js": "text/javascript"}
INLINE_BODY_BYTES = 8 << 10  # bodies up to this size are parsed and tokenized on the event loop
MAX_POEMS_WAITING = 8  # poem requests are answered one at a time; more than this waiting get 429


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
        except RequestTooLong as e:  # OpenAI's code for it: a client can drop earlier turns and retry
            raise ApiError(400, str(e), param=req.max_tokens_name, code="context_length_exceeded") from None
        if req.params.min_new_tokens > req.max_tokens:
            raise bad("min_tokens", f"'min_tokens' ({req.params.min_new_tokens}) is more than {req.max_tokens_name} "
                                    f"({req.max_tokens}); lower min_tokens or raise {req.max_tokens_name}")
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
        watcher = asyncio.ensure_future(wait_disconnect(receive))
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

    async def respond(self, receive: Callable, raw: bytes, parse: Callable[..., GenerationRequest]) -> Any:
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

            return event_stream(choices, queue, chunk, openers(req, choices), render,
                                 (lambda: usage(choices, req.prompts)) if req.include_usage else None)
        if not await self.collect(choices, queue, receive):
            return Response(status_code=499)  # nobody is listening
        if any(c.finish_reason == "abort" for c in choices):
            raise ApiError(503, ABORTED["error"]["message"], type_="server_error", code="generation_aborted")
        out = [render_choice(req, self.codec, c) for c in sorted(choices, key=lambda c: c.index)]
        return {**head, "object": "chat.completion" if chat else "text_completion", "choices": out,
                "usage": usage(choices, req.prompts)}


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
    slices = Slices()
    routes = {"/v1/completions": generation_route(lambda rcv, raw: srv.respond(rcv, raw, parse_completion), slices),
              "/v1/chat/completions": generation_route(lambda rcv, raw: srv.respond(rcv, raw, parse_chat), slices)}
    app.add_middleware(GuardMiddleware, srv=srv, api_key=api_key, routes=routes)

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
        try:
            text = await run_in_threadpool(render_metrics, srv.engine, srv.http_requests)  # may ask the engine process
        except EngineStopped as e:
            return error_response(503, str(e), type_="server_error", code="engine_dead")
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

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
        return await run_in_threadpool(tokenize_body, await read_body(request.receive))

    @app.post("/detokenize")
    async def detokenize(request: Request):
        return await run_in_threadpool(detokenize_body, await read_body(request.receive))

    # -- generation: POST /v1/completions and /v1/chat/completions are answered by the guard (guard.py) ------
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
        return await run_in_threadpool(poem_body, await read_body(request.receive))

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
