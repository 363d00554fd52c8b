"""What the scheduler hands its callers: per-step :class:`Output` events, and why it refuses a request."""

from __future__ import annotations

from dataclasses import dataclass


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
