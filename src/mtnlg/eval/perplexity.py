"""Held-out loss, perplexity and bits per byte of a model over packed token samples.

::

    samples (seq_len + 1 tokens each)  ─►  logits = model(x[:-1])  ─►  NLL of x[1:]
    loss          = sum NLL / tokens                       (nats per token)
    perplexity    = exp(loss)
    bits_per_byte = sum NLL / ln 2 / bytes                 (bytes = UTF-8 bytes of the target tokens)

Bits per byte does not depend on the tokenizer, so models with different vocabularies compare.
Special tokens (``<|endoftext|>`` between documents) count their loss but no bytes: they are
separators, not text. Samples come from :func:`mtnlg.data.datasets.build_datasets` (a split) or
from a preprocessed prefix (:func:`prefix_dataset`); this module never re-implements data loading.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from mtnlg.errors import DataError


@dataclass
class EvalResult:
    """Totals and the three derived numbers (``loss`` in nats per token)."""

    loss: float
    perplexity: float
    bits_per_byte: float
    tokens: int
    bytes: int
    samples: int

    def to_dict(self) -> dict:
        return asdict(self)


def token_byte_lengths(tokenizer) -> np.ndarray:
    """UTF-8 byte length of every token id (0 for special/added tokens)."""
    specials = set(tokenizer.hf.get_added_tokens_decoder())
    return np.array([0 if i in specials else len(tokenizer.token_bytes(i)) for i in range(tokenizer.vocab_size)],
                    dtype=np.int64)


def prefix_dataset(prefix: str, tokenizer, seq_len: int) -> Dataset:
    """Every document of a preprocessed ``PREFIX.{bin,idx}`` packed into ``seq_len + 1``-token samples."""
    from mtnlg.data.datasets import GPTDataset
    from mtnlg.data.indexed import IndexedDataset

    ds = IndexedDataset(prefix)
    if ds.vocab_size != tokenizer.vocab_size:
        raise DataError(f"{ds.idx_path} was tokenized with a {ds.vocab_size}-token vocabulary but the model's "
                        f"tokenizer has {tokenizer.vocab_size}; preprocess the data with the model's tokenizer")
    if ds.num_tokens < 2:
        raise DataError(f"{ds.bin_path} holds {ds.num_tokens} token(s); evaluation needs at least 2")
    return GPTDataset(ds, np.arange(len(ds)), seq_len, "data")


@torch.no_grad()
def evaluate(model: torch.nn.Module, samples: Iterable[torch.Tensor], byte_lengths: np.ndarray,
             batch_size: int = 8, progress: Callable[[int], None] | None = None) -> EvalResult:
    """Loss/perplexity/bits-per-byte of ``model`` (a :class:`~mtnlg.model.transformer.GPT`) over ``samples``.

    Each sample is a 1-D tensor of ``seq_len + 1`` ids; logits are taken in fp32 over the model's
    real vocabulary (``model.vocab_size``, as training masks it), so padded embedding rows never
    leak into the softmax. ``progress(n)`` is called after each batch with the number of samples done.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    vocab = int(model.vocab_size)
    lengths = np.zeros(max(vocab, len(byte_lengths)), dtype=np.int64)  # ids beyond the tokenizer: 0 bytes
    lengths[:len(byte_lengths)] = byte_lengths
    blen = torch.as_tensor(lengths, device=device)
    nll_sum, tokens, nbytes, done = 0.0, 0, 0, 0
    batch: list[torch.Tensor] = []

    def run(batch: list[torch.Tensor]) -> None:
        nonlocal nll_sum, tokens, nbytes, done
        x = torch.stack(batch).to(device)
        logits = model(x[:, :-1])[..., :vocab].float()
        target = x[:, 1:]
        nll = F.cross_entropy(logits.reshape(-1, vocab), target.reshape(-1), reduction="sum")
        nll_sum += float(nll)
        tokens += target.numel()
        nbytes += int(blen[target].sum())
        done += len(batch)
        if progress is not None:
            progress(done)

    try:
        for sample in samples:
            batch.append(torch.as_tensor(sample, dtype=torch.long))
            if len(batch) == batch_size:
                run(batch)
                batch = []
        if batch:
            run(batch)
    finally:
        model.train(was_training)
    if tokens == 0:
        raise DataError("no tokens to evaluate: the split is empty (check data.split) or the data has < 2 tokens")
    loss = nll_sum / tokens
    return EvalResult(loss=loss, perplexity=math.exp(loss),
                      bits_per_byte=nll_sum / math.log(2) / nbytes if nbytes else float("nan"),
                      tokens=tokens, bytes=nbytes, samples=done)
