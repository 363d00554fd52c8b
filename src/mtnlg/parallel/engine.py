"""The training engine: one object that owns this rank's model parts and runs a whole step.

``build_engine(cfg, device)`` turns a plain GPT (built on meta) into this rank's share of the
4-D layout and materializes it::

    build_model (meta) ─► pipeline split ─► tensor/sequence parallel ─► materialize ─► FSDP2/DDP/HSDP
                         (pp * vpp stages)   (DTensor plans)            (per-name init)  (fully_shard)

Every layout starts from the weights of one process (init is per parameter name, sliced to the
local shard), and ``train_step`` makes the gradients equal those of one process on the global
batch: each microbatch's summed token loss is scaled by ``1 / global_tokens``
(``grad_sync=token_weighted``) or ``1 / (local_tokens * dp)`` (``grad_sync=mean``), and the
data-parallel reduction sums (FSDP divide factor 1). Gradients are reduced only on the last
microbatch.

Tied embedding under pipeline parallelism: the last stage holds its own copy of the embedding for
the head (initialised from ``tok_embeddings.weight``); after backward the two copies' gradients are
summed between the first and the last stage (Megatron's embedding group), so both apply the same
update and stay equal. Gradient clipping counts that copy once.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import loss_parallel

from mtnlg.config import Config
from mtnlg.device import compute_dtype
from mtnlg.model.init import build_model, init_value
from mtnlg.parallel import pipeline as pipe
from mtnlg.parallel.comm import CommCounter
from mtnlg.parallel.data import OuterSync, apply_fsdp, dp_mesh_for, local, local_param_bytes
from mtnlg.parallel.mesh import build_mesh, init_distributed, mesh_degrees, sub
from mtnlg.parallel.tensor import apply_tensor_parallel, tp_model_config, vocab_mask

log = logging.getLogger(__name__)

__all__ = ["Engine", "StepOutput", "build_engine", "init_distributed"]

IGNORE = -100


@dataclass
class StepOutput:
    """What one optimizer step reports: the global token-mean loss and the global token count."""

    loss: float
    tokens: int


def build_engine(cfg: Config, device: torch.device) -> Engine:
    """This rank's engine for ``cfg`` (call :func:`init_distributed` first when distributed)."""
    return Engine(cfg, device)


class Engine:
    """This rank's model parts plus the step logic for the configured layout (see module doc)."""

    def __init__(self, cfg: Config, device: torch.device):
        self.cfg = cfg
        self.device = device
        pc = cfg.parallel
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.mesh: DeviceMesh | None = build_mesh(pc, device, self.world)
        deg = self.degrees = mesh_degrees(self.mesh)
        self.dtype = compute_dtype(device, cfg.train.precision)
        self.model_cfg = tp_model_config(cfg.model, deg.tp)
        self.comm = CommCounter(self.mesh)
        m = self.mesh
        self.tp_rank = m["tp"].get_local_rank() if m is not None else 0
        self.pp_rank = m["pp"].get_local_rank() if m is not None else 0
        self.dp_rank = sub(m, "dp").get_local_rank() if m is not None else 0
        self.dp_size = deg.dp
        self.loss_parallel = deg.tp > 1 and pc.loss_parallel

        full = build_model(self.model_cfg)
        if deg.pp > 1:
            self.num_stages = deg.pp * pc.vpp
            counts = pipe.stage_layer_counts(
                cfg.model, pc, cfg.train.seq_len,
                profile=lambda: self._agreed(pipe.profile_costs(cfg.model, device, cfg.train.micro_batch_size,
                                                                cfg.train.seq_len)))
            self.stage_counts = counts
            self.stage_ids = pipe.stage_ids(self.pp_rank, deg.pp, pc.vpp, pc.pp_schedule)
            parts = [pipe.split_stage(full, counts, s) for s in self.stage_ids]
        else:
            self.num_stages, self.stage_counts, self.stage_ids = 1, [cfg.model.num_layers], [0]
            parts = [full]
        del full
        self.is_first_stage = 0 in self.stage_ids
        self.is_last_stage = self.num_stages - 1 in self.stage_ids
        for part in parts:
            if deg.tp > 1:
                apply_tensor_parallel(part, m["tp"], pc.sequence_parallel, pc.loss_parallel)
            self._materialize(part)
        self.dp_mesh = dp_mesh_for(m) if m is not None else None
        if pc.sync_every > 1 and m is not None:  # local SGD: replicas are independent between outer steps
            self.dp_mesh = m["dp_shard"] if deg.dp_shard > 1 else None
        if self.dp_mesh is not None:
            reshard = pc.fsdp_reshard_after_forward
            param_dtype = self.dtype if self.dtype != torch.float32 else None
            for part in parts:
                apply_fsdp(part, self.dp_mesh, reshard_after_forward=reshard, param_dtype=param_dtype)
        self.model_parts: list[nn.Module] = parts
        mask = vocab_mask(cfg.model.vocab_size, self.model_cfg.padded_vocab_size(), device)
        if mask is not None and self.loss_parallel:
            mask = distribute_tensor(mask, m["tp"], [Shard(0)])
        self._mask = mask
        self._setup_pipeline()
        self._setup_embedding_group()
        self.outer: OuterSync | None = None
        if pc.sync_every > 1:
            if deg.pp > 1:
                from mtnlg.errors import ConfigError

                raise ConfigError("parallel.sync_every > 1 (local SGD) is not supported with parallel.pp > 1 "
                                  "(the pipeline schedules force the cross-replica gradient sync); "
                                  "set parallel.sync_every=1")
            if deg.dp_replicate == 1:
                log.warning("parallel.sync_every=%d with parallel.dp_replicate=1: no replicas to average; the outer "
                            "optimizer still runs every %d steps", pc.sync_every, pc.sync_every)
            group = m["dp_replicate"].get_group() if m is not None and deg.dp_replicate > 1 else None
            params = [p for part in parts for p in part.parameters()]
            self.outer = OuterSync(params, group, pc.sync_every, pc.outer_lr, pc.outer_momentum, pc.outer_async,
                                     mesh=m)
        log.info("engine: rank %d stages %s dp %d/%d tp %d/%d", self.rank, self.stage_ids, self.dp_rank,
                 self.dp_size, self.tp_rank, deg.tp)

    # ------------------------------------------------------------------ construction helpers
    @torch.no_grad()
    def _materialize(self, part: nn.Module) -> None:
        """Allocate ``part`` on the device and give each (local shard of a) parameter its
        layout-independent initial value (see :func:`mtnlg.model.init.init_value`)."""
        tied = part.output is not None and part.tok_embeddings is not None \
            and part.output.weight is part.tok_embeddings.weight
        part.to_empty(device=self.device)
        if tied:
            part.output.weight = part.tok_embeddings.weight
        base_vocab = self.cfg.model.padded_vocab_size()
        for name, p in part.named_parameters():
            canonical = "tok_embeddings.weight" if name == "output.weight" else name
            shape = tuple(p.shape)
            if canonical == "tok_embeddings.weight" and shape[0] != base_vocab:
                value = torch.zeros(shape)
                value[:base_vocab] = init_value(canonical, torch.Size((base_vocab, shape[1])), self.cfg.model,
                                                self.cfg.train.seed)
            else:
                value = init_value(canonical, torch.Size(shape), self.cfg.model, self.cfg.train.seed)
            value = value.to(self.device)
            if isinstance(p, DTensor):
                p.to_local().copy_(distribute_tensor(value, p.device_mesh, p.placements).to_local())
            else:
                p.copy_(value)

    def _agreed(self, costs: tuple[list[float], float, float]) -> tuple[list[float], float, float]:
        """Profiled costs averaged over all ranks, so every rank computes the same split."""
        if self.world == 1:
            return costs
        layers, emb, head = costs
        t = torch.tensor(layers + [emb, head], dtype=torch.float64)
        dist.all_reduce(t)
        t /= self.world
        vals = t.tolist()
        return vals[:-2], vals[-2], vals[-1]

    def _setup_pipeline(self) -> None:
        self.stages = []
        self._schedules: dict[int, object] = {}
        if self.degrees.pp == 1:
            return
        from torch.distributed.pipelining import PipelineStage

        group = self.mesh["pp"].get_group()
        self.stages = [PipelineStage(part, sid, self.num_stages, self.device, group=group)
                       for part, sid in zip(self.model_parts, self.stage_ids)]

    def _setup_embedding_group(self) -> None:
        """Ranks holding the first stage's embedding and the last stage's head copy sum their grads."""
        self._emb_group = None
        self._emb_params: list[nn.Parameter] = []
        if self.degrees.pp == 1:
            return
        for part in self.model_parts:
            if part.tok_embeddings is not None:
                self._emb_params.append(part.tok_embeddings.weight)
            if part.output is not None and part.tok_embeddings is None:
                self._emb_params.append(part.output.weight)
        first_last_same_rank = self.is_first_stage and self.is_last_stage
        if first_last_same_rank:  # ZBV: both copies on this rank
            return
        pp = self.degrees.pp
        grid = self.mesh.mesh.reshape(pp, -1)
        last_pp = (self.num_stages - 1) % pp
        if pp == 2:
            self._emb_group = self.mesh["pp"].get_group()
            return
        for col in range(grid.shape[1]):
            ranks = [int(grid[0, col]), int(grid[last_pp, col])]
            g = dist.new_group(ranks)
            if self.rank in ranks:
                self._emb_group = g

    def _fsdp_modules(self) -> list[FSDPModule]:
        return [m for part in self.model_parts for m in part.modules() if isinstance(m, FSDPModule)]

    # ------------------------------------------------------------------ losses
    def _loss_sum(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Summed token cross entropy (ignore -100; padded vocabulary masked out); vocab-parallel
        under loss parallel (the logits stay sharded)."""
        if self._mask is not None:
            logits = logits + self._mask
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE, reduction="sum")
        return loss

    def _ctx(self):
        stack = contextlib.ExitStack()
        if self.loss_parallel:
            stack.enter_context(loss_parallel())
        if self.dtype != torch.float32 and self.dp_mesh is None:
            stack.enter_context(torch.autocast(self.device.type, dtype=self.dtype))
        stack.enter_context(self.comm)
        return stack

    def _global_tokens(self, local_tokens: int) -> tuple[int, int]:
        """(tokens summed over the gradient-sync group, group size)."""
        if self.mesh is None:
            return local_tokens, 1
        dim = "dp_shard" if self.outer is not None else "dp"
        group_size = sub(self.mesh, dim).size()
        if group_size == 1:
            return local_tokens, 1
        t = torch.tensor([local_tokens], dtype=torch.int64, device=self.device)
        with self.comm:
            dist.all_reduce(t, group=sub(self.mesh, dim).get_group())
        return int(t.item()), group_size

    def _reduce_loss(self, loss_sum: float, tokens: int, dp_tokens: int | None = None) -> tuple[float, int]:
        """Global (sum of token losses, tokens): the last stage's tp-rank-0 values summed over dp."""
        if self.mesh is None:
            return loss_sum, tokens
        owner = self.is_last_stage and self.tp_rank == 0
        t = torch.tensor([loss_sum if owner else 0.0, tokens if owner else 0], dtype=torch.float64,
                         device=self.device)
        with self.comm:
            dist.all_reduce(t)
        return float(t[0].item()), int(round(t[1].item()))

    @staticmethod
    def _scalar(x: torch.Tensor) -> torch.Tensor:
        return x.full_tensor() if isinstance(x, DTensor) else x

    # ------------------------------------------------------------------ the step
    def train_step(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> StepOutput:
        """Forward + backward over this dp rank's microbatches of one optimizer step (see module doc)."""
        if not micro_batches:
            raise ValueError("train_step needs at least one microbatch")
        micro_batches = [(x.to(self.device), y.to(self.device)) for x, y in micro_batches]
        local_tokens = sum(int((y != IGNORE).sum()) for _, y in micro_batches)
        group_tokens, group_size = self._global_tokens(local_tokens)
        if self.cfg.parallel.grad_sync == "token_weighted":
            scale = 1.0 / max(group_tokens, 1)
        else:
            scale = 1.0 / (max(local_tokens, 1) * group_size)
        for part in self.model_parts:
            part.train()
        if self.degrees.pp > 1:
            loss_sum = self._pipeline_step(micro_batches, scale)
        else:
            loss_sum = 0.0
            root = self.model_parts[0]
            with self._ctx():
                for i, (x, y) in enumerate(micro_batches):
                    if isinstance(root, FSDPModule) and len(micro_batches) > 1:
                        root.set_requires_gradient_sync(i == len(micro_batches) - 1)
                    s = self._loss_sum(root(x), y)
                    (s * scale).backward()
                    loss_sum += float(self._scalar(s.detach()))
        self._reduce_partial_grads()
        if self._emb_params:
            self._sum_embedding_grads()
        total, tokens = self._reduce_loss(loss_sum, local_tokens)
        return StepOutput(loss=total / max(tokens, 1), tokens=tokens)

    def _pipeline_step(self, micro_batches, scale: float) -> float:
        """One schedule step over the concatenated microbatches; returns this rank's loss sum."""
        x = torch.cat([b[0] for b in micro_batches])
        y = torch.cat([b[1] for b in micro_batches])
        n = self.cfg.parallel.pp_microbatches or len(micro_batches)
        if x.shape[0] % n:
            from mtnlg.errors import ConfigError

            raise ConfigError(f"parallel.pp_microbatches={n} does not divide the {x.shape[0]} sequences of a "
                              f"step on this rank; pick a divisor")
        schedule = self._schedule(n)
        self._scale, self._acc = scale, []
        args = (x,) if self.is_first_stage else ()
        kwargs = {"target": y, "losses": []} if self.is_last_stage else {}
        with self._ctx():
            schedule.step(*args, **kwargs)
        # the first step's shape inference also calls the loss (on placeholder values): keep the last n
        return float(sum(self._acc[-n:])) if self.is_last_stage else 0.0

    def _pipeline_eval(self, micro_batches) -> float:
        """Forward-only pass through the stages in order with plain send/recv (no schedule: eval is
        rare, and not every schedule supports a forward-only step). Activations travel in fp32."""
        group = self.mesh["pp"].get_group()
        owner = {sid: (sid % self.degrees.pp if self.cfg.parallel.pp_schedule != "zb" or self.cfg.parallel.vpp != 2
                       else (sid if sid < self.degrees.pp else 2 * self.degrees.pp - 1 - sid))
                 for sid in range(self.num_stages)}
        parts = dict(zip(self.stage_ids, self.model_parts))
        sp = self.degrees.tp > 1 and self.cfg.parallel.sequence_parallel
        loss_sum = 0.0
        with self._ctx():
            for x, y in micro_batches:
                shape = (x.shape[0], x.shape[1] // (self.degrees.tp if sp else 1), self.cfg.model.hidden_size)
                h = None
                for sid in range(self.num_stages):
                    if sid not in parts:
                        continue
                    if sid == 0:
                        inp = x
                    elif owner[sid - 1] == self.pp_rank:
                        inp = h
                    else:
                        inp = torch.empty(shape, device=self.device)
                        dist.recv(inp, group=group, group_src=owner[sid - 1])
                    h = parts[sid](inp)
                    if sid == self.num_stages - 1:
                        loss_sum += float(self._scalar(self._loss_sum(h, y)))
                    elif owner[sid + 1] != self.pp_rank:
                        dist.send(h.float().contiguous(), group=group, group_dst=owner[sid + 1])
                        h = None
                    else:
                        h = h.float()
        return loss_sum

    def _pipe_loss(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        s = self._loss_sum(out, target)
        self._acc.append(float(self._scalar(s.detach())))
        return s * self._scale

    def _schedule(self, n: int):
        if n not in self._schedules:
            self._schedules[n] = pipe.build_schedule(self.cfg.parallel.pp_schedule, self.stages, n, self._pipe_loss)
        return self._schedules[n]

    @torch.no_grad()
    def _reduce_partial_grads(self) -> None:
        """Sequence-parallel LayerNorm weights see only T/tp tokens per rank, so their grads come
        back ``Partial(sum)`` over tp: sum them (one flat all-reduce) into ``Replicate`` grads."""
        partial = [p for part in self.model_parts for p in part.parameters()
                   if isinstance(p.grad, DTensor) and any(pl.is_partial() for pl in p.grad.placements)]
        if not partial:
            self._match_grad_placements()
            return
        flat = torch.cat([p.grad.to_local().flatten() for p in partial])
        with self.comm:
            dist.all_reduce(flat, group=self.mesh["tp"].get_group())
        for p, g in zip(partial, torch.split(flat, [p.grad.to_local().numel() for p in partial])):
            old = p.grad
            placements = [Replicate() if pl.is_partial() else pl for pl in old.placements]
            p.grad = DTensor.from_local(g.view_as(old.to_local()), old.device_mesh, placements,
                                        shape=old.shape, stride=old.stride())
        self._match_grad_placements()

    @torch.no_grad()
    def _match_grad_placements(self) -> None:
        """A grad may come back with another layout than its parameter (the vocab-parallel
        embedding's is ``Replicate``): bring it to the parameter's placements (a local slice)."""
        for part in self.model_parts:
            for p in part.parameters():
                g = p.grad
                if isinstance(g, DTensor) and isinstance(p, DTensor) and g.placements != p.placements:
                    p.grad = g.redistribute(p.device_mesh, p.placements)

    @torch.no_grad()
    def _sum_embedding_grads(self) -> None:
        grads = [local(p.grad) for p in self._emb_params if p.grad is not None]
        if len(grads) == 2 and self._emb_group is None:  # both copies on this rank
            total = grads[0] + grads[1]
            grads[0].copy_(total)
            grads[1].copy_(total)
            return
        if self._emb_group is not None and grads:
            with self.comm:
                dist.all_reduce(grads[0], group=self._emb_group)

    @torch.no_grad()
    def eval_loss(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, int]:
        """(sum of token losses, tokens) over all data-parallel ranks, without gradients."""
        micro_batches = [(x.to(self.device), y.to(self.device)) for x, y in micro_batches]
        local_tokens = sum(int((y != IGNORE).sum()) for _, y in micro_batches)
        for part in self.model_parts:
            part.eval()
        if self.degrees.pp > 1:
            loss_sum = self._pipeline_eval(micro_batches)
        else:
            loss_sum = 0.0
            with self._ctx():
                for x, y in micro_batches:
                    loss_sum += float(self._scalar(self._loss_sum(self.model_parts[0](x), y)))
        for part in self.model_parts:
            part.train()
        return self._reduce_loss(loss_sum, local_tokens)

    # ------------------------------------------------------------------ after backward
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
        the world sum counts each element exactly once, whatever is sharded or replicated.
        """
        per_stage = self.world // self.degrees.pp
        sq = torch.zeros((), dtype=torch.float64, device=self.device)
        for p, g in self._grads():
            shards = 1
            if isinstance(g, DTensor):
                for mesh_dim, pl in enumerate(g.placements):
                    if not (pl.is_replicate() or pl.is_partial()):  # Shard and FSDP+TP's _StridedShard
                        shards *= g.device_mesh.size(mesh_dim)
            sq += local(g).double().pow(2).sum() * (shards / per_stage)
        if self.world > 1:
            with self.comm:
                dist.all_reduce(sq)
        norm = float(sq.sqrt())
        coef = max_norm / (norm + 1e-6)
        if coef < 1.0:
            for _, g in self._grads(dedupe=False):
                local(g).mul_(coef)
        return norm

    @torch.no_grad()
    def grads_finite(self) -> bool:
        """True when every gradient on every rank is finite (the same answer everywhere)."""
        ok = all(bool(torch.isfinite(local(g)).all()) for _, g in self._grads(dedupe=False))
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


