"""Prompt tuning: a few trainable "virtual token" embeddings in front of a frozen model.

Layout of one sequence, by ``prompt_style`` (prefix / suffix texts are optional in both)::

    prefix_suffix: [prefix text] [soft_0 .. soft_{n-1}] [input text] [suffix text] [target ...]
    prepend:       [soft_0 .. soft_{n-1}] [prefix text] [input text] [suffix text] [target ...]
                    └ trainable [n, h] ┘  └── the prompt at generation ──┘   (loss only here)

(The spec's example: ``prepend`` with prefix "hello world" and suffix "goodbye".)

* ``num_tokens`` soft embeddings, initialised from the token embeddings of ``init_text`` (its
  tokens repeated / truncated to ``num_tokens``; random rows of the first ``vocab_size`` tokens
  when the text is empty);
* the base model is frozen (``requires_grad=False``; its weights stay bit-identical);
* the optimizer's lr is ``lr * lr_multiplier`` and it steps every ``update_every_n_steps``
  micro-batches (gradients accumulate in between);
* sequences are cut to ``max_seq_length`` (and the model's context) in tuning; at generation the
  prompt plus the new tokens must fit ``max_seq_length`` (more is refused with the numbers, as an
  over-long request is everywhere: :meth:`SoftPrompt.new_token_budget`).

Saved as a small safetensors file (the [n, h] tensor plus the style and its texts as metadata);
``mtnlg generate --prompt-tuning FILE`` splices it back in.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mtnlg.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

STYLES = ("prepend", "prefix_suffix")


@dataclass
class Splice:
    """Embeddings [n, h] that replace the ``n`` placeholder tokens at ``offsets[i]`` of each prompt
    (what :func:`mtnlg.infer.generate.generate` takes as ``soft_prompt``)."""

    embeds: torch.Tensor
    offsets: list[int]

class SoftPrompt(nn.Module):
    """``num_tokens`` trainable embeddings plus how to place them (style, prefix / suffix token ids)."""

    def __init__(self, embeds: torch.Tensor, style: str = "prepend", prefix: str = "", suffix: str = "",
                 max_seq_length: int = 512):
        super().__init__()
        if style not in STYLES:
            raise ConfigError(f"prompt_tuning_prompt_style='{style}' is not supported; use one of {list(STYLES)}")
        self.embeds = nn.Parameter(embeds.detach().clone().float())
        self.style = style
        self.prefix = prefix
        self.suffix = suffix
        self.max_seq_length = max_seq_length

    @property
    def num_tokens(self) -> int:
        return self.embeds.shape[0]

    @classmethod
    def from_config(cls, lm: Any, seed: int = 0) -> SoftPrompt:
        """Build from a :class:`~mtnlg.api.MegatronLmModel`'s ``prompt_tuning_*`` fields."""
        c = lm.config
        n = c.prompt_tuning_num_tokens
        if n <= 0:
            raise ConfigError("prompt tuning needs prompt_tuning_num_tokens > 0")
        emb = lm.model.tok_embeddings.weight.detach()
        vocab = min(c.prompt_tuning_vocab_size, lm.tokenizer.vocab_size, emb.shape[0])
        ids = [t for t in lm.tokenizer.encode(c.prompt_tuning_init_text) if t < vocab]
        if ids:
            ids = (ids * math.ceil(n / len(ids)))[:n]
        else:
            gen = torch.Generator().manual_seed(seed)
            ids = torch.randint(0, vocab, (n,), generator=gen).tolist()
        args = c.prompt_style_args
        return cls(emb[torch.tensor(ids)].float(), c.prompt_tuning_prompt_style, str(args.get("prefix", "")),
                   str(args.get("suffix", "")), min(c.prompt_tuning_max_seq_length, lm.model.cfg.max_seq_len))

    # -- layouts ------------------------------------------------------------------------------
    def layout(self, tokenizer: Any, input_ids: Sequence[int], target_ids: Sequence[int] = ()) -> tuple[list[int], int, int]:
        """(ids with ``num_tokens`` pad placeholders, offset of the soft tokens, index where the target starts)."""
        pre = tokenizer.encode(self.prefix) if self.prefix else []
        suf = tokenizer.encode(self.suffix) if self.suffix else []
        soft = [tokenizer.pad_id] * self.num_tokens
        if self.style == "prepend":
            ids, offset = soft + pre + list(input_ids) + suf, 0
        else:
            ids, offset = pre + soft + list(input_ids) + suf, len(pre)
        return ids + list(target_ids), offset, len(ids)

    def new_token_budget(self, prompt_len: int, max_new_tokens: int) -> int:
        """``max_new_tokens`` when the prompt plus its continuation fit ``max_seq_length``; else a one-line
        ConfigError naming the numbers (the one over-long rule: an error, never a silent clamp)."""
        if prompt_len + max_new_tokens > self.max_seq_length:
            raise ConfigError(
                f"the prompt takes {prompt_len} tokens with the soft prompt and its texts, and {max_new_tokens} new "
                f"tokens would make {prompt_len + max_new_tokens}, over prompt_tuning_max_seq_length="
                f"{self.max_seq_length}; ask for at most {self.max_seq_length - prompt_len} new tokens")
        return max_new_tokens

    def format_for_generation(self, input_ids: Sequence[int], tokenizer: Any):
        """Prompt ids with placeholders, and the :class:`Splice` that generation writes into them."""
        ids, offset, _ = self.layout(tokenizer, input_ids)
        if len(ids) >= self.max_seq_length:
            raise ConfigError(f"the prompt takes {len(ids)} tokens with the soft prompt and its texts, leaving no room "
                              f"in prompt_tuning_max_seq_length={self.max_seq_length}; shorten the prompt")
        return ids, Splice(self.embeds.detach(), [offset])

    # -- training -----------------------------------------------------------------------------
    def loss(self, model: nn.Module, tokenizer: Any, examples: Sequence[tuple[list[int], list[int]]],
             max_len: int) -> torch.Tensor:
        """Mean next-token cross entropy over the target tokens of ``examples`` ((input, target) id lists)."""
        rows, offsets, starts = [], [], []
        for inp, tgt in examples:
            ids, off, start = self.layout(tokenizer, inp, tgt)
            rows.append(ids[:max_len])
            offsets.append(off)
            starts.append(start)
        T = max(len(r) for r in rows)
        device = self.embeds.device
        ids = torch.full((len(rows), T), tokenizer.pad_id, dtype=torch.long, device=device)
        labels = torch.full_like(ids, -100)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
            labels[i, starts[i]:len(r)] = ids[i, starts[i]:len(r)]
        emb = model.tok_embeddings(ids)
        n = self.num_tokens
        idx = torch.tensor([[o + j for j in range(n)] for o in offsets], device=device)
        emb = emb.scatter(1, idx.unsqueeze(-1).expand(-1, -1, emb.shape[-1]),
                          self.embeds.to(emb.dtype).unsqueeze(0).expand(len(rows), -1, -1))
        logits = model(ids, token_embeds=emb)[..., : model.vocab_size]
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)

    # -- files --------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        meta = {"mtnlg": "soft_prompt", "style": self.style, "prefix": self.prefix, "suffix": self.suffix,
                "max_seq_length": str(self.max_seq_length)}
        save_file({"embeds": self.embeds.detach().cpu().contiguous()}, str(p), metadata=meta)
        return p

    @classmethod
    def load(cls, path: str | Path) -> SoftPrompt:
        from safetensors import SafetensorError, safe_open

        p = Path(path)
        if not p.is_file():
            raise CheckpointError(f"no soft prompt at {p}; create one with `mtnlg tune-prompt ... --output {p}`")
        try:
            with safe_open(str(p), "pt") as f:
                meta = f.metadata() or {}
                embeds = f.get_tensor("embeds")
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{p} is not a soft-prompt file ({e})") from None
        if meta.get("mtnlg") != "soft_prompt":
            raise CheckpointError(f"{p} is not a soft-prompt file written by `mtnlg tune-prompt`")
        return cls(embeds, meta.get("style", "prepend"), meta.get("prefix", ""), meta.get("suffix", ""),
                   int(meta.get("max_seq_length", "512")))


def load_soft_prompt(lm: Any, path: str | Path) -> SoftPrompt:
    """Attach a saved soft prompt to ``lm`` (a MegatronLmModel); generation then splices it in."""
    sp = SoftPrompt.load(path)
    h = lm.model.tok_embeddings.weight.shape[1]
    if sp.embeds.shape[1] != h:
        raise CheckpointError(f"{path} holds {sp.embeds.shape[1]}-wide embeddings but the model's hidden_size is {h}")
    lm.soft_prompt = sp.to(lm.model.tok_embeddings.weight.device)
    return sp


def tune_prompt(lm: Any, examples: Sequence[tuple[str, str]], steps: int = 100, lr: float = 0.1,
                batch_size: int = 8, seed: int = 0, soft: SoftPrompt | None = None,
                callback: Any = None) -> tuple[SoftPrompt, list[float]]:
    """Train a soft prompt on (input, target) text pairs with the base model frozen.

    Honours ``prompt_tuning_lr_multiplier`` (lr x multiplier), ``prompt_tuning_update_every_n_steps``
    (an optimizer step every n micro-batches) and ``prompt_tuning_max_seq_length``. Returns the soft
    prompt (also attached as ``lm.soft_prompt``) and the loss of every micro-batch.
    """
    c = lm.config
    lm._ensure_materialized()
    model = lm.model
    if not examples:
        raise ConfigError("prompt tuning needs at least one training example")
    soft = soft or getattr(lm, "soft_prompt", None) or SoftPrompt.from_config(lm, seed)
    model.requires_grad_(False)
    was_training = model.training
    model.eval()  # no dropout: the frozen model behaves as at inference
    tok = lm.tokenizer
    data = [(tok.encode(a), tok.encode(b) + [tok.eod_id]) for a, b in examples]
    max_len = min(c.prompt_tuning_max_seq_length, model.cfg.max_seq_len)
    opt = torch.optim.AdamW([soft.embeds], lr=lr * c.prompt_tuning_lr_multiplier, weight_decay=0.0)
    every = c.prompt_tuning_update_every_n_steps
    gen = torch.Generator().manual_seed(seed)
    losses = []
    try:
        for step in range(steps):
            pick = torch.randint(0, len(data), (min(batch_size, len(data)),), generator=gen).tolist()
            loss = soft.loss(model, tok, [data[i] for i in pick], max_len)
            (loss / every).backward()
            if (step + 1) % every == 0:
                opt.step()
                opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            if callback is not None:
                callback(step, losses[-1])
    finally:
        model.train(was_training)
    lm.soft_prompt = soft
    return soft, losses


def read_examples(path: str | Path) -> list[tuple[str, str]]:
    """Training pairs from a text file: ``input<TAB>target`` per line, or a plain line (empty input),
    or JSONL with ``{"input": ..., "target": ...}`` / ``{"text": ...}``."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--data {p} does not exist")
    out = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if p.suffix == ".jsonl":
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{p}:{n} is not valid JSON ({e})") from None
            out.append((str(d.get("input", "")), str(d.get("target", d.get("text", "")))))
        elif "\t" in line:
            a, b = line.split("\t", 1)
            out.append((a, b))
        else:
            out.append(("", line))
    if not out:
        raise ConfigError(f"--data {p} has no examples")
    return out
