"""Data parallelism: FSDP2 (ZeRO-3 / ZeRO-2-like), DDP and HSDP, plus low-communication outer sync.

All three are ``fully_shard`` over the data-parallel part of the mesh::

    dp_shard > 1, dp_replicate = 1   FSDP (ZeRO-3; reshard_after_forward=False ~ ZeRO-2)
    dp_shard = 1, dp_replicate > 1   DDP  (a 1-way shard: parameters replicated, grads all-reduced)
    both > 1                         HSDP (shard inside a replica group, all-reduce across groups)

Gradients are summed, not averaged (divide factor 1): the engine scales each loss so that the sum
is the token-weighted or the per-rank mean (see :mod:`mtnlg.parallel.engine`).

``sync_every = H > 1`` (local SGD / DiLoCo): the replicas skip the cross-replica all-reduce for H
inner steps, then average their parameter deltas and apply an outer Nesterov-SGD step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor


def dp_mesh_for(mesh: DeviceMesh) -> DeviceMesh | None:
    """The mesh FSDP shards over (1-D for FSDP, 2-D replicate x shard for DDP/HSDP); None if dp = 1."""
    rep, shard = mesh["dp_replicate"].size(), mesh["dp_shard"].size()
    if rep * shard == 1:
        return None
    if rep == 1:
        return mesh["dp_shard"]
    return mesh["dp_replicate", "dp_shard"]


def apply_fsdp(model: nn.Module, dp_mesh: DeviceMesh, reshard_after_forward: bool = True,
               param_dtype: torch.dtype | None = None) -> nn.Module:
    """``fully_shard`` every block, then the root (embeddings, final norm, head) of a GPT or stage."""
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in model.layers.values():
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp)
    fully_shard(model, mesh=dp_mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)  # the engine scales the loss; FSDP only sums
            m.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no PREMUL_SUM)
    return model


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor, or the tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


class OuterSync:
    """DiLoCo-style outer step over the ``dp_replicate`` group every ``every`` inner steps.

    The outer "gradient" is the replica-averaged delta ``anchor - param``; a Nesterov SGD step on
    the anchor (``outer_lr``, ``outer_momentum``) gives the new parameters on every replica.
    """

    def __init__(self, params: list[nn.Parameter], group: dist.ProcessGroup | None, every: int,
                 lr: float, momentum: float):
        self.params = params
        self.group = group
        self.every = every
        self.anchors = [local(p).detach().clone() for p in params]
        self.opt = torch.optim.SGD(self.anchors, lr=lr, momentum=momentum, nesterov=momentum > 0)

    @torch.no_grad()
    def maybe_sync(self, step: int) -> bool:
        """After optimizer step ``step`` (1-based): the outer step when ``step % every == 0``."""
        if step % self.every:
            return False
        deltas = [a - local(p) for a, p in zip(self.anchors, self.params)]
        if self.group is not None and dist.get_world_size(self.group) > 1:
            flat = torch.cat([d.flatten() for d in deltas])
            dist.all_reduce(flat, group=self.group)
            flat /= dist.get_world_size(self.group)
            deltas = list(torch.split(flat, [d.numel() for d in deltas]))
        for a, d in zip(self.anchors, deltas):
            a.grad = d.view_as(a)
        self.opt.step()
        for a, p in zip(self.anchors, self.params):
            local(p).copy_(a)
        return True


def local_param_bytes(modules: list[nn.Module]) -> int:
    """Bytes of the parameters this rank stores (local shards of DTensors), each tensor once."""
    seen: set[int] = set()
    total = 0
    for m in modules:
        for p in m.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            t = local(p)
            total += t.numel() * t.element_size()
    return total
