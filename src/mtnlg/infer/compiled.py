"""The decode step through ``torch.compile``, over a static KV cache (``SamplingParams.compile_decode``).

An eager decode step of a small model is bound by PyTorch's per-operator dispatch, not by reading the
weights: the benchmark model (8 x 288, vocab 8192, 41 MB of fp32 weights) spends ~1 ms of its ~2.7 ms
per token in the matmuls and the rest in ~25 small operators a layer. Compiled, the element-wise work
(LayerNorm, GELU, bias, residual, the cache write, the mask) becomes a few generated C++ kernels per
layer around the matmuls, and one call replaces ~200 dispatches.

What makes it compile once per batch shape: the KV cache is a :class:`~mtnlg.model.kv_cache.StaticKVCache`
(fixed ``[B, H, S, D]`` buffers per layer, written in place at a column given as a tensor) and
attention always sees all S columns through a mask built inside the graph from that column, so neither
the step number nor the sequence length is a Python value the compiled code depends on. S is the
request's length rounded up to a power of two (at least 64, at most the model's context), so a few
lengths share one compiled step. The prefill stays eager (its length varies with every prompt).

Costs: the first step of each new (model, batch size, S) compiles, ~10-30 s on 2 CPU cores (later
processes reuse inductor's on-disk cache for part of it); attention reads S cached columns a step
instead of the filled ones. It pays for long generations at small batch; see ``benchmarks/decode.py
--compile``. Weights stay graph inputs (no freezing), so a model trained or reloaded after a compile
is never decoded with stale weights.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from mtnlg.device import inference_attention
from mtnlg.errors import ConfigError
from mtnlg.model.kv_cache import StaticKVCache
from mtnlg.model.transformer import GPT

log = logging.getLogger(__name__)

MIN_LEN = 64
_compiled: Any = None
_seen: set[tuple[int, int, int]] = set()


def static_length(needed: int, max_seq_len: int) -> int:
    """The cache length S for a request of ``needed`` positions: a power of two >= 64, capped at the
    model's context."""
    s = MIN_LEN
    while s < needed:
        s *= 2
    return max(needed, min(s, max_seq_len))


def prepare(model: GPT, batch: int, length: int) -> None:
    """Check that ``model`` can decode compiled (one error, before any work) and say, once per new
    (model, batch, cache length), that its first step compiles: before any text is streamed, so the
    log line never lands inside the output."""
    check_model(model)
    key = (id(model), batch, length)
    if key not in _seen:
        _seen.add(key)
        log.info("compiling the decode step for batch %d, cache length %d (first time: ~10-30 s on a CPU)",
                 batch, length)


def check_model(model: GPT) -> None:
    """Only a whole model on one device compiles here."""
    if model.tok_embeddings is None or model.output is None or model.norm is None:
        raise ConfigError("compile_decode=True needs the whole model (a pipeline stage has no embeddings or "
                          "head); set compile_decode=False")
    if any(type(p) is not torch.nn.Parameter and type(p) is not torch.Tensor for p in model.parameters()):
        raise ConfigError("compile_decode=True needs plain weights on one device, not tensor-parallel shards; "
                          "set compile_decode=False")


def _step(model: GPT, tokens: torch.Tensor, positions: torch.Tensor, column: torch.Tensor,
          key_valid: torch.Tensor, cache: StaticKVCache) -> torch.Tensor:
    """Logits [B, V] of one new token per row: ``tokens``/``positions`` [B, 1], written at cache
    ``column`` ([1]); ``key_valid`` [B, S] marks the cache columns that are not left padding."""
    S = key_valid.shape[1]
    mask = (key_valid & (torch.arange(S, device=key_valid.device) <= column))[:, None, None, :]
    cache.at(column)
    h = model.embed(tokens, positions)
    for layer in model.layers.values():
        h = layer(h, cache, mask)
    return model.output(model.norm(h[:, -1]))


def decode_step(model: GPT, tokens: torch.Tensor, positions: torch.Tensor, column: int,
                key_valid: torch.Tensor, cache: StaticKVCache) -> torch.Tensor:
    """:func:`_step` through ``torch.compile`` (compiled on first use of each shape)."""
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(_step, dynamic=False, fullgraph=True)
    col = torch.tensor([column], device=tokens.device)
    with inference_attention(tokens.device):
        logits = _compiled(model, tokens, positions, col, key_valid, cache)
    cache.advance(1)
    return logits
