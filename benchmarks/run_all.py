"""Run every benchmark, print one markdown table and write ``benchmarks/results/<date>.json``.

Each benchmark is its own script that measures mtnlg against a reference in the same process and
prints one JSON object with ``--json``; this script only runs them and lays out the table:

    python benchmarks/run_all.py [--only NAME ...] [--timeout SECONDS]

Columns: what, mtnlg, reference, ratio, goal. A benchmark that fails shows its error in the table
(and the script exits non-zero) instead of hiding it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent


@dataclass
class Bench:
    name: str
    script: str
    args: list[str]
    rows: list[tuple[str, str, str, str, str]]  # (what, mtnlg key, reference key, ratio key, goal)


BENCHES = [  # goals as the open issues state them (#16 decode and serving, #17 training, #20 planner)
    Bench("train", "train_throughput.py", ["--steps", "50"], [  # ~100k tokens per framework: fits the 15 min
        ("training tokens/s vs HF GPT2LMHeadModel (fp32 CPU)", "tokens_per_s.mtnlg", "tokens_per_s.hf", "ratio",
         ">= 1.1x"),
        ("training TFLOP/s vs measured fp32 matmul peak", "achieved_tflops", "peak_tflops", "peak_fraction",
         ">= 0.8"),
    ]),
    # --int8 for the int8 rows, --compile for the compiled decode step (compile_decode); --llama-cpp fills the
    # llama.cpp rows where llama-cpp-python is installed
    Bench("decode", "decode.py", ["--int8", "--compile", "--llama-cpp"], [
        ("greedy decode tokens/s, batch 1, vs HF generate", "b1.mtnlg_tok_s", "b1.hf_tok_s", "ratio_b1", ">= 1.5x"),
        ("greedy decode tokens/s, batch 8, vs HF generate", "b8.mtnlg_tok_s", "b8.hf_tok_s", "ratio_b8", "-"),
        ("decode bandwidth utilisation, batch 1, fp32", "-", "-", "mbu_b1", ">= 0.7"),
        ("decode bandwidth utilisation, batch 1, int8", "-", "-", "mbu_b1_int8", ">= 0.7"),
        ("compiled decode (--compile) tokens/s, batch 1, vs HF generate", "b1.compiled_tok_s", "b1.hf_tok_s",
         "ratio_b1_compiled", ">= 1.5x"),
        ("compiled decode bandwidth utilisation, batch 1, fp32", "-", "-", "mbu_b1_compiled", ">= 0.7"),
        ("compiled decode bandwidth utilisation, batch 1, int8", "-", "-", "mbu_b1_int8_compiled", ">= 0.7"),
        ("decode tokens/s, batch 1, fp32 vs llama.cpp f32", "b1.mtnlg_tok_s", "llama_cpp_f32_tok_s",
         "ratio_llama_cpp", ">= 1x"),
        ("decode tokens/s, batch 1, int8 vs llama.cpp q8_0", "b1.int8_tok_s", "llama_cpp_q8_0_tok_s",
         "ratio_llama_cpp_int8", ">= 1x"),
    ]),
    Bench("preprocess", "preprocess.py", [], [
        ("preprocess MB/s vs raw tokenizers encode_batch", "mtnlg_mb_per_s", "raw_mb_per_s", "ratio", ">= 0.8"),
    ]),
    Bench("serve", "serve.py", [], [
        ("server output tokens/s, 16 concurrent / sequential", "-", "-", "throughput_ratio_16", ">= 6x"),
        ("server p50 TTFT, 16 concurrent / single request", "-", "-", "ttft_ratio_16", "<= 2x"),
    ]),
    Bench("plan", "plan_calibration.py", [], [  # the worst of six CPU layouts: its predicted and measured step
        ("planner's worst CPU layout, predicted vs measured step s", "predicted_s", "measured_s", "ratio", "0.9-1.1"),
        ("planner's worst error over the six layouts", "worst_layout", "-", "worst_error", "<= 0.1"),
        ("planner orders the layouts as measured", "-", "-", "rank_agreement", "True"),
    ]),
]


def _get(data: dict, key: str) -> object:
    """``a.b`` looks up nested keys; a missing key is None."""
    for part in key.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return "-" if v is None else str(v)


def run_one(b: Bench, timeout: float) -> dict:
    cmd = [sys.executable, str(HERE / b.script), "--json", *b.args]
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    elapsed = time.perf_counter() - t0
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["?"]
        return {"error": f"exit {r.returncode}: {tail[0]}", "seconds": elapsed}
    lines = [ln for ln in r.stdout.strip().splitlines() if ln.startswith("{")]
    try:
        data = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        return {"error": "no JSON object on stdout", "seconds": elapsed}
    data["seconds"] = round(elapsed, 1)
    return data


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", choices=[b.name for b in BENCHES], help="run only these")
    ap.add_argument("--timeout", type=float, default=400.0, help="seconds per benchmark")
    ap.add_argument("--output", type=Path, default=HERE / "results", help="directory for <date>.json")
    args = ap.parse_args()
    env_threads = os.environ.get("OMP_NUM_THREADS")
    results: dict[str, dict] = {}
    table = ["| what | mtnlg | reference | ratio | goal |", "| --- | --- | --- | --- | --- |"]
    failed = False
    for b in BENCHES:
        if args.only and b.name not in args.only:
            continue
        print(f"running {b.script} ...", file=sys.stderr, flush=True)
        res = run_one(b, args.timeout)
        results[b.name] = res
        for what, mk, rk, ratio_k, goal in b.rows:
            if "error" in res:
                failed = True
                table.append(f"| {what} | error: {res['error']} | - | - | {goal} |")
            else:
                table.append(f"| {what} | {_fmt(_get(res, mk))} | {_fmt(_get(res, rk))} | "
                             f"{_fmt(_get(res, ratio_k))} | {goal} |")
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform(terse=True)}"
    date = dt.date.today().isoformat()
    print(f"\nmtnlg benchmarks, {date}, {machine}\n")
    print("\n".join(table))
    args.output.mkdir(parents=True, exist_ok=True)
    out = args.output / f"{date}.json"
    out.write_text(json.dumps({"date": date, "machine": machine, "omp_num_threads": env_threads,
                               "results": results, "table": table}, indent=2))
    print(f"\nwrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
