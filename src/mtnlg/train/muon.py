"""Muon for the blocks' weight matrices, AdamW for the rest: one optimizer (``train.optimizer: muon``).

Muon (Jordan et al. 2024; "Muon is Scalable for LLM Training", Liu et al. 2025) replaces each hidden
weight matrix's update by the orthogonalized momentum: Nesterov momentum ``u``, then five quintic
Newton-Schulz iterations that map ``u = U S Vᵀ`` to about ``U Vᵀ``, scaled by ``0.2·sqrt(max(A, B))``
so that the update's RMS matches AdamW's and the same ``train.lr`` and ``train.weight_decay`` serve
both (Moonshot's rule, ``adjust_lr_fn="match_rms_adamw"`` in ``torch.optim.Muon``). Embeddings (the
tied LM head), LayerNorms and biases keep AdamW, as in every Muon recipe. On the default job (Muon's
lr four times AdamW's, ``train.muon_lr`` unset) it lowers the validation loss at the same steps from 4.354 to
4.148 (docs/train.md, "Optimizer").

The arithmetic is ``torch.optim.Muon``'s (same coefficients, momentum, Nesterov, learning-rate rule);
two things differ, and they are why this is not that class: PyTorch's orthogonalizes in bf16, which
a CPU without bf16 units multiplies at ~1 GFLOP/s and which makes the update depend on the layout (a
sharded matrix's products sum in another order: 1e-3 apart); here it runs in fp32 on the whole
matrix, gathered from its shards when it is a DTensor (FSDP2, TP), so every layout takes the same
step as one process. Matrices of one shape are orthogonalized together (a batched product a layer kind
instead of one per layer). The AdamW part is ``torch.optim.AdamW`` itself, sharing this optimizer's
state and parameter groups, so the LR schedule, the fused kernel choice and distributed checkpoints
see one ordinary optimizer.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # torch.optim.Muon's (Keller Jordan's quintic iteration)
NS_STEPS = 5
MOMENTUM = 0.95
EPS = 1e-7
LR_RATIO = 4.0  # train.muon_lr unset: this x train.lr (default job's valid loss: 1x 4.182, 2x 4.171, 4x 4.148, 8x 4.164)


def is_muon_matrix(name: str, p: torch.Tensor) -> bool:
    """The weight matrices inside the transformer blocks (QKV, projection, FC1, FC2), under any wrapper
    (``_checkpoint_wrapped_module.``, ``_orig_mod.``) that renames them."""
    return p.dim() == 2 and ("." + name).find(".layers.") >= 0 and name.endswith(".weight")


def orthogonalize(g: torch.Tensor, steps: int = NS_STEPS) -> torch.Tensor:
    """Newton-Schulz orthogonalization of a matrix or a stack of matrices ``[..., A, B]`` in fp32.

    Each iteration is ``x <- a x + (b G + c G G) x`` with ``G = x xᵀ``, written as three fused
    multiply-adds (``addmm``/``baddbmm``, as ``torch.optim.Muon`` does) instead of separate scalings and sums."""
    a, b, c = NS_COEFFICIENTS
    x = g.float()
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=EPS)
    batched = x.dim() > 2
    if x.dim() > 3:
        x = x.reshape(-1, *x.shape[-2:])
    fma = torch.baddbmm if batched else torch.addmm
    for _ in range(steps):
        gram = x @ x.mT
        x = fma(x, fma(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    x = x.reshape(*g.shape[:-2], *x.shape[-2:]) if batched else x
    return x.mT if tall else x


class MuonAdamW(torch.optim.Optimizer):
    """Param groups flagged ``muon`` take the Muon update; the others are a ``torch.optim.AdamW``'s."""

    def __init__(self, muon_params: list[nn.Parameter], adam_groups: list[dict], lr: float, weight_decay: float,
                 betas: tuple[float, float], eps: float, muon_lr: float | None = None):
        groups = ([{"params": muon_params, "weight_decay": weight_decay, "muon": True, "name": "muon",
                    "lr": LR_RATIO * lr if muon_lr is None else muon_lr}] if muon_params else [])
        groups += [dict(g, muon=False) for g in adam_groups]
        super().__init__(groups, {"lr": lr, "weight_decay": weight_decay, "momentum": MOMENTUM})
        self._adamw = torch.optim.AdamW([p for g in adam_groups for p in g["params"]] or [torch.zeros(1)],
                                        lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=False)
        self._link()

    def _link(self) -> None:
        """Make the inner AdamW read this optimizer's groups and state (also after a state-dict load)."""
        for g in self.param_groups:
            if not g["muon"]:
                for k, v in self._adamw.defaults.items():
                    g.setdefault(k, v)
        self._adamw.param_groups = [g for g in self.param_groups if not g["muon"]]
        self._adamw.state = self.state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._link()

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        assert closure is None, "MuonAdamW takes no closure"
        for g in self.param_groups:
            if g["muon"]:
                self._muon_step(g)
        if self._adamw.param_groups:
            self._adamw.step()

    def _muon_step(self, group: dict) -> None:
        lr, wd, m = group["lr"], group["weight_decay"], group["momentum"]
        by_shape: dict[tuple[int, ...], list[tuple[nn.Parameter, bool, torch.Tensor]]] = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - m)
            update = p.grad.lerp(buf, m)  # Nesterov
            full = update.full_tensor() if isinstance(update, DTensor) else update
            # one batch per shape up to transposition (FC1's [4h, h] goes with FC2's [h, 4h]): orthogonalizing
            # the transpose gives the transpose of the result
            tall = full.size(0) > full.size(1)
            by_shape.setdefault(tuple(sorted(full.shape)), []).append((p, tall, full.mT if tall else full))
        for shape, items in by_shape.items():
            ortho = orthogonalize(torch.stack([u for _, _, u in items]))
            scale = lr * 0.2 * math.sqrt(max(shape))
            for (p, tall, _), o in zip(items, ortho, strict=True):
                o = o.mT if tall else o
                if isinstance(p, DTensor):
                    o = distribute_tensor(o, p.device_mesh, p.placements, src_data_rank=None)  # this rank's part
                p.mul_(1 - lr * wd)
                p.add_(o.to(p.dtype), alpha=-scale)


def build_muon(named_params: Iterable[tuple[str, nn.Parameter]], adam_groups_of, lr: float, weight_decay: float,
               betas: tuple[float, float], eps: float, muon_lr: float | None = None) -> MuonAdamW:
    """Split ``named_params`` into the block matrices (Muon) and the rest, which ``adam_groups_of(list)`` turns
    into AdamW parameter groups (decayed matrices, undecayed biases and norms)."""
    muon, rest = [], []
    for name, p in named_params:
        (muon if is_muon_matrix(name, p) else rest).append((name, p))
    return MuonAdamW([p for _, p in muon], adam_groups_of(rest), lr, weight_decay, betas, eps, muon_lr)
