"""Running an ASGI app under uvicorn: the server behind ``mtnlg serve``, and in a thread for tests and benchmarks.

uvicorn runs on uvloop (where installed: not on Windows) with its httptools protocol, the C parser
(llhttp) that vLLM's server runs on too: measured against the pure-Python h11 on asyncio, alternated
three times each on this 2-core box (``benchmarks/serve.py``, 2026-12-01), output tokens/s at 16
concurrent streams 3,000-3,980 -> 4,270-5,140 (``throughput_ratio_16`` 5.7-6.0 -> 6.4-8.8, six runs),
since every request's head and every streamed event are parsed and framed on the server's one event
loop. Two changes to uvicorn's protocol (see :func:`http_protocol`): oversized headers get 431 with a
JSON body, and a rejected connection is closed gracefully so the client reads the answer. The listening
sockets are bound here (:func:`bind_sockets`), so an address in use is one line naming ``--port``.
"""

from __future__ import annotations

import errno
import json
import logging
import socket
import threading
import time
from typing import Any

from mtnlg.errors import ConfigError
from mtnlg.infer.fields import error_body

DRAIN_CAP = 64 << 20  # a rejected body up to this size is read and dropped, so the client sees the answer
MAX_HEADER_BYTES = 64 << 10  # the request line and headers together; more gets 431


class HeadersTooLarge(Exception):
    """The request line and headers passed ``MAX_HEADER_BYTES``."""


def http_protocol() -> type:
    """uvicorn's httptools protocol with two changes. A request the parser rejects (a malformed
    request line, or a request line and headers over ``MAX_HEADER_BYTES``) gets 400 or 431 as an
    OpenAI-shaped JSON error; the head is measured as it arrives, so an endless header is cut off at
    the limit, not buffered. And the connection closes gracefully: after the answer our side is shut
    for writing and what the client still sends is read and dropped (up to ``DRAIN_CAP`` bytes or
    10 s), so the client reads the answer instead of a connection reset."""
    import httptools
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class Parser:
        """The parser, remembering the error it raised (uvicorn's handler does not pass it on)."""

        def __init__(self, parser: Any, protocol: Any):
            self._parser, self._protocol = parser, protocol

        def feed_data(self, data: bytes) -> None:
            try:
                self._parser.feed_data(data)
            except httptools.HttpParserError as e:
                self._protocol._error = e
                raise

        def __getattr__(self, name: str) -> Any:
            return getattr(self._parser, name)

    class Protocol(HttpToolsProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.parser = Parser(self.parser, self)
            self._discarded: int | None = None
            self._error: Exception | None = None
            self._in_head, self._head_bytes, self._too_large = True, 0, False

        def data_received(self, data: bytes) -> None:
            if self._discarded is not None:
                self._discarded += len(data)
                if self._discarded > DRAIN_CAP:
                    self.transport.close()
                return
            if self._in_head:
                self._head_bytes += len(data)
            super().data_received(data)
            # still inside the head after this chunk: every byte so far was head; past the limit, answer
            # now instead of buffering more of it
            if self._in_head and self._head_bytes > MAX_HEADER_BYTES and self._discarded is None:
                self._too_large = True
                self.send_400_response("")

        def on_headers_complete(self) -> None:
            if len(self.url) + sum(len(k) + len(v) + 4 for k, v in self.headers) > MAX_HEADER_BYTES:
                self._too_large = True
                raise HeadersTooLarge  # the parser stops; uvicorn answers through send_400_response
            self._in_head, self._head_bytes = False, 0
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._in_head = True  # the next request on this connection starts with its head

        def send_400_response(self, msg: str) -> None:
            status = 431 if self._too_large else 400
            if status == 431:
                text = f"the request headers are too large; the limit is {MAX_HEADER_BYTES // 1024} KiB"
            else:
                text = f"invalid HTTP request ({self._error or msg})"
            body = json.dumps(error_body(text, code="bad_http_request")).encode()
            head = (f"HTTP/1.1 {status} {'Request Header Fields Too Large' if status == 431 else 'Bad Request'}\r\n"
                    f"content-type: application/json\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n")
            self.transport.write(head.encode() + body)
            if self.transport.can_write_eof():
                self.transport.write_eof()
            self._discarded = 0
            self.loop.call_later(10.0, self.transport.close)

    return Protocol


def uvicorn_config(app: Any, **kwargs: Any) -> Any:
    import uvicorn

    return uvicorn.Config(app, http=http_protocol(), loop="auto", timeout_graceful_shutdown=None, **kwargs)


def bind_sockets(host: str, port: int) -> list[socket.socket]:
    """Sockets bound to every address of ``host`` on ``port``, as uvicorn (asyncio's ``create_server``)
    binds them: ``SO_REUSEADDR``, IPv6 sockets IPv6-only. A port in use, a port that needs root, or a host
    that is not this machine's is a one-line :class:`ConfigError` naming ``--port`` or ``--host``."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        raise ConfigError(f"--host {host}: not an address or a known host name ({getattr(e, 'strerror', e)})") \
            from None
    socks: list[socket.socket] = []
    try:
        for family, type_, proto, _, addr in dict.fromkeys(infos):
            try:
                sock = socket.socket(family, type_, proto)
            except OSError:  # an address family this machine lacks (asyncio skips it too)
                continue
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
        if not socks:
            raise OSError(errno.EAFNOSUPPORT, "no usable address family")
    except OSError as e:
        for sock in socks:
            sock.close()
        where = f"{host}:{port}"
        if e.errno == errno.EADDRINUSE:
            msg = f"--port {port}: {where} is already in use (another server?); choose another port with --port"
        elif e.errno == errno.EACCES:
            msg = f"--port {port}: permission denied listening on {where} (ports below 1024 need root); choose " \
                  f"another port with --port"
        elif e.errno == errno.EADDRNOTAVAIL:
            msg = f"--host {host}: not an address of this machine (cannot listen on {where})"
        else:
            msg = f"--port {port}: cannot listen on {where} ({e.strerror or e})"
        raise ConfigError(msg) from None
    return socks


def check_address(host: str, port: int) -> None:
    """Fail now, before a model is loaded, when ``host:port`` cannot be listened on (:func:`bind_sockets`)."""
    for sock in bind_sockets(host, port):
        sock.close()


def run_app(app: Any, host: str, port: int) -> None:
    """Serve ``app`` on ``host:port`` until interrupted (Ctrl-C drains in-flight requests)."""
    import uvicorn

    level = logging.getLogger().getEffectiveLevel()  # MTNLG_LOG_LEVEL, set by the CLI
    socks = bind_sockets(host, port)  # a one-line ConfigError, not uvicorn's multi-line ERROR and exit 3
    shown = host or "0.0.0.0"
    url = f"http://{f'[{shown}]' if ':' in shown else shown}:{socks[0].getsockname()[1]}"

    class Server(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            if self.started:  # given sockets, uvicorn leaves its "running on" line out
                logging.getLogger("uvicorn.error").info("Uvicorn running on %s (Press CTRL+C to quit)", url)

    try:  # access lines at INFO and below, as the rest of the log
        Server(uvicorn_config(app, host=host, port=port, log_level=level,
                              access_log=level <= logging.INFO)).run(sockets=socks)
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled, after the graceful shutdown
        pass
    finally:
        for sock in socks:
            sock.close()


class BackgroundServer:
    """Run an app under uvicorn in a daemon thread on ``host`` and a free port (tests, benchmarks).

    ``stop()`` shuts down like Ctrl-C does: no new connections, in-flight requests finish, the engine drains.
    """

    def __init__(self, app: Any, host: str = "127.0.0.1"):
        import socket

        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.server = uvicorn.Server(uvicorn_config(app, log_level="warning", lifespan="on"))
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
