"""Rank-side functions for the parity tests (imported by spawned processes)."""

from __future__ import annotations

import time

import torch

from tests.parallel.harness import micro_batches, run_steps, tiny_config


def run_layouts(layouts: list[dict], uneven: bool = True) -> dict[str, object]:
    """Run each layout (parallel overrides, plus optional "_micro", "_vocab") for 10 steps."""
    out = {}
    for spec in layouts:
        spec = dict(spec)
        name = spec.pop("_name")
        micro = spec.pop("_micro", 2)
        vocab = spec.pop("_vocab", None)
        cfg = tiny_config(**spec)
        if vocab is not None:
            cfg.model.vocab_size = vocab
        t0 = time.perf_counter()
        losses, eng = run_steps(cfg, uneven=uneven, micro=micro, with_engine=True)
        total, tokens = eng.eval_loss(micro_batches(99, eng.dp_rank, eng.dp_size, vocab=cfg.model.vocab_size))
        out[name] = {"losses": losses, "eval": total / tokens, "time": time.perf_counter() - t0,
                     "comm": eng.comm_bytes()}
    return out


def two_rank_suite(layouts: list[dict]) -> dict[str, object]:
    """Everything the 2-rank tests need, in one spawn (process start-up dominates on 2 cores)."""
    return {"layouts": run_layouts(layouts), "comm": comm_volumes(), "local_sgd": local_sgd()}


def comm_volumes() -> dict[str, object]:
    """Bytes per mesh dim for one step of known shapes (compared with Megatron's formulas), and the
    DP bytes of a 4-microbatch step vs a 1-microbatch step (accumulation syncs once)."""
    from mtnlg.train.step import build_train_step as build_engine

    out: dict[str, object] = {}
    for sp in (False, True):
        for layers in (2, 4):
            cfg = tiny_config(tp=2, dp_shard=1, sequence_parallel=sp)
            cfg.model.num_layers = layers
            eng = build_engine(cfg, torch.device("cpu"))
            eng.train_step(micro_batches(0, eng.dp_rank, eng.dp_size))
            out[f"tp_sp{int(sp)}_L{layers}"] = eng.comm_bytes().get("tp", 0)
    cfg = tiny_config(dp_replicate=2, dp_shard=1)
    eng = build_engine(cfg, torch.device("cpu"))
    eng.comm_bytes()
    eng.train_step(micro_batches(0, eng.dp_rank, eng.dp_size, micro=1))  # 4 microbatches
    out["dp_4mb"] = eng.comm_bytes()
    eng.train_step(micro_batches(0, eng.dp_rank, eng.dp_size, micro=4))  # 1 microbatch
    out["dp_1mb"] = eng.comm_bytes()
    out["dp_params"] = sum(p.numel() for part in eng.model_parts for p in part.parameters())
    return out


def local_sgd() -> list[dict[str, object]]:
    """sync_every=2 on 2 replicas: per step, a parameter checksum and the bytes per dim."""
    import torch.distributed as dist

    from mtnlg.train.step import build_train_step as build_engine

    cfg = tiny_config(dp_replicate=2, dp_shard=1, sync_every=2, outer_lr=0.7, outer_momentum=0.9)
    eng = build_engine(cfg, torch.device("cpu"))
    opt = torch.optim.AdamW([p for part in eng.model_parts for p in part.parameters()], lr=1e-2)
    eng.comm_bytes()
    out = []
    for step in range(1, 5):
        res = eng.train_step(micro_batches(step, eng.dp_rank, eng.dp_size))
        opt.step()
        opt.zero_grad()
        eng.after_optimizer_step(step)
        w = eng.model_parts[0].layers["0"].mlp.fc1.weight
        s = torch.tensor([float(w.detach().double().sum())], dtype=torch.float64)
        sums = [torch.zeros_like(s) for _ in range(2)]
        dist.all_gather(sums, s)
        out.append({"loss": res.loss, "sums": [float(t) for t in sums], "comm": eng.comm_bytes()})
    return out
