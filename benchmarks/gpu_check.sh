#!/usr/bin/env bash
# The CUDA/NCCL path on a machine with a GPU, in under 8 minutes:
#   0. the device's measured bf16 matmul peak (8192^3, best of 2 s) beside its data-sheet figure;
#   1. bf16 training of a ~1.1B-parameter model (examples/gpu-1b.yaml) on one GPU, torch.compile off and on
#      (the chunked LM head + loss and fused AdamW are on by default), reporting MFU against the measured peak
#      and against the data sheet (989 TFLOP/s dense bf16 for H100/H200, as Megatron-LM and torchtitan
#      report it), the median step time and the first (compiling) step from mtnlg's metrics.jsonl;
#   2. greedy decode tokens/s of the trained model;
#   3. a 2-process NCCL run when 2 or more GPUs exist;
#   4. the README's main job (`mtnlg train`, then `mtnlg poem` and `mtnlg chat` on its model), as a user of
#      the GPU machine would run it (set DEFAULT_JOB=0 to skip; ~50 s on an H200).
# Goal on an H100/H200-class GPU: MFU >= 45% (data sheet).
# Usage: bash benchmarks/gpu_check.sh [RUN_DIR [REPORT_DIR]]
#   RUN_DIR holds the runs (checkpoints of ~13 GB each); REPORT_DIR gets the logs and gpu_check.json.
# Works from a plain checkout too (no `pip install`): it falls back on `python -m mtnlg` with src/ on the path.
# The corpus is fortunes-zh's; set MTNLG_FORTUNES_DIR to a folder holding tang300, song100 and chinese where
# the Debian package is not installed.
set -uo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-runs/gpu_check}
REPORT=${2:-$RUNS}
mkdir -p "$RUNS" "$REPORT"
if command -v mtnlg >/dev/null && python -c "import mtnlg" 2>/dev/null; then
    MTNLG=(mtnlg)
else
    export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
    MTNLG=(python -m mtnlg)
fi
export PYTHONUNBUFFERED=1
python - "$REPORT" <<'PY' 2>&1 | tee "$REPORT/env.log"
import json, sys, time, torch
if not torch.cuda.is_available():
    sys.exit("gpu_check.sh: no CUDA device visible; this check is for GPU machines")
print(f"GPU: {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}, torch {torch.__version__}, "
      f"CUDA {torch.version.cuda}, NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}")
n = 8192
a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
for _ in range(3):
    a @ b
torch.cuda.synchronize()
best, deadline = 0.0, time.perf_counter() + 2.0
while time.perf_counter() < deadline:
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    best = max(best, 10 * 2 * n**3 / (time.perf_counter() - t) / 1e12)
print(f"bf16 matmul {n}^3: {best:.0f} TFLOP/s measured")
json.dump({"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
           "matmul_bf16_tflops": best}, open(f"{sys.argv[1]}/env.json", "w"))
PY
[ "${PIPESTATUS[0]}" -eq 0 ] || exit 1
STEPS=${STEPS:-30}
for compile in false true; do
    echo "== bf16 training, 1 GPU, torch.compile=$compile"
    timeout "${TRAIN_TIMEOUT:-300}" "${MTNLG[@]}" train --config examples/gpu-1b.yaml --output "$RUNS/train-compile-$compile" \
        --train.steps="$STEPS" --train.compile=$compile --checkpoint.resume=none --no-progress \
        2>&1 | tee "$REPORT/train-compile-$compile.log" | grep -v "^step .*/.* loss" || true
done
echo "== decode"
timeout "${DECODE_TIMEOUT:-120}" python - "$RUNS/train-compile-false" <<'PY' 2>&1 | tee "$REPORT/decode.log"
import sys, time, torch
from mtnlg import MegatronLmModel
m = MegatronLmModel.from_pretrained(sys.argv[1], device="cuda", dtype=torch.bfloat16)
m.generate("秋天的夜晚，", max_new_tokens=8)  # warm-up
torch.cuda.synchronize(); t = time.perf_counter()
out = m.generate("秋天的夜晚，", max_new_tokens=128, return_full_text=False)
torch.cuda.synchronize(); dt = time.perf_counter() - t
n = len(m.tokenizer.encode(out))
print(f"decode: {n / dt:.1f} tokens/s at batch 1 (bf16, KV cache), {n} tokens")
PY
NGPU=$(python -c "import torch; print(torch.cuda.device_count())")
if [ "$NGPU" -ge 2 ]; then
    echo "== 2-process NCCL (FSDP2 over 2 GPUs)"
    timeout 150 "${MTNLG[@]}" train --nproc 2 --config examples/gpu-1b.yaml --output "$RUNS/train-nccl2" \
        --train.steps=10 --train.global_batch_size=16 --checkpoint.resume=none --no-progress \
        2>&1 | tee "$REPORT/train-nccl2.log" | tail -5 || true
fi
if [ "${DEFAULT_JOB:-1}" = 1 ]; then
    echo "== the main job: mtnlg train, poem, chat"
    timeout "${TRAIN_TIMEOUT:-300}" "${MTNLG[@]}" train --output "$RUNS/default-job" --checkpoint.resume=none \
        --no-progress 2>&1 | tee "$REPORT/default-job.log" | grep -E "^(finished|SFT:)" || true
    timeout 60 "${MTNLG[@]}" poem --checkpoint "$RUNS/default-job" "床前明月光，疑是地上霜。" 2>&1 | tail -3 || true
    printf '写一首关于秋天的诗\n再来一首\n/exit\n' | timeout 60 "${MTNLG[@]}" chat --checkpoint "$RUNS/default-job" \
        2>&1 | tail -10 || true
fi
python - "$RUNS" "$REPORT" <<'PY'
import json, statistics, sys
from pathlib import Path
DATASHEET = 989.0  # dense bf16 TFLOP/s of an H100/H200 SXM (NVIDIA data sheet)
env = json.loads((Path(sys.argv[2]) / "env.json").read_text())
rows = {}
print("\n| run | tokens/s | TFLOP/s | MFU (measured peak) | MFU (data sheet 989) | step s | first step s |\n"
      "| --- | --- | --- | --- | --- | --- | --- |")
for run in sorted(Path(sys.argv[1]).glob("train-*")):  # the throughput runs (not the default job)
    path = run / "metrics.jsonl"
    if not path.is_file():
        print(f"| {run.name} | failed: no metrics.jsonl | | | | | |")
        continue
    recs = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
    recs = [r for r in recs if r.get("split", "train") == "train"]
    first, recs = recs[:1], recs[5:]  # skip warm-up / compile steps
    if not recs:
        print(f"| {run.name} | failed: {len(first)} step(s) | | | | | |")
        continue
    med = lambda k: statistics.median(r.get(k) or 0.0 for r in recs)
    row = {"tokens_per_s": med("tokens_per_s"), "tflops": med("tflops"),
           "mfu_measured_peak": med("tflops") / env["matmul_bf16_tflops"], "mfu_datasheet": med("tflops") / DATASHEET,
           "step_time_s": med("step_time_s"), "first_step_s": first[0]["step_time_s"], "mem_mb": med("mem_mb")}
    rows[run.name] = row
    print(f"| {run.name} | {row['tokens_per_s']:,.0f} | {row['tflops']:.1f} | {100 * row['mfu_measured_peak']:.1f}% | "
          f"{100 * row['mfu_datasheet']:.1f}% | {row['step_time_s']:.3f} | {row['first_step_s']:.1f} |")
(Path(sys.argv[2]) / "gpu_check.json").write_text(json.dumps({**env, "runs": rows}, indent=1))
PY
