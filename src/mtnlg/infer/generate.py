"""Autoregressive generation with a preallocated KV cache: prefill the prompt once, then decode.

This is the engine behind ``MegatronLmModel.generate``. Decoding: greedy (``temperature=0``),
temperature sampling with top-k / top-p, and a seed for reproducible output.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mtnlg.errors import ConfigError
from mtnlg.model.kv_cache import KVCache
from mtnlg.model.transformer import GPT


@dataclass
class SamplingParams:
    """How to pick each next token."""

    max_new_tokens: int = 32
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    use_cache: bool = True
    vocab_limit: int | None = None  # never emit ids >= this (the tokenizer may be smaller than the embedding)

    def validate(self) -> None:
        if self.max_new_tokens < 0:
            raise ConfigError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")


def sample_next(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> torch.Tensor:
    """Pick one token per row of ``logits`` [B, V]."""
    if p.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / p.temperature
    if p.top_k:
        kth = torch.topk(logits, min(p.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > p.top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


@torch.inference_mode()
def generate_ids(model: GPT, prompt: list[int], params: SamplingParams) -> list[int]:
    """Continue one prompt; returns only the new token ids (stopping after a stop token)."""
    params.validate()
    if not prompt:
        raise ConfigError("the prompt is empty; give at least one token of text")
    device = next(model.parameters()).device
    max_len = model.cfg.max_seq_len
    if len(prompt) >= max_len:
        raise ConfigError(f"the prompt has {len(prompt)} tokens but the model's context (max_position_embeddings) "
                          f"is {max_len}; shorten the prompt")
    budget = min(params.max_new_tokens, max_len - len(prompt))
    gen = torch.Generator(device=device).manual_seed(params.seed) if params.seed is not None else None
    vocab = min(model.vocab_size, params.vocab_limit or model.vocab_size)
    tokens = torch.tensor([prompt], device=device)
    cache = KVCache(len(model.layers), len(prompt) + budget) if params.use_cache else None
    out: list[int] = []
    x = tokens
    for _ in range(budget):
        logits = model(x, cache=cache)[:, -1, :vocab]
        nxt = sample_next(logits, params, gen)
        tok = int(nxt[0])
        out.append(tok)
        if tok in params.stop_token_ids:
            break
        if cache is not None:
            x = nxt.view(1, 1)
        else:
            tokens = torch.cat([tokens, nxt.view(1, 1)], dim=1)
            x = tokens
    return out
