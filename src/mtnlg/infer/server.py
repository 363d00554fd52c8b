"""An OpenAI-compatible HTTP server (FastAPI + uvicorn) over the continuous-batching :class:`Engine`.

::

    POST /v1/completions        prompt (str | [str] | [int] | [[int]]) -> text_completion
    POST /v1/chat/completions   messages (system/user/assistant) -> chat.completion (role-token template)
    GET  /v1/models   GET /health   GET /metrics (Prometheus text)   POST /tokenize   POST /detokenize
    GET  /            the chat web page (mtnlg/infer/web)

The contract follows OpenAI as vLLM serves it: ``stream=true`` sends ``data: {json}`` server-sent
events, a final usage chunk when ``stream_options.include_usage`` is set, then ``data: [DONE]``. Every
error is ``{"error": {"message", "type", "param", "code"}}``: request bodies are parsed and checked
here field by field (so a wrong type names the field instead of dumping a validator's report), and
no exception reaches the client as a traceback.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mtnlg.data.tokenizer import END_OF_TURN, ROLE_TOKENS
from mtnlg.errors import ConfigError
from mtnlg.infer.engine import Engine, EngineStopped, Output, QueueFull, RequestTooLong, TokenLogprob, merge_outputs
from mtnlg.infer.engine import Request as EngineRequest
from mtnlg.infer.sampling import SamplingParams

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20  # 1 MiB
MAX_N = 16
MAX_STOP = 16
MAX_LOGPROBS = 20
WEB_DIR = Path(__file__).parent / "web"
WEB_FILES = {"chat.css": "text/css", "chat.js": "text/javascript"}


class ApiError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}


def error_response(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _bad(param: str, message: str) -> ApiError:
    return ApiError(400, message, param=param)


# -- request parsing ---------------------------------------------------------------------------------------
async def read_json(request: Request) -> dict[str, Any]:
    """The body as a JSON object: 413 over 1 MiB, 400 when it is not valid JSON or not an object."""
    length = request.headers.get("content-length")
    if length is not None:
        try:
            too_big = int(length) > MAX_BODY_BYTES
        except ValueError:
            raise _bad("body", "the Content-Length header is not a number") from None
        if too_big:
            raise ApiError(413, f"the request body is {length} bytes; the limit is {MAX_BODY_BYTES} bytes (1 MiB)",
                           code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ApiError(413, f"the request body exceeds the limit of {MAX_BODY_BYTES} bytes (1 MiB)",
                           code="request_too_large")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        raise _bad("body", "the request body is empty; send a JSON object")

    def no_constants(name: str) -> None:
        raise ValueError(f"{name} is not valid JSON")

    try:
        body = json.loads(raw, parse_constant=no_constants)
    except UnicodeDecodeError:
        raise _bad("body", "the request body is not valid UTF-8") from None
    except (ValueError, RecursionError) as e:
        msg = e.msg if isinstance(e, json.JSONDecodeError) else str(e)
        raise _bad("body", f"the request body is not valid JSON ({msg})") from None
    if not isinstance(body, dict):
        raise _bad("body", f"the request body must be a JSON object, got {type(body).__name__}")
    return body


_TYPE_NAMES = {"int": "an integer", "number": "a number", "bool": "a boolean", "str": "a string"}


def get_field(body: dict[str, Any], name: str, kind: str, default: Any = None, lo: float | None = None,
              hi: float | None = None, lo_open: bool = False) -> Any:
    """``body[name]`` checked to be of ``kind`` (int | number | bool | str) and within [lo, hi]; null = default."""
    value = body.get(name)
    if value is None:
        return default
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
    }[kind]
    if not ok:
        raise _bad(name, f"'{name}' must be {_TYPE_NAMES[kind]}, got {_json_type(value)}")
    if kind == "number":
        value = float(value)
        if not math.isfinite(value):
            raise _bad(name, f"'{name}' must be a finite number")
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise _bad(name, f"'{name}' must be {'>' if lo_open else '>='} {lo}, got {value}")
    if hi is not None and value > hi:
        raise _bad(name, f"'{name}' must be <= {hi}, got {value}")
    return value


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _string_list(body: dict[str, Any], name: str, limit: int) -> list[str]:
    value = body.get(name)
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise _bad(name, f"'{name}' must be a string or an array of strings")
    if len(value) > limit:
        raise _bad(name, f"'{name}' has {len(value)} entries; at most {limit} are allowed")
    return [s for s in value if s]


def _int_list(body: dict[str, Any], name: str) -> list[int]:
    value = body.get(name)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise _bad(name, f"'{name}' must be an array of integers")
    return value


def sampling_from_body(body: dict[str, Any], stop_ids: list[int], top_logprobs: int | None) -> SamplingParams:
    """The per-request :class:`SamplingParams` from the OpenAI (plus vLLM extra) fields."""
    top_k = get_field(body, "top_k", "int", 0, lo=-1)
    so = body.get("stream_options")
    if so is not None and (not isinstance(so, dict) or not isinstance(so.get("include_usage", False), bool)):
        raise _bad("stream_options", "'stream_options' must be an object like {\"include_usage\": true}")
    seed = get_field(body, "seed", "int")
    if seed is not None and not -(2**63) <= seed < 2**63:
        raise _bad("seed", "'seed' must fit in 64 bits")
    extra_stop_ids = _int_list(body, "stop_token_ids")
    return SamplingParams(
        temperature=get_field(body, "temperature", "number", 1.0, lo=0, hi=100),
        top_p=get_field(body, "top_p", "number", 1.0, lo=0, hi=1, lo_open=True),
        top_k=max(top_k, 0),
        min_p=get_field(body, "min_p", "number", 0.0, lo=0, hi=1),
        presence_penalty=get_field(body, "presence_penalty", "number", 0.0, lo=-2, hi=2),
        frequency_penalty=get_field(body, "frequency_penalty", "number", 0.0, lo=-2, hi=2),
        repetition_penalty=get_field(body, "repetition_penalty", "number", 1.0, lo=0, hi=100, lo_open=True),
        seed=None if seed is None else seed % (2**63),
        stop=_string_list(body, "stop", MAX_STOP),
        stop_token_ids=list(stop_ids) + extra_stop_ids,
        logprobs=top_logprobs,
        ignore_eos=get_field(body, "ignore_eos", "bool", False),
    )


def chat_prompt(messages: Any, tokenizer: Any) -> list[int]:
    """The chat template: ``<|role|>content<|end|>`` per message, then ``<|assistant|>`` to answer."""
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "'messages' must be a non-empty array of {\"role\", \"content\"} objects")
    text = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _bad("messages", f"messages[{i}] must be an object with 'role' and 'content'")
        role = m.get("role")
        if role == "developer":
            role = "system"
        if role not in ROLE_TOKENS:
            raise _bad("messages", f"messages[{i}].role must be one of {sorted(ROLE_TOKENS)}, got {role!r}")
        content = m.get("content")
        if isinstance(content, list):  # content parts: keep the text ones
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise _bad("messages", f"messages[{i}].content parts must be {{\"type\": \"text\", \"text\": ...}}")
            content = "".join(p["text"] for p in content)
        elif content is None and role == "assistant":
            content = ""
        if not isinstance(content, str):
            raise _bad("messages", f"messages[{i}].content must be a string")
        text.append(f"{ROLE_TOKENS[role]}{content}{END_OF_TURN}")
    text.append(ROLE_TOKENS["assistant"])
    return tokenizer.encode("".join(text))


# -- response building -------------------------------------------------------------------------------------
def _token_text(tokenizer: Any, tok: int) -> str:
    return tokenizer.token_bytes(tok).decode("utf-8", errors="replace")


class _Choice:
    """One running generation (a prompt x one of n) and what it produced so far."""

    def __init__(self, index: int, prompt_ids: list[int], prefix: str):
        self.index = index
        self.prompt_ids = prompt_ids
        self.prefix = prefix  # the echoed prompt
        self.req: EngineRequest | None = None
        self.outputs: list[Output] = []
        self.text = ""
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.finish_reason: str | None = None
        self.completion_tokens = 0


class OpenAIServer:
    """Request handling shared by the endpoints: submit choices to the engine, collect or stream them."""

    def __init__(self, engine: Engine, model_name: str):
        self.engine = engine
        self.tok = engine.tokenizer
        self.model_name = model_name
        self.created = int(time.time())
        eot = self.tok.token_to_id(END_OF_TURN)
        self.completion_stop_ids = [self.tok.eod_id]
        self.chat_stop_ids = [self.tok.eod_id] + ([eot] if eot is not None else [])
        self.http_requests: dict[tuple[str, int], int] = {}

    # -- helpers ----------------------------------------------------------------------------------------
    def check_model(self, body: dict[str, Any]) -> None:
        model = get_field(body, "model", "str")
        if model is not None and model not in (self.model_name, ""):
            raise ApiError(404, f"The model '{model}' does not exist; this server serves '{self.model_name}'",
                           type_="not_found_error", param="model", code="model_not_found")

    def max_tokens(self, body: dict[str, Any], prompt_len: int, default: int | None, names: tuple[str, ...]) -> int:
        value, name = None, names[0]
        for n in names:
            v = get_field(body, n, "int", None, lo=1)
            if v is not None:
                value, name = v, n
                break
        if value is None:
            value = default if default is not None else self.engine.max_model_len - prompt_len
        try:
            self.engine.check_length(prompt_len, max(value, 1))
        except RequestTooLong as e:
            raise _bad(name, str(e)) from None
        return value

    async def run(self, choices: list[_Choice], params: SamplingParams, max_tokens: int, n_same_seed: int
                  ) -> asyncio.Queue:
        """Submit every choice; their outputs arrive on one queue as (choice, [Output])."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        if self.engine.queue_depth + len(choices) > self.engine.max_queue:
            raise ApiError(429, f"the server is busy ({self.engine.queue_depth} requests waiting); retry later",
                           type_="rate_limit_error", code="rate_limit_exceeded", headers={"Retry-After": "1"})
        submitted = []
        try:
            for c in choices:
                p = params
                if params.seed is not None and c.index % n_same_seed:
                    p = _replace(params, seed=(params.seed + c.index % n_same_seed) % (2**63))
                c.req = self.engine.submit(c.prompt_ids, p, max_tokens,
                                           sink=lambda outs, c=c: queue.put_nowait((c, outs)), loop=loop)
                submitted.append(c.req)
        except QueueFull as e:
            for r in submitted:
                r.cancel()
            raise ApiError(429, str(e), type_="rate_limit_error", code="rate_limit_exceeded",
                           headers={"Retry-After": "1"}) from None
        except EngineStopped as e:
            for r in submitted:
                r.cancel()
            raise ApiError(503, str(e), type_="server_error", code="service_unavailable") from None
        except ConfigError as e:
            for r in submitted:
                r.cancel()
            raise _bad("prompt", str(e)) from None
        return queue

    @staticmethod
    async def collect(choices: list[_Choice], queue: asyncio.Queue) -> None:
        pending = len(choices)
        try:
            while pending:
                c, outs = await queue.get()
                for o in outs:
                    c.text += o.text
                    c.token_ids += o.token_ids
                    if o.logprobs:
                        c.logprobs += o.logprobs
                    if o.finish_reason is not None:
                        c.finish_reason = o.finish_reason
                        c.completion_tokens = o.completion_tokens
                        pending -= 1
        finally:
            for c in choices:
                if c.req is not None and c.finish_reason is None:
                    c.req.cancel()

    def usage(self, choices: list[_Choice], prompts: list[list[int]]) -> dict[str, int]:
        prompt = sum(len(p) for p in prompts)
        completion = sum(c.completion_tokens for c in choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def completion_logprobs(self, lps: list[TokenLogprob], offset: int) -> dict[str, Any]:
        tokens, token_lps, tops, offsets = [], [], [], []
        for lp in lps:
            t = _token_text(self.tok, lp.token_id)
            tokens.append(t)
            token_lps.append(lp.logprob)
            tops.append({_token_text(self.tok, i): v for i, v in lp.top})
            offsets.append(offset)
            offset += len(t)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

    def chat_logprobs(self, lps: list[TokenLogprob]) -> dict[str, Any]:
        def entry(tok: int, lp: float) -> dict[str, Any]:
            return {"token": _token_text(self.tok, tok), "logprob": lp, "bytes": list(self.tok.token_bytes(tok))}

        return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(i, v) for i, v in lp.top]}
                            for lp in lps]}


async def _coalesced(queue: asyncio.Queue) -> list[tuple[_Choice, Output]]:
    """Wait for output, then take everything queued so far, merged into one event per choice: when the
    client side falls behind the engine, several tokens travel in one SSE event instead of many."""
    items = [await queue.get()]
    while not queue.empty():
        items.append(queue.get_nowait())
    merged: dict[int, tuple[_Choice, list[Output]]] = {}
    for c, outs in items:
        merged.setdefault(c.index, (c, []))[1].extend(outs)
    return [(c, merge_outputs(outs)) for c, outs in merged.values()]


ABORTED = {"error": {"message": "generation stopped: the engine failed or is shutting down", "type": "server_error",
                     "param": None, "code": "generation_aborted"}}


def _raise_if_aborted(choices: list[_Choice]) -> None:
    if any(c.finish_reason == "abort" for c in choices):
        raise ApiError(503, ABORTED["error"]["message"], type_="server_error", code="generation_aborted")


def _replace(params: SamplingParams, **changes: Any) -> SamplingParams:
    import dataclasses

    return dataclasses.replace(params, **changes)


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


# -- the app -----------------------------------------------------------------------------------------------
def create_app(engine: Engine, model_name: str = "mtnlg", api_key: str | None = None) -> FastAPI:
    """The FastAPI app. The engine loop starts with the app and drains (in-flight requests finish) at shutdown."""
    api_key = api_key if api_key is not None else (os.environ.get("MTNLG_API_KEY") or None)
    srv = OpenAIServer(engine, model_name)

    from contextlib import asynccontextmanager

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
        return PlainTextResponse(render_metrics(srv), media_type="text/plain; version=0.0.4")

    # -- tokenizer --------------------------------------------------------------------------------------
    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await read_json(request)
        if "messages" in body:
            ids = chat_prompt(body["messages"], srv.tok)
        else:
            prompt = body.get("prompt")
            if not isinstance(prompt, str):
                raise _bad("prompt", "'prompt' must be a string (or send 'messages')")
            ids = srv.tok.encode(prompt)
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.max_model_len}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = await read_json(request)
        ids = _int_list(body, "tokens")
        if "tokens" not in body:
            raise _bad("tokens", "'tokens' (an array of token ids) is required")
        bad = [t for t in ids if not 0 <= t < srv.tok.vocab_size]
        if bad:
            raise _bad("tokens", f"token id {bad[0]} is outside the vocabulary [0, {srv.tok.vocab_size})")
        return {"prompt": srv.tok.decode(ids)}

    # -- completions ------------------------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_json(request)
        srv.check_model(body)
        prompts = _prompts(body, srv.tok)
        n = get_field(body, "n", "int", 1, lo=1, hi=MAX_N)
        logprobs = get_field(body, "logprobs", "int", None, lo=0, hi=MAX_LOGPROBS)
        echo = get_field(body, "echo", "bool", False)
        stream = get_field(body, "stream", "bool", False)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage")) if stream else False
        params = sampling_from_body(body, srv.completion_stop_ids, logprobs)
        max_tokens = srv.max_tokens(body, max(len(p) for p in prompts), 16, ("max_tokens",))
        choices = [_Choice(i * n + j, p, srv.tok.decode(p) if echo else "")
                   for i, p in enumerate(prompts) for j in range(n)]
        queue = await srv.run(choices, params, max_tokens, n)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(choice_list: list[dict], usage: dict | None = None) -> dict:
            return {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                    "choices": choice_list, **({"usage": usage} if include_usage else {})}

        if stream:
            offsets = {c.index: len(c.prefix) for c in choices}

            def render(c: _Choice, o: Output) -> dict:
                lp = None
                if logprobs is not None and o.logprobs:
                    lp = srv.completion_logprobs(o.logprobs, offsets[c.index])
                offsets[c.index] += len(o.text)
                return {"index": c.index, "text": o.text, "logprobs": lp, "finish_reason": o.finish_reason}

            openers = [{"index": c.index, "text": c.prefix, "logprobs": None, "finish_reason": None}
                       for c in choices if c.prefix]
            return _sse_response(choices, queue, chunk, openers, render,
                                 (lambda: srv.usage(choices, prompts)) if include_usage else None)

        await srv.collect(choices, queue)
        _raise_if_aborted(choices)
        out = []
        for c in sorted(choices, key=lambda c: c.index):
            lp = srv.completion_logprobs(c.logprobs, len(c.prefix)) if logprobs is not None else None
            out.append({"index": c.index, "text": c.prefix + c.text, "logprobs": lp,
                        "finish_reason": c.finish_reason})
        return {"id": rid, "object": "text_completion", "created": created, "model": model_name, "choices": out,
                "usage": srv.usage(choices, prompts)}

    # -- chat -------------------------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await read_json(request)
        srv.check_model(body)
        if "messages" not in body:
            raise _bad("messages", "'messages' is required")
        prompt = chat_prompt(body["messages"], srv.tok)
        n = get_field(body, "n", "int", 1, lo=1, hi=MAX_N)
        want_lp = get_field(body, "logprobs", "bool", False)
        top = get_field(body, "top_logprobs", "int", 0, lo=0, hi=MAX_LOGPROBS)
        stream = get_field(body, "stream", "bool", False)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage")) if stream else False
        params = sampling_from_body(body, srv.chat_stop_ids, top if want_lp else None)
        max_tokens = srv.max_tokens(body, len(prompt), None, ("max_completion_tokens", "max_tokens"))
        choices = [_Choice(j, prompt, "") for j in range(n)]
        queue = await srv.run(choices, params, max_tokens, n)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(choice_list: list[dict], usage: dict | None = None) -> dict:
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                    "choices": choice_list, **({"usage": usage} if include_usage else {})}

        if stream:
            def render(c: _Choice, o: Output) -> dict:
                lp = srv.chat_logprobs(o.logprobs) if want_lp and o.logprobs else None
                delta = {"content": o.text} if o.text or o.finish_reason is None else {}
                return {"index": c.index, "delta": delta, "logprobs": lp, "finish_reason": o.finish_reason}

            openers = [{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                        "finish_reason": None} for c in choices]
            return _sse_response(choices, queue, chunk, openers, render,
                                 (lambda: srv.usage(choices, [prompt])) if include_usage else None)

        await srv.collect(choices, queue)
        _raise_if_aborted(choices)
        out = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                "logprobs": srv.chat_logprobs(c.logprobs) if want_lp else None, "finish_reason": c.finish_reason}
               for c in choices]
        return {"id": rid, "object": "chat.completion", "created": created, "model": model_name, "choices": out,
                "usage": srv.usage(choices, [prompt])}

    return app



def _sse_response(choices: list[_Choice], queue: asyncio.Queue, chunk: Callable[..., dict], openers: list[dict],
                  render: Callable[[_Choice, Output], dict], usage: Callable[[], dict] | None) -> StreamingResponse:
    """The SSE body shared by /v1/completions and /v1/chat/completions: the opening chunks, one chunk
    per engine output (``render`` shapes its choice), the usage chunk when asked, then ``[DONE]``.
    A client that goes away cancels its unfinished requests at once, freeing their KV-cache slots."""

    async def events() -> AsyncIterator[str]:
        pending = len(choices)
        try:
            for opener in openers:
                yield _sse(chunk([opener], None))
            while pending:
                for c, o in await _coalesced(queue):
                    if o.finish_reason == "abort":
                        yield _sse(ABORTED)
                        return
                    if o.finish_reason is not None:
                        c.finish_reason, c.completion_tokens = o.finish_reason, o.completion_tokens
                        pending -= 1
                    yield _sse(chunk([render(c, o)], None))
            if usage is not None:
                yield _sse(chunk([], usage()))
            yield "data: [DONE]\n\n"
        finally:
            for c in choices:
                if c.req is not None and c.finish_reason is None:
                    c.req.cancel()

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class GuardMiddleware:
    """Pure ASGI (so streaming and disconnects pass straight through): the Bearer key on /v1/*, HTTP
    request counting for /metrics, and a JSON 500 instead of a traceback if anything escapes."""

    def __init__(self, app: Any, srv: OpenAIServer, api_key: str | None):
        self.app, self.srv, self.api_key = app, srv, api_key

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if self.api_key and path.startswith("/v1/"):
            auth = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not _same(token.strip(), self.api_key):
                _count(self.srv, path, 401)
                resp = error_response(401, "Incorrect or missing API key: send the header "
                                      "'Authorization: Bearer <key>'", code="invalid_api_key")
                await resp(scope, receive, send)
                return
        started = False

        async def send_wrapper(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                _count(self.srv, path, message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except Exception:
            log.exception("unhandled error on %s", path)
            if not started:
                await error_response(500, "internal server error", type_="server_error")(scope, receive, send_wrapper)


def _same(a: str, b: str) -> bool:
    import hmac

    return hmac.compare_digest(a.encode(), b.encode())


def _count(srv: OpenAIServer, path: str, status: int) -> None:
    known = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/tokenize",
             "/detokenize", "/")
    key = (path if path in known else "other", status)
    srv.http_requests[key] = srv.http_requests.get(key, 0) + 1


def _prompts(body: dict[str, Any], tokenizer: Any) -> list[list[int]]:
    """``prompt`` as token lists: a string, strings, token ids or lists of token ids. An empty
    string starts from the end-of-document token."""
    if "prompt" not in body or body["prompt"] is None:
        raise _bad("prompt", "'prompt' is required")
    p = body["prompt"]
    items: list[Any]
    if isinstance(p, str) or (isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool)
                                                                 for t in p)):
        items = [p]
    elif isinstance(p, list) and p:
        items = p
    else:
        raise _bad("prompt", "'prompt' must be a string, an array of strings, or token ids")
    if len(items) > MAX_N * 4:
        raise _bad("prompt", f"'prompt' has {len(items)} entries; at most {MAX_N * 4} are allowed")
    out = []
    for it in items:
        if isinstance(it, str):
            ids = tokenizer.encode(it)
        elif isinstance(it, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in it):
            ids = list(it)
            bad = [t for t in ids if not 0 <= t < tokenizer.vocab_size]
            if bad:
                raise _bad("prompt", f"prompt token id {bad[0]} is outside the vocabulary [0, {tokenizer.vocab_size})")
        else:
            raise _bad("prompt", "'prompt' must be a string, an array of strings, or token ids")
        out.append(ids or [tokenizer.eod_id])
    return out


def render_metrics(srv: OpenAIServer) -> str:
    """Prometheus text exposition of the engine and HTTP counters."""
    e, m = srv.engine, srv.engine.metrics
    lines = ["# HELP mtnlg_http_requests_total HTTP requests by endpoint and status code.",
             "# TYPE mtnlg_http_requests_total counter"]
    for (path, status), count in sorted(srv.http_requests.items()):
        lines.append(f'mtnlg_http_requests_total{{endpoint="{path}",status="{status}"}} {count}')
    lines += ["# HELP mtnlg_request_success_total Finished generation requests by finish reason.",
              "# TYPE mtnlg_request_success_total counter"]
    for reason in ("stop", "length", "abort"):
        lines.append(f'mtnlg_request_success_total{{finish_reason="{reason}"}} {m.requests_finished.get(reason, 0)}')
    lines += ["# HELP mtnlg_prompt_tokens_total Prompt tokens prefilled.", "# TYPE mtnlg_prompt_tokens_total counter",
              f"mtnlg_prompt_tokens_total {m.prompt_tokens}",
              "# HELP mtnlg_generation_tokens_total Tokens generated.",
              "# TYPE mtnlg_generation_tokens_total counter", f"mtnlg_generation_tokens_total {m.generation_tokens}",
              "# HELP mtnlg_num_requests_waiting Requests waiting for a KV-cache slot (queue depth).",
              "# TYPE mtnlg_num_requests_waiting gauge", f"mtnlg_num_requests_waiting {e.queue_depth}",
              "# HELP mtnlg_num_requests_running Requests in the running batch.",
              "# TYPE mtnlg_num_requests_running gauge", f"mtnlg_num_requests_running {e.num_running}",
              "# HELP mtnlg_kv_cache_slots KV-cache slots (the running-batch limit).",
              "# TYPE mtnlg_kv_cache_slots gauge", f"mtnlg_kv_cache_slots {e.num_slots}"]
    lines += m.render_extra()  # prefix-cache hit rate, request errors
    lines += m.ttft.render("mtnlg_time_to_first_token_seconds", "Time from arrival to the first token.")
    lines += m.itl.render("mtnlg_inter_token_latency_seconds", "Time between consecutive tokens of a request.")
    return "\n".join(lines) + "\n"


def serve(lm: Any, cfg: Any, api_key: str | None = None) -> None:
    """Run the server for ``lm`` (a MegatronLmModel) with a :class:`~mtnlg.config.ServeConfig` until interrupted."""
    import sys

    import uvicorn

    # The engine thread runs Python between its kernels; with the default 5 ms GIL switch interval the
    # HTTP thread would wait up to 5 ms for every hand-off, which shows up directly in TTFT and ITL.
    sys.setswitchinterval(0.0005)
    engine = Engine(lm, max_batch=cfg.max_batch, max_model_len=cfg.max_model_len, max_queue=cfg.max_queue,
                    kv_cache_mb=cfg.kv_cache_mb)
    app = create_app(engine, cfg.model_name, api_key if api_key is not None else cfg.api_key)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info", timeout_graceful_shutdown=None)


class BackgroundServer:
    """Run an app under uvicorn in a daemon thread on ``host`` and a free port (tests, benchmarks).

    ``stop()`` shuts down like Ctrl-C does: no new connections, in-flight requests finish, the engine drains.
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1"):
        import socket
        import threading

        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=None, lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.01)

    def stop(self, timeout: float = 60) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> BackgroundServer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
