"""TEMPORARY stand-in for mtnlg.infer.sampling / streaming until they land (serving helper)."""
from __future__ import annotations

import codecs
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    logprobs: int | None = None
    ignore_eos: bool = False


def process_logits(logits, params, histories, prompt_lens):
    out = logits.clone()
    for i, p in enumerate(params):
        row = out[i]
        if p.repetition_penalty != 1.0 and histories[i]:
            idx = torch.tensor(sorted(set(histories[i])), device=row.device)
            vals = row[idx]
            row[idx] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        gen = histories[i][prompt_lens[i]:]
        if gen and (p.presence_penalty or p.frequency_penalty):
            counts = torch.bincount(torch.tensor(gen, device=row.device), minlength=row.shape[0]).to(row.dtype)
            row -= p.presence_penalty * (counts > 0).to(row.dtype) + p.frequency_penalty * counts
        if p.temperature > 0:
            row /= p.temperature
            if p.top_k:
                kth = torch.topk(row, min(p.top_k, row.shape[-1])).values[-1]
                row.masked_fill_(row < kth, float("-inf"))
            if p.min_p > 0:
                probs = row.softmax(-1)
                row.masked_fill_(probs < p.min_p * probs.max(), float("-inf"))
            if p.top_p < 1.0:
                sl, idx = torch.sort(row, descending=True)
                pr = sl.softmax(-1)
                drop = pr.cumsum(-1) - pr > p.top_p
                sl = sl.masked_fill(drop, float("-inf"))
                row.copy_(torch.full_like(row, float("-inf")).scatter(-1, idx, sl))
    return out


def sample(logits, params, generators):
    toks = []
    for i, p in enumerate(params):
        if p.temperature == 0:
            toks.append(int(logits[i].argmax()))
        else:
            toks.append(int(torch.multinomial(logits[i].softmax(-1), 1, generator=generators[i])))
    return torch.tensor(toks)


class IncrementalDetokenizer:
    def __init__(self, tokenizer, skip_special_tokens=True):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        from mtnlg.data.tokenizer import SPECIAL_TOKENS
        self.special = {tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}

    def push(self, tok):
        if self.skip and tok in self.special:
            return ""
        return self.dec.decode(self.tok.token_bytes(tok))

    def flush(self):
        return self.dec.decode(b"", final=True)
