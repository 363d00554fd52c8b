"""The spec's full 6B config with ``quantize=True``: streaming materialization, peak RSS, decode speed.

1. Measures the int8 matmul paths on one 4096 x 15360 layer at batch 1 (the choice in
   ``mtnlg.model.quantize``): mtnlg's own kernel (:mod:`mtnlg.model.int8_gemv`, fp32 activations),
   ``_weight_int8pack_mm`` with bf16 and fp32 activations, and an fp32 gemv over dequantized weights.
2. Builds ``MegatronModelConfig()`` (the spec's defaults: 30 layers, hidden 4096, FFN 15360,
   vocab 30522) with ``quantize=True`` and materializes it layer by layer (never the fp32 model).
3. Prefills an 8-token prompt and decodes 8 greedy tokens, ``--rounds`` times with each int8 path
   (mtnlg's kernel, the default where it builds, and PyTorch's ``_weight_int8pack_mm``), alternating;
   reports the median tokens/s after the prefill per path (the top-level figures: the default path).
4. Model bandwidth utilisation (key ``mbu``, goal >= 0.85): the weight bytes one decode step reads
   (``benchmarks/decode.py``'s ``bytes_per_token``: every layer's int8 weights and scales, the int8
   LM head, one embedding row) times tokens/s, over the read bandwidth of an fp32 buffer of the same
   size (``torch.sum``, best of 5, before and after the decodes: the faster) measured in the same run,
   in a child process so that the buffer does not count in this process's peak RSS.

    python benchmarks/quantized_6b.py [--json] [--skip-paths] [--rounds N]

Heavy (about 6.5 GB of int8 weights, minutes of init): a script, not a CI test.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch


GOAL = {"mbu": 0.85, "peak_rss_gib": 10}


def rss_gib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def current_rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**30


def measure_paths(repeats: int = 5) -> dict[str, float]:
    from mtnlg.model.quantize import quantize_weight

    out_f, in_f = 15360, 4096
    w = torch.randn(out_f, in_f) * 0.02
    q, s = quantize_weight(w)
    deq = q.float() * s[:, None]
    del w
    x = torch.randn(1, in_f)
    xb, sb = x.bfloat16(), s.bfloat16()
    from mtnlg.model import int8_gemv

    paths = {
        "int8pack_bf16": lambda: torch.ops.aten._weight_int8pack_mm(xb, q, sb),
        "int8pack_fp32": lambda: torch.ops.aten._weight_int8pack_mm(x, q, s),
        "dequant_fp32_gemv": lambda: torch.nn.functional.linear(x, deq),
    }
    if int8_gemv.available():
        paths["mtnlg_int8_gemv"] = lambda: int8_gemv.int8_gemv(x, q, s, None)
    res = {}
    for name, fn in paths.items():
        fn()
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        res[name + "_ms"] = best * 1e3
    return res


def decode_rate(model, prompt: list[int], new_tokens: int) -> float:
    """Tokens/s of ``new_tokens`` greedy tokens after the prefill (a prefill + 1 token timed apart)."""
    from mtnlg.infer.generate import SamplingParams, generate

    t0 = time.perf_counter()
    generate(model, [prompt], SamplingParams(max_new_tokens=1))
    prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    c = generate(model, [prompt], SamplingParams(max_new_tokens=new_tokens + 1))[0]
    return (len(c.token_ids) - 1) / max(time.perf_counter() - t0 - prefill, 1e-9)


def read_bandwidth_elsewhere(nbytes: int) -> float:
    """Bytes/s at which a child process reads an fp32 buffer of ``nbytes`` (decode.py's measure)."""
    here = os.path.dirname(os.path.abspath(__file__))
    code = (f"import sys; sys.path.insert(0, {here!r}); from decode import read_bandwidth; "
            f"print(read_bandwidth({nbytes}, repeats=5))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return float(out.split()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3, help="decodes per int8 path, alternating")
    ap.add_argument("--skip-paths", action="store_true", help="skip the per-layer matmul path measurement")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from mtnlg.api import MegatronLmModel, MegatronModelConfig
    from mtnlg.infer.generate import SamplingParams, generate
    from mtnlg.model import int8_gemv
    from mtnlg.model.quantize import quantized_bytes

    result: dict[str, object] = {"threads": torch.get_num_threads()}
    if not args.skip_paths:
        result["paths_4096x15360_b1"] = measure_paths()
    base_rss = current_rss_gib()
    t0 = time.perf_counter()
    lm = MegatronLmModel(MegatronModelConfig(quantize=True))
    lm.materialize()
    lm.model.eval()
    result["materialize_s"] = time.perf_counter() - t0
    result["parameters"] = sum(p.numel() for p in lm.model.parameters()) + sum(
        b.numel() for b in lm.model.buffers() if b.dtype == torch.int8)
    result["model_gib"] = quantized_bytes(lm.model) / 2**30
    result["rss_after_materialize_gib"] = current_rss_gib()
    prompt = list(range(100, 108))
    t0 = time.perf_counter()
    generate(lm.model, [prompt], SamplingParams(max_new_tokens=1))
    result["prefill_plus_first_token_s"] = time.perf_counter() - t0
    # decode with mtnlg's int8 kernel (the default where it builds) and with PyTorch's, alternately
    paths = ["mtnlg_int8_gemv", "int8pack_bf16"] if int8_gemv.available() else ["int8pack_bf16"]
    from decode import bytes_per_token

    wb = bytes_per_token(lm.model)
    bw_before = read_bandwidth_elsewhere(wb)  # and again after the decodes: the faster of the two is the bound
    rates: dict[str, list[float]] = {p: [] for p in paths}
    for _ in range(args.rounds):
        for path in paths:
            old = int8_gemv.set_enabled(path == "mtnlg_int8_gemv")
            try:
                rates[path].append(decode_rate(lm.model, prompt, args.new_tokens))
            finally:
                int8_gemv.set_enabled(old)
    result.update({
        "decode_tokens": args.new_tokens,
        "decode_path": paths[0],
        "decode_tokens_per_s": statistics.median(rates[paths[0]]),
        "decode_tokens_per_s_by_path": {p: statistics.median(r) for p, r in rates.items()},
        "peak_rss_gib": rss_gib(),
        "start_rss_gib": base_rss,
    })
    bw = max(bw_before, read_bandwidth_elsewhere(wb))
    result.update(weight_bytes_per_token=wb, read_gb_s=bw / 1e9, mbu=wb * result["decode_tokens_per_s"] / bw,
                  mbu_by_path={p: wb * r / bw for p, r in result["decode_tokens_per_s_by_path"].items()}, goal=GOAL)
    if args.json:
        print(json.dumps(result))
        return
    if "paths_4096x15360_b1" in result:
        print("int8 matmul paths, one 4096x15360 layer, batch 1:")
        for k, v in result["paths_4096x15360_b1"].items():
            print(f"  {k:<22} {v:8.2f} ms")
    print(f"6B (spec config) quantize=True: {result['parameters'] / 1e9:.2f}B params, "
          f"{result['model_gib']:.2f} GiB in memory, materialized in {result['materialize_s']:.1f}s")
    print(f"peak RSS {result['peak_rss_gib']:.2f} GiB; prefill (8 tokens) + first token "
          f"{result['prefill_plus_first_token_s']:.2f}s; decode {result['decode_tokens_per_s']:.2f} tokens/s "
          f"({result['decode_tokens']} tokens, {result['threads']} threads)")
    print(f"mbu {result['mbu']:.2f} (goal >= {GOAL['mbu']}): {wb / 1e9:.2f} GB of weights a token x "
          f"{result['decode_tokens_per_s']:.2f} tokens/s over a {result['read_gb_s']:.1f} GB/s buffer read")
    for path, rate in result["decode_tokens_per_s_by_path"].items():
        print(f"  {path:<18} {rate:6.2f} tokens/s  mbu {result['mbu_by_path'][path]:.2f}")


if __name__ == "__main__":
    main()
