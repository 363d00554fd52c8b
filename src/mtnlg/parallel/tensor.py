"""Tensor and sequence parallelism for :class:`mtnlg.model.GPT` with DTensor plans (Megatron's split).

Per block (sequence parallel on)::

    x [B, T/tp, h] ─ ln_1 (SequenceParallel) ─ all-gather T ─► qkv (colwise: whole heads per rank)
                   ─ attention on local heads ─► proj (rowwise) ─ reduce-scatter T ─► + x
                   ─ ln_2 (SequenceParallel) ─ all-gather T ─► fc1 (colwise) ─ act ─► fc2 (rowwise)
                   ─ reduce-scatter T ─► + x

The token embedding is vocab-parallel (rows split, masked lookup + all-reduce); the tied LM head is
column-parallel over the vocabulary and, with loss parallel, its logits stay sharded
(``Shard(-1)``) into a vocab-parallel cross entropy that never gathers them. Without sequence
parallel the LayerNorms stay replicated and the rowwise layers all-reduce instead.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from mtnlg.config import ModelConfig, ParallelConfig
from mtnlg.model.dropout import HashDropout

log = logging.getLogger(__name__)


def check_tp(cfg: ModelConfig, tp: int) -> None:
    """Heads and the FFN width must split evenly over ``tp`` ranks (see ``ParallelConfig.check_model``)."""
    ParallelConfig(tp=tp).check_model(cfg)


def tp_model_config(cfg: ModelConfig, tp: int) -> ModelConfig:
    """The model config to build under ``tp``: the vocabulary padded by Megatron's rule, to a multiple of
    ``make_vocab_size_divisible_by * tp`` (:meth:`ModelConfig.padded_vocab_size`, the formula the
    planner uses too).

    The extra rows are initialised to zero and their logits masked out of the loss, so the loss is
    that of one process; checkpoints store the unpadded vocabulary (:mod:`mtnlg.checkpoint`), so the
    padding never ties a checkpoint to a tp degree.
    """
    check_tp(cfg, tp)
    if tp == 1:
        return cfg
    return dataclasses.replace(cfg, make_vocab_size_divisible_by=cfg.make_vocab_size_divisible_by * tp)


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool = True,
                          loss_parallel: bool | None = None) -> nn.Module:
    """Shard ``model`` (a GPT or a pipeline stage of one, on any device incl. meta) over ``tp_mesh``.

    The activations between blocks are plain local tensors: ``[B, T/tp, h]`` with sequence
    parallel, ``[B, T, h]`` without. ``loss_parallel`` (default: the model's ``parallel_output``,
    Megatron's meaning): the head returns vocab-parallel logits, a ``Shard(-1)`` DTensor that the
    vocab-parallel cross entropy consumes without gathering; False gathers full logits (plain tensor).
    """
    sp = sequence_parallel
    if loss_parallel is None:
        loss_parallel = model.cfg.parallel_output
    tied = model.output is not None and model.tok_embeddings is not None \
        and model.output.weight is model.tok_embeddings.weight
    plan: dict[str, object] = {}
    if model.tok_embeddings is not None:
        plan["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
        if sp:  # position embeddings are added on the full sequence, then the stream is split along T
            plan["emb_dropout"] = PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),),
                                                     use_local_output=True)
    for name in model.layers:
        p = f"layers.{name}."
        plan[p + "attn.qkv"] = ColwiseParallel()
        plan[p + "attn.proj"] = RowwiseParallel(output_layouts=Shard(1) if sp else Replicate())
        plan[p + "mlp.fc1"] = ColwiseParallel()
        plan[p + "mlp.fc2"] = RowwiseParallel(output_layouts=Shard(1) if sp else Replicate())
        if sp:
            plan[p + "ln_1"] = SequenceParallel()
            plan[p + "ln_2"] = SequenceParallel()
            plan[p + "attn"] = PrepareModuleInput(input_layouts=(Shard(1), None, None),
                                                  desired_input_layouts=(Replicate(), None, None))
            plan[p + "mlp"] = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
    if model.norm is not None and sp:
        plan["norm"] = SequenceParallel()
    if model.output is not None:
        plan["output"] = ColwiseParallel(input_layouts=Shard(1) if sp else Replicate(),
                                         output_layouts=Shard(-1) if loss_parallel else Replicate(),
                                         use_local_output=not loss_parallel)
    parallelize_module(model, tp_mesh, plan)
    if sp:  # layout-independent dropout sees a sequence shard: tell it which one (mtnlg.model.dropout)
        for m in model.modules():
            if isinstance(m, HashDropout):
                m.seq_shard = (tp_mesh.get_local_rank(), tp_mesh.size())
    if tied:  # both are Shard(0) over the vocabulary: re-tie the head to the (now DTensor) embedding
        model.output.weight = model.tok_embeddings.weight
    return model


def vocab_mask(vocab_size: int, padded: int, device: torch.device) -> torch.Tensor | None:
    """Additive mask (0 / -inf) that removes the padded vocabulary rows from the softmax; None if none."""
    if padded == vocab_size:
        return None
    mask = torch.zeros(padded, device=device)
    mask[vocab_size:] = float("-inf")
    return mask
