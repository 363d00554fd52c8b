"""Enumerate every valid (tp, pp, vpp, dp, micro-batch, recompute, zero) layout and rank by throughput.

Valid means: tp divides the heads and the FFN and stays inside a node (unless ``max_tp`` says
otherwise); pp x vpp divides the layers; B is a multiple of b x dp; the schedule can run it
(m >= p for 1F1B and interleaved; interleaved needs m % p == 0 as in Megatron); ZeRO-2/3 only
without pipelining; and the first stage fits in the GPU's memory. pp > 1 runs 1F1B, vpp > 1
interleaved 1F1B. Ranked by estimated tokens per second (the same for every layout of one batch,
so: by estimated iteration time from :mod:`mtnlg.plan.timemodel`), ties broken by lower memory; each
plan names its limiting term (the largest of the time terms).
"""

from __future__ import annotations

from collections.abc import Iterable

from mtnlg.errors import ConfigError, MtnlgError
from mtnlg.plan.estimate import Layout, Plan, plan
from mtnlg.plan.gpus import GPU
from mtnlg.plan.presets import PlanModel
from mtnlg.plan.profile import Profile

MICRO_BATCHES = (1, 2, 4, 8, 16)
VPPS = (1, 2, 4)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(model: PlanModel, gpus: int, global_batch: int, *, gpus_per_node: int = 8,
                      max_tp: int | None = None, recompute: Iterable[str] = ("none", "selective", "full"),
                      zero: Iterable[int] = (0, 1, 2, 3)) -> list[Layout]:
    """Every layout that passes the divisibility and schedule rules (memory not yet checked)."""
    cfg = model.cfg
    max_tp = max_tp or gpus_per_node
    out = []
    for tp in divisors(gpus):
        if tp > max_tp or cfg.num_heads % tp or cfg.ffn_hidden_size % tp:
            continue
        for pp in divisors(gpus // tp):
            if cfg.num_layers % pp:
                continue
            dp = gpus // (tp * pp)
            for vpp in VPPS:
                if (vpp > 1 and pp == 1) or cfg.num_layers % (pp * vpp):
                    continue
                for b in MICRO_BATCHES:
                    if global_batch % (b * dp):
                        continue
                    m = global_batch // (b * dp)
                    if pp > 1 and (m < pp or (vpp > 1 and m % pp)):
                        continue
                    for rc in recompute:
                        for z in zero:
                            if pp > 1 and z >= 2:
                                continue
                            out.append(Layout(gpus, tp, pp, vpp, global_batch, b, rc, z, "1f1b"))
    return out


def search(model: PlanModel, gpus: int, gpu: GPU, global_batch: int, *, top: int = 10, gpus_per_node: int = 8,
           max_tp: int | None = None, profile: Profile | None = None) -> list[Plan]:
    """The ``top`` fitting layouts, fastest first."""
    if gpus < 1 or global_batch < 1:
        raise ConfigError(f"--gpus and --global-batch must be >= 1, got {gpus} and {global_batch}")
    plans = []
    for layout in candidate_layouts(model, gpus, global_batch, gpus_per_node=gpus_per_node, max_tp=max_tp):
        try:
            p = plan(model, layout, gpu, profile=profile, gpus_per_node=gpus_per_node)
        except MtnlgError:
            continue
        if p.fits:
            plans.append(p)
    plans.sort(key=lambda p: (p.est_iteration_time_s, p.memory.total))
    return plans[:top]
