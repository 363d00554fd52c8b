"""The OpenAI protocol as vLLM serves it: build requests from validated bodies, render responses. No app here.

Fields are read and checked by :mod:`mtnlg.infer.fields`; this module tokenizes prompts and chat
messages (:class:`TextCodec`), builds :class:`GenerationRequest` / :class:`PoemRequest`, and renders
choices, deltas, logprobs and SSE events. Plain synchronous Python, so the app can run it in a worker
thread for a large body.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

from mtnlg.data.chat_template import ChatTemplate
from mtnlg.data.tokenizer import END_OF_TURN
from mtnlg.errors import ConfigError
from mtnlg.infer.fields import (MAX_BODY_BYTES, MAX_LOGPROBS, MAX_N, MAX_PROMPTS, SAMPLING_FIELDS, UNSUPPORTED_FIELDS,
                                ApiError, _short, bad, check_names, error_body, get_field, int_list, max_tokens_field,
                                parse_json, sampling_from_body, seeded, stream_flags, too_large)
from mtnlg.infer.poem_form import FORMS, MAX_POEM_LINES, form_of_conversation, parse_poem
from mtnlg.infer.sampling import SamplingParams

# chat "form" (an mtnlg extension): free text, the poem form when the last user message asks for a poem
# (as `mtnlg chat` and the web page do), or always a poem of any / 5- / 7-character lines
CHAT_FORMS = ("free", "auto", *FORMS)
# the fields each route reads: a near miss of one of them is a 400 (max_token -> max_tokens), other fields
# are accepted unused on the OpenAI routes; /v1/poem (mtnlg's own) refuses every other field
COMPLETION_FIELDS = SAMPLING_FIELDS | UNSUPPORTED_FIELDS | {"model", "prompt", "n", "max_tokens", "logprobs", "echo",
                                                            "stream", "stream_options"}
CHAT_FIELDS = SAMPLING_FIELDS | UNSUPPORTED_FIELDS | {"model", "messages", "n", "max_tokens", "max_completion_tokens",
                                                      "logprobs", "top_logprobs", "stream", "stream_options", "form"}
POEM_FIELDS = ("prompt", "lines", "temperature", "top_p", "top_k", "min_p", "seed", "model")


# -- text <-> tokens ---------------------------------------------------------------------------------------
class TextCodec:
    """The tokenizer as the server uses it, from worker threads: encoding and decoding go through the
    batch calls of the Rust tokenizer, which release the GIL, so a 1 MiB prompt does not stall the
    event loop. Chat content is encoded as plain text (see :mod:`mtnlg.data.chat_template`)."""

    def __init__(self, tokenizer: Any):
        from tokenizers import Tokenizer as HFTokenizer

        self.tok = tokenizer
        self.vocab_size = tokenizer.vocab_size
        self.eod_id = tokenizer.eod_id
        self._as_text = HFTokenizer.from_str(tokenizer.hf.to_str())  # a copy that never parses special tokens
        self._as_text.encode_special_tokens = True
        codec = self

        class _Template(ChatTemplate):
            def encode_text(self, text: str) -> list[int]:
                return codec.encode_text(text)

        try:
            self.template: ChatTemplate | None = _Template(tokenizer)
        except ConfigError:
            self.template = None
        eot = tokenizer.token_to_id(END_OF_TURN)
        self.completion_stop_ids = [tokenizer.eod_id]
        self.chat_stop_ids = [tokenizer.eod_id] + ([eot] if eot is not None else [])

    def encode(self, text: str) -> list[int]:
        if len(text) <= 4096:  # parsed on the event loop: the single call, no thread pool to wake
            return self.tok.hf.encode(text, add_special_tokens=False).ids
        return self.tok.hf.encode_batch([text], add_special_tokens=False)[0].ids  # releases the GIL

    def encode_text(self, text: str) -> list[int]:
        return self._as_text.encode_batch([text], add_special_tokens=False)[0].ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.hf.decode_batch([list(ids)], skip_special_tokens=False)[0]

    def token_text(self, tok: int) -> str:
        return self.tok.token_bytes(tok).decode("utf-8", errors="replace")

    def chat_prompt(self, messages: Any) -> list[int]:
        if self.template is None:
            raise bad("messages", "this model's tokenizer has no chat tokens; use /v1/completions")
        try:
            return self.template.prompt_ids(messages)
        except ConfigError as e:
            raise bad("messages", str(e)) from None

    def check_ids(self, ids: list[int], param: str) -> list[int]:
        wrong = [t for t in ids if not 0 <= t < self.vocab_size]
        if wrong:
            raise bad(param, f"token id {_short(wrong[0])} is outside the vocabulary [0, {self.vocab_size})")
        return ids


def parse_prompts(body: dict[str, Any], codec: TextCodec) -> list[list[int]]:
    """``prompt`` as token lists: a string, strings, token ids or lists of token ids. An empty
    string starts from the end-of-document token."""
    if body.get("prompt") is None:
        raise bad("prompt", "'prompt' is required")
    p = body["prompt"]
    items: list[Any]
    if isinstance(p, str) or (isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool)
                                                                 for t in p)):
        items = [p]
    elif isinstance(p, list) and p:
        items = p
    else:
        raise bad("prompt", "'prompt' must be a string, an array of strings, or token ids")
    if len(items) > MAX_PROMPTS:
        raise bad("prompt", f"'prompt' has {len(items)} entries; at most {MAX_PROMPTS} are allowed")
    out = []
    for it in items:
        if isinstance(it, str):
            ids = codec.encode(it)
        elif isinstance(it, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in it):
            ids = codec.check_ids(list(it), "prompt")
        else:
            raise bad("prompt", "'prompt' must be a string, an array of strings, or token ids")
        out.append(ids or [codec.eod_id])
    return out


# -- requests ----------------------------------------------------------------------------------------------
@dataclass
class GenerationRequest:
    """A parsed /v1/completions or /v1/chat/completions request."""

    chat: bool
    prompts: list[list[int]]
    n: int
    params: SamplingParams
    max_tokens: int | None  # None: what the context leaves
    max_tokens_name: str
    stream: bool
    include_usage: bool
    logprobs: int | None = None  # completions: top-k logprobs
    echo: bool = False
    want_logprobs: bool = False  # chat

    @property
    def num_choices(self) -> int:
        return len(self.prompts) * self.n


def parse_completion(body: dict[str, Any], codec: TextCodec) -> GenerationRequest:
    check_names(body, COMPLETION_FIELDS)
    stream, include_usage = stream_flags(body)
    n = get_field(body, "n", "int", 1, lo=1, hi=MAX_N)
    logprobs = get_field(body, "logprobs", "int", None, lo=0, hi=MAX_LOGPROBS)
    echo = get_field(body, "echo", "bool", False)
    params = sampling_from_body(body, codec.completion_stop_ids, logprobs, codec.vocab_size)
    max_tokens, name = max_tokens_field(body, ("max_tokens",))
    prompts = parse_prompts(body, codec)
    return GenerationRequest(False, prompts, n, params, 16 if max_tokens is None else max_tokens, name, stream,
                             include_usage, logprobs=logprobs, echo=echo)


def parse_chat(body: dict[str, Any], codec: TextCodec) -> GenerationRequest:
    check_names(body, CHAT_FIELDS)
    if "messages" not in body:
        raise bad("messages", "'messages' is required")
    stream, include_usage = stream_flags(body)
    n = get_field(body, "n", "int", 1, lo=1, hi=MAX_N)
    want_lp = get_field(body, "logprobs", "bool", False)
    top = get_field(body, "top_logprobs", "int", 0, lo=0, hi=MAX_LOGPROBS)
    params = sampling_from_body(body, codec.chat_stop_ids, top if want_lp else None, codec.vocab_size)
    max_tokens, name = max_tokens_field(body, ("max_completion_tokens", "max_tokens"))
    prompt = codec.chat_prompt(body["messages"])
    form = get_field(body, "form", "str", "free")
    if form not in CHAT_FORMS:
        raise bad("form", f"'form' must be one of {', '.join(CHAT_FORMS)} (an mtnlg extension), got {_short(form)!r}")
    if form != "free":
        params = replace(params, form=form if form != "auto" else form_of_conversation(body["messages"]))
    return GenerationRequest(True, [prompt], n, params, max_tokens, name, stream, include_usage,
                             want_logprobs=want_lp)


@dataclass
class PoemRequest:
    """``POST /v1/poem`` (an mtnlg extension): the opening lines and how many more, in the same form."""

    text: str
    lines: int
    params: SamplingParams


def parse_poem_request(body: dict[str, Any], vocab_size: int) -> PoemRequest:
    check_names(body, POEM_FIELDS, route="/v1/poem")
    text = get_field(body, "prompt", "str")
    if text is None:
        raise bad("prompt", "'prompt' (the opening lines, e.g. \"床前明月光，疑是地上霜。\") is required")
    try:
        parse_poem(text)
    except ConfigError as e:
        raise bad("prompt", str(e)) from None
    lines = get_field(body, "lines", "int", 2, lo=1, hi=MAX_POEM_LINES)
    p = sampling_from_body(body, [], None, vocab_size)
    return PoemRequest(text, lines, SamplingParams(temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
                                                   min_p=p.min_p, seed=p.seed))


# -- responses ---------------------------------------------------------------------------------------------
class Choice:
    """One running generation (a prompt x one of n) and what it produced so far."""

    def __init__(self, index: int, prompt_ids: list[int], prefix: str):
        self.index = index
        self.prompt_ids = prompt_ids
        self.prefix = prefix  # the echoed prompt
        self.req: Any = None  # the engine's request handle (has .cancel())
        self.text = ""
        self.token_ids: list[int] = []
        self.logprobs: list[Any] = []
        self.finish_reason: str | None = None
        self.completion_tokens = 0

    def add(self, out: Any) -> bool:
        """Record one engine output; True when it was the last."""
        self.text += out.text
        self.token_ids += out.token_ids
        if out.logprobs:
            self.logprobs += out.logprobs
        if out.finish_reason is not None:
            self.finish_reason, self.completion_tokens = out.finish_reason, out.completion_tokens
            return True
        return False


def usage(choices: list[Choice], prompts: list[list[int]]) -> dict[str, int]:
    prompt = sum(len(p) for p in prompts)
    completion = sum(c.completion_tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion_logprobs(codec: TextCodec, lps: list[Any], offset: int) -> dict[str, Any]:
    tokens, token_lps, tops, offsets = [], [], [], []
    for lp in lps:
        t = codec.token_text(lp.token_id)
        tokens.append(t)
        token_lps.append(lp.logprob)
        tops.append({codec.token_text(i): v for i, v in lp.top})
        offsets.append(offset)
        offset += len(t)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(codec: TextCodec, lps: list[Any]) -> dict[str, Any]:
    def entry(tok: int, lp: float) -> dict[str, Any]:
        return {"token": codec.token_text(tok), "logprob": lp, "bytes": list(codec.tok.token_bytes(tok))}

    return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(i, v) for i, v in lp.top]}
                        for lp in lps]}


def render_choice(req: GenerationRequest, codec: TextCodec, c: Choice) -> dict[str, Any]:
    """One finished choice of a non-streamed response."""
    if req.chat:
        return {"index": c.index, "message": {"role": "assistant", "content": c.text},
                "logprobs": chat_logprobs(codec, c.logprobs) if req.want_logprobs else None,
                "finish_reason": c.finish_reason}
    lp = completion_logprobs(codec, c.logprobs, len(c.prefix)) if req.logprobs is not None else None
    return {"index": c.index, "text": c.prefix + c.text, "logprobs": lp, "finish_reason": c.finish_reason}


def render_delta(req: GenerationRequest, codec: TextCodec, c: Choice, out: Any, offset: int) -> dict[str, Any]:
    """One streamed piece of a choice; ``offset`` is where its text starts (completions' text_offset)."""
    if req.chat:
        lp = chat_logprobs(codec, out.logprobs) if req.want_logprobs and out.logprobs else None
        delta = {"content": out.text} if out.text or out.finish_reason is None else {}
        return {"index": c.index, "delta": delta, "logprobs": lp, "finish_reason": out.finish_reason}
    lp = None
    if req.logprobs is not None and out.logprobs:
        lp = completion_logprobs(codec, out.logprobs, offset)
    return {"index": c.index, "text": out.text, "logprobs": lp, "finish_reason": out.finish_reason}


def openers(req: GenerationRequest, choices: list[Choice]) -> list[dict[str, Any]]:
    """The first streamed chunks: the assistant role (chat) or the echoed prompt (completions)."""
    if req.chat:
        return [{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                 "finish_reason": None} for c in choices]
    return [{"index": c.index, "text": c.prefix, "logprobs": None, "finish_reason": None}
            for c in choices if c.prefix]


ABORTED = error_body("generation stopped: the engine failed or is shutting down", "server_error",
                     code="generation_aborted")


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


__all__ = ["ABORTED", "CHAT_FIELDS", "COMPLETION_FIELDS", "MAX_BODY_BYTES", "MAX_POEM_LINES", "POEM_FIELDS", "ApiError",
           "Choice", "GenerationRequest", "PoemRequest", "TextCodec", "bad", "error_body", "get_field", "int_list",
           "parse_chat", "parse_completion", "parse_json", "parse_poem_request", "parse_prompts", "render_choice",
           "render_delta", "sampling_from_body", "seeded", "sse", "too_large", "usage"]
