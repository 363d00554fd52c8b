"""Pipeline schedules: the op order of torch.distributed.pipelining's own schedule classes, a timing
simulation of it, and the closed-form bubble fractions the planner uses.

The op order comes from the same classes the trainer runs (``ScheduleGPipe``, ``Schedule1F1B``,
``ScheduleInterleaved1F1B``, ``ScheduleZBVZeroBubble``). Their order is a pure function of
(p, m, v), so we call the order-building methods on an instance made without stages or a process
group (``object.__new__`` + the few attributes those methods read). Microbatch indices are renumbered
by order of appearance per (stage, op), which fixes an off-by-one in torch's 1F1B IR on the last rank.

Timing model (:func:`simulate`): each rank runs its ops in torch's order; an op starts when the rank
is free and its dependencies are done: F(s, i) after F(s-1, i); B or I(s, i) after F(s, i) and the
backward of (s+1, i); W(s, i) after I(s, i). Communication is free. Durations per stage chunk:
F = 1/v, full backward B = 2/v, and for the zero-bubble split I = W = 1/v (so F + I + W = F + B).
Bubble = idle time / (p · makespan). With these times GPipe and 1F1B give exactly (p-1)/(m+p-1).

Closed forms (:func:`bubble_fraction`), as a fraction of the iteration time:
GPipe and 1F1B (p-1)/(m+p-1); interleaved ((p-1)/v)/(m+(p-1)/v) (Narayanan et al. 2021, sec. 2.2.2);
zero bubble (ZB-V, Qi et al. 2024): the simulated value of torch's ZB-V order (no closed form; it
tends to 0 as m grows: 0.018 at p=8, m=64). 1F1B and interleaved need m >= p (torch's Schedule1F1B
refuses fewer; the interleaved closed form assumes it).
::

    1F1B, p=4, m=8            F = forward, B = backward, . = bubble
    rank 0  F F F F . . . B F B F B F B F B . . . B B B
    rank 3  . . . F B F B F B ...
"""

from __future__ import annotations

import functools
from collections import defaultdict
from dataclasses import dataclass

from mtnlg.errors import ConfigError

SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb")


@dataclass(frozen=True)
class Op:
    """One compute op of the schedule: kind F (forward), B (full backward), I (input grad), W (weight grad)."""

    rank: int
    stage: int
    kind: str
    microbatch: int
    start: float
    end: float


@dataclass
class Timeline:
    """A simulated schedule: every op with its start and end time."""

    schedule: str
    pp: int
    microbatches: int
    vpp: int
    ops: list[Op]

    @property
    def makespan(self) -> float:
        return max(op.end for op in self.ops)

    @property
    def busy(self) -> float:
        return sum(op.end - op.start for op in self.ops)

    @property
    def bubble_fraction(self) -> float:
        """Idle time of all ranks over ``pp`` x the makespan."""
        return 1.0 - self.busy / (self.pp * self.makespan)

    def idle_intervals(self) -> dict[int, list[tuple[float, float]]]:
        """Per rank, the gaps (start, end) between time 0, its ops and the makespan."""
        gaps: dict[int, list[tuple[float, float]]] = {}
        for rank in range(self.pp):
            t, out = 0.0, []
            for op in sorted((o for o in self.ops if o.rank == rank), key=lambda o: o.start):
                if op.start > t + 1e-12:
                    out.append((t, op.start))
                t = op.end
            if self.makespan > t + 1e-12:
                out.append((t, self.makespan))
            gaps[rank] = out
        return gaps


def check_schedule(schedule: str, pp: int, microbatches: int, vpp: int) -> None:
    """Raise :class:`ConfigError` for a combination the schedule classes do not support."""
    if schedule not in SCHEDULES:
        raise ConfigError(f"--schedule '{schedule}' is not one of {list(SCHEDULES)}")
    if pp < 1 or microbatches < 1 or vpp < 1:
        raise ConfigError(f"--pp, --microbatches and --vpp must be >= 1, got {pp}, {microbatches}, {vpp}")
    if schedule in ("1f1b", "interleaved") and microbatches < pp:
        raise ConfigError(f"--schedule {schedule} needs at least as many microbatches as stages "
                          f"(m={microbatches} < pp={pp}); raise --microbatches (in a plan: the global batch) or use "
                          f"--schedule gpipe")
    if schedule == "interleaved":
        if vpp < 2:
            raise ConfigError("--schedule interleaved needs --vpp >= 2 (virtual stages per rank)")
        rounds = max(1, microbatches // pp)
        if microbatches % rounds:
            raise ConfigError(f"--schedule interleaved needs --microbatches a multiple of "
                              f"{rounds} (max(1, m // pp)); got {microbatches}")
    if schedule == "zb" and vpp not in (1, 2):
        raise ConfigError("--schedule zb (ZB-V) runs exactly 2 virtual stages per rank; use --vpp 2 or omit it")


def pipeline_order(schedule: str, pp: int, microbatches: int, vpp: int = 1) -> dict[int, list[tuple[int, str, int]]]:
    """Per rank, the compute ops ``(stage, kind, microbatch)`` in the order torch's schedule class runs them."""
    from torch.distributed.pipelining import schedules as S

    check_schedule(schedule, pp, microbatches, vpp)
    if schedule in ("gpipe", "1f1b"):
        sched = object.__new__(S.ScheduleGPipe if schedule == "gpipe" else S.Schedule1F1B)
        sched._num_stages, sched._n_microbatches = pp, microbatches
        raw = sched._get_pipeline_order()
    elif schedule == "interleaved":
        sched = object.__new__(S.ScheduleInterleaved1F1B)
        sched.pp_group_size, sched._n_microbatches, sched.n_local_stages = pp, microbatches, vpp
        sched.number_of_rounds = max(1, microbatches // pp)
        sched.microbatches_per_round = microbatches // sched.number_of_rounds
        raw = {r: sched._calculate_single_rank_operations(r) for r in range(pp)}
    else:
        sched = object.__new__(S.ScheduleZBVZeroBubble)
        sched.pp_group_size, sched._n_microbatches, sched.num_stages = pp, microbatches, 2 * pp
        raw = {r: sched._calculate_single_rank_operations(r) for r in range(pp)}
    out: dict[int, list[tuple[int, str, int]]] = {}
    for rank, actions in raw.items():
        seen: dict[tuple[int, str], int] = defaultdict(int)
        ops = []
        for a in actions:
            if a is None or a.computation_type.value not in ("F", "B", "I", "W"):
                continue
            kind = a.computation_type.value
            ops.append((a.stage_index, kind, seen[(a.stage_index, kind)]))
            seen[(a.stage_index, kind)] += 1
        out[rank] = ops
    return out


def simulate(schedule: str, pp: int, microbatches: int, vpp: int = 1) -> Timeline:
    """Time torch's op order under the model in the module docstring."""
    chunks = 2 if schedule == "zb" else (vpp if schedule == "interleaved" else 1)
    order = pipeline_order(schedule, pp, microbatches, vpp)
    num_stages = pp * chunks
    dur = {"F": 1 / chunks, "B": 2 / chunks, "I": 1 / chunks, "W": 1 / chunks}
    done: dict[tuple[int, str, int], float] = {}
    free = [0.0] * pp
    pos = [0] * pp
    ops: list[Op] = []
    remaining = sum(len(v) for v in order.values())
    while remaining:
        progressed = False
        for rank in range(pp):
            while pos[rank] < len(order[rank]):
                stage, kind, mb = order[rank][pos[rank]]
                if kind == "F":
                    deps = [(stage - 1, "F", mb)] if stage > 0 else []
                elif kind in ("B", "I"):
                    deps = [(stage, "F", mb)]
                    if stage < num_stages - 1:
                        nxt = (stage + 1, "B", mb) if (stage + 1, "B", mb) in done else (stage + 1, "I", mb)
                        deps.append(nxt)
                else:
                    deps = [(stage, "I", mb)]
                if any(d not in done for d in deps):
                    break
                start = max([free[rank]] + [done[d] for d in deps])
                end = start + dur[kind]
                done[(stage, kind, mb)] = end
                free[rank] = end
                ops.append(Op(rank, stage, kind, mb, start, end))
                pos[rank] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            raise RuntimeError(f"schedule {schedule} (p={pp}, m={microbatches}, v={vpp}) deadlocks in simulation")
    return Timeline(schedule, pp, microbatches, vpp, ops)


@functools.lru_cache(maxsize=256)
def _simulated_bubble(schedule: str, pp: int, microbatches: int, vpp: int) -> float:
    return simulate(schedule, pp, microbatches, vpp).bubble_fraction


def bubble_fraction(schedule: str, pp: int, microbatches: int, vpp: int = 1) -> float:
    """Closed-form share of the iteration a pipeline GPU is idle (see the module docstring)."""
    if pp == 1:
        return 0.0
    p, m = pp, microbatches
    if schedule == "interleaved" and vpp > 1:
        return ((p - 1) / vpp) / (m + (p - 1) / vpp)
    if schedule == "zb":
        return _simulated_bubble("zb", p, m, 2)
    return (p - 1) / (m + p - 1)
