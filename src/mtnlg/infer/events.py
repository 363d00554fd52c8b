"""What the scheduler hands its callers: per-step :class:`Output` events, how they reach them
(:func:`deliver`: straight to a sink, or onto the sink's asyncio loop), and why it refuses a request."""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The waiting queue holds ``max_queue`` requests already: the caller should retry later (HTTP 429)."""


class EngineStopped(Exception):
    """The engine is shutting down and takes no new requests (HTTP 503)."""


@dataclass
class TokenLogprob:
    """The chosen token's log-probability and the ``top`` most likely alternatives (id, logprob)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Output:
    """One event of a request: new text (maybe empty) and, on the last event, why it finished."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" on the final event
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None  # why a request was aborted by an exception


def merge_outputs(outs: list[Output]) -> Output:
    """Concatenate a request's events into one :class:`Output`."""
    merged = Output("", [])
    logprobs: list[TokenLogprob] = []
    for o in outs:
        merged.text += o.text
        merged.token_ids += o.token_ids
        if o.logprobs:
            logprobs += o.logprobs
        if o.finish_reason is not None:
            merged.finish_reason, merged.error = o.finish_reason, o.error
            merged.prompt_tokens, merged.completion_tokens = o.prompt_tokens, o.completion_tokens
    merged.logprobs = logprobs if any(o.logprobs is not None for o in outs) else None
    return merged


def deliver(events: list[tuple[Any, Output]]) -> threading.Event | None:
    """Hand each request (anything with ``id``, ``sink``, ``loop`` and ``cancel()``) its outputs of one
    step: its sink is called here, or on its asyncio ``loop`` (one cross-thread call per loop). Returns an
    event set once every such loop has also run the consumers those outputs woke (so a caller can let
    the loop send them before it goes on); None when no loop is involved."""
    per_req: dict[int, tuple[Any, list[Output]]] = {}
    for req, out in events:
        per_req.setdefault(req.id, (req, []))[1].append(out)
    by_loop: dict[int, tuple[Any, list[tuple[Any, list[Output]]]]] = {}
    for req, outs in per_req.values():
        if req.loop is None:
            _safe_sink(req, outs)
        else:
            by_loop.setdefault(id(req.loop), (req.loop, []))[1].append((req, outs))
    if not by_loop:
        return None
    done = threading.Event()
    left = [len(by_loop)]
    here = asyncio._get_running_loop()
    for loop, items in by_loop.values():
        if loop is here:  # already on that loop (the server reading the engine process's pipe): no hop
            _dispatch(items, done, left)
            continue
        try:
            loop.call_soon_threadsafe(_dispatch, items, done, left)
        except RuntimeError:  # the event loop is closed (server gone): nobody is listening
            _count_down(done, left)
    return done


def _safe_sink(req: Any, outs: list[Output]) -> None:
    try:
        req.sink(outs)
    except Exception:  # noqa: BLE001 - a consumer's bug must not stop the engine
        log.exception("request %d: the output sink raised", req.id)
        req.cancel()


def _dispatch(items: list[tuple[Any, list[Output]]], done: threading.Event, left: list[int]) -> None:
    """On the loop: hand out the outputs, then count down once the tasks they woke have run (callbacks
    run in the order they were scheduled, and waking a task schedules it before this ``call_soon``)."""
    try:
        for req, outs in items:
            _safe_sink(req, outs)
    finally:
        asyncio.get_running_loop().call_soon(_count_down, done, left)


def _count_down(done: threading.Event, left: list[int]) -> None:
    left[0] -= 1
    if left[0] <= 0:
        done.set()
