"""Running an ASGI app under uvicorn: the server behind ``mtnlg serve``, and in a thread for tests and benchmarks.

uvicorn's h11 protocol is used with two changes (see :func:`h11_protocol`): oversized headers get 431
with a JSON body, and a rejected connection is closed gracefully so the client reads the answer.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from mtnlg.infer.fields import error_body

DRAIN_CAP = 64 << 20  # a rejected body up to this size is read and dropped, so the client sees the answer
MAX_HEADER_BYTES = 64 << 10  # the request line and headers together; more gets 431


def h11_protocol() -> type:
    """uvicorn's h11 protocol with two changes. A request that h11 rejects (headers over
    ``MAX_HEADER_BYTES``, a malformed request line) gets the status h11 suggests (431 for oversized
    headers) as an OpenAI-shaped JSON error. And the connection closes gracefully: after the answer
    our side is shut for writing and what the client still sends is read and dropped (up to
    ``DRAIN_CAP`` bytes or 10 s), so the client reads the answer instead of a connection reset."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._discarded: int | None = None
            self._h11_error: Exception | None = None
            next_event = self.conn.next_event

            def remember_error() -> Any:
                try:
                    return next_event()
                except h11.RemoteProtocolError as e:
                    self._h11_error = e
                    raise

            self.conn.next_event = remember_error  # type: ignore[method-assign]

        def data_received(self, data: bytes) -> None:
            if self._discarded is None:
                super().data_received(data)
                return
            self._discarded += len(data)
            if self._discarded > DRAIN_CAP:
                self.transport.close()

        def send_400_response(self, msg: str) -> None:
            status = getattr(self._h11_error, "error_status_hint", 400) or 400
            if status == 431:
                text = f"the request headers are too large; the limit is {MAX_HEADER_BYTES // 1024} KiB"
            else:
                text = f"invalid HTTP request ({self._h11_error or msg})"
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

    return uvicorn.Config(app, http=h11_protocol(), h11_max_incomplete_event_size=MAX_HEADER_BYTES,
                          timeout_graceful_shutdown=None, **kwargs)


def run_app(app: Any, host: str, port: int) -> None:
    """Serve ``app`` on ``host:port`` until interrupted (Ctrl-C drains in-flight requests)."""
    import logging

    import uvicorn

    level = logging.getLogger().getEffectiveLevel()  # MTNLG_LOG_LEVEL, set by the CLI
    try:  # access lines at INFO and below, as the rest of the log
        uvicorn.Server(uvicorn_config(app, host=host, port=port, log_level=level,
                                      access_log=level <= logging.INFO)).run()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled, after the graceful shutdown
        pass


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
