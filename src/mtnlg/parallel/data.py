"""Data parallelism: FSDP2 (ZeRO-3 / ZeRO-2-like), DDP and HSDP, plus low-communication outer sync.

All three are ``fully_shard`` over the data-parallel part of the mesh::

    dp_shard > 1, dp_replicate = 1   FSDP (ZeRO-3; reshard_after_forward=False ~ ZeRO-2)
    dp_shard = 1, dp_replicate > 1   DDP  (a 1-way shard: parameters replicated, grads all-reduced)
    both > 1                         HSDP (shard inside a replica group, all-reduce across groups)

Gradients are summed, not averaged (divide factor 1): the step scales each loss so that the sum
is the token-weighted or the per-rank mean (see :mod:`mtnlg.train.step`).

``sync_every = H > 1`` (local SGD / DiLoCo): the replicas skip the cross-replica all-reduce for H
inner steps, then average their parameter deltas and apply an outer Nesterov-SGD step.

``outer_async`` (overlapped / streaming DiLoCo, the outer step one round late): the average of a
round's deltas is started with ``async_op=True`` and the next H inner steps run while it travels; it
is waited for and applied at the next sync point. Round k starts from ``B_k``, ends at ``P_k``::

    sync k:  send g_k = B_k - P_k (async)          wait avg(g_{k-1});  A <- outer(A, avg g_{k-1})
             B_{k+1} = A + (P_k - B_k)   (the global model + this replica's own not-yet-averaged round)

so each round's progress is counted once: locally for one round, then averaged inside ``A``.
:func:`outer_reference` is the same arithmetic (synchronous or delayed) for R replicas in one process.
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
            m.set_gradient_divide_factor(1.0)  # the step scales the loss; FSDP only sums
            m.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no PREMUL_SUM)
    return model


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor, or the tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


class OuterSync:
    """DiLoCo-style outer step over the ``dp_replicate`` group every ``every`` inner steps. ``params`` are
    this rank's (its pipeline stages' only, under pipeline parallelism: each stage keeps the anchors and
    momentum of its own parameters and averages over its own replica group).

    The outer "gradient" is the replica-averaged delta ``anchor - param``; a Nesterov SGD step on
    the anchor (``outer_lr``, ``outer_momentum``) gives the new parameters on every replica. With
    ``overlap`` the average runs asynchronously and is applied one outer step late (module doc).
    """

    def __init__(self, params: list[nn.Parameter], group: dist.ProcessGroup | None, every: int,
                 lr: float, momentum: float, overlap: bool = False, mesh: DeviceMesh | None = None):
        self.params = params
        self.group = group
        self.mesh = mesh  # the whole device mesh: checkpoints stack per-replica state over its dp_replicate dim
        self.every = every
        self.overlap = overlap
        self.anchors = [local(p).detach().clone() for p in params]
        self.opt = torch.optim.SGD(self.anchors, lr=lr, momentum=momentum, nesterov=momentum > 0)
        self.starts = [a.clone() for a in self.anchors] if overlap else None  # B_k: where this round began
        self._pending: tuple[dist.Work | None, torch.Tensor] | None = None
        self.wait_seconds = 0.0  # time spent blocked on the outer all-reduce (what overlap hides)

    def _world(self) -> int:
        return dist.get_world_size(self.group) if self.group is not None else 1

    @property
    def replicas(self) -> int:
        """How many replicas average at each outer step."""
        return self._world()

    @property
    def replica(self) -> int:
        """This rank's replica index (its rank in the outer group)."""
        return dist.get_rank(self.group) if self.group is not None else 0

    def _start_average(self, deltas: list[torch.Tensor]) -> tuple[dist.Work | None, torch.Tensor]:
        flat = torch.cat([d.flatten() for d in deltas])
        work = dist.all_reduce(flat, group=self.group, async_op=True) if self._world() > 1 else None
        return work, flat

    def _finish_average(self, pending: tuple[dist.Work | None, torch.Tensor]) -> list[torch.Tensor]:
        import time

        work, flat = pending
        if work is not None:
            t0 = time.perf_counter()
            work.wait()
            self.wait_seconds += time.perf_counter() - t0
            flat /= self._world()
        return list(torch.split(flat, [a.numel() for a in self.anchors]))

    def _outer_step(self, deltas: list[torch.Tensor]) -> None:
        for a, d in zip(self.anchors, deltas):
            a.grad = d.view_as(a)
        self.opt.step()

    @torch.no_grad()
    def maybe_sync(self, step: int) -> bool:
        """After optimizer step ``step`` (1-based): the outer step when ``step % every == 0``."""
        if step % self.every:
            return False
        if not self.overlap:
            sent = self._start_average([a - local(p) for a, p in zip(self.anchors, self.params)])
            deltas = self._finish_average(sent)
            self._outer_step(deltas)
            for a, p in zip(self.anchors, self.params):
                local(p).copy_(a)
            return True
        sent = self._start_average([b - local(p) for b, p in zip(self.starts, self.params)])
        if self._pending is not None:
            self._outer_step(self._finish_average(self._pending))
        self._pending = sent
        for a, b, p in zip(self.anchors, self.starts, self.params):
            lp = local(p)
            lp.add_(a - b)  # B_{k+1} = A + (P_k - B_k)
            b.copy_(lp)
        return True

    def state_dict(self) -> dict[str, object]:
        """Anchors, outer momentum, round starts and the in-flight average (waited for) — all a resume needs."""
        momentum = [self.opt.state.get(a, {}).get("momentum_buffer") for a in self.anchors]
        state: dict[str, object] = {"anchors": [a.detach().clone() for a in self.anchors], "momentum": momentum}
        if self.overlap:
            state["starts"] = [b.clone() for b in self.starts]
            if self._pending is not None:
                work, flat = self._pending
                if work is not None:
                    work.wait()
                    flat /= self._world()
                self._pending = (None, flat)
                state["pending"] = flat.clone()
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore :meth:`state_dict`. Missing pieces start fresh from the current parameters: no
        ``anchors`` (a checkpoint of a ``sync_every = 1`` run) anchors at the parameters, no ``starts``
        begins the round at the parameters, no ``momentum`` / ``pending`` means none yet."""
        anchors = state.get("anchors") or [local(p) for p in self.params]
        for a, v in zip(self.anchors, anchors):
            a.copy_(v)
        self.opt.state.clear()
        for a, m in zip(self.anchors, state.get("momentum") or [None] * len(self.anchors)):
            if m is not None:
                self.opt.state[a]["momentum_buffer"] = m.clone()
        if self.overlap:
            starts = state.get("starts") or [local(p) for p in self.params]
            for b, v in zip(self.starts, starts):
                b.copy_(v)
            self._pending = (None, state["pending"].clone()) if state.get("pending") is not None else None

    def reset(self) -> None:
        """Start the outer optimizer afresh at the current parameters (after loading other weights)."""
        self.load_state_dict({})


def outer_reference(replica_params: list[list[torch.Tensor]], inner_step, every: int, steps: int,
                    lr: float, momentum: float, overlap: bool = True) -> list[list[torch.Tensor]]:
    """One-process reference of local SGD for R replicas (the math of the module doc): ``inner_step(r,
    step, params)`` updates replica r's tensors in place; every ``every`` steps the outer Nesterov step
    on the replica-averaged deltas, applied at once (``overlap=False``) or one outer step late
    (``overlap=True``). Returns every replica's final tensors."""
    params = [[t.clone() for t in ps] for ps in replica_params]
    anchors = [t.clone() for t in params[0]]
    opt = torch.optim.SGD(anchors, lr=lr, momentum=momentum, nesterov=momentum > 0)
    starts = [[t.clone() for t in ps] for ps in params]
    pending = None
    R = len(params)
    for step in range(1, steps + 1):
        for r in range(R):
            inner_step(r, step, params[r])
        if step % every:
            continue
        if not overlap:
            for i, a in enumerate(anchors):
                a.grad = sum(a - params[r][i] for r in range(R)) / R
            opt.step()
            for r in range(R):
                for p, a in zip(params[r], anchors):
                    p.copy_(a)
            continue
        sent = [sum(starts[r][i] - params[r][i] for r in range(R)) / R for i in range(len(anchors))]
        if pending is not None:
            for a, d in zip(anchors, pending):
                a.grad = d.clone()
            opt.step()
        pending = sent
        for r in range(R):
            for a, b, p in zip(anchors, starts[r], params[r]):
                p.add_(a - b)
                b.copy_(p)
    return params


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
