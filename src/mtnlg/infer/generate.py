"""Autoregressive generation: a preallocated KV cache, one prefill, then one token per step.

This is the engine behind ``MegatronLmModel.generate`` and the ``generate`` / ``poem`` / ``chat``
commands. Prompts of different lengths share a batch with LEFT padding, so every row's next token
sits in the last column::

    row 0:  PAD PAD  a   b   c  │ d'  e' ...      positions 0 0 0 1 2 │ 3 4 ...
    row 1:   w   x   y   z   u  │ v'  ...         positions 0 1 2 3 4 │ 5 ...
            └── key mask: False on PAD ──┘  each query also sees itself (no all-masked rows)

Every row is a :class:`~mtnlg.infer.decode.RowState`, the decode state the continuous-batching
scheduler uses too (stop tokens and strings, the token budget, logprobs, the UTF-8 guard), so both give
the same tokens. Decoding options are per row (:class:`~mtnlg.infer.sampling.SamplingParams`): greedy, temperature,
top-k / top-p / min-p, repetition / presence / frequency penalties, ``no_repeat_ngram_size``, stop
token ids and stop strings, ``max_new_tokens`` / ``max_length``, a seed per row, per-token
logprobs; :func:`beam_search` for ``num_beams > 1`` and :func:`stream` for text deltas that only
ever contain whole characters. Plain greedy runs on a fast path (argmax, no copies), which is what
makes batch-1 decoding of a small model several times faster than Hugging Face ``generate``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from mtnlg.data.tokenizer import Tokenizer
from mtnlg.errors import ConfigError
from mtnlg.infer import compiled
from mtnlg.infer.decode import RowState, allowed_matrix, pick_greedy, token_budget
from mtnlg.infer.sampling import SamplingParams, process_logits, sample, top_logprobs
from mtnlg.infer.utf8 import START, Utf8Guard
from mtnlg.model.decode_linear import decode_head
from mtnlg.model.kv_cache import KVCache, StaticKVCache
from mtnlg.model.prompt_tuning import Splice
from mtnlg.model.transformer import GPT

__all__ = ["SamplingParams", "Completion", "SoftPrompt", "generate", "generate_ids", "stream", "beam_search",
           "LogitsHook"]

# A hook that edits the processed logits of a step in place: (row, generated ids so far, logits row [V]).
# Used for constrained decoding (``mtnlg poem``); None = unconstrained.
LogitsHook = Callable[[int, list[int], torch.Tensor], None]


@dataclass
class Completion:
    """One finished sequence. ``token_ids`` excludes a final stop token (it is in ``stop_token``)."""

    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] | None = None
    finish_reason: str = "length"  # "stop" (stop token or string) | "length"
    stop_token: int | None = None
    score: float | None = None  # beam search: the length-penalised score


SoftPrompt = Splice  # soft-prompt embeddings spliced into the prompts (prompt tuning)


def _device(model: GPT) -> torch.device:
    return next(model.parameters()).device


class _Batch:
    """The tensors of one left-padded batch: padded ids, positions, key mask, and how to embed them."""

    def __init__(self, model: GPT, prompts: Sequence[Sequence[int]], capacity: int, pad_id: int,
                 soft: SoftPrompt | None):
        self.model = model
        device = _device(model)
        self.B = len(prompts)
        lens = [len(p) for p in prompts]
        self.P = max(lens)
        self.pads = [self.P - n for n in lens]
        self.padded = any(self.pads)
        self.capacity = capacity  # P + the most new tokens of any row
        ids = torch.full((self.B, capacity), pad_id, dtype=torch.long, device=device)
        for i, p in enumerate(prompts):
            ids[i, self.pads[i]:self.P] = torch.tensor(list(p), dtype=torch.long, device=device)
        self.ids = ids
        pads = torch.tensor(self.pads, device=device)
        self.pos = (torch.arange(capacity, device=device).unsqueeze(0) - pads.unsqueeze(1)).clamp_(min=0)
        self.key_valid = torch.arange(capacity, device=device).unsqueeze(0) >= pads.unsqueeze(1)  # [B, S]
        self.soft = soft
        self.key_valid_static: torch.Tensor | None = None
        self.head = decode_head(model.output)
        if soft is not None:
            n = soft.embeds.shape[0]
            rows = torch.arange(self.B, device=device).repeat_interleave(n)
            cols = torch.tensor([self.pads[i] + soft.offsets[i] + j for i in range(self.B) for j in range(n)],
                                device=device)
            self.soft_index = (rows, cols)

    def mask(self, start: int, end: int) -> torch.Tensor | None:
        """Bool attention mask [B, 1, end-start, end] for queries start..end-1 over keys 0..end-1."""
        if not self.padded:
            return None
        T = end - start
        causal = torch.ones(T, end, dtype=torch.bool, device=self.ids.device).tril(diagonal=start)
        diag = torch.zeros(T, end, dtype=torch.bool, device=self.ids.device)
        diag[torch.arange(T), torch.arange(start, end)] = True
        return (causal & (self.key_valid[:, None, :end] | diag)).unsqueeze(1)

    def embeds(self, end: int) -> torch.Tensor | None:
        """Token embeddings of columns 0..end-1 with the soft prompt written in (None without one)."""
        if self.soft is None:
            return None
        e = self.model.tok_embeddings(self.ids[:, :end]).clone()
        e[self.soft_index] = self.soft.embeds.to(e.dtype).repeat(self.B, 1)
        return e

    def static_mask(self, start: int, end: int, length: int) -> torch.Tensor:
        """:meth:`mask` over all ``length`` columns of a static cache (the unwritten ones hidden)."""
        T = end - start
        m = torch.zeros(self.B, 1, T, length, dtype=torch.bool, device=self.ids.device)
        inner = self.mask(start, end)
        m[..., :end] = inner if inner is not None else torch.ones(
            T, end, dtype=torch.bool, device=self.ids.device).tril(diagonal=start)
        return m

    def forward(self, start: int, end: int, cache: KVCache | StaticKVCache | None) -> torch.Tensor:
        """Logits [B, V] of column ``end - 1`` after running columns ``start..end-1``."""
        if isinstance(cache, StaticKVCache):
            if start >= self.P and end == start + 1:  # a decode step: the compiled one
                if self.key_valid_static is None:
                    valid = torch.zeros(self.B, cache.max_len, dtype=torch.bool, device=self.ids.device)
                    valid[:, : self.capacity] = self.key_valid
                    self.key_valid_static = valid
                return compiled.decode_step(self.model, self.ids[:, start:end], self.pos[:, start:end], start,
                                            self.key_valid_static, cache)
            cache.at(torch.arange(start, end, device=self.ids.device))
            mask = self.static_mask(start, end, cache.max_len)
        else:
            mask = self.mask(start, end)
        token_embeds = None
        if self.soft is not None and start < self.P:
            token_embeds = self.embeds(end)[:, start:end]
        return self.model(self.ids[:, start:end], self.pos[:, start:end], cache, mask,
                          token_embeds, logits_at=-1, head=self.head)


def _rows(model: GPT, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams],
          tokenizer: Tokenizer | None) -> list[RowState]:
    """One validated, clamped :class:`RowState` per prompt (the budget rule raises before any work)."""
    if len(prompts) != len(params):
        raise ValueError("one SamplingParams per prompt")
    guard = Utf8Guard.for_tokenizer(tokenizer) if tokenizer is not None else None
    rows = []
    for pr, p in zip(prompts, params):
        p = p.validate().clamped(model.vocab_size)
        rows.append(RowState(list(pr), p, token_budget(len(pr), p, model.cfg.max_seq_len), tokenizer, guard))
    return rows


def _replace_vocab(p: SamplingParams, lim: int | None) -> SamplingParams:
    return dataclasses.replace(p, vocab_limit=lim)


def _completion(r: RowState) -> Completion:
    return Completion(prompt_ids=r.prompt_ids, token_ids=r.token_ids, text=r.text, logprobs=r.logprobs,
                      top_logprobs=r.top_logprobs, finish_reason=r.finish_reason or "length",
                      stop_token=r.stop_token)


def _decode(model: GPT, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams],
            tokenizer: Tokenizer | None, soft: SoftPrompt | None, hook: LogitsHook | None,
            ) -> Iterator[tuple[list[RowState], list[tuple[int, int, str]]]]:
    """The decode loop. Yields after every step: (row states, [(row, token, new safe text)]).
    Bad options and over-long requests raise here, before the first step (not at the first ``next``)."""
    rows = _rows(model, prompts, params, tokenizer)
    static_len = None
    if all(p.use_cache for p in params) and any(p.compile_decode for p in params):
        # the compiled step's cache length, checked and announced now, before the caller streams anything
        needed = max(len(p) for p in prompts) + max(r.budget for r in rows)
        static_len = compiled.static_length(needed, model.cfg.max_seq_len)
        compiled.prepare(model, len(prompts), static_len)
    return _loop(model, prompts, params, tokenizer, soft, hook, rows, static_len)


def _loop(model: GPT, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams],
          tokenizer: Tokenizer | None, soft: SoftPrompt | None, hook: LogitsHook | None, rows: list[RowState],
          static_len: int | None) -> Iterator[tuple[list[RowState], list[tuple[int, int, str]]]]:
    """``static_len``: decode steps compiled over a static cache of that length (None: eager)."""
    pad_id = tokenizer.pad_id if tokenizer is not None else 0
    max_new = max(r.budget for r in rows)
    batch = _Batch(model, prompts, max(len(p) for p in prompts) + max_new, pad_id, soft)
    P = batch.P
    # logits are cut to the smallest vocab_limit of the batch (in practice all rows share the tokenizer)
    vocab = min([model.vocab_size] + [p.vocab_limit for p in params if p.vocab_limit is not None])
    rowp = [r.params if r.params.vocab_limit is None else _replace_vocab(r.params, None) for r in rows]
    plain = all(p.is_plain_greedy() for p in rowp) and hook is None
    use_cache = all(p.use_cache for p in params)
    device = _device(model)
    gens = [torch.Generator(device=device).manual_seed(p.seed) if p.seed is not None else None for p in rowp]
    want_lp = any(p.logprobs is not None for p in rowp)
    k_top = max(p.logprobs or 0 for p in rowp)
    alive = list(range(len(rows)))
    cache: KVCache | StaticKVCache | None = None
    if static_len is not None:
        cache = StaticKVCache(len(model.layers), static_len)
    elif use_cache:
        cache = KVCache(len(model.layers), batch.capacity)

    start = 0
    for step in range(max_new):
        end = P + step
        logits = batch.forward(start if use_cache else 0, end, cache)[:, :vocab]
        start = end
        if plain:
            tokens = pick_greedy(logits, rows)
            lps = torch.log_softmax(logits.float(), -1).gather(1, tokens[:, None])[:, 0] if want_lp else None
        else:
            constrained = logits
            if hook is not None:  # constraints first, so top-k / top-p choose among allowed tokens
                constrained = logits.float().clone()
                for i in alive:
                    hook(i, rows[i].token_ids, constrained[i])
            processed = process_logits(constrained, rowp, [r.history for r in rows], [len(pr) for pr in prompts],
                                       allowed=allowed_matrix(rows, vocab, logits.device))
            tokens, lps = sample(processed, rowp, gens, raw_logits=logits)
        batch.ids[:, end] = tokens
        tok_list = tokens.tolist()
        lp_list = lps.tolist() if lps is not None and want_lp else [None] * len(rows)
        top_ids = top_vals = None
        if k_top:
            top_ids, top_vals = (t.tolist() for t in top_logprobs(logits, k_top))
        events = []
        for i in alive:
            top = list(zip(top_ids[i], top_vals[i])) if top_ids is not None else None
            events.append((i, tok_list[i], rows[i].push(tok_list[i], lp_list[i], top)))
        alive = [i for i in alive if not rows[i].done]
        yield rows, events
        if not alive:
            break


@torch.inference_mode()
def generate(model: GPT, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
             tokenizer: Tokenizer | None = None, soft_prompt: SoftPrompt | None = None,
             logits_hook: LogitsHook | None = None) -> list[Completion]:
    """Continue a batch of token-id prompts (any lengths); one :class:`Completion` per prompt.

    ``params`` is one :class:`SamplingParams` for all rows or one per row. Text, stop strings and
    streaming need ``tokenizer``. ``num_beams > 1`` runs :func:`beam_search` per prompt.
    """
    plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
    if not prompts:
        return []
    if any(p.num_beams > 1 for p in plist):
        if soft_prompt is not None or logits_hook is not None:
            raise ConfigError("beam search (num_beams > 1) does not support soft prompts or constrained decoding; "
                              "use num_beams=1")
        return [beam_search(model, pr, p, tokenizer) for pr, p in zip(prompts, plist)]
    rows: list[RowState] = []
    for rows, _ in _decode(model, prompts, plist, tokenizer, soft_prompt, logits_hook):
        pass
    return [_completion(r) for r in rows]


def generate_ids(model: GPT, prompt: list[int], params: SamplingParams) -> list[int]:
    """Continue one prompt; the new token ids, ending with the stop token if one was produced."""
    c = generate(model, [prompt], params)[0]
    return c.token_ids + ([c.stop_token] if c.stop_token is not None else [])


class TextStream:
    """Iterate to get text deltas (whole characters only, stop strings never leaked);
    ``completion`` holds the finished :class:`Completion` once the iteration ends."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, prompt: Sequence[int], params: SamplingParams,
                 soft_prompt: SoftPrompt | None = None, logits_hook: LogitsHook | None = None):
        if params.num_beams > 1:
            raise ConfigError("streaming does not support beam search (num_beams > 1); use num_beams=1")
        self._it = _decode(model, [prompt], [params], tokenizer, soft_prompt, logits_hook)
        self.completion: Completion | None = None

    def __iter__(self) -> Iterator[str]:
        with torch.inference_mode():
            for rows, events in self._it:
                self.completion = _completion(rows[0])
                for _, _, delta in events:
                    if delta:
                        yield delta


def stream(model: GPT, tokenizer: Tokenizer, prompt: Sequence[int], params: SamplingParams,
           soft_prompt: SoftPrompt | None = None, logits_hook: LogitsHook | None = None) -> TextStream:
    """A :class:`TextStream` over one prompt's continuation."""
    return TextStream(model, tokenizer, prompt, params, soft_prompt, logits_hook)


@torch.inference_mode()
def beam_search(model: GPT, prompt: Sequence[int], params: SamplingParams,
                tokenizer: Tokenizer | None = None) -> Completion:
    """Keep the ``num_beams`` best partial sequences by total logprob; return the best finished one.

    A hypothesis finishes on a stop token, on a stop string (its text is cut before it) or at the
    token budget; its score is ``sum(logprobs) / len ** length_penalty`` (``len`` = new tokens, the
    stop token included), so ``length_penalty > 0`` favours longer outputs. The search ends when
    every beam slot holds a finished hypothesis that no running beam can still beat (scores only
    fall as beams grow; for ``length_penalty >= 0`` this bound is the one Hugging Face uses). Logit
    processing (penalties, n-gram ban) and the UTF-8 guard apply; temperature and sampling filters do not.
    """
    row = _rows(model, [prompt], [params], tokenizer)[0]
    params, budget = row.params, row.budget
    nb = params.num_beams
    device = _device(model)
    vocab = min(model.vocab_size, params.vocab_limit or model.vocab_size)
    stop_ids = row.stop_ids
    lp_pen = params.length_penalty
    guard = row.guard
    proc = SamplingParams(**{**params.__dict__, "temperature": 0.0, "vocab_limit": None, "num_beams": 1})
    cache = KVCache(len(model.layers), len(prompt) + budget) if params.use_cache else None
    P = len(prompt)
    seqs = [list(prompt) for _ in range(nb)]
    states = [START] * nb
    beam_lps: list[list[float]] = [[] for _ in range(nb)]
    scores = torch.full((nb,), float("-inf"), device=device)
    scores[0] = 0.0
    finished: list[tuple[float, list[int], list[float], int | None, str | None]] = []  # score, ids, lps, stop, text

    def stop_text(ids: list[int]) -> str | None:
        """The text cut before the first stop string, or None if no stop string occurs."""
        if not params.stop:
            return None
        text = tokenizer.decode(ids, skip_special_tokens=True)
        hits = [i for i in (text.find(s) for s in params.stop) if i >= 0]
        return text[: min(hits)] if hits else None

    x = torch.tensor([list(prompt)] * nb, device=device)
    for step in range(budget):
        if cache is not None:
            logits = model(x, cache=cache, logits_at=-1)[:, :vocab]
        else:
            logits = model(torch.tensor(seqs, device=device), logits_at=-1)[:, :vocab]
        logits = process_logits(logits, [proc] * nb, seqs, [P] * nb)
        if guard is not None:
            left = budget - step
            for b in range(nb):
                m = guard.mask(states[b], left, vocab, device)
                if m is not None:
                    logits[b].masked_fill_(~m, float("-inf"))
        logp = torch.log_softmax(logits, dim=-1)
        cand = (scores[:, None] + logp).view(-1)
        top = torch.topk(cand, min(2 * nb, cand.numel()))
        new_beams: list[tuple[int, int, float]] = []
        n = step + 1
        for val, flat in zip(top.values.tolist(), top.indices.tolist()):
            if val == float("-inf"):
                break
            b, t = divmod(flat, vocab)
            lps = beam_lps[b] + [val - float(scores[b])]
            if t in stop_ids:
                finished.append((val / n ** lp_pen, seqs[b][P:], lps[:-1], t, None))
                continue
            cut = stop_text(seqs[b][P:] + [t])
            if cut is not None:
                finished.append((val / n ** lp_pen, seqs[b][P:] + [t], lps, None, cut))
                continue
            new_beams.append((b, t, val))
            if len(new_beams) == nb:
                break
        if not new_beams:
            break
        finished.sort(key=lambda f: -f[0])
        del finished[nb:]
        if len(finished) == nb:  # can any running beam still beat the worst finished one?
            best_running = max(v for _, _, v in new_beams)
            bound = best_running / (budget if lp_pen > 0 and best_running < 0 else step + 1) ** lp_pen \
                if lp_pen != 0 else best_running
            if bound <= finished[-1][0]:
                break
        while len(new_beams) < nb:  # fewer live candidates than beams: pad with a dead copy
            new_beams.append((new_beams[0][0], new_beams[0][1], float("-inf")))
        idx = torch.tensor([b for b, _, _ in new_beams], device=device)
        old_scores = scores.tolist()
        seqs = [seqs[b] + [t] for b, t, _ in new_beams]
        beam_lps = [beam_lps[b] + [v - old_scores[b]] for b, _, v in new_beams]
        if guard is not None:
            states = [guard.next_state(states[b], t) or START for b, t, _ in new_beams]
        scores = torch.tensor([v for _, _, v in new_beams], device=device)
        if cache is not None:
            cache.reorder(idx)
        x = torch.tensor([[t] for _, t, _ in new_beams], device=device)
    n_new = len(seqs[0]) - P
    for b in range(nb):
        if scores[b] > float("-inf") and n_new > 0:
            finished.append((float(scores[b]) / n_new ** lp_pen, seqs[b][P:], beam_lps[b], None, None))
    if not finished:
        return Completion(prompt_ids=list(prompt))
    score, ids, lps, stop, cut = max(finished, key=lambda f: f[0])
    reason = "stop" if stop is not None or cut is not None else "length"
    c = Completion(prompt_ids=list(prompt), token_ids=list(ids), logprobs=list(lps) if params.logprobs is not None else [],
                   finish_reason=reason, stop_token=stop, score=score)
    if tokenizer is not None:
        c.text = cut if cut is not None else tokenizer.decode(ids, skip_special_tokens=True)
    return c
