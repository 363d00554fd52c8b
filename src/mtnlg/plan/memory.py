"""Memory per GPU: weights, gradients and optimizer states by ZeRO stage, activations by recompute mode.

Model states (Rajbhandari et al. 2020, ZeRO): mixed-precision Adam keeps 2 (bf16 weights) + 2 (bf16
gradients) + 12 (fp32 master weights, momentum, variance) bytes per parameter. ZeRO-1 shards the
optimizer states over the data-parallel group, ZeRO-2 also the gradients, ZeRO-3 also the weights.
Plain fp32 training (CPU) keeps 4 + 4 + 8 bytes.

Activations (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models",
arXiv:2205.05198), bytes per layer and microbatch with 16-bit activations, s sequence, b micro-batch,
h hidden, a heads, t tensor-parallel size:

======================  ==============================  ==========================
recompute               tensor parallel (no SP)         tensor + sequence parallel
======================  ==============================  ==========================
none                    s·b·h·(10 + 24/t + 5·a·s/(h·t))  s·b·h·(34 + 5·a·s/h)/t
selective               s·b·h·(10 + 24/t)               34·s·b·h/t
full                    2·s·b·h  (the layer input)      2·s·b·h/t
======================  ==============================  ==========================

With full recomputation one layer's activations are rebuilt during the backward pass (the
"working set" term). The first pipeline stage holds the most activations: the number of
microbatches it has in flight depends on the schedule (:func:`in_flight_microbatches`).
"""

from __future__ import annotations

from dataclasses import dataclass

from mtnlg.config import ModelConfig


def activation_bytes_per_layer(seq: int, micro_batch: int, hidden: int, heads: int, tp: int = 1,
                               recompute: str = "none", sp: bool = True, dtype_bytes: int = 2) -> float:
    """Korthikanti et al. 2022 activation memory of one transformer layer for one microbatch (bytes)."""
    s, b, h, a, t = seq, micro_batch, hidden, heads, tp
    sp = sp and t > 1
    if recompute == "full":
        per = 2 * s * b * h / (t if sp else 1)
    elif recompute == "selective":
        per = 34 * s * b * h / t if sp else s * b * h * (10 + 24 / t)
    else:
        per = s * b * h * (34 + 5 * a * s / h) / t if sp else s * b * h * (10 + 24 / t + 5 * a * s / (h * t))
    return per * dtype_bytes / 2  # the paper's constants count 16-bit values


def in_flight_microbatches(schedule: str, pp: int, microbatches: int, vpp: int = 1) -> float:
    """Microbatches whose activations the first stage holds at its peak, in units of a whole stage.

    GPipe: all m. 1F1B: min(p, m) (Narayanan et al. 2021, sec. 2.2.1). Interleaved 1F1B with v
    chunks per GPU: p·(1 + (p-1)/(p·v)) (Korthikanti et al. 2022, sec. 4.2.3). Zero bubble (ZB-V):
    the same peak as 1F1B (Qi et al. 2024). Without pipelining one microbatch at a time.
    """
    if pp == 1:
        return 1.0
    if schedule == "gpipe":
        return float(microbatches)
    if schedule == "interleaved" and vpp > 1:
        return min(float(microbatches), pp * (1 + (pp - 1) / (pp * vpp)))
    return float(min(pp, microbatches))


def model_state_bytes(params_per_gpu: float, dp: int, zero: int, mixed_precision: bool = True) -> dict[str, float]:
    """Weights, gradients and optimizer states (bytes per GPU) under ZeRO stage ``zero``."""
    w, g, o = (2, 2, 12) if mixed_precision else (4, 4, 8)
    return {
        "weights": params_per_gpu * w / (dp if zero >= 3 else 1),
        "gradients": params_per_gpu * g / (dp if zero >= 2 else 1),
        "optimizer": params_per_gpu * o / (dp if zero >= 1 else 1),
    }


def params_per_gpu(cfg: ModelConfig, tp: int, pp: int) -> float:
    """Parameters held by one GPU of the first pipeline stage (the embedding tables live there).

    Weight matrices and their column-parallel biases are split over ``tp``; LayerNorms and the
    row-parallel output biases are replicated. With ``pp == 1`` the final LayerNorm is there too.
    """
    h, f = cfg.hidden_size, cfg.ffn_hidden_size
    replicated = 4 * h + 2 * h  # two LayerNorms, attention-proj and fc2 biases
    sharded = (3 * h * h + 3 * h) + h * h + (h * f + f) + f * h
    layers = -(-cfg.num_layers // pp)
    embeddings = cfg.padded_vocab_size(tp) * h / tp + cfg.max_seq_len * h
    return layers * (sharded / tp + replicated) + embeddings + (2 * h if pp == 1 else 0)


@dataclass
class MemoryEstimate:
    """Bytes per GPU by term; ``total`` is their sum."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    recompute_working_set: float
    logits: float

    @property
    def total(self) -> float:
        return (self.weights + self.gradients + self.optimizer + self.activations + self.recompute_working_set
                + self.logits)

    def as_dict(self) -> dict[str, float]:
        return {"weights": self.weights, "gradients": self.gradients, "optimizer": self.optimizer,
                "activations": self.activations, "recompute_working_set": self.recompute_working_set,
                "logits": self.logits}


def estimate_memory(cfg: ModelConfig, seq: int, micro_batch: int, tp: int, pp: int, dp: int, microbatches: int,
                    schedule: str = "1f1b", vpp: int = 1, recompute: str = "full", zero: int = 1, sp: bool = True,
                    dtype_bytes: int = 2, mixed_precision: bool = True) -> MemoryEstimate:
    """Peak memory of one GPU of the first pipeline stage."""
    states = model_state_bytes(params_per_gpu(cfg, tp, pp), dp, zero, mixed_precision)
    per_layer = activation_bytes_per_layer(seq, micro_batch, cfg.hidden_size, cfg.num_heads, tp, recompute, sp,
                                           dtype_bytes)
    layers_per_stage = -(-cfg.num_layers // pp)
    activations = per_layer * layers_per_stage * in_flight_microbatches(schedule, pp, microbatches, vpp)
    working = 0.0
    if recompute == "full":
        working = activation_bytes_per_layer(seq, micro_batch, cfg.hidden_size, cfg.num_heads, tp, "none", sp,
                                             dtype_bytes)
    # With one stage it is also the last: fp32 logits for the (vocab-parallel) cross entropy, 4·s·b·V/t.
    logits = 4 * seq * micro_batch * cfg.padded_vocab_size(tp) / tp if pp == 1 else 0.0
    return MemoryEstimate(states["weights"], states["gradients"], states["optimizer"], activations, working, logits)
