"""Pipeline parallelism: split a GPT into stages and run them with ``torch.distributed.pipelining``.

Split (``pp * vpp`` stages, contiguous layers)::

    stage 0: tok/pos embeddings + layers[0:a]      (Megatron's pre_process)
    stage k: layers[...]
    stage S-1: layers[...] + final norm + LM head  (Megatron's post_process; its own copy of the tied
                                                   embedding weight, grads summed with stage 0)

The embeddings always live on the first stage and the head on the last, as Megatron's
``pre_process`` / ``post_process`` (true only on the first / last stage) place them. The spec's
``pre_process_first`` / ``post_process_last`` decide how they are *counted* in the uniform split:
when set, the embedding (resp. the final norm + head + loss) counts as one transformer layer on the
first (resp. last) stage, which then gets one layer fewer, exactly Megatron's
``account_for_embedding_in_pipeline_split`` / ``account_for_loss_in_pipeline_split``. Example,
7 layers on 2 stages: [3, 4] by default, [3, 4] with pre_process_first, [4, 3] with post_process_last
(:func:`uniform_split`). ``auto`` / ``profile`` balancing always charge the measured or modelled
embedding and head costs, and explicit ``pp_layers`` are taken as given.

Layer counts are ``uniform`` (layers / stages, remainder to the later stages), explicit
(``parallel.pp_layers``), ``auto`` (a cost model: layer FLOPs, the embedding charged to the first
stage, head + loss to the last) or ``profile`` (each layer timed in a short warm-up on this device).
With ``vpp`` virtual stages rank ``r`` holds stages ``r, r+pp, ...`` (looped); the ZBV schedule uses
the V layout ``r, 2pp-1-r``.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    ScheduleZBVZeroBubble,
)

from mtnlg.config import ModelConfig, ParallelConfig
from mtnlg.errors import ConfigError

log = logging.getLogger(__name__)


def uniform_split(num_layers: int, stages: int, pre_process_first: bool = False,
                  post_process_last: bool = False) -> list[int]:
    """Layers per stage, as even as possible; the remainder goes to the later stages.

    With ``pre_process_first`` the embedding counts as one layer of the first stage and with
    ``post_process_last`` the head + loss as one layer of the last: ``num_layers + 2`` units split
    evenly, one taken off each end. 7 layers on 2 stages: [3, 4]; with both flags: 9 units = [4, 5],
    minus the two extras = [3, 4]; with pre_process_first only: 8 units = [4, 4] -> [3, 4]; with
    post_process_last only: [4, 4] -> [4, 3]."""
    extra_first, extra_last = int(pre_process_first), int(post_process_last)
    units = num_layers + extra_first + extra_last
    if stages == 1:
        return [num_layers]
    base, rem = divmod(units, stages)
    counts = [base + (1 if i >= stages - rem else 0) for i in range(stages)]
    counts[0] -= extra_first
    counts[-1] -= extra_last
    if min(counts) < 1:
        raise ConfigError(f"model.num_layers={num_layers} on {stages} pipeline stages leaves a stage without layers "
                          f"once the embedding/head count as layers (model.pre_process_first / post_process_last); "
                          f"set them to False or use fewer stages")
    return counts


def layer_costs(cfg: ModelConfig, seq_len: int) -> tuple[list[float], float, float]:
    """Cost model (training FLOPs per token): ``(per-layer costs, embedding cost, head+loss cost)``.

    A layer costs 3 x (24 h^2 + 4 s h) (forward + 2x backward of its matmuls and attention); the head
    3 x 2 h V plus the softmax/cross-entropy ~ 3 x 5 V; the embedding (lookup, position add, its
    dense V x h gradient and optimizer update amortised) is charged like Megatron's
    ``account_for_embedding_in_pipeline_split``: as much as one layer.
    """
    h, V = cfg.hidden_size, cfg.padded_vocab_size()
    layer = 3.0 * (24 * h * h + 4 * seq_len * h)
    return [layer] * cfg.num_layers, layer, 3.0 * (2 * h * V + 5 * V)


def balance(costs: list[float], stages: int, first_extra: float = 0.0, last_extra: float = 0.0) -> list[int]:
    """Contiguous split of ``costs`` into ``stages`` non-empty parts minimising the costliest stage."""
    n = len(costs)
    if n < stages:
        raise ConfigError(f"{n} layers cannot fill {stages} pipeline stages; lower parallel.pp or parallel.vpp")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[s][i]: minimal max-cost splitting the first i layers into s stages; choice[s][i]: start of stage s
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    choice = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for s in range(1, stages + 1):
        for i in range(s, n - (stages - s) + 1):
            for j in range(s - 1, i):
                cost = prefix[i] - prefix[j] + (first_extra if s == 1 else 0.0) + (last_extra if s == stages else 0.0)
                m = max(best[s - 1][j], cost)
                if m < best[s][i] - 1e-12:
                    best[s][i], choice[s][i] = m, j
    counts, i = [], n
    for s in range(stages, 0, -1):
        j = choice[s][i]
        counts.append(i - j)
        i = j
    return counts[::-1]


def profile_costs(cfg: ModelConfig, device: torch.device, micro_batch: int, seq_len: int,
                  repeats: int = 2) -> tuple[list[float], float, float]:
    """Time forward+backward of each layer, the embedding and head+loss on ``device`` (seconds)."""
    from mtnlg.model.init import build_model

    def timed(fn: Callable[[], None]) -> float:
        fn()  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - t0) / repeats

    model = build_model(cfg)
    h = torch.randn(micro_batch, seq_len, cfg.hidden_size, device=device)
    tokens = torch.randint(0, cfg.vocab_size, (micro_batch, seq_len), device=device)
    layers = []
    for name in list(model.layers):
        block = model.layers[name].to_empty(device=device)
        with torch.no_grad():
            for p in block.parameters():
                p.normal_(0.0, 0.02)

        def run(b=block):
            x = h.detach().requires_grad_()
            b(x).sum().backward()
        layers.append(timed(run))
        model.layers[name] = block.to("meta")
    emb = nn.Embedding(cfg.padded_vocab_size(), cfg.hidden_size, device=device)
    head = nn.Linear(cfg.hidden_size, cfg.padded_vocab_size(), bias=False, device=device)

    def run_emb():
        emb(tokens).sum().backward()

    def run_head():
        x = h.detach().requires_grad_()
        torch.nn.functional.cross_entropy(head(x).flatten(0, 1), tokens.flatten()).backward()
    return layers, timed(run_emb), timed(run_head)


def stage_layer_counts(cfg: ModelConfig, pcfg: ParallelConfig, seq_len: int,
                       profile: Callable[[], tuple[list[float], float, float]] | None = None) -> list[int]:
    """Layers per stage for ``pp * vpp`` stages according to ``parallel.pp_layers`` / ``pp_balance``."""
    stages = pcfg.pp * pcfg.vpp
    L = cfg.num_layers
    if pcfg.pp_layers is not None:
        counts = list(pcfg.pp_layers)
        if len(counts) != stages or sum(counts) != L or min(counts) < 1:
            raise ConfigError(f"parallel.pp_layers={counts} must list {stages} positive layer counts (pp*vpp) "
                              f"summing to model.num_layers={L}")
        return counts
    if L < stages:
        raise ConfigError(f"model.num_layers={L} cannot fill pp*vpp={stages} pipeline stages; lower parallel.pp "
                          f"or parallel.vpp")
    if pcfg.pp_balance == "uniform":
        return uniform_split(L, stages, cfg.pre_process_first, cfg.post_process_last)
    if pcfg.pp_balance == "auto":
        costs, emb, head = layer_costs(cfg, seq_len)
    else:
        if profile is None:
            raise ConfigError("parallel.pp_balance=profile needs a device to time layers on")
        costs, emb, head = profile()
    counts = balance(costs, stages, emb, head)
    total = sum(costs) + emb + head
    start = 0
    for s, c in enumerate(counts):
        share = (sum(costs[start:start + c]) + (emb if s == 0 else 0) + (head if s == stages - 1 else 0)) / total
        log.info("pipeline stage %d: layers %d-%d (%d) %.1f%% of the step (%s)", s, start, start + c - 1, c,
                 100 * share, pcfg.pp_balance)
        start += c
    return counts


def stage_ids(pp_rank: int, pp: int, vpp: int, schedule: str) -> list[int]:
    """Stage indices held by ``pp_rank``: looped ``r, r+pp, ...``, or the V shape for ZBV."""
    if schedule == "zb" and vpp == 2:
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + i * pp for i in range(vpp)]


def split_stage(model: nn.Module, counts: list[int], stage: int) -> nn.Module:
    """A copy of ``model`` (normally on meta) that keeps only stage ``stage``'s parts, same names.

    The last stage's head, when it does not also hold the embedding, gets its own (untied) weight
    named ``output.weight``; materialization (``mtnlg.model.init``) initialises it like the
    embedding, and the step (``mtnlg.train.step``) sums the two gradients.
    """
    stages = len(counts)
    start = sum(counts[:stage])
    keep = {str(i) for i in range(start, start + counts[stage])}
    part = copy.deepcopy(model)
    for name in list(part.layers):
        if name not in keep:
            del part.layers[name]
    first, last = stage == 0, stage == stages - 1
    if not first:
        part.tok_embeddings = None
        part.pos_embeddings = None
    if not last:
        part.norm = None
        part.output = None
    elif not first:
        part.output.weight = nn.Parameter(torch.empty_like(part.output.weight))
    return part


SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved": ScheduleInterleaved1F1B}


def build_schedule(name: str, stages: list[PipelineStage], n_microbatches: int, loss_fn: Callable):
    """The ``torch.distributed.pipelining`` schedule for ``parallel.pp_schedule``.

    Gradient scaling is ours (the loss is already weighted), hence ``scale_grads=False``.
    """
    if name in ("gpipe", "1f1b"):
        if len(stages) != 1:
            raise ConfigError(f"parallel.pp_schedule={name} runs one stage per rank; set parallel.vpp=1 or use "
                              f"parallel.pp_schedule=interleaved")
        return SCHEDULES[name](stages[0], n_microbatches, loss_fn=loss_fn, scale_grads=False)
    if name == "interleaved":
        return ScheduleInterleaved1F1B(stages, n_microbatches, loss_fn=loss_fn, scale_grads=False)
    if len(stages) == 2:
        return ScheduleZBVZeroBubble(stages, n_microbatches, loss_fn=loss_fn, scale_grads=False)
    return ScheduleInterleavedZeroBubble(stages, n_microbatches, loss_fn=loss_fn, scale_grads=False)
