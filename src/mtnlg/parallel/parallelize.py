"""Apply a layout to a plain GPT from outside (torchtitan's ``parallelize``).

::

    GPT (meta) ─► pipeline split ─► TP / SP ─► materialize ─► activation ─► compile ─► FSDP2 / DDP / HSDP
                  (pp * vpp stages)  (DTensor   (model/init,    checkpointing (per      (fully_shard per
                                      plans)     per-name init) (full/selective) block)  block, then root)

The model code knows nothing of this: each step takes the modules and the mesh and changes the
modules in place, keeping every parameter name. Every layout starts from the weights of one process
(init is per parameter name, sliced to the local shard). What comes back, :class:`ParallelModel`,
is this rank's share: its model parts (one per pipeline stage it holds), the stages for the
schedule, and the groups the step needs (data-parallel mesh, tied-embedding group).

Tied embedding under pipeline parallelism: the last stage holds its own copy of the embedding for
the head (initialised from ``tok_embeddings.weight``); the step sums the two copies' gradients
between the first and the last stage (Megatron's embedding group), so both stay equal.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, distribute_tensor

from mtnlg.config import ParallelConfig, TrainConfig
from mtnlg.device import compute_dtype
from mtnlg.errors import ConfigError
from mtnlg.model.init import materialize
from mtnlg.model.transformer import GPT, Block
from mtnlg.parallel import pipeline as pipe
from mtnlg.parallel.data import apply_fsdp, dp_mesh_for
from mtnlg.parallel.mesh import resolve_degrees, sub
from mtnlg.parallel.tensor import apply_tensor_parallel

log = logging.getLogger(__name__)

__all__ = ["ParallelModel", "apply_activation_checkpointing", "apply_compile", "parallelize"]


@dataclass
class ParallelModel:
    """This rank's share of a model under a layout (what :func:`parallelize` returns)."""

    parts: list[nn.Module]  # one per pipeline stage held here (the whole GPT without pp)
    layout: ParallelConfig  # degrees resolved (dp_shard filled in)
    mesh: DeviceMesh | None
    device: torch.device
    stage_ids: list[int] = field(default_factory=lambda: [0])
    num_stages: int = 1
    stage_counts: list[int] = field(default_factory=list)
    stages: list = field(default_factory=list)  # torch.distributed.pipelining.PipelineStage per part
    dp_mesh: DeviceMesh | None = None  # the mesh FSDP syncs gradients over (None: no FSDP)
    emb_params: list[nn.Parameter] = field(default_factory=list)  # the tied embedding's two copies (pp > 1)
    emb_group: dist.ProcessGroup | None = None

    @property
    def is_first_stage(self) -> bool:
        return 0 in self.stage_ids

    @property
    def is_last_stage(self) -> bool:
        return self.num_stages - 1 in self.stage_ids

    def rank_in(self, dim: str) -> int:
        """This rank's coordinate along mesh dimension ``dim`` (``"dp"`` included); 0 without a mesh."""
        return sub(self.mesh, dim).get_local_rank() if self.mesh is not None else 0


def parallelize(model: GPT, mesh: DeviceMesh | None, parallel_config: ParallelConfig, train: TrainConfig,
                device: torch.device, vocab_rows: int | None = None) -> ParallelModel:
    """Turn ``model`` (a GPT on meta, built with :func:`~mtnlg.parallel.tensor.tp_model_config`)
    into this rank's share of the layout, materialized on ``device`` (see the module doc).

    ``train`` supplies the seed, the precision, ``activation_checkpointing``, ``compile`` and the
    sequence shape for the pipeline's profiled split; ``vocab_rows`` is the tp-independent padded
    vocabulary (the embedding rows drawn at init; extra tp padding starts at zero).
    """
    world = mesh.size() if mesh is not None else 1
    layout = resolve_degrees(parallel_config, world)
    pm = ParallelModel(parts=[], layout=layout, mesh=mesh, device=device, stage_counts=[model.cfg.num_layers])
    if layout.pp > 1:
        pm.num_stages = layout.pp * layout.vpp
        pm.stage_counts = pipe.stage_layer_counts(
            model.cfg, layout, train.seq_len,
            profile=lambda: _agreed(pipe.profile_costs(model.cfg, device, train.micro_batch_size, train.seq_len)))
        pm.stage_ids = pipe.stage_ids(pm.rank_in("pp"), layout.pp, layout.vpp, layout.pp_schedule)
        parts = [pipe.split_stage(model, pm.stage_counts, s) for s in pm.stage_ids]
    else:
        parts = [model]
    for part in parts:
        if layout.tp > 1:
            apply_tensor_parallel(part, mesh["tp"], layout.sequence_parallel, layout.loss_parallel)
        materialize(part, device, seed=train.seed, vocab_rows=vocab_rows, assign=_assign)
    apply_activation_checkpointing(parts, train.activation_checkpointing)
    if train.compile:
        apply_compile(parts)
    if mesh is not None:
        pm.dp_mesh = dp_mesh_for(mesh)
        if layout.sync_every > 1:
            # local SGD: the replicas (of every pipeline stage) are independent between outer steps,
            # which average over dp_replicate (mtnlg.parallel.data.OuterSync); FSDP syncs inside dp_shard
            pm.dp_mesh = mesh["dp_shard"] if layout.dp_shard > 1 else None
    if pm.dp_mesh is not None:
        dtype = compute_dtype(device, train.precision)
        param_dtype = dtype if dtype != torch.float32 else None
        for part in parts:
            apply_fsdp(part, pm.dp_mesh, reshard_after_forward=layout.fsdp_reshard_after_forward,
                       param_dtype=param_dtype)
    pm.parts = parts
    if layout.pp > 1:
        _setup_pipeline(pm)
    return pm


def _assign(p: torch.Tensor, full: torch.Tensor) -> None:
    """Write this rank's slice of the full initial value ``full`` into parameter ``p``."""
    full = full.to(p.device)
    if isinstance(p, DTensor):
        p.to_local().copy_(distribute_tensor(full, p.device_mesh, p.placements).to_local())
    else:
        p.copy_(full)


def _agreed(costs: tuple[list[float], float, float]) -> tuple[list[float], float, float]:
    """Profiled costs averaged over all ranks, so every rank computes the same split."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return costs
    layers, emb, head = costs
    t = torch.tensor(layers + [emb, head], dtype=torch.float64)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    vals = t.tolist()
    return vals[:-2], vals[-2], vals[-1]


def pipeline_stages(pm: ParallelModel) -> list:
    """This rank's pipeline stages over its model parts. A stage learns its activations' shapes on its first
    step, so each sequence length (the loop's long steps: ``train.long_seq_every``) has its own."""
    from torch.distributed.pipelining import PipelineStage

    group = pm.mesh["pp"].get_group()
    return [PipelineStage(part, sid, pm.num_stages, pm.device, group=group)
            for part, sid in zip(pm.parts, pm.stage_ids)]


def _setup_pipeline(pm: ParallelModel) -> None:
    """The schedule's stages, and the group that sums the tied embedding's two copies' gradients."""
    pm.stages = pipeline_stages(pm)
    for part in pm.parts:
        if part.tok_embeddings is not None:
            pm.emb_params.append(part.tok_embeddings.weight)
        if part.output is not None and part.tok_embeddings is None:
            pm.emb_params.append(part.output.weight)
    if pm.is_first_stage and pm.is_last_stage:  # ZBV: both copies on this rank
        return
    pp = pm.layout.pp
    if pp == 2:
        pm.emb_group = pm.mesh["pp"].get_group()
        return
    grid = pm.mesh.mesh.reshape(pp, -1)
    last_pp = (pm.num_stages - 1) % pp
    rank = dist.get_rank()
    for col in range(grid.shape[1]):  # every rank takes part in every new_group call
        ranks = [int(grid[0, col]), int(grid[last_pp, col])]
        g = dist.new_group(ranks)
        if rank in ranks:
            pm.emb_group = g


# -- activation checkpointing and compile ----------------------------------------------------------


def _blocks(model_parts: Iterable[nn.Module]) -> list[nn.Module]:
    return [m for part in model_parts for m in part.modules() if isinstance(m, Block)]


def _selective_policy():
    """Save the outputs of matmuls and attention, recompute the cheap element-wise ops (GELU,
    LayerNorm, dropout, adds): most of the activation memory back for a few % of the FLOPs."""
    from torch.utils.checkpoint import CheckpointPolicy

    save = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
            torch.ops.aten._scaled_dot_product_efficient_attention.default,
            torch.ops.aten._scaled_dot_product_flash_attention.default,
            torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default}

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in save else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def apply_activation_checkpointing(model_parts: Iterable[nn.Module], mode: str) -> int:
    """Recompute block activations in backward: ``full`` keeps only each block's input, ``selective``
    keeps matmul/attention outputs and recomputes the rest. Patches each Block's ``forward`` in place
    (parameter names and FSDP/TP hooks are unchanged). Returns the number of blocks wrapped."""
    if mode == "none":
        return 0
    if mode not in ("full", "selective"):
        raise ConfigError(f"train.activation_checkpointing='{mode}' is not one of ['none', 'full', 'selective']")
    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

    blocks = _blocks(model_parts)
    for block in blocks:
        inner = block.forward
        if mode == "full":
            def fwd(*args, _inner=inner, **kwargs):
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)
        else:
            def fwd(*args, _inner=inner, **kwargs):
                return checkpoint(_inner, *args, use_reentrant=False,
                                  context_fn=functools.partial(create_selective_checkpoint_contexts,
                                                               _selective_policy()), **kwargs)
        block.forward = fwd
    return len(blocks)


def apply_compile(model_parts: Iterable[nn.Module]) -> int:
    """torch.compile each transformer block in place (per-block regions compile once for all blocks,
    keep parameter names, and compose with FSDP2 / TP hooks). Inductor's on-disk caches (FX graph
    and AOTAutograd) are on, so a second run loads the kernels instead of recompiling them.
    Returns the number of blocks compiled."""
    enable_compile_caches()
    blocks = _blocks(model_parts)
    for block in blocks:
        block.compile()
    return len(blocks)


def enable_compile_caches() -> None:
    """Turn on inductor's persistent caches (on by default in recent torch; made explicit here)."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    if hasattr(functorch_config, "enable_autograd_cache"):
        functorch_config.enable_autograd_cache = True
