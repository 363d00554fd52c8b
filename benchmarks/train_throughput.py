"""Training throughput: mtnlg vs Hugging Face ``GPT2LMHeadModel`` on the same model, batch and data.

Both train the same architecture (6 layers, hidden 384, 6 heads, ffn 1536, vocab 8192, seq 256,
batch 8, fp32 on CPU by default) with AdamW and gradient clipping on the same random token batches.
mtnlg runs its real training step (``mtnlg.parallel.engine`` + ``mtnlg.train.optim``); Hugging
Face runs ``model(input_ids, labels=input_ids)``. Steps alternate between the two (one mtnlg step,
one HF step, ...) so that load from other processes hits both alike, and the fp32 matmul peak is
measured in between. Reported: tokens/s of each, their ratio, and mtnlg's achieved FLOP/s (model
FLOPs, Megatron's eq. 3 adapted to the ffn size, see ``mtnlg.train.metrics``) as a fraction of
the measured matmul peak.

    python benchmarks/train_throughput.py            # a table
    python benchmarks/train_throughput.py --json     # one JSON object (keys include ratio, peak_fraction)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch


def build_mtnlg(args):
    from mtnlg.config import Config
    from mtnlg.parallel.engine import build_engine
    from mtnlg.train.optim import apply_compile, build_optimizer

    cfg = Config()
    m, t = cfg.model, cfg.train
    m.vocab_size, m.hidden_size, m.num_layers, m.num_heads = args.vocab, args.hidden, args.layers, args.heads
    m.ffn_hidden_size, m.max_seq_len = 4 * args.hidden, args.seq
    t.seq_len, t.global_batch_size, t.micro_batch_size, t.device, t.precision = args.seq, args.batch, args.batch, \
        "cpu", "fp32"
    cfg.validate()
    engine = build_engine(cfg, torch.device("cpu"))
    if args.compile:
        apply_compile(engine.model_parts)
    opt = build_optimizer(engine.model_parts, t)

    def step(x: torch.Tensor) -> float:
        out = engine.train_step([(x[:, :-1], x[:, 1:])])
        engine.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss

    return cfg, step


def build_hf(args):
    from transformers import GPT2Config, GPT2LMHeadModel

    hf_cfg = GPT2Config(vocab_size=args.vocab, n_positions=args.seq, n_embd=args.hidden, n_layer=args.layers,
                        n_head=args.heads, n_inner=4 * args.hidden, activation_function="gelu",
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(hf_cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)

    def step(x: torch.Tensor) -> float:
        ids = x[:, :-1]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return model, step


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=100, help="timed steps per framework (100 = 205k tokens each)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--compile", action="store_true", help="torch.compile mtnlg's blocks (train.compile)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from mtnlg.train.metrics import flops_per_token, measure_matmul_tflops

    cfg, mt_step = build_mtnlg(args)
    _, hf_step = build_hf(args)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g) for _ in range(8)]
    for i in range(args.warmup):
        mt_step(batches[i % 8])
        hf_step(batches[i % 8])
    times: dict[str, list[float]] = {"mtnlg": [], "hf": []}
    peaks: list[float] = []
    for i in range(args.steps):
        x = batches[i % 8]
        for name, fn in (("mtnlg", mt_step), ("hf", hf_step)) if i % 2 == 0 else (("hf", hf_step), ("mtnlg", mt_step)):
            t0 = time.perf_counter()
            fn(x)
            times[name].append(time.perf_counter() - t0)
        if i % 10 == 0:
            peaks.append(measure_matmul_tflops(torch.device("cpu"), torch.float32, seconds=0.3))
    tokens = args.batch * args.seq
    tps = {k: tokens * len(v) / sum(v) for k, v in times.items()}
    peak = max(peaks)  # the best the machine did while we measured
    fpt = flops_per_token(cfg.model, args.seq)
    achieved = tps["mtnlg"] * fpt / 1e12
    result = {
        "config": {k: getattr(args, k) for k in ("layers", "hidden", "heads", "vocab", "seq", "batch", "steps")},
        "threads": torch.get_num_threads(),
        "tokens_per_s": {k: round(v, 1) for k, v in tps.items()},
        "median_step_s": {k: round(statistics.median(v), 4) for k, v in times.items()},
        "ratio": tps["mtnlg"] / tps["hf"],
        "achieved_tflops": achieved,
        "hf_achieved_tflops": tps["hf"] * fpt / 1e12,
        "peak_tflops": peak,
        "peak_fraction": achieved / peak,
        "hf_peak_fraction": tps["hf"] * fpt / 1e12 / peak,
        "flops_per_token": fpt,
        "goal": {"ratio": 1.3, "peak_fraction": 0.75},
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"train throughput, fp32 CPU ({result['threads']} threads), {args.layers} layers, hidden {args.hidden}, "
          f"seq {args.seq}, batch {args.batch}, vocab {args.vocab}, {args.steps} steps each")
    print(f"{'':8} {'tokens/s':>10} {'GFLOP/s':>10} {'of peak':>8}")
    for k in ("mtnlg", "hf"):
        gf = tps[k] * fpt / 1e9
        print(f"{k:8} {tps[k]:10.1f} {gf:10.1f} {gf / (peak * 1e3):8.1%}")
    print(f"ratio mtnlg / hf: {result['ratio']:.2f}x (goal >= 1.3x); fp32 matmul peak {peak * 1e3:.1f} GFLOP/s; "
          f"mtnlg at {result['peak_fraction']:.1%} of peak (goal >= 75%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
