"""A preallocated key/value cache: prefill once, then decode one token at a time without regrowing."""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every layer for a batch of sequences that advance together.

    Storage is allocated on the first :meth:`update` (so the head count is the local one under
    tensor parallelism) as two tensors of shape [num_layers, B, H, max_len, D].
    """

    def __init__(self, num_layers: int, max_len: int):
        self.num_layers = num_layers
        self.max_len = max_len
        self.length = 0
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, H, T, D = k.shape
        if self.k is None:
            shape = (self.num_layers, B, H, self.max_len, D)
            self.k = torch.empty(shape, dtype=k.dtype, device=k.device)
            self.v = torch.empty(shape, dtype=v.dtype, device=v.device)
        end = self.length + T
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > max_len={self.max_len}")
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows ``index`` (beam search)."""
        if self.k is not None:
            self.k = self.k.index_select(1, index)
            self.v = self.v.index_select(1, index)

    def reset(self) -> None:
        self.length = 0
