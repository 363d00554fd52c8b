"""Batched next-token selection where every row has its own :class:`SamplingParams`.

Shared by the one-shot generator (``mtnlg.infer.generate``) and the continuous-batching engine
(``mtnlg.infer.scheduler``), whose rows come from unrelated requests. One step is::

    raw logits [B, V] ─► process_logits ─► (logit bias, penalties, n-gram ban, temperature, top-k, min-p, top-p)
                    └──────────────────► sample ─► tokens [B], logprobs [B]

A row with ``temperature == 0`` is greedy (argmax of the penalised logits); other rows draw
from the processed distribution with their own ``torch.Generator`` (so a seeded request gives
the same text whatever else shares its batch). Work is vectorised over rows wherever the
parameters allow; per-row Python only runs for the options that need a row's history.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import dataclasses
import math

import torch

from mtnlg.errors import ConfigError
from mtnlg.infer.poem_form import FORMS

NEG_INF = float("-inf")
MIN_TEMPERATURE = 1e-5  # below this, sampling is greedy (logits / T would overflow)
MAX_PENALTY = 1e4  # repetition_penalty in [1/MAX_PENALTY, MAX_PENALTY]; |presence|, |frequency| <= MAX_PENALTY
MAX_BEAMS = 1024  # more beams than this is a mistake (memory grows with it), not a search
MAX_LOGIT_BIAS = 100.0  # |bias| per token at most (OpenAI's range: -100 bans a token, +100 forces it)


@dataclass
class SamplingParams:
    """How to pick each next token of one sequence (HF / OpenAI / vLLM names).

    Order of application (as in Hugging Face, with OpenAI's ``logit_bias`` first: token id -> a number
    in [-100, 100] added to that token's logit): repetition penalty (over prompt + output),
    presence / frequency penalties (over the output, OpenAI), ``no_repeat_ngram_size`` (over
    prompt + output), temperature, top-k, min-p, top-p. ``logprobs``: None = none; k >= 0 =
    the chosen token's logprob plus the k most likely alternatives.
    """

    max_new_tokens: int | None = 32  # None = up to the model's context
    max_length: int | None = None  # prompt + output; the smaller of the two limits wins
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    no_repeat_ngram_size: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    logprobs: int | None = None
    ignore_eos: bool = False  # serving: keep going past stop_token_ids
    num_beams: int = 1  # > 1: beam search (mtnlg.infer.generate only; greedy scoring)
    length_penalty: float = 1.0  # beam score = sum logprob / len ** length_penalty
    use_cache: bool = True
    compile_decode: bool = False  # decode steps through torch.compile over a static cache (mtnlg.infer.compiled)
    vocab_limit: int | None = None  # never emit ids >= this (the tokenizer may be smaller than the embedding)
    form: str | None = None  # "poem" | "poem5" | "poem7": the output is a whole regular poem (mtnlg.infer.poem_form)
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit (OpenAI)
    min_new_tokens: int = 0  # stop_token_ids (EOS included) cannot be picked before this many tokens (vLLM min_tokens)
    skip_special_tokens: bool = True  # the text leaves out special tokens (<|endoftext|>, role tokens)
    include_stop_str_in_output: bool = False  # a stop string that ends the text stays in it (vLLM)

    def validate(self) -> SamplingParams:
        def bad(name: str, rule: str) -> ConfigError:
            return ConfigError(f"{name} {rule}, got {getattr(self, name)!r}")

        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                     "frequency_penalty", "length_penalty"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
                raise bad(name, "must be a number")
        if self.max_new_tokens is not None and self.max_new_tokens < 0:
            raise bad("max_new_tokens", "must be >= 0")
        if self.max_length is not None and self.max_length <= 0:
            raise bad("max_length", "must be > 0")
        if self.temperature < 0:
            raise bad("temperature", "must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise bad("top_k", "must be >= 0 (0 = off)")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1]")
        if not 0 <= self.min_p <= 1:
            raise bad("min_p", "must be in [0, 1]")
        if not self.repetition_penalty > 0:
            raise bad("repetition_penalty", "must be > 0 (1 = off)")
        if self.no_repeat_ngram_size < 0:
            raise bad("no_repeat_ngram_size", "must be >= 0 (0 = off)")
        if not 1 <= self.num_beams <= MAX_BEAMS:
            raise bad("num_beams", f"must be in [1, {MAX_BEAMS}]")
        if self.logprobs is not None and self.logprobs < 0:
            raise bad("logprobs", "must be >= 0 or None")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", "must be a list of non-empty strings")
        if self.form is not None and self.form not in FORMS:
            raise bad("form", f"must be one of {', '.join(FORMS)} or None (free text)")
        if self.compile_decode and (self.num_beams > 1 or not self.use_cache):
            raise bad("compile_decode", "needs the KV cache and num_beams=1 (the compiled step is one cached "
                      "decode step); set compile_decode=False")
        if self.min_new_tokens < 0:
            raise bad("min_new_tokens", "must be >= 0")
        if self.min_new_tokens and self.num_beams > 1:
            raise bad("min_new_tokens", "works with sampling and greedy decoding, not beam search; use num_beams=1")
        if self.form is not None and self.num_beams > 1:
            raise bad("form", "works with sampling and greedy decoding, not beam search; use num_beams=1")
        for tok, bias in self.logit_bias.items():
            if isinstance(tok, bool) or not isinstance(tok, int) or tok < 0:
                raise ConfigError(f"logit_bias keys must be token ids (integers >= 0), got {tok!r}")
            if (isinstance(bias, bool) or not isinstance(bias, (int, float)) or not math.isfinite(bias)
                    or abs(bias) > MAX_LOGIT_BIAS):
                raise ConfigError(f"logit_bias[{tok}] must be a number in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], "
                                  f"got {bias!r}")
        for tok in self.stop_token_ids:
            if isinstance(tok, bool) or not isinstance(tok, int) or tok < 0:
                raise ConfigError(f"stop_token_ids must be token ids (integers >= 0), got {tok!r}")
            if self.vocab_limit is not None and tok >= self.vocab_limit:
                raise ConfigError(f"stop token id {tok} is outside the vocabulary [0, {self.vocab_limit})")
        return self

    def clamped(self, vocab_size: int) -> SamplingParams:
        """Valid values brought into the range the math can take (a ``logit_bias`` or stop token id
        outside the vocabulary is an error): ``top_k`` at or above the vocabulary
        is off, a temperature below :data:`MIN_TEMPERATURE` is greedy, penalties are bounded (so logits
        stay finite), ``logprobs`` is at most the vocabulary, the seed is taken modulo 2**63."""
        outside = [t for t in self.logit_bias if t >= vocab_size]
        if outside:
            raise ConfigError(f"logit_bias key {outside[0]} is outside the vocabulary [0, {vocab_size})")
        outside = [t for t in self.stop_token_ids if t >= vocab_size]
        if outside:
            raise ConfigError(f"stop token id {outside[0]} is outside the vocabulary [0, {vocab_size})")
        ch: dict = {}
        if self.top_k >= vocab_size:
            ch["top_k"] = 0
        if 0 < self.temperature < MIN_TEMPERATURE:
            ch["temperature"] = 0.0
        if self.temperature > 1 / MIN_TEMPERATURE:
            ch["temperature"] = 1 / MIN_TEMPERATURE
        rp = min(max(self.repetition_penalty, 1 / MAX_PENALTY), MAX_PENALTY)
        if rp != self.repetition_penalty:
            ch["repetition_penalty"] = rp
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if abs(v) > MAX_PENALTY:
                ch[name] = math.copysign(MAX_PENALTY, v)
        if abs(self.length_penalty) > MAX_PENALTY:
            ch["length_penalty"] = math.copysign(MAX_PENALTY, self.length_penalty)
        if self.num_beams > vocab_size:
            ch["num_beams"] = vocab_size
        if self.logprobs is not None and self.logprobs > vocab_size:
            ch["logprobs"] = vocab_size
        if self.seed is not None and not 0 <= self.seed < 2**63:
            ch["seed"] = self.seed % 2**63
        return dataclasses.replace(self, **ch) if ch else self

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    def needs_history(self) -> bool:
        """Whether :func:`process_logits` needs this row's token history."""
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0 or self.frequency_penalty != 0
                or self.no_repeat_ngram_size > 0)

    def is_plain_greedy(self) -> bool:
        """Greedy with no logit processing at all: the fast path is a bare argmax."""
        return self.greedy and not self.needs_history() and self.vocab_limit is None and not self.logit_bias


def banned_ngram_tokens(history: Sequence[int], n: int) -> list[int]:
    """Tokens that would complete an n-gram already present in ``history`` (HF's no_repeat_ngram_size)."""
    if n <= 0 or len(history) + 1 < n:
        return []
    if n == 1:
        return sorted(set(history))
    h = list(history)
    prefix = h[len(h) - n + 1:]
    return [h[i + n - 1] for i in range(len(h) - n + 1) if h[i:i + n - 1] == prefix]


def process_logits(logits: torch.Tensor, params: Sequence[SamplingParams],
                   histories: Sequence[Sequence[int]] | None = None,
                   prompt_lens: Sequence[int] | None = None, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Apply each row's penalties and filters to ``logits`` [B, V]; returns a new fp32 tensor.

    ``allowed`` (bool [B, V]) removes tokens before anything else (the UTF-8 guard, constraints), so
    top-k / top-p choose among allowed tokens.
    ``histories[i]`` is row i's prompt followed by its output so far and ``prompt_lens[i]`` the
    prompt's length (default 0: all history counts as output). Filtered entries become -inf.
    Greedy rows get only the history-based penalties (temperature and filters cannot change an argmax).
    """
    B, V = logits.shape
    if len(params) != B:
        raise ValueError(f"process_logits: {B} rows but {len(params)} SamplingParams")
    out = logits.float().clone() if logits.dtype == torch.float32 else logits.float()
    device = out.device
    if allowed is not None:
        out.masked_fill_(~allowed, NEG_INF)
    for i, p in enumerate(params):
        if p.logit_bias:
            ids = [t for t in p.logit_bias if t < V]
            if ids:
                out[i].index_add_(0, torch.tensor(ids, device=device),
                                  torch.tensor([float(p.logit_bias[t]) for t in ids], device=device))
        if p.vocab_limit is not None and p.vocab_limit < V:
            out[i, p.vocab_limit:] = NEG_INF
        if not p.needs_history():
            continue
        hist = list(histories[i]) if histories is not None else []
        if not hist:
            continue
        row = out[i]
        if p.repetition_penalty != 1.0:
            idx = torch.tensor(sorted(set(hist)), device=device)
            vals = row.index_select(0, idx)
            row.index_copy_(0, idx, torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty))
        start = prompt_lens[i] if prompt_lens is not None else 0
        gen = hist[start:]
        if gen and (p.presence_penalty or p.frequency_penalty):
            counts = torch.bincount(torch.tensor(gen, device=device), minlength=V)[:V].float()
            row -= p.presence_penalty * (counts > 0).float() + p.frequency_penalty * counts
        if p.no_repeat_ngram_size:
            banned = banned_ngram_tokens(hist, p.no_repeat_ngram_size)
            if banned:
                row[torch.tensor(banned, device=device)] = NEG_INF

    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if not sampled:
        return out
    rows = torch.tensor(sampled, device=device) if len(sampled) < B else None
    sub = out if rows is None else out.index_select(0, rows)
    ps = [params[i] for i in sampled]
    temp = torch.tensor([p.temperature for p in ps], device=device).unsqueeze(1)
    sub = sub / temp
    if any(p.top_k or p.top_p < 1 or p.min_p > 0 for p in ps):
        sub = _filter(sub, ps)
    if rows is None:
        return sub
    out.index_copy_(0, rows, sub)
    return out


def _filter(x: torch.Tensor, ps: list[SamplingParams]) -> torch.Tensor:
    """Top-k, min-p and top-p with per-row values, from one descending sort."""
    n, V = x.shape
    device = x.device
    srt, idx = torch.sort(x, dim=-1, descending=True)
    drop = torch.zeros_like(srt, dtype=torch.bool)
    ranks = torch.arange(V, device=device).unsqueeze(0)
    if any(p.top_k for p in ps):
        k = torch.tensor([min(p.top_k, V) if p.top_k else V for p in ps], device=device).unsqueeze(1)
        drop |= ranks >= k
    srt = srt.masked_fill(drop, NEG_INF)
    if any(p.min_p > 0 for p in ps):
        probs = srt.softmax(-1)
        min_p = torch.tensor([p.min_p for p in ps], device=device).unsqueeze(1)
        drop |= probs < min_p * probs[:, :1]
        srt = srt.masked_fill(drop, NEG_INF)
    if any(p.top_p < 1 for p in ps):
        probs = srt.softmax(-1)
        top_p = torch.tensor([p.top_p for p in ps], device=device).unsqueeze(1)
        drop |= (probs.cumsum(-1) - probs) >= top_p  # keep the smallest prefix whose mass reaches top_p
        drop[:, 0] = False  # always keep the most likely token
        srt = srt.masked_fill(drop, NEG_INF)
    return torch.full_like(x, NEG_INF).scatter(-1, idx, srt)


def sample(logits: torch.Tensor, params: Sequence[SamplingParams],
           generators: Sequence[torch.Generator | None] | None = None,
           raw_logits: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row of processed ``logits`` [B, V] -> (tokens [B] int64, logprobs [B] fp32).

    Greedy rows take the argmax; the others draw from ``softmax(logits)`` with their generator
    (None = the global RNG). Logprobs are of the chosen token under ``raw_logits`` (the model's own
    distribution; default: ``logits``). NaN logits are never picked; a row with nothing left to pick
    falls back to its raw logits.
    """
    B = logits.shape[0]
    logits = _finite(logits)
    dead = ~torch.isfinite(logits).any(dim=-1)
    if bool(dead.any()):  # every token filtered out: fall back to the model's own distribution
        ref = _finite(raw_logits.float() if raw_logits is not None else logits)
        ref = ref.masked_fill(~torch.isfinite(ref).any(dim=-1, keepdim=True), 0.0)
        logits = torch.where(dead[:, None], ref, logits)
    tokens = logits.argmax(dim=-1)
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if sampled:
        probs = logits.index_select(0, torch.tensor(sampled, device=logits.device)).softmax(-1)
        gens = generators if generators is not None else [None] * B
        if all(gens[i] is None for i in sampled):
            tokens[sampled] = torch.multinomial(probs, 1).squeeze(1)
        else:  # multinomial(p, 1, generator=g) is argmax(p / q), q ~ Exp(1) drawn from g: the same draws
            q = torch.empty_like(probs)  # per row, then one division (1 op per row instead of ~10)
            for j, i in enumerate(sampled):
                q[j].exponential_(generator=gens[i])
            tokens[sampled] = (probs / q).argmax(-1)
    ref = raw_logits if raw_logits is not None else logits
    logprobs = torch.log_softmax(ref.float(), dim=-1).gather(1, tokens.unsqueeze(1)).squeeze(1)
    return tokens, logprobs


def _finite(x: torch.Tensor) -> torch.Tensor:
    """NaN -> -inf (never picked), +inf -> the largest finite value (so softmax stays defined)."""
    return torch.nan_to_num(x, nan=NEG_INF, posinf=torch.finfo(x.dtype).max, neginf=NEG_INF)


def top_logprobs(raw_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most likely tokens of each row and their logprobs: (ids [B, k], logprobs [B, k])."""
    lp = torch.log_softmax(raw_logits.float(), dim=-1)
    top = torch.topk(lp, min(k, lp.shape[-1]), dim=-1)
    return top.indices, top.values
