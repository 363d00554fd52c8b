"""Held-out loss, perplexity and bits per byte of a model over packed token samples.

::

    samples (seq_len + 1 tokens each)  ─►  logits = model(x[:-1])  ─►  NLL of x[1:]
    loss          = sum NLL / tokens                       (nats per token)
    perplexity    = exp(loss)
    bits_per_byte = sum NLL / ln 2 / bytes                 (bytes = UTF-8 bytes of the target tokens)
    bits_per_char = sum NLL / ln 2 / characters            (characters of the target tokens' text)

Bits per byte and per character do not depend on the tokenizer, so models with different
vocabularies (and n-gram models, see :mod:`mtnlg.eval.quality`) compare. Special tokens
(``<|endoftext|>`` between documents) count their loss but no bytes or characters: they are
separators, not text. A token's characters are its UTF-8 lead bytes, so a character split over
several tokens counts once. Sequences come from :func:`mtnlg.data.datasets.eval_sequences` (every
target of a split exactly once, the same tokens the training loop scores) or from a preprocessed
prefix (:func:`prefix_dataset`); this module never re-implements data loading.
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
    bits_per_char: float = float("nan")
    chars: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def token_byte_lengths(tokenizer) -> np.ndarray:
    """UTF-8 byte length of every token id (0 for special/added tokens)."""
    specials = set(tokenizer.hf.get_added_tokens_decoder())
    return np.array([0 if i in specials else len(tokenizer.token_bytes(i)) for i in range(tokenizer.vocab_size)],
                    dtype=np.int64)


def token_char_lengths(tokenizer) -> np.ndarray:
    """Characters each token id contributes to a text (its UTF-8 lead bytes; 0 for special tokens)."""
    specials = set(tokenizer.hf.get_added_tokens_decoder())
    return np.array([0 if i in specials else sum(1 for b in tokenizer.token_bytes(i) if b & 0xC0 != 0x80)
                     for i in range(tokenizer.vocab_size)], dtype=np.int64)


def prefix_dataset(prefix: str, tokenizer, seq_len: int) -> Dataset:
    """Every document of a preprocessed ``PREFIX.{bin,idx}`` packed into ``seq_len + 1``-token samples."""
    from mtnlg.data.datasets import GPTDataset
    from mtnlg.data.indexed import IndexedDataset

    ds = IndexedDataset(prefix)
    ds.verify()  # checksum and token ids, before any forward pass
    if ds.vocab_size != tokenizer.vocab_size:
        raise DataError(f"{ds.idx_path} was tokenized with a {ds.vocab_size}-token vocabulary but the model's "
                        f"tokenizer has {tokenizer.vocab_size}; preprocess the data with the model's tokenizer")
    if ds.num_tokens < 2:
        raise DataError(f"{ds.bin_path} holds {ds.num_tokens} token(s); evaluation needs at least 2")
    return GPTDataset(ds, np.arange(len(ds)), seq_len, "data")


def eval_pieces(dataset: Dataset, context: int = 0) -> list[torch.Tensor] | list[tuple[torch.Tensor, int]]:
    """Every target token of ``dataset`` (a split or a prefix dataset) exactly once; ``context`` > 0:
    overlapping windows, every target after the first ``context`` with at least that many tokens before it
    (:meth:`mtnlg.data.datasets.GPTDataset.whole`)."""
    from mtnlg.data.datasets import eval_sequences

    return eval_sequences(dataset, context)


@torch.no_grad()
def evaluate(model: torch.nn.Module, samples: Iterable[torch.Tensor], byte_lengths: np.ndarray,
             batch_size: int = 8, progress: Callable[[int], None] | None = None,
             char_lengths: np.ndarray | None = None) -> EvalResult:
    """Loss/perplexity/bits-per-byte (and per character) of ``model`` (a GPT) over ``samples``.

    Each sample is a 1-D tensor of ids whose tokens after the first are the targets (pieces of
    different lengths are padded and the padding ignored), or ``(ids, skip)`` whose first ``skip``
    targets are context only (overlapping evaluation); logits are taken in fp32 over the
    model's real vocabulary (``model.vocab_size``, as training masks it), so padded embedding rows
    never leak into the softmax. ``progress(n)`` is called after each batch with the samples done.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    vocab = int(model.vocab_size)

    def table(per_token: np.ndarray | None) -> torch.Tensor:
        out = np.zeros(max(vocab, 0 if per_token is None else len(per_token)) + 1, dtype=np.int64)
        if per_token is not None:  # ids beyond the tokenizer (and the ignored padding): 0
            out[:len(per_token)] = per_token
        return torch.as_tensor(out, device=device)

    blen, clen = table(byte_lengths), table(char_lengths)
    nll_sum, tokens, nbytes, nchars, done = 0.0, 0, 0, 0, 0
    batch: list[torch.Tensor] = []
    skips: list[int] = []

    def run(batch: list[torch.Tensor]) -> None:
        nonlocal nll_sum, tokens, nbytes, nchars, done
        from mtnlg.data.datasets import pad_sequences

        x, target = pad_sequences(batch, max(s.numel() for s in batch), skips=skips)
        x, target = x.to(device), target.to(device)
        if int(x.max()) >= vocab or int(x.min()) < 0:
            raise DataError(f"token id {int(x.max())} is outside the model's vocabulary [0, {vocab}): the data was "
                            f"tokenized with another tokenizer")
        logits = model(x)[..., :vocab].float()
        nll = F.cross_entropy(logits.reshape(-1, vocab), target.reshape(-1), ignore_index=-100, reduction="sum")
        nll_sum += float(nll)
        valid = target != -100
        tokens += int(valid.sum())
        safe = torch.where(valid, target, torch.full_like(target, blen.numel() - 1))
        nbytes += int(blen[safe].sum())
        nchars += int(clen[safe].sum())
        done += len(batch)
        if progress is not None:
            progress(done)

    try:
        for sample in samples:
            sample, skip = sample if isinstance(sample, tuple) else (sample, 0)
            batch.append(torch.as_tensor(sample, dtype=torch.long))
            skips.append(skip)
            if len(batch) == batch_size:
                run(batch)
                batch, skips = [], []
        if batch:
            run(batch)
    finally:
        model.train(was_training)
    if tokens == 0:
        raise DataError("no tokens to evaluate: the split is empty (check data.split) or the data has < 2 tokens")
    loss = nll_sum / tokens
    bits = nll_sum / math.log(2)
    return EvalResult(loss=loss, perplexity=math.exp(loss) if loss < 700 else float("inf"),
                      bits_per_byte=bits / nbytes if nbytes else float("nan"),
                      tokens=tokens, bytes=nbytes, samples=done,
                      bits_per_char=bits / nchars if nchars else float("nan"), chars=nchars)
