"""The continuous-batching engine in its own process (vLLM's "engine core"), for ``mtnlg serve``.

In one process the engine thread and the HTTP event loop share the GIL: while the loop parses a burst
of requests (~1 ms of Python each), every PyTorch operator of the engine's step releases the GIL and
waits to win it back, so a one-row step of ~1-2 ms took 17-22 ms in a traced 16-request wave
(``benchmarks/serve.py``). Here the :class:`~mtnlg.infer.scheduler.Engine` runs in a child process that
loads the same checkpoint; :class:`EngineClient` gives the server the engine's interface (``submit``,
``check_length``, ``queue_depth``, ``metrics``, ``healthy``, ``poem``, ``start``, ``shutdown`` ...) over one
pipe, so the server process holds the tokenizer but no weights:

    server process                                   engine process
    submit / cancel  ── (rid, prompt, params) ──►    Engine.submit (a sink naming the rid)
    reader thread    ◄── one message per step ──     Engine._deliver: [(rid, Output), ...]
        └─ events.deliver: each request's sink on the event loop, one cross-thread call per step
    poem (/v1/poem)  ── (id, text, lines, params) ─► Engine.poem on a thread of its own ── the lines back

Requests are validated in the server process by the same rule the engine applies
(:func:`~mtnlg.infer.decode.checked_request`), so a bad one is refused
before it crosses. The child is started with ``spawn`` (never ``fork``: the parent holds OpenMP and
tokenizer thread pools) and loads the model with ``from_pretrained`` (safetensors, no pickles).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import multiprocessing as mp
import threading
from collections.abc import Callable, Iterator
from multiprocessing.reduction import ForkingPickler
from typing import Any

import torch

from mtnlg.errors import ConfigError
from mtnlg.infer.decode import checked_request, token_budget
from mtnlg.infer.events import EngineStopped, Output, QueueFull, deliver
from mtnlg.infer.metrics import EngineMetrics
from mtnlg.infer.sampling import SamplingParams

log = logging.getLogger(__name__)

START_TIMEOUT = 600.0  # s: loading a large checkpoint in the child
REPLY_TIMEOUT = 10.0  # s: a metrics snapshot
INLINE_SEND_BYTES = 32 << 10  # bigger messages from the event loop go through the writer thread


class RemoteRequest:
    """The server's handle on a request running in the engine process (what :func:`events.deliver` and
    the server use: ``id``, ``sink``, ``loop``, ``cancel()``)."""

    def __init__(self, rid: int, client: EngineClient, sink: Callable[[list[Output]], None], loop: Any):
        self.id, self.client, self.sink, self.loop = rid, client, sink, loop
        self.finished = False

    def cancel(self) -> None:
        if not self.finished:
            with contextlib.suppress(OSError):  # the engine process is gone: nothing left to cancel
                self.client._send(("cancel", self.id))


class EngineClient:
    """An :class:`~mtnlg.infer.scheduler.Engine` over ``checkpoint`` in a child process (see the module
    docstring); ``engine_kwargs`` are the Engine's (``max_batch``, ``max_model_len``, ``max_queue``,
    ``kv_cache_mb``)."""

    def __init__(self, checkpoint: str, device: torch.device, dtype: torch.dtype, tokenizer: Any,
                 **engine_kwargs: Any):
        self.tokenizer = tokenizer
        self._lock = threading.Lock()  # one sender at a time on the pipe
        self._backlog: collections.deque[memoryview] = collections.deque()  # messages for the writer thread
        self._writing = False
        self._writer: threading.Thread | None = None
        self._wake = threading.Event()
        self._ids = itertools.count()
        self._requests: dict[int, RemoteRequest] = {}
        self._reply: dict[tuple[str, int], Any] = {}  # (what, question id) -> the answer
        self._replied = threading.Condition()
        self._stopped = False
        self._crashed = False
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_child_main, name="mtnlg-engine-core", daemon=True,
                                 args=(child, checkpoint, str(device), str(dtype).removeprefix("torch."),
                                       engine_kwargs))
        self._proc.start()
        child.close()
        if not self._conn.poll(START_TIMEOUT):
            self._proc.kill()
            raise RuntimeError(f"the engine process did not start within {START_TIMEOUT:.0f} s")
        try:
            kind, info = self._conn.recv()
        except EOFError:  # it died before it could say why (killed, out of memory)
            self._proc.join(10)
            raise ConfigError(f"the engine process exited while loading {checkpoint} (exit code "
                              f"{self._proc.exitcode}); run with --serve.engine_process=false to see the error "
                              f"in this process") from None
        if kind == "error":
            self._proc.join(10)
            raise ConfigError(info)
        self.max_model_len, self.max_queue, self.num_slots, self.vocab_size = (
            info["max_model_len"], info["max_queue"], info["num_slots"], info["vocab_size"])
        self._reader: Any = None  # the event loop or the thread that reads the pipe (see start)
        self._start_lock = threading.Lock()

    # -- the Engine interface the server uses ----------------------------------------------------------
    def start(self) -> EngineClient:
        """Read the engine's messages on the running event loop (the server's: no thread to wake, no GIL
        to hand over, and outputs reach their streams in the loop's own I/O turn; a reader thread lost
        up to 4 ms to the OS scheduler in a traced burst on 2 cores), or, with no loop, on a thread."""
        with self._start_lock:
            gone = isinstance(self._reader, asyncio.AbstractEventLoop) and self._reader.is_closed()
            if self._reader is not None and not gone:
                return self
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
            if loop is not None:
                self._reader = loop
                loop.add_reader(self._conn.fileno(), self._readable)
            else:
                self._reader = threading.Thread(target=self._read, name="mtnlg-engine-reader", daemon=True)
                self._reader.start()
        return self

    @contextlib.contextmanager
    def incoming(self) -> Iterator[None]:
        """Nothing to hold: the engine runs beside the parsing, not behind it."""
        yield

    @property
    def queue_depth(self) -> int:
        return max(0, len(self._requests) - self.num_slots)

    @property
    def num_running(self) -> int:
        return min(len(self._requests), self.num_slots)

    @property
    def healthy(self) -> bool:
        return not self._crashed and (self._proc.is_alive() or self._stopped)

    def _check_running(self) -> None:
        """Raise :class:`EngineStopped` saying why, when the engine process takes no more work."""
        if self._stopped:
            raise EngineStopped("the server is shutting down")
        if not self.healthy:
            raise EngineStopped("the engine process stopped (killed, or an internal error); restart the server")

    @property
    def metrics(self) -> EngineMetrics:
        """The engine's counters and histograms, fetched from the engine process."""
        return self._ask("metrics")

    def check_length(self, prompt_len: int, max_tokens: int) -> None:
        token_budget(prompt_len, SamplingParams(max_new_tokens=max_tokens), self.max_model_len)

    def submit(self, prompt_ids: list[int], params: SamplingParams, max_tokens: int | None,
               sink: Callable[[list[Output]], None], loop: Any = None) -> RemoteRequest:
        """As :meth:`Engine.submit`: checked here by the engine's own rules, then sent."""
        self.start()
        params, _ = checked_request(prompt_ids, params, max_tokens, self.vocab_size, self.max_model_len)
        self._check_running()
        if self.queue_depth >= self.max_queue:
            raise QueueFull(f"the queue is full ({self.max_queue} waiting requests); retry later")
        req = RemoteRequest(next(self._ids), self, sink, loop)
        self._requests[req.id] = req
        self._send(("submit", (req.id, list(prompt_ids), params)))
        return req

    def poem(self, text: str, lines: int, params: SamplingParams) -> list[str]:
        """As :meth:`Engine.poem`, written in the engine process (so this process needs no weights)."""
        self.start()
        key = ("poem", next(self._ids))
        self._check_running()
        self._send(("poem", (key[1], text, lines, params)))  # never while holding _replied: the reader needs it
        with self._replied:
            while key not in self._reply:
                if not self.healthy:
                    raise EngineStopped("the engine process stopped while writing the poem; restart the server")
                self._replied.wait(1.0)
            kind, value = self._reply.pop(key)
        if kind == "form":
            raise ConfigError(value)
        if kind == "error":
            raise RuntimeError(value)
        return value

    def shutdown(self, timeout: float | None = None) -> None:
        """Let waiting and running requests finish, then stop the engine process."""
        if not self._stopped:
            self._stopped = True
            with contextlib.suppress(OSError):
                self._send(("shutdown", None))
        self._proc.join(timeout)
        if self._proc.is_alive():
            self._proc.kill()

    # -- the pipe ---------------------------------------------------------------------------------------
    def _send(self, msg: tuple[str, Any]) -> None:
        """Send ``msg`` to the engine process, in order. A big message sent from the event loop (a submit
        of long prompts) goes through a writer thread, as does everything after it until that thread is
        idle again: the loop is also the pipe's reader, and blocked in a send it could not drain the
        engine's outputs while the engine, blocked sending them, does not read its pipe."""
        data = ForkingPickler.dumps(msg)  # what Connection.send pickles; sent with send_bytes
        with self._lock:
            if self._backlog or self._writing or (len(data) > INLINE_SEND_BYTES and self._on_reader_loop()):
                self._backlog.append(data)
                if self._writer is None:
                    self._writer = threading.Thread(target=self._write, name="mtnlg-engine-writer", daemon=True)
                    self._writer.start()
                self._wake.set()
                return
            self._conn.send_bytes(data)

    def _on_reader_loop(self) -> bool:
        return isinstance(self._reader, asyncio.AbstractEventLoop) and asyncio._get_running_loop() is self._reader

    def _write(self) -> None:
        """The writer thread: the backlog, in order, without holding the lock while a send blocks."""
        while True:
            self._wake.wait()
            with self._lock:
                if not self._backlog:
                    self._wake.clear()
                    continue
                data = self._backlog.popleft()
                self._writing = True
            try:
                self._conn.send_bytes(data)
            except OSError:  # the engine process is gone: the reader answers the requests
                pass
            finally:
                with self._lock:
                    self._writing = False

    def _ask(self, what: str) -> Any:
        """A blocking question to the engine process (never from the event loop that reads the pipe); each
        question has its own key, so concurrent askers (two /metrics scrapers) each get their answer."""
        self.start()
        self._check_running()
        key = (what, next(self._ids))
        self._send(("ask", key))
        with self._replied:
            if not self._replied.wait_for(lambda: key in self._reply, REPLY_TIMEOUT):
                raise RuntimeError(f"the engine process did not answer ({what})")
            return self._reply.pop(key)

    def _read(self) -> None:
        """The reader thread: every message, until the engine process stops or goes away."""
        try:
            while self._handle(*self._conn.recv()):
                pass
        except (EOFError, OSError):
            pass
        self._gone()

    def _readable(self) -> None:
        """On the event loop: every message that waits."""
        try:
            while self._conn.poll(0):
                if not self._handle(*self._conn.recv()):
                    break
            else:
                return
        except (EOFError, OSError):
            pass
        self._reader.remove_reader(self._conn.fileno())
        self._gone()

    def _handle(self, kind: str, payload: Any) -> bool:
        """One message from the engine process: outputs to their requests' sinks (one call per event loop
        and step), a reply, or the news that it crashed; False once it has stopped."""
        if kind == "out":
            events = [(self._requests[rid], out) for rid, out in payload if rid in self._requests]
            for req, out in events:
                if out.finish_reason is not None:
                    req.finished = True
                    self._requests.pop(req.id, None)
            deliver(events)
        elif kind == "reply":
            with self._replied:
                self._reply[payload[0]] = payload[1]
                self._replied.notify_all()
        elif kind == "crashed":
            self._crashed = True
        return kind != "stopped"

    def _gone(self) -> None:
        """The engine process is gone: nobody will answer the requests still open."""
        if not self._stopped:
            self._crashed = True
        pending = [(req, Output("", [], finish_reason="abort")) for req in list(self._requests.values())]
        self._requests.clear()
        for req, _ in pending:
            req.finished = True
        deliver(pending)
        with self._replied:  # a poem waiting for its reply sees the process gone
            self._replied.notify_all()


def _child_main(conn: Any, checkpoint: str, device: str, dtype: str, engine_kwargs: dict[str, Any]) -> None:
    """The engine process: load the model, then one thread alternates between the pipe (every message
    that waits) and one engine step (:meth:`Engine.run_once`), so a request reaches the next step with no
    thread hand-over: with a reader thread beside the engine's, a 16-request burst's submits took the GIL
    from the steps (a 5-row prefill traced at 7 ms instead of ~2). Only /v1/poem has a thread of its own.
    Ctrl-C is the server's to handle (it drains, then stops this process through the pipe)."""
    import queue
    import signal
    import sys

    from mtnlg.api import MegatronLmModel
    from mtnlg.device import decode_threads
    from mtnlg.infer.scheduler import Engine

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.setswitchinterval(0.0005)

    lock = threading.Lock()

    def send(msg: tuple[str, Any]) -> None:
        with lock:
            conn.send(msg)

    requests: dict[int, Any] = {}  # the server's id -> the engine's request, until it finishes (for cancel)

    class Remote:
        """A request's sink that names it by the server's id; set before the engine can see the request,
        so its first outputs can never race the bookkeeping. Outputs leave in ``_deliver``, not here."""

        def __init__(self, rid: int):
            self.rid = rid

        def __call__(self, outs: list[Output]) -> None:
            pass

    class CoreEngine(Engine):
        def _deliver(self, events):  # one message a step; the server process sends them on
            if events:
                send(("out", [(req.sink.rid, out) for req, out in events]))
                for req, out in events:
                    if out.finish_reason is not None:
                        requests.pop(req.sink.rid, None)
            return None

    try:
        lm = MegatronLmModel.from_pretrained(checkpoint, device=torch.device(device), dtype=getattr(torch, dtype))
        decode_threads(lm.model)  # this process only decodes: one thread for a small model
        engine = CoreEngine(lm, **engine_kwargs)  # driven by the loop below, not a thread
    except Exception as e:  # noqa: BLE001 - reported to the server process as one line
        send(("error", f"the engine process could not start: {type(e).__name__}: {e}"))
        return
    send(("ready", {"max_model_len": engine.max_model_len, "max_queue": engine.max_queue,
                    "num_slots": engine.num_slots, "vocab_size": engine.vocab_size}))
    poems: queue.SimpleQueue = queue.SimpleQueue()

    def write_poems() -> None:  # a thread of its own: a poem takes many forward passes, the pipe must not wait
        while (item := poems.get()) is not None:
            pid, text, lines, params = item
            try:
                result: tuple[str, Any] = ("ok", engine.poem(text, lines, params))
            except ConfigError as e:
                result = ("form", str(e))
            except Exception as e:  # noqa: BLE001 - this poem fails, the engine goes on
                result = ("error", f"{type(e).__name__}: {e}")
            send(("reply", (("poem", pid), result)))

    threading.Thread(target=write_poems, name="mtnlg-poems", daemon=True).start()
    stopping = False

    def handle(kind: str, payload: Any) -> None:
        nonlocal stopping
        if kind == "submit":
            rid, prompt, params = payload
            try:
                requests[rid] = engine.submit(prompt, params, None, sink=Remote(rid))
            except Exception as e:  # noqa: BLE001 - checked in the server already; fail this one only
                out = Output("", [], finish_reason="abort")
                out.error = f"{type(e).__name__}: {e}"
                send(("out", [(rid, out)]))
        elif kind == "cancel":
            req = requests.get(payload)
            if req is not None:
                req.cancel()
        elif kind == "poem":
            poems.put(payload)
        elif kind == "ask":
            send(("reply", (payload, engine.metrics)))
        elif kind == "shutdown":  # finish what was submitted, then say so
            poems.put(None)
            engine.shutdown()
            stopping = True

    try:
        while True:
            timeout = 0.0 if engine.has_work else 0.5
            while conn.poll(timeout):
                handle(*conn.recv())
                timeout = 0.0
            if engine.has_work:
                try:
                    engine.run_once()
                except BaseException:  # noqa: BLE001 - the loop broke: every request is answered, the server told
                    engine.crash()
                    send(("crashed", None))
                    return
            elif stopping:
                send(("stopped", None))
                return
    except (EOFError, OSError):  # the server process went away
        pass


__all__ = ["EngineClient", "RemoteRequest"]
