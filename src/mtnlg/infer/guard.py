"""The server's front door, in pure ASGI: checks every request, counts every answer, and runs the
generation routes directly.

:class:`GuardMiddleware` is the app's outer layer (only Starlette's error handler is outside it): the
Bearer key on every route but /health and the page, ``Content-Type: application/json`` on JSON routes
(415), the declared body size (413), HTTP request counting for /metrics, a JSON 500 instead of a
traceback. ``POST /v1/completions`` and
``POST /v1/chat/completions`` (given as ``routes``) are then answered here by :func:`generation_route`
instead of through FastAPI's middleware stack, router and dependency solver: those layers cost ~0.2 ms
of the event loop per request, and a burst of 16 requests is parsed one after another on that one
loop before the median request's first token (``benchmarks/serve.py``). Every other route is FastAPI's.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi.responses import JSONResponse, RedirectResponse, Response
from starlette.datastructures import URL

from mtnlg.errors import ConfigError
from mtnlg.infer.fields import MAX_BODY_BYTES, ApiError, bad, error_body, too_large
from mtnlg.infer.httpd import DRAIN_CAP

log = logging.getLogger(__name__)

JSON_ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/poem", "/tokenize", "/detokenize")
KNOWN_ROUTES = (*JSON_ROUTES, "/v1/models", "/health", "/metrics", "/")


def error_response(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)


def is_open(path: str) -> bool:
    """The routes that never need the key: the health check and the static page."""
    return path in ("/health", "/") or path.startswith("/web/")


async def read_body(receive: Callable) -> bytes:
    """The body, at most 1 MiB (413 beyond; the rest is read and dropped so the client gets the answer)."""
    chunks, size = [], 0
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


class Slices:
    """Turns for request parsing on the event loop, so a burst does not hold up the streams.

    asyncio runs every callback that is ready when an iteration of the loop begins before it looks at
    anything new, and a burst of N requests makes N parse-and-submit steps (~0.4 ms each) ready at
    once: the first tokens of the burst's first requests, back from the engine meanwhile, waited for
    all N (traced: a 16-request burst's first tokens all left together, 16 ms after it arrived, the
    first of them 9 ms after the engine had sent it). Parsing now takes at most ``budget`` seconds of an
    iteration; a request past it waits for the next iteration, behind the outputs that arrived."""

    def __init__(self, budget: float = 0.001):
        self.budget = budget
        self.start: float | None = None

    async def turn(self) -> None:
        while True:
            now = time.perf_counter()
            if self.start is None:  # the first parse of this iteration opens its slice
                self.start = now
                asyncio.get_running_loop().call_soon(self._close)  # runs in the next iteration
                return
            if now - self.start <= self.budget:
                return
            await asyncio.sleep(0)  # to the next iteration

    def _close(self) -> None:
        self.start = None


def generation_route(respond: Callable[[Callable, bytes], Awaitable[Any]], slices: Slices) -> Callable:
    """An ASGI app answering a generation request with ``respond(receive, body)`` (a dict or a Response),
    errors as the app's exception handlers answer them; parsing takes its turn in ``slices``."""

    async def route(scope: dict, receive: Callable, send: Callable) -> None:
        await slices.turn()
        try:
            result = await respond(receive, await read_body(receive))
            response = result if isinstance(result, Response) else JSONResponse(result)
        except ApiError as e:
            response = error_response(e.status, e.message, e.type, e.param, e.code, e.headers)
        except ConfigError as e:
            response = error_response(400, str(e))
        await response(scope, receive, send)

    return route


class GuardMiddleware:
    """Pure ASGI (so streaming and disconnects pass straight through): the Bearer key on every route but
    /health and the page, ``Content-Type: application/json`` on JSON routes (415), the declared body size
    (413), HTTP request counting for /metrics, and a JSON 500 instead of a traceback if anything escapes.
    A rejected body is read and dropped (up to ``DRAIN_CAP``) before answering, so every client sees the
    answer instead of a connection reset."""

    def __init__(self, app: Any, srv: Any, api_key: str | None, routes: dict[str, Callable] | None = None):
        self.app, self.srv, self.api_key = app, srv, api_key
        self.routes = routes or {}

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
        route = self.routes.get(path)
        if route is None and path.endswith("/") and path.rstrip("/") in self.routes:  # as FastAPI's redirect_slashes
            url = URL(scope=scope).replace(path=path.rstrip("/"))
            await RedirectResponse(str(url), status_code=307)(scope, receive, send_wrapper)
            return
        try:
            if route is None:
                await self.app(scope, receive, send_wrapper)
            elif scope.get("method") == "POST":
                await route(scope, receive, send_wrapper)
            else:
                await error_response(405, "Method Not Allowed", headers={"Allow": "POST"})(scope, receive, send_wrapper)
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


def _count(srv: Any, path: str, status: int) -> None:
    key = (path if path in KNOWN_ROUTES else "other", status)
    srv.http_requests[key] = srv.http_requests.get(key, 0) + 1


__all__ = ["GuardMiddleware", "Slices", "error_response", "generation_route", "is_open", "read_body"]
