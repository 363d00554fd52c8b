"""Optimisation pieces of the training loop: AdamW or Muon (:mod:`mtnlg.train.muon`), the LR schedule and
the MT-NLG batch-size ramp.
(Activation checkpointing and torch.compile are applied with the layout, in
:mod:`mtnlg.parallel.parallelize`; precision is set by the step, :mod:`mtnlg.train.step`.)

Everything here works on a list of model parts (one per pipeline stage held by this rank) whose
parameters may be plain tensors or DTensors (FSDP2 / TP); only Muon's step talks to other ranks (it
gathers each sharded matrix to orthogonalize it whole).

LR schedule (Megatron / MT-NLG)::

    lr ▲      ____
       │     /    `-._                      linear warmup over warmup_steps,
       │    /         `-._                  cosine decay to min_lr_ratio * lr at lr_decay_steps,
       │   /              `-.___________    then flat.
       └──┴──────────────────┴──────────► step
          warmup        lr_decay_steps
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Iterator

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from mtnlg.config import TrainConfig
from mtnlg.errors import ConfigError
from mtnlg.train.muon import build_muon

# -- AdamW / Muon --------------------------------------------------------------------------------------


def unique_parameters(model_parts: Iterable[nn.Module]) -> Iterator[tuple[str, nn.Parameter]]:
    """``(name, param)`` over all parts, each trainable parameter once (the tied LM head counts once)."""
    seen: set[int] = set()
    for part in model_parts:
        for name, p in part.named_parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                yield name, p


def no_decay(name: str, p: torch.Tensor) -> bool:
    """Biases and LayerNorm weights are not decayed (every parameter with fewer than 2 dims)."""
    return p.dim() < 2 or name.endswith(".bias")


def _adam_groups(named: list[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    decay = [p for n, p in named if not no_decay(n, p)]
    plain = [p for n, p in named if no_decay(n, p)]
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": plain, "weight_decay": 0.0, "name": "no_decay"}]
    return [g for g in groups if g["params"]]


def build_optimizer(model_parts: Iterable[nn.Module], cfg: TrainConfig) -> torch.optim.Optimizer:
    """``train.optimizer``: ``adamw`` (AdamW(beta1, beta2, eps, weight_decay) with two groups: decayed
    matrices, undecayed biases/norms) or ``muon`` (:mod:`mtnlg.train.muon`: the blocks' matrices take
    Muon's orthogonalized update, the rest that AdamW).

    Torch's fused AdamW kernel (``train.fused_adamw``, one pass over each parameter's state instead of
    a dozen element-wise ops) for plain tensors and for DTensors (FSDP2 / TP) that share one mesh;
    see :func:`set_kernel`.
    """
    named = list(unique_parameters(model_parts))
    if not named:
        raise ConfigError("the model has no trainable parameters")
    betas = (cfg.beta1, cfg.beta2)
    if cfg.optimizer == "muon":
        opt: torch.optim.Optimizer = build_muon(named, lambda rest: _adam_groups(rest, cfg.weight_decay), cfg.lr,
                                                cfg.weight_decay, betas, cfg.eps, muon_lr=cfg.muon_lr)
    else:
        opt = torch.optim.AdamW(_adam_groups(named, cfg.weight_decay), lr=cfg.lr, betas=betas, eps=cfg.eps,
                                weight_decay=cfg.weight_decay, foreach=False)
    set_kernel(opt, cfg.fused_adamw)
    return opt


def set_kernel(optimizer: torch.optim.Optimizer, fused: bool = True) -> None:
    """Choose AdamW's kernel per param group from the parameters it holds now: torch's fused kernel
    when they are plain tensors or DTensors on one device mesh (DTensor runs the fused op on the local
    shards: one dispatch per group instead of a dozen per parameter), else the per-parameter loop.
    Call again after loading a state dict saved under another layout (its param groups carry the
    saving layout's choice)."""
    for g in optimizer.param_groups:
        meshes = {id(p.device_mesh) if isinstance(p, DTensor) else None for p in g["params"]}
        g["fused"] = bool(fused and len(meshes) <= 1) or None
        g["foreach"] = None if g["fused"] or meshes == {None} else False


# -- learning-rate schedule ------------------------------------------------------------------------


def lr_multiplier(step: int, cfg: TrainConfig) -> float:
    """Factor on ``cfg.lr`` for optimizer step ``step`` (0-based: the first update uses step 0).

    Warmup is linear, ``(step + 1) / warmup_steps``, so the first update already moves; then cosine
    from 1 down to ``min_lr_ratio`` between ``warmup_steps`` and ``lr_decay_steps`` (default ``steps``).
    """
    warmup = cfg.warmup_steps
    decay_steps = cfg.lr_decay_steps if cfg.lr_decay_steps is not None else cfg.steps
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if step >= decay_steps:
        return cfg.min_lr_ratio
    span = max(1, decay_steps - warmup)
    progress = (step - warmup) / span
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_at(step: int, cfg: TrainConfig) -> float:
    """The learning rate of optimizer step ``step``."""
    return cfg.lr * lr_multiplier(step, cfg)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over :func:`lr_multiplier`; its state (``last_epoch``) is the number of updates done."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(lr_multiplier, cfg=cfg))


# -- MT-NLG batch-size ramp ------------------------------------------------------------------------


class BatchRamp:
    """Global batch size as a function of the samples consumed so far (Megatron's rampup_batch_size).

    The batch starts at ``rampup_batch_start`` and grows by ``rampup_batch_increment`` sequences in
    equal steps spread over ``rampup_tokens / seq_len`` samples, then stays at ``global_batch_size``.
    MT-NLG 530B: start 32, increment 32, over 12B tokens, to 1920. Every size must be a multiple of
    ``micro_batch_size * dp_size`` so that each rank runs a whole number of micro-batches.
    """

    def __init__(self, cfg: TrainConfig, dp_size: int = 1):
        self.global_batch_size = cfg.global_batch_size
        self.micro_batch_size = cfg.micro_batch_size
        self.dp_size = dp_size
        self.start, self.increment = cfg.rampup_batch_start, cfg.rampup_batch_increment
        self.ramp_samples = cfg.rampup_tokens // cfg.seq_len
        unit = cfg.micro_batch_size * dp_size
        self.enabled = cfg.rampup_tokens > 0 and self.start > 0 and self.start < self.global_batch_size
        if cfg.global_batch_size % unit:
            raise ConfigError(f"train.global_batch_size={cfg.global_batch_size} must be a multiple of "
                              f"train.micro_batch_size x data-parallel size = {cfg.micro_batch_size} x {dp_size}")
        if self.enabled:
            if self.increment <= 0:
                raise ConfigError("train.rampup_batch_increment must be > 0 when train.rampup_tokens > 0")
            if (self.global_batch_size - self.start) % self.increment:
                raise ConfigError(f"train.global_batch_size - train.rampup_batch_start = "
                                  f"{self.global_batch_size - self.start} must be a multiple of "
                                  f"train.rampup_batch_increment={self.increment}")
            for key, v in (("rampup_batch_start", self.start), ("rampup_batch_increment", self.increment)):
                if v % unit:
                    raise ConfigError(f"train.{key}={v} must be a multiple of micro_batch_size x data-parallel "
                                      f"size = {unit}")
            self.num_increments = (self.global_batch_size - self.start) // self.increment
            self.samples_per_increment = self.ramp_samples / self.num_increments

    def batch_size(self, consumed_samples: int) -> int:
        """Global batch size (sequences) of the step that starts after ``consumed_samples``."""
        if not self.enabled or consumed_samples >= self.ramp_samples:
            return self.global_batch_size
        steps = int(consumed_samples / self.samples_per_increment)
        return min(self.global_batch_size, self.start + steps * self.increment)

    def num_micro_batches(self, consumed_samples: int) -> int:
        """Micro-batches each data-parallel rank runs (gradient accumulation) at this point."""
        return self.batch_size(consumed_samples) // (self.micro_batch_size * self.dp_size)
