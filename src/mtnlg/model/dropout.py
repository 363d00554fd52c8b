"""Layout-independent dropout: each mask bit is a hash of the element's global coordinates.

``keep(row, t, f) = hash32(seed, site, row_key, t, f) >= p * 2^32``, where ``site`` numbers the
dropout (0: embeddings, ``1 + 2 * layer`` / ``2 + 2 * layer``: a layer's two residual branches, by
global layer index), ``row_key`` is a hash of the sample's own tokens (so it does not depend on which
rank, micro-batch or pipeline stage holds the row), ``t`` the global position (a sequence-parallel
shard adds its offset) and ``f`` the feature. A counter-based generator has no state to keep in step,
so tensor, sequence, data and pipeline parallelism draw exactly the masks of one process (Megatron's
RNG tracker only makes them independent per rank, not equal).

The row keys travel with the activations as an argument (``keys=``), not as module state: a pipeline
schedule runs the micro-batches of a stage out of order with their backward passes, and activation
checkpointing recomputes a block's forward later, both with the keys that block saw first.

The hash is ``lowbias32`` on int64 tensors holding 32-bit values (products wrap, the low 32 bits stay
exact), fast enough for a CPU model; ``seed`` (``GPT.dropout_seed``) lets a loop vary masks per step.
"""

from __future__ import annotations

import torch
from torch import nn

MASK32 = 0xFFFFFFFF


def hash32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int64 tensors of 32-bit values."""
    x = x & MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def row_keys(tokens: torch.Tensor) -> torch.Tensor:
    """[B, T] token ids -> [B] 32-bit keys: a position-aware hash of each row's content."""
    t = torch.arange(tokens.shape[1], device=tokens.device, dtype=torch.int64)
    return hash32(hash32(tokens.long() ^ hash32(t + 0x9E3779B9)).sum(1))


def keep_mask(shape: torch.Size, p: float, seed: int, site: int, keys: torch.Tensor, t0: int,
              device: torch.device) -> torch.Tensor:
    """Boolean keep mask [B, T, F] for rows ``keys`` at global positions ``t0 .. t0 + T - 1``."""
    B, T, F = shape
    base = hash32(torch.tensor((seed * 0x9E3779B1 + site * 0x85EBCA77) & MASK32, device=device))
    h = hash32(base ^ keys.to(device).view(B, 1, 1))
    h = hash32(h ^ (torch.arange(t0, t0 + T, device=device, dtype=torch.int64) * 0xC2B2AE3D & MASK32).view(1, T, 1))
    h = hash32(h ^ torch.arange(F, device=device, dtype=torch.int64).view(1, 1, F))
    return h >= int(p * 2**32)


class HashDropout(nn.Module):
    """Dropout whose mask is :func:`keep_mask` of the element's global coordinates.

    ``keys`` ([B] row keys, :func:`row_keys` of the batch's tokens) come from
    :class:`~mtnlg.model.transformer.GPT` with each forward; ``seq_shard = (rank, world)`` is set by
    sequence parallelism (``mtnlg.parallel.tensor``), whose local input holds positions ``rank * T_local ..``.
    """

    def __init__(self, p: float, site: int):
        super().__init__()
        self.p = p
        self.site = site
        self.seed = 0
        self.seq_shard = (0, 1)

    def forward(self, x: torch.Tensor, keys: torch.Tensor | None = None) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if keys is None or keys.shape[0] != x.shape[0]:  # a block used on its own: rows keyed by batch index
            keys = torch.arange(x.shape[0], device=x.device, dtype=torch.int64)
        t0 = self.seq_shard[0] * x.shape[1]
        keep = keep_mask(x.shape, self.p, self.seed, self.site, keys, t0, x.device)
        return x.masked_fill(~keep, 0.0) * (1.0 / (1.0 - self.p))  # autograd keeps the 1-byte mask only

    def extra_repr(self) -> str:
        return f"p={self.p}, site={self.site}"
