"""Key/value caches: one protocol (:class:`LayerCache`), two layouts.

* :class:`KVCache` (contiguous): a batch of sequences that advance together (``generate``, beam search).
  ``[B, H, max_len, D]`` a layer, filled left to right; ``length`` positions are valid.
* :class:`StaticKVCache` (static): the same batch in buffers whose shapes never change, one per layer,
  written at columns the caller names: what a compiled decode step needs (``mtnlg.infer.compiled``).
* :class:`SlotKVCache` (slots): independent sequences of a continuous-batching scheduler. Shape
  ``[layers, slots, H, max_len, D]``; before each forward the scheduler says which slots take part and
  where each row's new tokens go (:meth:`SlotKVCache.select`), so prefill chunks, decode steps and a
  reused prompt prefix are all the same operation.

Attention calls ``update(layer, k, v)`` (store the new keys and values, get back every key and value
the queries may see) and the model calls ``advance(T)`` once after all layers.
"""

from __future__ import annotations

from typing import Protocol

import torch


class LayerCache(Protocol):
    """What attention needs from a KV cache."""

    length: int

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k, v`` ([B, H, T, D]) after the cached positions; return all keys and values so far."""
        ...

    def advance(self, num_tokens: int) -> None:
        """Mark ``num_tokens`` more positions as filled (called once per forward, after all layers)."""
        ...


class KVCache:
    """Keys and values of every layer for a batch of sequences that advance together.

    Storage is allocated on the first :meth:`update` (so the head count is the local one under
    tensor parallelism): one [B, H, max_len, D] tensor per layer for keys and one for values.
    """

    def __init__(self, num_layers: int, max_len: int):
        self.num_layers = num_layers
        self.max_len = max_len
        self.length = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, H, T, D = k.shape
        if not self.k:
            for store, like in ((self.k, k), (self.v, v)):
                store.extend(torch.empty(B, H, self.max_len, D, dtype=like.dtype, device=like.device)
                             for _ in range(self.num_layers))
        end = self.length + T
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > max_len={self.max_len}")
        # narrow + copy_: a decode step's write costs a third of Python indexing's
        kl, vl = self.k[layer], self.v[layer]
        kl.narrow(2, self.length, T).copy_(k)
        vl.narrow(2, self.length, T).copy_(v)
        return kl.narrow(2, 0, end), vl.narrow(2, 0, end)

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows ``index`` (beam search)."""
        self.k = [t.index_select(0, index) for t in self.k]
        self.v = [t.index_select(0, index) for t in self.v]

    def reset(self) -> None:
        self.length = 0


class StaticKVCache:
    """Keys and values of a batch that advances together, in buffers of a fixed shape.

    One ``[B, H, max_len, D]`` tensor per layer for keys and one for values (separate tensors, so that
    a compiled step writes one column of each in place rather than copying a stacked buffer). Before
    each forward the caller names the columns the new tokens go to (:meth:`at`); :meth:`update` writes
    them there and returns the whole buffers, so attention always sees ``max_len`` keys and the
    caller's mask hides the columns not written yet (they hold zeros, never NaN). Allocated on the
    first :meth:`update` (local head count under tensor parallelism).
    """

    def __init__(self, num_layers: int, max_len: int):
        self.num_layers = num_layers
        self.max_len = max_len
        self.length = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.columns: torch.Tensor | None = None

    def at(self, columns: torch.Tensor) -> None:
        """The next forward's T new tokens go to these columns ([T] long tensor)."""
        self.columns = columns

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.k:
            B, H, _, D = k.shape
            for store, like in ((self.k, k), (self.v, v)):
                store.extend(torch.zeros(B, H, self.max_len, D, dtype=like.dtype, device=like.device)
                             for _ in range(self.num_layers))
        self.k[layer][:, :, self.columns] = k
        self.v[layer][:, :, self.columns] = v
        return self.k[layer], self.v[layer]

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens


class SlotKVCache:
    """Keys and values for ``slots`` independent sequences; implements :class:`LayerCache`.

    Before each forward the scheduler calls :meth:`select`: row ``i`` of the batch is slot
    ``slots[i]``, its ``counts[i]`` new tokens (the batch is right-padded to T) go to positions
    ``starts[i] ..``, and attention sees positions ``0 .. span-1`` of the row's slot (the caller's
    attention mask hides what a row must not see). Padding is never written.
    """

    def __init__(self, num_layers: int, slots: int, heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (num_layers, slots, heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0  # unused: the scheduler always passes explicit positions
        self._rows: torch.Tensor | slice = slice(0, 0)
        self._write: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor] | None = None
        self._span = 0
        self._fresh = False

    @staticmethod
    def bytes_per_slot(num_layers: int, heads: int, max_len: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * heads * max_len * head_dim * torch.empty((), dtype=dtype).element_size()

    def select(self, slots: list[int], starts: list[int], counts: list[int]) -> int:
        """Route the next forward (see the class doc); returns ``span``, the key length it will see."""
        T = max(counts)
        span = max(s + n for s, n in zip(starts, counts))
        if span > self.max_len:
            raise ValueError(f"KV cache overflow: {span} positions > max_len={self.max_len}")
        dev = self.k.device
        contiguous = slots == list(range(slots[0], slots[0] + len(slots)))
        self._rows = slice(slots[0], slots[0] + len(slots)) if contiguous else torch.tensor(slots, device=dev)
        # every row starts at 0 with its whole input: attention needs only the new keys (no gather)
        self._fresh = all(s == 0 for s in starts) and all(n == T for n in counts)
        if T == 1:  # a decode step: row i's one new token goes to position starts[i] of its slot
            self._write = (None, None, torch.tensor(slots, device=dev), torch.tensor(starts, device=dev))
        else:
            b = [i for i, n in enumerate(counts) for _ in range(n)]
            t = [j for n in counts for j in range(n)]
            pos = [starts[i] + j for i, j in zip(b, t)]
            self._write = (torch.tensor(b, device=dev), torch.tensor(t, device=dev),
                           torch.tensor([slots[i] for i in b], device=dev), torch.tensor(pos, device=dev))
        self._span = span
        return span

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, slot, pos = self._write
        self.k[layer, slot, :, pos] = k[:, :, 0] if b is None else k[b, :, t]
        self.v[layer, slot, :, pos] = v[:, :, 0] if b is None else v[b, :, t]
        if self._fresh:
            return k, v
        return self.k[layer, self._rows, :, : self._span], self.v[layer, self._rows, :, : self._span]

    def copy_prefix(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` positions of slot ``src`` into slot ``dst`` (a shared prompt prefix)."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]

    def advance(self, num_tokens: int) -> None:
        pass
