"""One layout in, one estimate out: parameters, FLOPs, memory, communication, bubble and time.

The iteration time is the sum of the terms of :mod:`mtnlg.plan.timemodel` (matmuls at their shape's
rate, element-wise bytes, attention, per-op overhead, TP/SP collectives, pipeline sends, bubble, the
data-parallel reduction less its overlap, the optimizer), priced with a machine profile
(:mod:`mtnlg.plan.profile`): ``--profile FILE.json``, else the shipped profile of ``--gpu``, else
the GPU table's data-sheet figures.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from mtnlg.errors import ConfigError
from mtnlg.plan.comm import CommVolume, communication
from mtnlg.plan.flops import RECOMPUTE, flops_per_iteration, params_eq2, params_exact
from mtnlg.plan.gpus import GPU
from mtnlg.plan.memory import MemoryEstimate, estimate_memory, params_per_gpu
from mtnlg.plan.presets import PlanModel
from mtnlg.plan.profile import Profile, nominal_profile, resolve_profile
from mtnlg.plan.schedule import SCHEDULES, bubble_fraction, check_schedule
from mtnlg.plan.timemodel import Shape, dp_times, iteration_terms, largest_loss, limiting_term


@dataclass(frozen=True)
class Layout:
    """A 3D-parallel training layout: world = tp x pp x dp GPUs."""

    gpus: int
    tp: int = 1
    pp: int = 1
    vpp: int = 1
    global_batch: int = 1
    micro_batch: int = 1
    recompute: str = "full"
    zero: int = 1
    schedule: str = "1f1b"  # gpipe | 1f1b | interleaved | zb; 1f1b with vpp > 1 means interleaved
    sequence_parallel: bool = True

    @property
    def dp(self) -> int:
        return self.gpus // (self.tp * self.pp)

    @property
    def microbatches(self) -> int:
        """Microbatches per pipeline per iteration: B / (b · dp)."""
        return self.global_batch // (self.micro_batch * self.dp)

    @property
    def effective_schedule(self) -> str:
        return "interleaved" if self.vpp > 1 and self.schedule == "1f1b" else self.schedule

    @property
    def chunks(self) -> int:
        """Model chunks per pipeline rank: 2 for ZB-V, ``vpp`` otherwise."""
        return 2 if self.schedule == "zb" and self.pp > 1 else self.vpp


def validate_layout(model: PlanModel, layout: Layout) -> None:
    """Raise :class:`ConfigError` naming the flag to change when a layout breaks divisibility."""
    cfg, lo = model.cfg, layout
    for name in ("gpus", "tp", "pp", "vpp", "global_batch", "micro_batch"):
        if getattr(lo, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(lo, name)}")
    if lo.gpus % (lo.tp * lo.pp):
        raise ConfigError(f"--gpus {lo.gpus} is not divisible by tp x pp = {lo.tp * lo.pp}")
    if cfg.num_heads % lo.tp or cfg.ffn_hidden_size % lo.tp:
        raise ConfigError(f"--tp {lo.tp} must divide num_heads={cfg.num_heads} and ffn_hidden_size="
                          f"{cfg.ffn_hidden_size}")
    if lo.vpp > 1 and lo.schedule == "gpipe":
        raise ConfigError("--vpp > 1 runs interleaved 1F1B; drop --schedule gpipe or set --vpp 1")
    if lo.schedule == "zb" and lo.vpp not in (1, 2):
        raise ConfigError("--schedule zb (ZB-V) runs exactly 2 model chunks per rank; use --vpp 2 or omit it")
    if cfg.num_layers % (lo.pp * lo.chunks):
        raise ConfigError(f"pp x model chunks per rank = {lo.pp * lo.chunks} must divide num_layers={cfg.num_layers}")
    if lo.global_batch % (lo.micro_batch * lo.dp):
        raise ConfigError(f"--global-batch {lo.global_batch} must be a multiple of micro-batch x dp = "
                          f"{lo.micro_batch} x {lo.dp}")
    if lo.recompute not in RECOMPUTE:
        raise ConfigError(f"--recompute '{lo.recompute}' is not one of {list(RECOMPUTE)}")
    if lo.zero not in (0, 1, 2, 3):
        raise ConfigError(f"--zero must be 0, 1, 2 or 3, got {lo.zero}")
    if lo.schedule not in SCHEDULES:
        raise ConfigError(f"--schedule '{lo.schedule}' is not one of {list(SCHEDULES)}")
    if lo.pp > 1:
        if lo.zero >= 2:
            raise ConfigError(f"--zero {lo.zero} shards the gradients that pipeline microbatches accumulate into; "
                              "with --pp > 1 use --zero 0 or 1 (as DeepSpeed and Megatron do)")
        sched = lo.effective_schedule
        check_schedule(sched, lo.pp, lo.microbatches, lo.chunks)
    elif lo.vpp > 1:
        raise ConfigError("--vpp > 1 needs --pp > 1")
    if model.seq_len > cfg.max_seq_len:
        raise ConfigError(f"--seq-len {model.seq_len} exceeds the model's max_seq_len {cfg.max_seq_len}")


@dataclass
class Plan:
    """Everything the planner estimates for one model and layout."""

    model: PlanModel
    layout: Layout
    gpu: GPU
    params: int
    params_eq2: float
    flops_per_iteration: float
    memory: MemoryEstimate
    comm: CommVolume
    bubble_fraction: float
    time_breakdown: dict[str, float]
    tflops_per_gpu: float | None = None
    extra: dict[str, float] = field(default_factory=dict)
    profile_name: str = ""
    shape: Shape | None = None

    @property
    def limiting_term(self) -> str:
        return limiting_term(self.time_breakdown)

    @property
    def largest_loss(self) -> str:
        return largest_loss(self.time_breakdown)

    @property
    def est_iteration_time_s(self) -> float:
        return sum(self.time_breakdown.values())

    @property
    def est_tflops_per_gpu(self) -> float:
        return self.flops_per_iteration / (self.layout.gpus * self.est_iteration_time_s) / 1e12

    @property
    def tokens_per_s(self) -> float:
        return self.layout.global_batch * self.model.seq_len / self.est_iteration_time_s

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.gpu.memory_bytes

    def as_dict(self) -> dict:
        lo = self.layout
        out = {
            "model": self.model.name,
            "gpu": self.gpu.name,
            "layout": {"gpus": lo.gpus, "tp": lo.tp, "pp": lo.pp, "vpp": lo.chunks, "dp": lo.dp,
                       "global_batch": lo.global_batch, "micro_batch": lo.micro_batch,
                       "microbatches": lo.microbatches, "seq_len": self.model.seq_len, "recompute": lo.recompute,
                       "zero": lo.zero, "schedule": lo.effective_schedule,
                       "sequence_parallel": lo.sequence_parallel and lo.tp > 1},
            "params": self.params,
            "params_eq2": self.params_eq2,
            "flops_per_iteration": self.flops_per_iteration,
            "memory_per_gpu_bytes": self.memory.total,
            "memory_breakdown": self.memory.as_dict(),
            "gpu_memory_bytes": self.gpu.memory_bytes,
            "communication_per_iteration": self.comm.as_dict(),
            "bubble_fraction": self.bubble_fraction,
            "est_iteration_time_s": self.est_iteration_time_s,
            "time_breakdown_s": self.time_breakdown,
            "limiting_term": self.limiting_term,
            "largest_loss": self.largest_loss,
            "profile": self.profile_name,
            "est_tflops_per_gpu": self.est_tflops_per_gpu,
            "est_tokens_per_s": self.tokens_per_s,
            "fits": self.fits,
        }
        if self.tflops_per_gpu is not None:
            out["tflops_per_gpu"] = self.tflops_per_gpu
        return out


def default_profile(gpu: GPU) -> Profile:
    """The shipped profile of ``gpu`` (A100, H100 families), else its data-sheet figures."""
    return resolve_profile(None, gpu.name) or nominal_profile(gpu.name, gpu.peak_flops, gpu.hbm_bw, gpu.nvlink_bw,
                                                              gpu.ib_bw)


def plan(model: PlanModel, layout: Layout, gpu: GPU, *, profile: Profile | None = None,
         gpus_per_node: int = 8, iteration_time: float | None = None) -> Plan:
    """Estimate one layout (validated first) on ``profile`` (default: :func:`default_profile`)."""
    validate_layout(model, layout)
    if gpus_per_node < 1:
        raise ConfigError(f"--gpus-per-node must be >= 1, got {gpus_per_node}")
    prof = profile or default_profile(gpu)
    cfg, lo, s = model.cfg, layout, model.seq_len
    V = cfg.padded_vocab_size(lo.tp)
    flops = flops_per_iteration(lo.global_batch, s, cfg.num_layers, cfg.hidden_size, V, lo.recompute)
    m = lo.microbatches
    sched = lo.effective_schedule
    mem = estimate_memory(cfg, s, lo.micro_batch, lo.tp, lo.pp, lo.dp, m, sched, lo.chunks, lo.recompute, lo.zero,
                          lo.sequence_parallel, gpu.dtype_bytes, gpu.mixed_precision)
    ppg = params_per_gpu(cfg, lo.tp, lo.pp)
    comm = communication(hidden=cfg.hidden_size, seq=s, micro_batch=lo.micro_batch,
                         layers_per_stage=cfg.num_layers // lo.pp, microbatches=m, params_per_gpu=ppg, tp=lo.tp,
                         pp=lo.pp, dp=lo.dp, vpp=lo.chunks, recompute=lo.recompute, zero=lo.zero,
                         dtype_bytes=gpu.dtype_bytes, grad_bytes=gpu.dtype_bytes, nvlink_bw=gpu.nvlink_bw,
                         ib_bw=gpu.ib_bw, gpus_per_node=gpus_per_node)
    bubble = bubble_fraction(sched, lo.pp, m, lo.chunks) if lo.pp > 1 else 0.0
    shape = Shape(layers=cfg.num_layers, hidden=cfg.hidden_size, ffn=cfg.ffn_hidden_size, heads=cfg.num_heads,
                  vocab=V, seq=s, micro_batch=lo.micro_batch, microbatches=m, tp=lo.tp, pp=lo.pp, dp=lo.dp,
                  chunks=lo.chunks, recompute=lo.recompute, zero=lo.zero, sp=lo.sequence_parallel and lo.tp > 1,
                  dtype_bytes=gpu.dtype_bytes, mixed_precision=gpu.mixed_precision, params_per_gpu=ppg,
                  bubble_fraction=bubble, gpus_per_node=gpus_per_node)
    times = iteration_terms(prof, shape)
    comm = replace(comm, tp_s=times["tp_comm"], pp_s=times["pp_comm"], dp_s=dp_times(prof, shape)[0])
    achieved = None
    if iteration_time is not None:
        if not iteration_time > 0:
            raise ConfigError(f"--iteration-time must be > 0 seconds, got {iteration_time}")
        achieved = flops / (lo.gpus * iteration_time) / 1e12
    return Plan(model, lo, gpu, params_exact(cfg, lo.tp),
                params_eq2(cfg.num_layers, cfg.hidden_size, V, s), flops, mem, comm, bubble, times, achieved,
                profile_name=prof.name, shape=shape)
