"""The one decode state: everything about a sequence being generated except the model call.

Both drivers, :func:`mtnlg.infer.generate.generate` (a batch that advances together, streaming,
beam search) and the continuous-batching :class:`mtnlg.infer.scheduler.Engine`, keep one
:class:`RowState` per sequence and do the same thing every step::

    logits ─► process + mask (RowState.allowed: no broken UTF-8) ─► sample ─► RowState.push(token)
                                                                                   │
        token ids, logprobs, safe text delta (whole characters, no stop string) ◄──┤
        finish_reason: "stop" (stop token / stop string) | "length" (budget) ◄─────┘

The token budget has one carrier (``SamplingParams.max_new_tokens`` / ``max_length``; the server's
``max_tokens`` is put into ``max_new_tokens``) and one rule, :func:`token_budget`: a request that
cannot fit the model's context is an error that names the numbers, never silently clamped.
"""

from __future__ import annotations

import dataclasses

import torch

from mtnlg.data.tokenizer import Tokenizer
from mtnlg.errors import ConfigError
from mtnlg.infer.poem_form import PoemForm, form_start
from mtnlg.infer.sampling import SamplingParams
from mtnlg.infer.streaming import StopStringFilter, StreamDecoder
from mtnlg.infer.utf8 import START, Utf8Guard


class RequestTooLong(ConfigError):
    """Prompt plus new tokens exceed the model's context (HTTP 400)."""


def token_budget(prompt_len: int, params: SamplingParams, context: int) -> int:
    """How many new tokens a prompt of ``prompt_len`` gets: ``max_new_tokens`` (None = up to the context),
    at most ``max_length - prompt_len`` (HF: ``max_new_tokens`` is set, ``max_length`` is not, or both
    bound). Raises :class:`RequestTooLong` when prompt + new tokens
    exceed ``context`` and :class:`ConfigError` when nothing is left to generate."""
    if prompt_len == 0:
        raise ConfigError("the prompt is empty; give at least one token of text")
    n = params.max_new_tokens if params.max_new_tokens is not None else context - prompt_len
    if params.max_length is not None and params.max_length > context:
        raise RequestTooLong(f"max_length={params.max_length} exceeds the model's maximum context length of "
                             f"{context} tokens; lower max_length")
    if params.max_length is not None:
        n = min(n, params.max_length - prompt_len)
        if n <= 0:
            raise ConfigError(f"max_length={params.max_length} leaves no room after the {prompt_len}-token prompt; "
                              f"raise max_length or pass max_new_tokens")
    if params.min_new_tokens > n:
        raise ConfigError(f"min_new_tokens={params.min_new_tokens} is more than the {n} new tokens this request may "
                          f"generate; lower min_new_tokens (min_tokens) or raise max_new_tokens (max_tokens)")
    if prompt_len + n > context:
        raise RequestTooLong(
            f"This model's maximum context length is {context} tokens. However, you requested {prompt_len + n} "
            f"tokens ({prompt_len} in the prompt, {n} to generate). Please shorten the prompt or lower "
            f"max_new_tokens (max_tokens).")
    return n


def with_budget(params: SamplingParams, max_new_tokens: int | None) -> SamplingParams:
    """``params`` with ``max_new_tokens`` set (the server's ``max_tokens``), ``max_length`` dropped."""
    if max_new_tokens is None:
        return params
    return dataclasses.replace(params, max_new_tokens=max_new_tokens, max_length=None)


def checked_request(prompt_ids: list[int], params: SamplingParams, max_tokens: int | None, vocab_size: int,
                    context: int) -> tuple[SamplingParams, int]:
    """A request as an engine takes it: ``(params with its budget, the budget)``, or a
    :class:`~mtnlg.errors.ConfigError` naming what is wrong (a budget below 1, a prompt too long for
    ``context``, a token id outside the vocabulary, a bad sampling setting)."""
    if max_tokens is not None and max_tokens < 1:
        raise ConfigError(f"max_tokens must be >= 1, got {max_tokens}")
    params = with_budget(params, max_tokens).validate().clamped(vocab_size)
    budget = token_budget(len(prompt_ids), params, context)
    bad = [t for t in prompt_ids if not 0 <= t < vocab_size]
    if bad:
        raise ConfigError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
    return params, budget


class RowState:
    """One sequence's decode state: what it generated, its text, and whether and why it finished.

    ``token_ids`` excludes a final stop token (that is ``stop_token``); ``logprobs`` / ``top_logprobs``
    are aligned with ``token_ids`` (``stop_logprob`` is the stop token's). Without a tokenizer there
    is no text, no stop strings and no UTF-8 guard.
    """

    def __init__(self, prompt_ids: list[int], params: SamplingParams, budget: int,
                 tokenizer: Tokenizer | None = None, guard: Utf8Guard | None = None):
        if params.stop and tokenizer is None:
            raise ConfigError("stop strings need a tokenizer; pass tokenizer=")
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.budget = budget
        self.stop_ids = frozenset(params.stop_token_ids) if not params.ignore_eos else frozenset()
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []
        self.top_logprobs: list[list[tuple[int, float]]] | None = [] if params.logprobs else None
        self.stop_token: int | None = None
        self.stop_logprob: float | None = None
        self.finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
        self.detok = StreamDecoder(tokenizer, params.skip_special_tokens) if tokenizer is not None else None
        self.stops = StopStringFilter(params.stop, params.include_stop_str_in_output) if tokenizer is not None else None
        self.guard = guard if tokenizer is not None else None
        self.utf8 = START
        self.form = PoemForm.for_tokenizer(tokenizer) if params.form and tokenizer is not None else None
        self.form_state = form_start(params.form) if self.form is not None else None
        if budget <= 0:
            self.finish_reason = "length"

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        return self.stops.text if self.stops is not None else ""

    @property
    def history(self) -> list[int]:
        return self.prompt_ids + self.token_ids

    def allowed(self, width: int, device: torch.device) -> torch.Tensor | None:
        """Bool [width] of the tokens this row may pick now (None = any)."""
        mask = self._allowed(width, device)
        if self.stop_ids and len(self.token_ids) < self.params.min_new_tokens:  # not yet: no stop token
            mask = torch.ones(width, dtype=torch.bool, device=device) if mask is None else mask.clone()
            mask[[t for t in self.stop_ids if t < width]] = False
            if self.form_state is not None and not bool(mask.any()):  # a whole poem is shorter: text goes on
                self.form_state = None
                return self.allowed(width, device)
        return mask

    def _allowed(self, width: int, device: torch.device) -> torch.Tensor | None:
        if self.guard is None:
            return None
        left = self.budget - len(self.token_ids)
        mask = self.guard.mask(self.utf8, left, width, device)
        if self.form_state is not None:
            form = mask & self.form.mask(self.form_state, self.stop_ids, width, device, left)
            if bool(form.any()):
                return form
            self.form_state = None  # the vocabulary cannot spell the form: free text from here on
        return mask

    def push(self, token: int, logprob: float | None = None, top: list[tuple[int, float]] | None = None) -> str:
        """Record the chosen token; return the text that became safe to show (whole characters, never
        part of a stop string). Sets ``finish_reason`` when this token ends the sequence."""
        if self.done:
            raise RuntimeError("push() on a finished sequence")
        delta = ""
        if token in self.stop_ids:
            self.stop_token, self.stop_logprob = token, logprob
            self.finish_reason = "stop"
            if self.params.include_stop_str_in_output and self.detok is not None:
                # vLLM keeps a stop token's text when asked (EOS and other special tokens have none
                # while skip_special_tokens is on); no stop string is looked for in it
                delta, _ = self.stops.push(self.detok.feed(token), False)
        else:
            self.token_ids.append(token)
            if logprob is not None and self.params.logprobs is not None:
                self.logprobs.append(logprob)
                if self.top_logprobs is not None:
                    self.top_logprobs.append(list(top or [])[: self.params.logprobs])
            if self.form_state is not None:
                self.form_state = self.form.next_state(self.form_state, token)
            if self.guard is not None:
                nxt = self.guard.next_state(self.utf8, token)
                self.utf8 = nxt if nxt is not None else START
            if self.detok is not None:
                # vLLM's min_tokens holds stop strings back too: none counts before that many tokens
                delta, hit = self.stops.push(self.detok.feed(token), len(self.token_ids) >= self.params.min_new_tokens)
                if hit:
                    self.finish_reason = "stop"
            if self.finish_reason is None and len(self.token_ids) >= self.budget:
                self.finish_reason = "length"
        if self.done:
            delta += self._drain()
        return delta

    def finish(self, reason: str) -> str:
        """End early (cancelled, failed): release the held-back text."""
        if self.done:
            return ""
        self.finish_reason = reason
        return self._drain()

    def _drain(self) -> str:
        if self.stops is None or self.stops.stopped:
            return ""
        delta, _ = self.stops.push(self.detok.flush())
        return delta + ("" if self.stops.stopped else self.stops.finish())


def pick_greedy(logits: torch.Tensor, rows: list[RowState]) -> torch.Tensor:
    """Argmax per row of ``logits`` [B, V] among each row's allowed tokens (the fast path: the mask
    is applied only to rows whose plain argmax is not allowed)."""
    tokens = logits.argmax(dim=-1)
    masks = [r.allowed(logits.shape[-1], logits.device) for r in rows]
    if any(m is not None for m in masks):
        picks = tokens.tolist()
        for i, m in enumerate(masks):
            if m is not None and not bool(m[picks[i]]):
                tokens[i] = logits[i].masked_fill(~m, float("-inf")).argmax()
    return tokens


def allowed_matrix(rows: list[RowState], width: int, device: torch.device) -> torch.Tensor | None:
    """Bool [B, width] of the rows' allowed tokens, or None when no row restricts anything."""
    masks = [r.allowed(width, device) for r in rows]
    if all(m is None for m in masks):
        return None
    full = torch.ones(width, dtype=torch.bool, device=device)
    return torch.stack([m if m is not None else full for m in masks])
