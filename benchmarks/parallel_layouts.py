"""Step time and communication of parallel layouts vs one process (CPU, gloo, a small GPT).

    python benchmarks/parallel_layouts.py            # table
    python benchmarks/parallel_layouts.py --json     # one JSON object

Each layout trains a few steps after a warm-up; the table gives its step time as a ratio to the
1-process step time measured in the same run, and the bytes per step each mesh dimension moved.
On a shared 2-core CPU, ranks compete for cores, so ratios > 1 are expected: the point is the
relative cost of layouts and their communication volume, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

LAYOUTS = [
    ("1 process", 1, {}),
    ("DDP 2", 2, {"dp_replicate": 2, "dp_shard": 1}),
    ("FSDP 2", 2, {"dp_shard": 2}),
    ("TP 2 + SP", 2, {"tp": 2}),
    ("PP 2 1F1B", 2, {"pp": 2}),
    ("PP 2 interleaved vpp 2", 2, {"pp": 2, "vpp": 2, "pp_schedule": "interleaved"}),
]


def config(parallel: dict):
    from mtnlg.config import Config

    cfg = Config()
    m = cfg.model
    m.vocab_size, m.hidden_size, m.num_layers, m.num_heads, m.ffn_hidden_size, m.max_seq_len = 512, 128, 4, 4, 512, 128
    cfg.train.seq_len, cfg.train.device = 128, "cpu"
    for k, v in parallel.items():
        setattr(cfg.parallel, k, v)
    return cfg.validate()


def measure(parallel: dict, steps: int, warmup: int) -> dict:
    from mtnlg.train.step import build_train_step as build_engine

    cfg = config(parallel)
    eng = build_engine(cfg, torch.device("cpu"))
    opt = torch.optim.AdamW([p for part in eng.model_parts for p in part.parameters()], lr=1e-3)
    g = torch.Generator().manual_seed(0)
    per = 8 // eng.dp_size
    times = []
    for step in range(warmup + steps):
        x = torch.randint(0, 512, (per, 128), generator=g)
        mbs = [(x[i:i + 2], x[i:i + 2]) for i in range(0, per, 2)]
        t0 = time.perf_counter()
        eng.train_step(mbs)
        eng.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad()
        if step >= warmup:
            times.append(time.perf_counter() - t0)
        if step == warmup - 1:
            eng.comm_bytes()
    return {"step_s": sum(times) / len(times), "comm": {k: v // steps for k, v in eng.comm_bytes().items()}}


def _entry(rank, world, port, parallel, steps, warmup, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out = measure(parallel, steps, warmup)
        if rank == 0:
            queue.put(out)
    finally:
        dist.destroy_process_group()


def run(world: int, parallel: dict, steps: int, warmup: int) -> dict:
    if world == 1:
        torch.set_num_threads(1)
        return measure(parallel, steps, warmup)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_entry, args=(r, world, port, parallel, steps, warmup, queue)) for r in range(world)]
    for p in procs:
        p.start()
    out = queue.get(timeout=600)
    for p in procs:
        p.join()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rows = []
    for name, world, parallel in LAYOUTS:
        r = run(world, parallel, args.steps, args.warmup)
        rows.append({"layout": name, "ranks": world, **r})
    base = rows[0]["step_s"]
    for r in rows:
        r["step_time_vs_1proc"] = r["step_s"] / base
    if args.json:
        print(json.dumps({"benchmark": "parallel_layouts", "rows": rows}))
        return
    print(f"{'layout':<26}{'ranks':>6}{'step s':>9}{'x 1 proc':>10}  bytes/step per mesh dim")
    for r in rows:
        comm = ", ".join(f"{k}={v / 1e6:.2f}MB" for k, v in sorted(r["comm"].items())) or "-"
        print(f"{r['layout']:<26}{r['ranks']:>6}{r['step_s']:>9.3f}{r['step_time_vs_1proc']:>10.2f}  {comm}")


if __name__ == "__main__":
    main()
