"""Calibrate the planner's time model on this CPU.

1. Measure the fp32 matmul peak (square ``torch.mm``, best of many runs, measured before and after the
   step and the higher kept: the CPU is shared, so the best run is the least disturbed one).
2. Predict one training step of a tiny mtnlg GPT with the planner (gpu=cpu, peak = the measured
   matmul rate, efficiency 1.0, no parallelism, no recomputation): eq. 3's FLOPs / peak.
3. Measure the real step: forward + cross entropy + backward + AdamW on a plain ``mtnlg.model.GPT``
   (the fastest of the timed steps after warm-up, like the peak: the least disturbed one).
4. Print predicted / measured. Below 1 means the step runs slower than its matmuls alone would at
   peak (attention at a short sequence, GELU, LayerNorm, the optimizer and framework overhead).

    python benchmarks/plan_calibration.py [--json] [--threads N] [--steps N]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from mtnlg.config import ModelConfig
from mtnlg.model import build_model, materialize
from mtnlg.plan import Layout, PlanModel, get_gpu, plan


def matmul_peak(n: int = 1024, repeats: int = 20) -> float:
    """Best fp32 FLOP/s of an n x n x n matmul."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def measure_step(cfg: ModelConfig, batch: int, seq: int, steps: int, warmup: int = 2) -> float:
    """Fastest seconds of forward + loss + backward + AdamW step (after ``warmup`` untimed steps)."""
    model = materialize(build_model(cfg), seed=0).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        logits = model(inputs)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the CPU is shared)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    h = args.hidden
    cfg = ModelConfig(vocab_size=4096, hidden_size=h, num_layers=args.layers, num_heads=max(1, h // 64),
                      ffn_hidden_size=4 * h, max_seq_len=args.seq)
    peak = matmul_peak()
    measured = measure_step(cfg, args.batch, args.seq, args.steps)
    peak = max(peak, matmul_peak())
    model = PlanModel("calibration", cfg, args.seq)
    layout = Layout(gpus=1, global_batch=args.batch, micro_batch=args.batch, recompute="none", zero=0)
    predicted_plan = plan(model, layout, get_gpu("cpu", peak_tflops=peak / 1e12), efficiency=1.0)
    predicted = predicted_plan.est_iteration_time_s
    result = {
        "threads": args.threads,
        "model": {"hidden": h, "layers": args.layers, "heads": cfg.num_heads, "vocab": cfg.vocab_size,
                  "seq": args.seq, "batch": args.batch, "params": predicted_plan.params},
        "matmul_peak_gflops": peak / 1e9,
        "flops_per_step": predicted_plan.flops_per_iteration,
        "predicted_s": predicted,
        "measured_s": measured,
        "achieved_gflops": predicted_plan.flops_per_iteration / measured / 1e9,
        "ratio": predicted / measured,
    }
    if args.json:
        print(json.dumps(result))
        return
    rows = [("fp32 matmul peak (measured)", f"{result['matmul_peak_gflops']:.1f} GFLOP/s"),
            ("model", f"{predicted_plan.params:,} params, h={h}, L={args.layers}, batch {args.batch} x {args.seq}"),
            ("FLOPs / step (eq. 3, no recompute)", f"{result['flops_per_step']:.3e}"),
            ("predicted step (planner)", f"{predicted * 1e3:.1f} ms"),
            ("measured step (fwd+bwd+AdamW)", f"{measured * 1e3:.1f} ms"),
            ("achieved", f"{result['achieved_gflops']:.1f} GFLOP/s"),
            ("predicted / measured", f"{result['ratio']:.3f}")]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))


if __name__ == "__main__":
    main()
