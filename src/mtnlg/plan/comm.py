"""Communication volume per iteration and GPU, for each parallel dimension, and its time.

Volumes are the bytes one GPU sends (ring collectives: an all-reduce of S bytes over n ranks sends
2·(n-1)/n·S, an all-gather or reduce-scatter (n-1)/n·S), so time = volume / link bandwidth.

* **TP**: per layer and microbatch, 2 all-reduces of the b·s·h activation in the forward pass and 2
  in the backward (Shoeybi et al. 2019); with sequence parallelism each becomes an all-gather plus a
  reduce-scatter, the same volume (Korthikanti et al. 2022). Full recomputation repeats the 2 forward ones.
* **PP**: every microbatch crosses each stage boundary forward (activations) and backward (gradients):
  b·s·h/t per GPU with the scatter/gather optimisation (Narayanan et al. 2021, sec. 4.1), times v with
  interleaving.
* **DP**: the gradient all-reduce (ZeRO-0), reduce-scatter + all-gather of the updated weights
  (ZeRO-1/2, the same volume), or all-gather in forward and backward + reduce-scatter (ZeRO-3, 1.5x).

Placement follows Megatron's rank order (tp fastest, then dp, then pp): a group uses NVLink when it
fits inside one node, InfiniBand otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

COMM_EFFICIENCY = 0.7  # achieved fraction of the link's data-sheet bandwidth (NCCL bus bandwidth)


@dataclass
class CommVolume:
    """Bytes per GPU per iteration, and seconds, for each dimension."""

    tp_bytes: float
    pp_bytes: float
    dp_bytes: float
    tp_s: float
    pp_s: float
    dp_s: float

    def as_dict(self) -> dict[str, float]:
        return {"tp_bytes": self.tp_bytes, "pp_bytes": self.pp_bytes, "dp_bytes": self.dp_bytes,
                "tp_s": self.tp_s, "pp_s": self.pp_s, "dp_s": self.dp_s}


def tp_collectives_per_layer(recompute: str) -> int:
    """All-reduce equivalents per layer and microbatch (forward 2 + backward 2, + 2 recomputed)."""
    return 6 if recompute == "full" else 4


def communication(*, hidden: int, seq: int, micro_batch: int, layers_per_stage: int, microbatches: int,
                  params_per_gpu: float, tp: int, pp: int, dp: int, vpp: int = 1, recompute: str = "full",
                  zero: int = 1, dtype_bytes: int = 2, grad_bytes: int = 2, nvlink_bw: float, ib_bw: float,
                  gpus_per_node: int = 8, efficiency: float = COMM_EFFICIENCY) -> CommVolume:
    """Communication of one GPU in one iteration (volumes in bytes, times in seconds)."""
    act = micro_batch * seq * hidden * dtype_bytes  # one microbatch's hidden state
    tp_bytes = 0.0
    if tp > 1:
        tp_bytes = (tp_collectives_per_layer(recompute) * 2 * (tp - 1) / tp * act
                    * layers_per_stage * microbatches)
    pp_bytes = 2 * microbatches * vpp * act / tp if pp > 1 else 0.0
    dp_bytes = 0.0
    if dp > 1:
        ring = (dp - 1) / dp
        dp_bytes = (3 * ring * params_per_gpu * dtype_bytes if zero >= 3
                    else 2 * ring * params_per_gpu * grad_bytes)

    def bw(group_span: int) -> float:
        return (nvlink_bw if group_span <= gpus_per_node else ib_bw) * efficiency

    return CommVolume(tp_bytes, pp_bytes, dp_bytes,
                      tp_bytes / bw(tp), pp_bytes / bw(tp * dp * pp), dp_bytes / bw(tp * dp))
