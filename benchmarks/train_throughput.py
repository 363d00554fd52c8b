"""Training throughput: mtnlg vs Hugging Face ``GPT2LMHeadModel`` on the same model, batch and data.

Both train the same architecture (6 layers, hidden 384, 6 heads, ffn 1536, vocab 8192, seq 256,
batch 8, fp32 on CPU by default) with AdamW and gradient clipping on the same random token batches.
mtnlg runs the step the default ``mtnlg train`` runs (``mtnlg.train.step`` on a model prepared by
``mtnlg.parallel.parallelize``: compiled blocks when ``train.compile``, chunked LM head + loss,
fused AdamW, from ``mtnlg.train.optim``); Hugging Face runs ``model(input_ids, labels=input_ids)``.
Steps alternate between the two (one mtnlg step, one HF step, ...) so that load from other
processes hits both alike, and the fp32 matmul peak is measured in between. Reported: tokens/s of
each, their ratio, mtnlg's achieved FLOP/s (model FLOPs, Megatron's eq. 3 adapted to the ffn size,
see ``mtnlg.train.metrics``) as a fraction of the measured matmul peak, and the compile time
(first step minus a median step) apart from the step time.

``--nproc N`` measures scaling instead: tokens/s of data parallelism (DDP and FSDP2) and TP over N
gloo ranks with one thread each, against one process with N threads, the same global batch.

    python benchmarks/train_throughput.py            # a table
    python benchmarks/train_throughput.py --json     # one JSON object (keys include ratio, peak_fraction)
    python benchmarks/train_throughput.py --nproc 2  # DP / TP scaling vs one process, same threads
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time

import torch

GOAL = {"ratio": 1.1, "peak_fraction": 0.8}


def mtnlg_config(args, parallel: dict | None = None):
    from mtnlg.config import Config

    cfg = Config()
    m, t = cfg.model, cfg.train
    m.vocab_size, m.hidden_size, m.num_layers, m.num_heads = args.vocab, args.hidden, args.layers, args.heads
    m.ffn_hidden_size, m.max_seq_len = 4 * args.hidden, args.seq
    t.seq_len, t.global_batch_size, t.micro_batch_size, t.device, t.precision = args.seq, args.batch, args.batch, \
        "cpu", "fp32"
    t.optimizer = "adamw"  # like for like with Hugging Face's AdamW (the default job's Muon is another optimizer)
    if args.compile is not None:
        t.compile = args.compile
    for k, v in (parallel or {}).items():
        setattr(cfg.parallel, k, v)
    return cfg.validate()


def build_mtnlg(args, parallel: dict | None = None):
    from mtnlg.train.optim import build_optimizer
    from mtnlg.train.step import build_train_step

    cfg = mtnlg_config(args, parallel)
    engine = build_train_step(cfg, torch.device("cpu"))
    opt = build_optimizer(engine.model_parts, cfg.train)

    def step(x: torch.Tensor) -> float:
        per = x.shape[0] // engine.dp_size
        x = x[engine.dp_rank * per:(engine.dp_rank + 1) * per]
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


def compare(args) -> dict:
    """mtnlg vs Hugging Face in one process, steps alternating."""
    from mtnlg.train.metrics import flops_per_token, measure_matmul_tflops

    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g) for _ in range(8)]
    t0 = time.perf_counter()
    cfg, mt_step = build_mtnlg(args)
    build_s = time.perf_counter() - t0
    _, hf_step = build_hf(args)
    first: dict[str, float] = {}
    for i in range(args.warmup):
        for name, fn in (("mtnlg", mt_step), ("hf", hf_step)):
            t0 = time.perf_counter()
            fn(batches[i % 8])
            first.setdefault(name, time.perf_counter() - t0)
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
    median = {k: statistics.median(v) for k, v in times.items()}
    return {
        "config": {k: getattr(args, k) for k in ("layers", "hidden", "heads", "vocab", "seq", "batch", "steps")},
        "threads": torch.get_num_threads(),
        "mtnlg_path": {"compile": cfg.train.compile, "chunked_loss": cfg.train.chunked_loss,
                       "fused_adamw": cfg.train.fused_adamw,
                       "activation_checkpointing": cfg.train.activation_checkpointing},
        "tokens_per_s": {k: round(v, 1) for k, v in tps.items()},
        "median_step_s": {k: round(v, 4) for k, v in median.items()},
        "build_s": round(build_s, 2),
        "first_step_s": {k: round(v, 3) for k, v in first.items()},
        "compile_s": round(max(0.0, first["mtnlg"] - median["mtnlg"]), 2) if cfg.train.compile else 0.0,
        "ratio": tps["mtnlg"] / tps["hf"],
        "achieved_tflops": achieved,
        "hf_achieved_tflops": tps["hf"] * fpt / 1e12,
        "peak_tflops": peak,
        "peak_fraction": achieved / peak,
        "hf_peak_fraction": tps["hf"] * fpt / 1e12 / peak,
        "flops_per_token": fpt,
        "load_avg": os.getloadavg(),
        "goal": GOAL,
    }


# -- scaling over processes ------------------------------------------------------------------------

LAYOUTS = [("DDP", {"dp_replicate": -1, "dp_shard": 1}), ("FSDP2", {"dp_shard": -1}), ("TP", {"tp": -1})]


def _measure(args, parallel: dict) -> dict:
    cfg, step = build_mtnlg(args, parallel)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g) for _ in range(4)]
    t0 = time.perf_counter()
    for i in range(args.warmup):
        step(batches[i % 4])
    warm = time.perf_counter() - t0
    times = []
    for i in range(args.steps):
        t0 = time.perf_counter()
        step(batches[i % 4])
        times.append(time.perf_counter() - t0)
    return {"tokens_per_s": args.batch * args.seq * len(times) / sum(times),
            "median_step_s": statistics.median(times), "warmup_s": warm}


def _rank(rank: int, world: int, port: int, args, parallel: dict, queue) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    from mtnlg.device import flush_denormals, reuse_freed_memory

    flush_denormals()  # as the 1-process row and each `mtnlg train --nproc` rank
    reuse_freed_memory()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out = _measure(args, parallel)
        if rank == 0:
            queue.put(out)
    finally:
        dist.destroy_process_group()


def scaling(args) -> dict:
    """Tokens/s of DDP, FSDP2 and TP over ``nproc`` ranks (1 thread each) vs 1 process (nproc threads)."""
    import torch.multiprocessing as mp

    n = args.nproc
    torch.set_num_threads(n)
    rows = [{"layout": f"1 process, {n} threads", "ranks": 1, **_measure(args, {})}]
    for name, parallel in LAYOUTS:
        parallel = {k: (n if v == -1 else v) for k, v in parallel.items()}
        if parallel.get("tp") and args.heads % n:
            continue
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        procs = [ctx.Process(target=_rank, args=(r, n, port, args, parallel, queue)) for r in range(n)]
        for p in procs:
            p.start()
        out = queue.get(timeout=1800)
        for p in procs:
            p.join()
        rows.append({"layout": f"{name} {n}", "ranks": n, **out})
    base = rows[0]["tokens_per_s"]
    for r in rows:
        r["vs_1_process"] = r["tokens_per_s"] / base
    return {"benchmark": "train_scaling", "nproc": n, "threads_total": n, "cpu_count": os.cpu_count(),
            "config": {k: getattr(args, k) for k in ("layers", "hidden", "heads", "vocab", "seq", "batch", "steps")},
            "compile": mtnlg_config(args).train.compile, "rows": rows, "load_avg": os.getloadavg()}


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
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile mtnlg's blocks (default: train.compile's default, as `mtnlg train`)")
    p.add_argument("--nproc", type=int, default=None, help="measure DP / TP scaling over N processes instead")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    from mtnlg.device import flush_denormals, reuse_freed_memory

    flush_denormals()  # as `mtnlg train` runs (both frameworks' steps run in this process with them)
    reuse_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.nproc:
        result = scaling(args)
        if args.json:
            print(json.dumps(result))
            return 0
        print(f"training scaling, fp32 CPU, {args.layers} layers, hidden {args.hidden}, seq {args.seq}, global batch "
              f"{args.batch}, compile={result['compile']}; {args.nproc} ranks x 1 thread vs 1 process x "
              f"{args.nproc} threads ({result['cpu_count']} CPUs, load average {result['load_avg'][0]:.1f})")
        print(f"{'layout':<22}{'tokens/s':>10}{'step s':>9}{'x 1 proc':>10}")
        for r in result["rows"]:
            print(f"{r['layout']:<22}{r['tokens_per_s']:>10.1f}{r['median_step_s']:>9.3f}{r['vs_1_process']:>10.2f}")
        return 0
    result = compare(args)
    if args.json:
        print(json.dumps(result))
        return 0
    peak, fpt, tps = result["peak_tflops"], result["flops_per_token"], result["tokens_per_s"]
    print(f"train throughput, fp32 CPU ({result['threads']} threads), {args.layers} layers, hidden {args.hidden}, "
          f"seq {args.seq}, batch {args.batch}, vocab {args.vocab}, {args.steps} steps each; mtnlg path "
          f"{result['mtnlg_path']}; load average {result['load_avg'][0]:.1f}")
    print(f"{'':8} {'tokens/s':>10} {'GFLOP/s':>10} {'of peak':>8} {'step s':>8}")
    for k in ("mtnlg", "hf"):
        gf = tps[k] * fpt / 1e9
        print(f"{k:8} {tps[k]:10.1f} {gf:10.1f} {gf / (peak * 1e3):8.1%} {result['median_step_s'][k]:8.3f}")
    print(f"ratio mtnlg / hf: {result['ratio']:.2f}x (goal >= {GOAL['ratio']}x); fp32 matmul peak {peak * 1e3:.1f} "
          f"GFLOP/s; mtnlg at {result['peak_fraction']:.1%} of peak (goal >= {GOAL['peak_fraction']:.0%}); "
          f"compile {result['compile_s']:.1f}s (first step {result['first_step_s']['mtnlg']:.1f}s, not in the step times)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
