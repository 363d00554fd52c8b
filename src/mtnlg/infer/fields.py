"""Reading an OpenAI request body, field by field: typed, range-checked, and rejected with a 400 that
names the field (:class:`ApiError`), or clamped to what the math can take (``top_k`` above the
vocabulary means the vocabulary, a temperature below :data:`TEMPERATURE_FLOOR` is greedy), so no
request reaches the engine with a value that could make it fail. OpenAI fields this server does not
implement are refused by name (:func:`unsupported`), never silently ignored, and so is a misspelled
field (:func:`check_names`: ``max_token`` is a 400 suggesting ``max_tokens``). Plain synchronous
Python: the app may run it in a worker thread (:mod:`mtnlg.infer.protocol` builds requests from it).
"""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import replace
from typing import Any

from mtnlg.infer.sampling import MAX_LOGIT_BIAS, MIN_TEMPERATURE, SamplingParams

MAX_BODY_BYTES = 1 << 20  # 1 MiB
MAX_N = 16
MAX_PROMPTS = 64
MAX_STOP = 16
MAX_STOP_CHARS = 256
MAX_STOP_TOKEN_IDS = 64
MAX_LOGPROBS = 20
MAX_LOGIT_BIAS_KEYS = 1024
TEMPERATURE_FLOOR = MIN_TEMPERATURE  # the one greedy floor (mtnlg.infer.sampling): generate, CLI and server agree
REPETITION_PENALTY_RANGE = (0.01, 100.0)  # logits scaled by at most 100x either way

# the fields sampling_from_body reads, and the OpenAI fields unsupported() refuses (when set)
SAMPLING_FIELDS = frozenset({"temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                             "repetition_penalty", "seed", "stop", "stop_token_ids", "logit_bias", "ignore_eos",
                             "min_tokens", "skip_special_tokens", "include_stop_str_in_output"})
UNSUPPORTED_FIELDS = frozenset({"best_of", "suffix", "tools", "functions", "tool_choice", "response_format"})
# vLLM's extra fields that this server takes only at the value that asks for what it does anyway (vLLM's
# default): anything else is a 400 naming the field, never a setting silently ignored
VLLM_DEFAULTS: dict[str, tuple[Any, ...]] = {  # (null is "not set", as for every field)
    "use_beam_search": (False,), "length_penalty": (1, 1.0), "spaces_between_special_tokens": (True,),
    "truncate_prompt_tokens": (), "allowed_token_ids": (), "prompt_logprobs": (), "bad_words": ([],),
    "add_generation_prompt": (True,), "continue_final_message": (False,), "add_special_tokens": (False, True),
    "chat_template": (), "chat_template_kwargs": ({},), "priority": (0,), "top_a": (0, 0.0), "typical_p": (1, 1.0),
    "modalities": (["text"],), "audio": (), "function_call": ("none", "auto"), "web_search_options": ()}
# real fields of OpenAI's API and vLLM's extras that clients send and this server does not read: never
# taken for a misspelling, whatever fields are added later (those in VLLM_DEFAULTS only at those values)
ACCEPTED_UNUSED = frozenset({
    "user", "metadata", "store", "service_tier", "parallel_tool_calls", "prediction", "reasoning_effort",
    "verbosity", "prompt_cache_key", "safety_identifier", "request_id", *VLLM_DEFAULTS})
# other APIs' names for a field of ours (Anthropic, Hugging Face / TGI, the Responses API, llama.cpp)
FIELD_ALIASES = {"stop_sequences": "stop", "max_new_tokens": "max_tokens", "max_output_tokens": "max_tokens",
                 "max_completion_tokens": "max_tokens", "repeat_penalty": "repetition_penalty"}
NEAR_MISS_CUTOFF = 0.85  # difflib ratio: max_token, temprature, presense_penalty; not min_tokens (0.8), store (0.73)
MAX_NAMES_CHECKED = 64  # unknown names looked at per body (a 1 MiB body can hold 100k names; difflib ~40 us each)


class ApiError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def bad(param: str, message: str) -> ApiError:
    return ApiError(400, message, param=param)


def too_large(detail: str) -> ApiError:
    return ApiError(413, f"the request body {detail}; the limit is {MAX_BODY_BYTES} bytes (1 MiB)",
                    code="request_too_large")


# -- field names -----------------------------------------------------------------------------------------
def _squash(name: str) -> str:
    return name.lower().replace("_", "").replace("-", "").replace(" ", "")


def near_miss(name: str, known: frozenset[str] | tuple[str, ...]) -> str | None:
    """The field of ``known`` that ``name`` most likely misspells: another API's name for it, the same
    letters but for case, ``_`` and ``-`` (``maxTokens``, ``top-p``), two neighbours swapped (``modle``),
    or a difflib ratio of at least :data:`NEAR_MISS_CUTOFF`; None when nothing is that close."""
    if len(name) > 64:
        return None
    if FIELD_ALIASES.get(name) in known:
        return FIELD_ALIASES[name]
    ordered = sorted(known)
    for k in ordered:
        if _squash(k) == _squash(name):
            return k
        if len(k) == len(name):
            diff = [i for i, (a, b) in enumerate(zip(name, k)) if a != b]
            i = diff[0] if len(diff) == 2 and diff[1] == diff[0] + 1 else None
            if i is not None and name[i] == k[i + 1] and name[i + 1] == k[i]:
                return k
    hits = difflib.get_close_matches(name, ordered, 1, NEAR_MISS_CUTOFF)
    return hits[0] if hits else None


def check_names(body: dict[str, Any], known: frozenset[str] | tuple[str, ...], route: str | None = None) -> None:
    """400 naming the first field of ``body`` that is not in ``known`` and misspells one of them (with the
    suggestion); other unknown fields are accepted unused, as OpenAI clients send fields this server has no
    use for. With ``route`` (an mtnlg route: no client sends it anything else) every unknown field is a 400."""
    looked = 0
    for name in body:
        if name in known or (route is None and name in ACCEPTED_UNUSED):
            continue
        hint = near_miss(name, known)
        suggestion = f"; did you mean '{hint}'?" if hint else ""
        if route is not None:
            takes = f"{' It' if hint else '; it'} takes: {', '.join(known)}"
            raise bad(name, f"{route} has no field {_short(name)!r}{suggestion}{takes}")
        if hint:
            raise bad(name, f"unknown field {_short(name)!r}{suggestion} (a misspelled field is refused, "
                            f"not ignored)")
        looked += 1
        if looked >= MAX_NAMES_CHECKED:
            return


# -- bodies and fields -------------------------------------------------------------------------------------
def parse_json(raw: bytes) -> dict[str, Any]:
    """``raw`` as a JSON object; 400 (naming the problem) when it is empty, not UTF-8, not JSON (NaN and
    Infinity are not JSON), too deeply nested, not an object, or holds a lone UTF-16 surrogate."""
    if not raw.strip():
        raise bad("body", "the request body is empty; send a JSON object")

    def no_constants(name: str) -> None:
        raise ValueError(f"{name} is not valid JSON")

    try:
        body = json.loads(raw, parse_constant=no_constants)
        # a lone surrogate ("\ud800") is valid JSON but not text: it cannot be encoded, tokenized or echoed
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeDecodeError:
        raise bad("body", "the request body is not valid UTF-8") from None
    except UnicodeEncodeError:
        raise bad("body", "the request body holds a lone UTF-16 surrogate (like \\ud800); send valid text") from None
    except RecursionError:
        raise bad("body", "the request body is nested too deeply") from None
    except ValueError as e:
        msg = e.msg if isinstance(e, json.JSONDecodeError) else str(e)
        raise bad("body", f"the request body is not valid JSON ({msg})") from None
    if not isinstance(body, dict):
        raise bad("body", f"the request body must be a JSON object, got {json_type(body)}")
    return body


_TYPE_NAMES = {"int": "an integer", "number": "a number", "bool": "a boolean", "str": "a string"}


def json_type(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


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
        raise bad(name, f"'{name}' must be {_TYPE_NAMES[kind]}, got {json_type(value)}")
    if kind == "number":
        try:
            value = float(value)
        except OverflowError:  # an integer beyond float range
            value = math.inf
        if not math.isfinite(value):
            raise bad(name, f"'{name}' must be a finite number")
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise bad(name, f"'{name}' must be {'>' if lo_open else '>='} {lo}, got {_short(value)}")
    if hi is not None and value > hi:
        raise bad(name, f"'{name}' must be <= {hi}, got {_short(value)}")
    return value


def _short(value: Any) -> str:
    s = str(value)
    return s if len(s) <= 40 else s[:20] + "..." + s[-8:]


def string_list(body: dict[str, Any], name: str, limit: int, max_chars: int = MAX_STOP_CHARS) -> list[str]:
    value = body.get(name)
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise bad(name, f"'{name}' must be a string or an array of strings")
    if len(value) > limit:
        raise bad(name, f"'{name}' has {len(value)} entries; at most {limit} are allowed")
    if any(len(s) > max_chars for s in value):
        raise bad(name, f"each '{name}' string must be at most {max_chars} characters")
    return [s for s in value if s]


def int_list(body: dict[str, Any], name: str, limit: int | None = None) -> list[int]:
    value = body.get(name)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise bad(name, f"'{name}' must be an array of integers")
    if limit is not None and len(value) > limit:
        raise bad(name, f"'{name}' has {len(value)} entries; at most {limit} are allowed")
    return value


def token_ids(body: dict[str, Any], name: str, limit: int, vocab_size: int) -> list[int]:
    """An array of token ids of the vocabulary (as ``logit_bias`` keys are checked)."""
    ids = int_list(body, name, limit)
    wrong = [t for t in ids if not 0 <= t < vocab_size]
    if wrong:
        raise bad(name, f"'{name}' entry {_short(wrong[0])} is not a token id in [0, {vocab_size})")
    return ids


def stream_flags(body: dict[str, Any]) -> tuple[bool, bool]:
    """(stream, include_usage) from ``stream`` and ``stream_options``."""
    stream = get_field(body, "stream", "bool", False)
    so = body.get("stream_options")
    if so is not None and (not isinstance(so, dict) or not isinstance(so.get("include_usage", False), bool)):
        raise bad("stream_options", "'stream_options' must be an object like {\"include_usage\": true}")
    return stream, bool(stream and so and so.get("include_usage"))


def sampling_from_body(body: dict[str, Any], stop_ids: list[int], top_logprobs: int | None,
                       vocab_size: int) -> SamplingParams:
    """The per-request :class:`SamplingParams` from the OpenAI (plus vLLM extra) fields, validated and clamped."""
    top_k = get_field(body, "top_k", "int", 0, lo=-1)
    seed = get_field(body, "seed", "int")
    if seed is not None and not -(2**63) <= seed < 2**63:
        raise bad("seed", "'seed' must fit in 64 bits")
    temperature = get_field(body, "temperature", "number", 1.0, lo=0, hi=100)
    lo, hi = REPETITION_PENALTY_RANGE
    rep = get_field(body, "repetition_penalty", "number", 1.0, lo=0, hi=hi, lo_open=True)
    if rep < lo:
        raise bad("repetition_penalty", f"'repetition_penalty' must be in [{lo}, {hi}] (1 = off), got {_short(rep)}")
    unsupported(body)
    return SamplingParams(
        logit_bias=logit_bias(body, vocab_size),
        temperature=temperature if temperature >= TEMPERATURE_FLOOR else 0.0,
        top_p=get_field(body, "top_p", "number", 1.0, lo=0, hi=1, lo_open=True),
        top_k=min(max(top_k, 0), vocab_size),
        min_p=get_field(body, "min_p", "number", 0.0, lo=0, hi=1),
        presence_penalty=get_field(body, "presence_penalty", "number", 0.0, lo=-2, hi=2),
        frequency_penalty=get_field(body, "frequency_penalty", "number", 0.0, lo=-2, hi=2),
        repetition_penalty=rep,
        seed=None if seed is None else seed % (2**63),
        stop=string_list(body, "stop", MAX_STOP),
        stop_token_ids=list(stop_ids) + token_ids(body, "stop_token_ids", MAX_STOP_TOKEN_IDS, vocab_size),
        logprobs=top_logprobs,
        ignore_eos=get_field(body, "ignore_eos", "bool", False),
        min_new_tokens=get_field(body, "min_tokens", "int", 0, lo=0),
        skip_special_tokens=get_field(body, "skip_special_tokens", "bool", True),
        include_stop_str_in_output=get_field(body, "include_stop_str_in_output", "bool", False),
    ).validate()


def logit_bias(body: dict[str, Any], vocab_size: int) -> dict[int, float]:
    """OpenAI's ``logit_bias``: an object from token ids (as strings) to numbers in [-100, 100]."""
    value = body.get("logit_bias")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad("logit_bias", "'logit_bias' must be an object mapping token ids to numbers in [-100, 100]")
    if len(value) > MAX_LOGIT_BIAS_KEYS:
        raise bad("logit_bias", f"'logit_bias' has {len(value)} entries; at most {MAX_LOGIT_BIAS_KEYS} are allowed")
    out: dict[int, float] = {}
    for key, bias in value.items():
        digits = key.strip() if isinstance(key, str) else ""
        tok = int(digits) if digits.isascii() and digits.isdigit() and len(digits) < 20 else None
        if tok is None or tok >= vocab_size:
            raise bad("logit_bias", f"'logit_bias' key {_short(key)!r} is not a token id in [0, {vocab_size})")
        if (isinstance(bias, bool) or not isinstance(bias, (int, float)) or not math.isfinite(bias)
                or abs(bias) > MAX_LOGIT_BIAS):
            raise bad("logit_bias", f"'logit_bias' values must be numbers in [-{MAX_LOGIT_BIAS:g}, "
                                    f"{MAX_LOGIT_BIAS:g}], got {_short(bias)} for token {tok}")
        out[tok] = float(bias)
    return out


def unsupported(body: dict[str, Any]) -> None:
    """OpenAI fields this server does not implement: a clear 400 instead of silently ignoring them
    (metadata such as ``user`` is accepted and unused)."""
    n = body.get("n", 1)
    best_of = body.get("best_of")
    if best_of is not None and best_of != (n if n is not None else 1):
        raise bad("best_of", "'best_of' (sampling more than n and returning the best) is not supported; send "
                             "n and pick by logprobs")
    if body.get("suffix"):
        raise bad("suffix", "'suffix' (insertion) is not supported by this model")
    for name in ("tools", "functions"):
        if body.get(name):
            raise bad(name, f"'{name}' (tool calling) is not supported by this model")
    if body.get("tool_choice") not in (None, "none"):
        raise bad("tool_choice", "'tool_choice' is not supported by this model (no tools)")
    for name, takes in VLLM_DEFAULTS.items():
        value = body.get(name)
        if value is not None and not any(type(value) is type(t) and value == t for t in takes):
            shown = (f"only as {' or '.join(json.dumps(t) for t in takes)} (what this server does)" if takes
                     else "only as null")
            raise bad(name, f"'{name}' is taken {shown}: this server does not support other values, so leave it out")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise bad("response_format", "this 'response_format' is not supported (structured output); only "
                                     "{\"type\": \"text\"} is")


def seeded(params: SamplingParams, index: int, n: int) -> SamplingParams:
    """Choice ``index`` of ``n`` per prompt: the j-th sample of a seeded request gets seed + j."""
    if params.seed is None or index % n == 0:
        return params
    return replace(params, seed=(params.seed + index % n) % (2**63))


def max_tokens_field(body: dict[str, Any], names: tuple[str, ...]) -> tuple[int | None, str]:
    """The first of ``names`` that is set (>= 1), and its name."""
    for n in names:
        v = get_field(body, n, "int", None, lo=1)
        if v is not None:
            return v, n
    return None, names[0]
