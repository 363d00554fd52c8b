"""Is the planner right on this machine? Calibrate, then train six layouts for real and compare.

1. ``mtnlg plan --calibrate``'s measurements (:func:`mtnlg.plan.calibrate.calibrate`) at the shapes
   these layouts produce: matmuls, fused attention, element-wise bandwidth, per-op overhead, and
   gloo collectives between 2 spawned ranks (1 torch thread per rank, as the runs use).
2. Each layout trains a small GPT through the public CLI, ``mtnlg train [--nproc N] --parallel.x=y``
   (``OMP_NUM_THREADS=1``), and its step times are read from the run's ``metrics.jsonl``.
3. The planner predicts each layout's step time with that profile (``gpu=cpu``, fp32, no recompute).

Layouts: 1 process; DP2 (DDP); FSDP2; TP2 + SP; PP2 1F1B with 4 micro-batches; TP2 x PP2 on 4 processes.
The calibration times each part at its median (what a step typically pays per call); the measured
figure is the fastest step after the first (the least disturbed one), and ``ratio_median`` /
``worst_error_median`` compare with the median step as well. On this shared 2-core VM both move by
20-30% from minute to minute with the neighbours' load, so read one run's errors with that in mind
(the load average is printed too).

    python benchmarks/plan_calibration.py [--size small|tiny] [--steps N] [--profile P.json] [--json]

``--json`` prints one object with ``worst_error`` (max |predicted/measured - 1|) and
``rank_agreement`` (the planner orders the layouts as the measurement does).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from mtnlg.config import ModelConfig
from mtnlg.plan import Layout, PlanModel, get_gpu, plan
from mtnlg.plan.calibrate import calibrate
from mtnlg.plan.profile import load_profile
from mtnlg.plan.timemodel import lookup_shapes

# name, processes, CLI overrides, planner layout fields
LAYOUTS = [
    ("1 process", 1, {}, {"zero": 0}),
    ("DP2 (DDP)", 2, {"parallel.dp_replicate": 2, "parallel.dp_shard": 1}, {"zero": 0}),
    ("FSDP2", 2, {"parallel.dp_shard": 2}, {"zero": 3}),
    ("TP2 + SP", 2, {"parallel.tp": 2}, {"tp": 2, "zero": 0}),
    ("PP2 1F1B m=4", 2, {"parallel.pp": 2, "parallel.pp_schedule": "1f1b"}, {"pp": 2, "zero": 0}),
    ("TP2 x PP2", 4, {"parallel.tp": 2, "parallel.pp": 2}, {"tp": 2, "pp": 2, "zero": 0}),
]
SIZES = {  # model and batch; global batch 8 in micro-batches of 2 (4 per pipeline)
    "small": {"vocab_size": 512, "hidden_size": 256, "num_layers": 4, "num_heads": 4, "ffn_hidden_size": 1024,
              "seq_len": 128},
    "tiny": {"vocab_size": 512, "hidden_size": 64, "num_layers": 2, "num_heads": 4, "ffn_hidden_size": 256,
             "seq_len": 64},
}
GLOBAL_BATCH, MICRO_BATCH = 8, 2


def model_of(size: str) -> PlanModel:
    s = dict(SIZES[size])
    seq = s.pop("seq_len")
    return PlanModel(size, ModelConfig(**s, max_seq_len=seq), seq)


def layout_of(gpus: int, fields: dict) -> Layout:
    return Layout(gpus=gpus, global_batch=GLOBAL_BATCH, micro_batch=MICRO_BATCH, recompute="none", **fields)


def write_config(size: str, steps: int, where: Path) -> Path:
    m = model_of(size)
    cfg = {"model": {k: v for k, v in SIZES[size].items() if k != "seq_len"} | {"max_seq_len": m.seq_len},
           "data": {"corpus": "poems"},
           "train": {"steps": steps, "optimizer": "adamw", "seq_len": m.seq_len, "global_batch_size": GLOBAL_BATCH,
                     "micro_batch_size": MICRO_BATCH, "eval_interval": 10_000, "eval_batches": 1, "warmup_steps": 1},
           "checkpoint": {"interval": 0}, "log": {"interval": 1, "tensorboard": False},
           "sft": {"enabled": False}}  # the step times are pre-training's; the chat stage would only add minutes
    # (AdamW: the time model prices Adam's optimizer step, not Muon's orthogonalization)
    path = where / f"{size}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def train(config: Path, nproc: int, overrides: dict, run_dir: Path, timeout: float = 900) -> list[float]:
    """Run ``mtnlg train`` and return its step times (seconds) from ``metrics.jsonl``."""
    cmd = [sys.executable, "-m", "mtnlg", "train", "--config", str(config), "--output", str(run_dir), "--no-progress"]
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    cmd += [f"--{k}={v}" for k, v in overrides.items()]
    env = dict(os.environ, OMP_NUM_THREADS="1", MTNLG_LOG_LEVEL="WARNING")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["step_time_s"] for r in rows if r.get("split") == "train"]


def rank_order(values: list[float]) -> list[int]:
    return sorted(range(len(values)), key=lambda i: values[i])


def run(size: str, steps: int, profile_path: str | None, work: Path) -> dict:
    model = model_of(size)
    cpu = get_gpu("cpu")
    load_before = os.getloadavg()
    t0 = time.time()
    if profile_path:
        prof = load_profile(profile_path)
    else:
        gemms, atts = set(), set()
        for _, n, _, fields in LAYOUTS:
            g, a = lookup_shapes(plan(model, layout_of(n, fields), cpu).shape)
            gemms |= g
            atts |= a
        prof = calibrate(gemms, atts, threads=1, progress=lambda msg: print(f"calibrate: {msg}", file=sys.stderr))
        prof.save(work / "profile.json")
    calib_s = time.time() - t0
    config = write_config(size, steps, work)
    rows = []
    for name, n, overrides, fields in LAYOUTS:
        p = plan(model, layout_of(n, fields), cpu, profile=prof)
        print(f"train: {name} ({n} process{'es' if n > 1 else ''})", file=sys.stderr)
        times = train(config, n, overrides, work / name.replace(" ", "_").replace("+", "").replace("(", "")
                      .replace(")", ""))
        after_first = times[1:] or times
        measured = min(after_first)
        rows.append({"layout": name, "processes": n, "predicted_s": p.est_iteration_time_s, "measured_s": measured,
                     "measured_median_s": statistics.median(after_first), "ratio": p.est_iteration_time_s / measured,
                     "ratio_median": p.est_iteration_time_s / statistics.median(after_first),
                     "limiting_term": p.limiting_term, "terms_s": p.time_breakdown})
    pred, meas = [r["predicted_s"] for r in rows], [r["measured_s"] for r in rows]
    for r in rows:  # relative to the 1-process layout: a load that slows every run alike cancels out
        r["predicted_vs_1proc"], r["measured_vs_1proc"] = r["predicted_s"] / pred[0], r["measured_s"] / meas[0]
    worst = max(rows, key=lambda r: abs(r["ratio"] - 1))
    return {"benchmark": "plan_calibration", "size": size, "steps": steps, "profile": prof.name,
            # the worst layout at the top level, for benchmarks/run_all.py's one-row summary
            "worst_layout": worst["layout"], "predicted_s": worst["predicted_s"], "measured_s": worst["measured_s"],
            "ratio": worst["ratio"],
            "calibration_s": calib_s, "layouts": rows,
            "worst_error": max(abs(r["ratio"] - 1) for r in rows),
            "worst_error_median": max(abs(r["ratio_median"] - 1) for r in rows),
            "rank_agreement": rank_order(pred) == rank_order(meas),
            "predicted_order": [rows[i]["layout"] for i in rank_order(pred)],
            "measured_order": [rows[i]["layout"] for i in rank_order(meas)],
            "load_average_before": list(load_before), "load_average_after": list(os.getloadavg()),
            "cpu_count": os.cpu_count()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=list(SIZES), default="small")
    ap.add_argument("--steps", type=int, default=6, help="training steps per layout (the first is not timed)")
    ap.add_argument("--profile", help="use this profile instead of calibrating")
    ap.add_argument("--workdir", help="keep runs and the profile here (default: a temporary directory)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    if args.steps < 2:
        ap.error("--steps must be >= 2 (the first step is not timed)")
    from mtnlg.device import reuse_freed_memory

    reuse_freed_memory()  # calibrate as `mtnlg plan --calibrate` does: the layouts train through `mtnlg train`
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        res = run(args.size, args.steps, args.profile, work)
    if args.json:
        print(json.dumps(res))
        return
    print(f"{'layout':<16}{'procs':>6}{'predicted s':>13}{'measured s':>12}{'median s':>10}{'pred/meas':>11}"
          f"{'pred/med':>10}{'pred x1p':>10}{'meas x1p':>10}  limited by")
    for r in res["layouts"]:
        print(f"{r['layout']:<16}{r['processes']:>6}{r['predicted_s']:>13.4f}{r['measured_s']:>12.4f}"
              f"{r['measured_median_s']:>10.4f}{r['ratio']:>11.3f}{r['ratio_median']:>10.3f}"
              f"{r['predicted_vs_1proc']:>10.2f}"
              f"{r['measured_vs_1proc']:>10.2f}  {r['limiting_term']}")
    la, lb = res["load_average_before"], res["load_average_after"]
    print(f"worst error {res['worst_error']:.1%} (against the median step {res['worst_error_median']:.1%}); "
          f"rank agreement {res['rank_agreement']}")
    print(f"predicted order: {', '.join(res['predicted_order'])}\nmeasured order:  {', '.join(res['measured_order'])}")
    print(f"load average before {la[0]:.2f} / after {lb[0]:.2f} on {res['cpu_count']} cores")


if __name__ == "__main__":
    main()
