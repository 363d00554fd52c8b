#!/usr/bin/env bash
# The CUDA/NCCL path on a machine with a GPU, in under 8 minutes:
#   1. bf16 training of a ~1.1B-parameter model (examples/gpu-1b.yaml) on one GPU, torch.compile off and on
#      (the chunked LM head + loss and fused AdamW are on by default), reporting MFU against the device's
#      bf16 dense peak, the median step time and the first (compiling) step from mtnlg's metrics.jsonl;
#   2. greedy decode tokens/s of the trained model;
#   3. a 2-process NCCL run when 2 or more GPUs exist.
# Goal on an H100/H200-class GPU: MFU >= 45%.  Usage: bash benchmarks/gpu_check.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-runs/gpu_check}}
mkdir -p "$OUT"
python - <<'PY'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("gpu_check.sh: no CUDA device visible; this check is for GPU machines")
print(f"GPU: {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}, torch {torch.__version__}, "
      f"CUDA {torch.version.cuda}, NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}")
PY
STEPS=${STEPS:-30}
for compile in false true; do
    echo "== bf16 training, 1 GPU, torch.compile=$compile"
    timeout 240 mtnlg train --config examples/gpu-1b.yaml --output "$OUT/train-compile-$compile" \
        --train.steps="$STEPS" --train.compile=$compile --checkpoint.resume=none --no-progress
done
echo "== decode"
timeout 90 python - "$OUT/train-compile-false" <<'PY'
import sys, time, torch
from mtnlg import MegatronLmModel
m = MegatronLmModel.from_pretrained(sys.argv[1], device="cuda", dtype=torch.bfloat16)
m.generate("秋天的夜晚，", max_new_tokens=8)  # warm-up
torch.cuda.synchronize(); t = time.perf_counter()
out = m.generate("秋天的夜晚，", max_new_tokens=128, return_full_text=False)
torch.cuda.synchronize(); dt = time.perf_counter() - t
n = len(m.tokenizer.encode(out))
print(f"decode: {n / dt:.1f} tokens/s at batch 1 (bf16, KV cache)")
PY
NGPU=$(python -c "import torch; print(torch.cuda.device_count())")
if [ "$NGPU" -ge 2 ]; then
    echo "== 2-process NCCL (FSDP2 over 2 GPUs)"
    timeout 150 mtnlg train --nproc 2 --config examples/gpu-1b.yaml --output "$OUT/train-nccl2" \
        --train.steps=10 --train.global_batch_size=16 --checkpoint.resume=none --no-progress
fi
python - "$OUT" <<'PY'
import json, statistics, sys
from pathlib import Path
print("\n| run | tokens/s | TFLOP/s | MFU | step s | first step s (compile) |\n| --- | --- | --- | --- | --- | --- |")
for run in sorted(Path(sys.argv[1]).glob("train-*")):
    recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
    recs = [r for r in recs if r.get("split", "train") == "train"]
    first, recs = recs[:1], recs[5:]  # skip warm-up / compile steps
    if not recs:
        continue
    med = lambda k: statistics.median(r.get(k) or 0.0 for r in recs)
    print(f"| {run.name} | {med('tokens_per_s'):,.0f} | {med('tflops'):.1f} | {100 * med('mfu'):.1f}% | "
          f"{med('step_time_s'):.3f} | {first[0]['step_time_s']:.1f} |")
PY
