"""One training step on a parallelized model: loss, gradient-sync scaling, the pipeline schedule,
clipping and the non-finite check.

``build_train_step(cfg, device)`` builds the mesh, the model on meta and applies the layout with
:func:`mtnlg.parallel.parallelize.parallelize`; :class:`TrainStep` then runs steps on it::

    micro-batches ─► forward + loss (plain, chunked head, or vocab-parallel) ─► (loss * scale).backward()
                     (or the pipeline schedule)           grads reduced on the last micro-batch only
                  ─► SP LayerNorm grads summed over tp ─► tied-embedding copies summed (pp)
    clip_grad_norm_ (global, layout-correct) ─► optimizer (caller) ─► after_optimizer_step (local SGD)

Every layout gives the gradients of one process on the global batch: each microbatch's summed
token loss is scaled by ``1 / global_tokens`` (``grad_sync=token_weighted``) or
``1 / (local_tokens * dp)`` (``grad_sync=mean``), and the data-parallel reduction sums (FSDP divide
factor 1). This module is also the one place that sets train/eval mode and the autocast context.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import loss_parallel

from mtnlg.config import Config
from mtnlg.device import compute_dtype
from mtnlg.errors import ConfigError
from mtnlg.model.dropout import row_keys
from mtnlg.model.init import build_model
from mtnlg.parallel import pipeline as pipe
from mtnlg.parallel.comm import CommCounter
from mtnlg.parallel.data import OuterSync, local, local_param_bytes
from mtnlg.parallel.mesh import build_mesh, sub
from mtnlg.parallel.parallelize import ParallelModel, parallelize, pipeline_stages
from mtnlg.parallel.tensor import tp_model_config, vocab_mask
from mtnlg.train.loss import IGNORE, cross_entropy_sum, linear_cross_entropy

log = logging.getLogger(__name__)

__all__ = ["StepOutput", "TrainStep", "build_train_step"]


@dataclass
class StepOutput:
    """What one optimizer step reports: the global token-mean loss and the global token count."""

    loss: float
    tokens: int


def build_train_step(cfg: Config, device: torch.device) -> TrainStep:
    """This rank's step for ``cfg`` (call :func:`mtnlg.parallel.mesh.init_distributed` first when distributed)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    mesh = build_mesh(cfg.parallel, device, world)
    model = build_model(tp_model_config(cfg.model, cfg.parallel.tp))
    pm = parallelize(model, mesh, cfg.parallel, cfg.train, device, vocab_rows=cfg.model.padded_vocab_size())
    return TrainStep(cfg, pm)


class TrainStep:
    """The step logic for a :class:`~mtnlg.parallel.parallelize.ParallelModel` (see module doc)."""

    def __init__(self, cfg: Config, pm: ParallelModel):
        self.cfg, self.pm = cfg, pm
        self.device = pm.device
        self.layout = pm.layout
        self.model_parts: list[nn.Module] = pm.parts
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.mesh = pm.mesh
        self.comm = CommCounter(self.mesh)
        self.tp_rank, self.dp_rank = pm.rank_in("tp"), pm.rank_in("dp")
        self.dp_size = self.layout.dp
        self.dtype = compute_dtype(self.device, cfg.train.precision)
        self.loss_parallel = self.layout.tp > 1 and self.layout.loss_parallel
        mask = vocab_mask(cfg.model.vocab_size, pm.parts[0].padded_vocab_size, self.device)
        if mask is not None and self.loss_parallel:
            mask = distribute_tensor(mask, self.mesh["tp"], [Shard(0)])
        self._mask = mask
        # the chunked head + loss needs the plain head weight (not sharded by TP or FSDP, one stage)
        self.chunked = cfg.train.chunked_loss and self.layout.pp == 1 and self.layout.tp == 1 and pm.dp_mesh is None
        self._schedules: dict[tuple[int, int], object] = {}  # (micro-batches, sequence length) -> schedule
        self._stages: dict[int, list] = {}  # sequence length -> pipeline stages (each infers its shapes once)
        self.outer: OuterSync | None = None
        if self.layout.sync_every > 1:
            if self.layout.dp_replicate == 1:
                log.warning("parallel.sync_every=%d with parallel.dp_replicate=1: no replicas to average; the "
                            "outer optimizer still runs every %d steps", self.layout.sync_every, self.layout.sync_every)
            m = self.mesh
            group = m["dp_replicate"].get_group() if m is not None and self.layout.dp_replicate > 1 else None
            params = [p for part in self.model_parts for p in part.parameters()]
            self.outer = OuterSync(params, group, self.layout.sync_every, self.layout.outer_lr,
                                   self.layout.outer_momentum, self.layout.outer_async, mesh=m)
        log.info("step: rank %d stages %s dp %d/%d tp %d/%d%s", dist.get_rank() if self.world > 1 else 0,
                 pm.stage_ids, self.dp_rank, self.dp_size, self.tp_rank, self.layout.tp,
                 " chunked loss" if self.chunked else "")

    # ------------------------------------------------------------------ mode, precision, loss
    def _ctx(self, train: bool, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> contextlib.ExitStack:
        """Train or eval mode, autocast (bf16 without FSDP's own mixed precision), loss parallel and
        the communication counter (keyed on the micro-batches' shapes, which set the traffic): the one
        place they are set."""
        for part in self.model_parts:
            part.train(train)
        stack = contextlib.ExitStack()
        if not train:
            stack.callback(lambda: [part.train() for part in self.model_parts])
            stack.enter_context(torch.no_grad())
        if self.loss_parallel:
            stack.enter_context(loss_parallel())
        if self.dtype != torch.float32 and self.pm.dp_mesh is None:
            stack.enter_context(torch.autocast(self.device.type, dtype=self.dtype))
        key = (train, tuple(tuple(x.shape) for x, _ in micro_batches))
        # a pipeline's first step also sends the schedule's shape-inference messages: count its second
        stack.enter_context(self.comm.scope(key, times=2 if self.layout.pp > 1 else 1))
        return stack

    def _loss_sum(self, out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return cross_entropy_sum(out, labels, self._mask)

    def _forward_loss(self, root: nn.Module, x: torch.Tensor, y: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """Summed token loss of one microbatch through the whole model (no pipeline); the caller
        back-propagates ``loss * scale``."""
        if self.chunked:
            return linear_cross_entropy(root.hidden_states(x), root.output.weight, y, self._mask, grad_scale=scale)
        return self._loss_sum(root(x), y)

    @staticmethod
    def _scalar(x: torch.Tensor) -> torch.Tensor:
        return x.full_tensor() if isinstance(x, DTensor) else x

    def _global_tokens(self, local_tokens: int) -> tuple[int, int]:
        """(tokens summed over the gradient-sync group, group size)."""
        if self.mesh is None:
            return local_tokens, 1
        group = sub(self.mesh, "dp_shard" if self.outer is not None else "dp")
        if group.size() == 1:
            return local_tokens, 1
        t = torch.tensor([local_tokens], dtype=torch.int64, device=self.device)
        with self.comm:
            dist.all_reduce(t, group=group.get_group())
        return int(t.item()), group.size()

    def _reduce_loss(self, loss_sum: float, tokens: int) -> tuple[float, int]:
        """Global (sum of token losses, tokens): the last stage's tp-rank-0 values summed over dp."""
        if self.mesh is None:
            return loss_sum, tokens
        owner = self.pm.is_last_stage and self.tp_rank == 0
        t = torch.tensor([loss_sum if owner else 0.0, tokens if owner else 0], dtype=torch.float64,
                         device=self.device)
        with self.comm:
            dist.all_reduce(t)
        return float(t[0].item()), int(round(t[1].item()))

    # ------------------------------------------------------------------ the step
    def train_step(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> StepOutput:
        """Forward + backward over this dp rank's microbatches of one optimizer step (see module doc)."""
        if not micro_batches:
            raise ValueError("train_step needs at least one microbatch")
        micro_batches = [(x.to(self.device), y.to(self.device)) for x, y in micro_batches]
        local_tokens = sum(int((y != IGNORE).sum()) for _, y in micro_batches)
        group_tokens, group_size = self._global_tokens(local_tokens)
        if self.layout.grad_sync == "token_weighted":
            scale = 1.0 / max(group_tokens, 1)
        else:
            scale = 1.0 / (max(local_tokens, 1) * group_size)
        if self.layout.pp > 1:
            loss_sum = self._pipeline_step(micro_batches, scale)
        else:
            loss_sum = 0.0
            root = self.model_parts[0]
            with self._ctx(train=True, micro_batches=micro_batches):
                for i, (x, y) in enumerate(micro_batches):
                    if isinstance(root, FSDPModule) and len(micro_batches) > 1:
                        root.set_requires_gradient_sync(i == len(micro_batches) - 1)
                    s = self._forward_loss(root, x, y, scale)
                    (s * scale).backward()
                    loss_sum += float(self._scalar(s.detach()))
        self._reduce_partial_grads()
        if self.pm.emb_params:
            self._sum_embedding_grads()
        total, tokens = self._reduce_loss(loss_sum, local_tokens)
        return StepOutput(loss=total / max(tokens, 1), tokens=tokens)

    @torch.no_grad()
    def eval_loss(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, int]:
        """(sum of token losses, tokens) over all data-parallel ranks, in eval mode, without gradients."""
        micro_batches = [(x.to(self.device), y.to(self.device)) for x, y in micro_batches]
        local_tokens = sum(int((y != IGNORE).sum()) for _, y in micro_batches)
        if self.layout.pp > 1:
            with self._ctx(train=False, micro_batches=micro_batches):
                loss_sum = self._pipeline_eval(micro_batches)
        else:
            loss_sum = 0.0
            with self._ctx(train=False, micro_batches=micro_batches):
                for x, y in micro_batches:
                    loss_sum += float(self._scalar(self._forward_loss(self.model_parts[0], x, y)))
        return self._reduce_loss(loss_sum, local_tokens)

    def _pipeline_step(self, micro_batches, scale: float) -> float:
        """One schedule step over the concatenated microbatches; returns this rank's loss sum."""
        x = torch.cat([b[0] for b in micro_batches])
        y = torch.cat([b[1] for b in micro_batches])
        n = self.layout.pp_microbatches or len(micro_batches)
        if x.shape[1] > self.cfg.train.seq_len:  # a long step (train.long_seq_every): fewer, longer sequences
            n = math.gcd(n, x.shape[0])
        if x.shape[0] % n:
            raise ConfigError(f"parallel.pp_microbatches={n} does not divide the {x.shape[0]} sequences of a "
                              f"step on this rank; pick a divisor")
        key = (n, x.shape[1])
        if key not in self._schedules:
            if x.shape[1] not in self._stages:
                self._stages[x.shape[1]] = self.pm.stages if not self._stages else pipeline_stages(self.pm)
            stages = self._stages[x.shape[1]]
            self._schedules[key] = pipe.build_schedule(self.layout.pp_schedule, stages, n, self._pipe_loss)
        self._scale, self._acc = scale, []
        args = (x,) if self.pm.is_first_stage else ()
        kwargs = {"target": y, "losses": []} if self.pm.is_last_stage else {}
        if self.cfg.model.dropout > 0:
            # every stage keys its dropout masks on the rows' tokens (the schedule splits them like x)
            kwargs["row_keys"] = row_keys(x)
        with self._ctx(train=True, micro_batches=micro_batches):
            self._schedules[key].step(*args, **kwargs)
        # the first step's shape inference also calls the loss (on placeholder values): keep the last n
        return float(sum(self._acc[-n:])) if self.pm.is_last_stage else 0.0

    def _pipeline_eval(self, micro_batches) -> float:
        """Forward-only pass through the stages in order with plain send/recv (no schedule: eval is
        rare, and not every schedule supports a forward-only step). Activations travel in fp32."""
        lay, pm = self.layout, self.pm
        group = self.mesh["pp"].get_group()
        pp_rank = pm.rank_in("pp")
        zbv = lay.pp_schedule == "zb" and lay.vpp == 2
        owner = {sid: (sid if sid < lay.pp else 2 * lay.pp - 1 - sid) if zbv else sid % lay.pp
                 for sid in range(pm.num_stages)}
        parts = dict(zip(pm.stage_ids, self.model_parts))
        sp = lay.tp > 1 and lay.sequence_parallel
        loss_sum = 0.0
        for x, y in micro_batches:
            shape = (x.shape[0], x.shape[1] // (lay.tp if sp else 1), self.cfg.model.hidden_size)
            h = None
            for sid in range(pm.num_stages):
                if sid not in parts:
                    continue
                if sid == 0:
                    inp = x
                elif owner[sid - 1] == pp_rank:
                    inp = h
                else:
                    inp = torch.empty(shape, device=self.device)
                    dist.recv(inp, group=group, group_src=owner[sid - 1])
                h = parts[sid](inp)
                if sid == pm.num_stages - 1:
                    loss_sum += float(self._scalar(self._loss_sum(h, y)))
                elif owner[sid + 1] != pp_rank:
                    dist.send(h.float().contiguous(), group=group, group_dst=owner[sid + 1])
                    h = None
                else:
                    h = h.float()
        return loss_sum

    def _pipe_loss(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        s = self._loss_sum(out, target)
        self._acc.append(float(self._scalar(s.detach())))
        return s * self._scale

    # ------------------------------------------------------------------ gradient sync after backward
    @torch.no_grad()
    def _reduce_partial_grads(self) -> None:
        """Sequence-parallel LayerNorm weights see only T/tp tokens per rank, so their grads come
        back ``Partial(sum)`` over tp: sum them (one flat all-reduce) into ``Replicate`` grads."""
        partial = [p for part in self.model_parts for p in part.parameters()
                   if isinstance(p.grad, DTensor) and any(pl.is_partial() for pl in p.grad.placements)]
        if partial:
            flat = torch.cat([p.grad.to_local().flatten() for p in partial])
            with self.comm:
                dist.all_reduce(flat, group=self.mesh["tp"].get_group())
            for p, g in zip(partial, torch.split(flat, [p.grad.to_local().numel() for p in partial])):
                old = p.grad
                placements = [Replicate() if pl.is_partial() else pl for pl in old.placements]
                p.grad = DTensor.from_local(g.view_as(old.to_local()), old.device_mesh, placements,
                                            shape=old.shape, stride=old.stride())
        # a grad may come back with another layout than its parameter (the vocab-parallel
        # embedding's is Replicate): bring it to the parameter's placements (a local slice)
        for part in self.model_parts:
            for p in part.parameters():
                g = p.grad
                if isinstance(g, DTensor) and isinstance(p, DTensor) and g.placements != p.placements:
                    p.grad = g.redistribute(p.device_mesh, p.placements)

    @torch.no_grad()
    def _sum_embedding_grads(self) -> None:
        """The tied embedding's two copies (first stage, last stage's head) apply the summed gradient."""
        grads = [local(p.grad) for p in self.pm.emb_params if p.grad is not None]
        if len(grads) == 2 and self.pm.emb_group is None:  # both copies on this rank
            total = grads[0] + grads[1]
            grads[0].copy_(total)
            grads[1].copy_(total)
            return
        if self.pm.emb_group is not None and grads:
            with self.comm:
                dist.all_reduce(grads[0], group=self.pm.emb_group)

    # ------------------------------------------------------------------ clipping and checks
    def _grads(self, dedupe: bool = True) -> list[tuple[nn.Parameter, torch.Tensor]]:
        out = []
        for part in self.model_parts:
            for name, p in part.named_parameters():
                if p.grad is None:
                    continue
                if dedupe and name == "output.weight" and part.tok_embeddings is None:
                    continue  # the head's copy of the tied embedding counts once (on the first stage)
                out.append((p, p.grad))
        return out

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> float:
        """Clip to a global L2 norm that is correct under any layout; return the norm before clipping.

        Each rank adds its local shard's squared norm times (#shards / #ranks holding the stage), so
        the world sum counts each element exactly once, whatever is sharded or replicated. Under local
        SGD (``sync_every > 1``) each replica is its own trainer between outer steps and clips by the
        norm of its own gradient: the sums are kept apart per ``dp_replicate`` index.
        """
        replicas = self.layout.dp_replicate if self.outer is not None else 1
        mine = self.pm.rank_in("dp_replicate") if replicas > 1 else 0
        per_stage = self.world // (self.layout.pp * replicas)
        groups: dict[float, list[torch.Tensor]] = {}
        for p, g in self._grads():
            shards = 1
            if isinstance(g, DTensor):
                for mesh_dim, pl in enumerate(g.placements):
                    if not (pl.is_replicate() or pl.is_partial()):  # Shard and FSDP+TP's _StridedShard
                        shards *= g.device_mesh.size(mesh_dim)
            groups.setdefault(shards / per_stage, []).append(local(g))
        sq = torch.zeros(replicas, dtype=torch.float64, device=self.device)
        for factor, grads in groups.items():  # one multi-tensor pass per group instead of per-tensor copies
            sq[mine] += torch.stack(torch._foreach_norm(grads)).double().pow(2).sum() * factor
        if self.world > 1:
            with self.comm:
                dist.all_reduce(sq)
        norm = float(sq[mine].sqrt())
        coef = max_norm / (norm + 1e-6)
        if coef < 1.0:
            torch._foreach_mul_([local(g) for _, g in self._grads(dedupe=False)], coef)
        return norm

    @torch.no_grad()
    def grads_finite(self) -> bool:
        """True when every gradient on every rank is finite (the same answer everywhere)."""
        grads = [local(g) for _, g in self._grads(dedupe=False)]
        ok = not grads or bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all())
        if self.world == 1:
            return ok
        t = torch.tensor([1.0 if ok else 0.0], device=self.device)
        with self.comm:
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item() > 0)

    def after_optimizer_step(self, step: int) -> None:
        """The local-SGD / DiLoCo outer step every ``parallel.sync_every`` optimizer steps."""
        if self.outer is not None:
            with self.comm:
                self.outer.maybe_sync(step)

    def param_bytes(self) -> int:
        """Bytes of parameters stored on this rank (local shards)."""
        return local_param_bytes(self.model_parts)

    def comm_bytes(self) -> dict[str, int]:
        """Bytes moved per mesh dimension since the last call (see :mod:`mtnlg.parallel.comm`)."""
        return self.comm.take()
