"""Rank-side functions for the parity tests (imported by spawned processes)."""

from __future__ import annotations

import time

import torch

from tests.parallel.harness import STEPS, micro_batches, run_steps, tiny_config


def run_layouts(layouts: list[dict], uneven: bool = True) -> dict[str, object]:
    """Run each layout (parallel overrides, plus optional "_micro", "_vocab", "_dropout", "_steps",
    "_muon") for 10 steps (or "_steps"), then the eval loss of a held-out batch."""
    out = {}
    for spec in layouts:
        spec = dict(spec)
        name = spec.pop("_name")
        micro = spec.pop("_micro", 2)
        vocab = spec.pop("_vocab", None)
        dropout = spec.pop("_dropout", 0.0)
        steps = spec.pop("_steps", STEPS)
        muon = spec.pop("_muon", False)
        cfg = tiny_config(**spec)
        if muon:
            cfg.train.optimizer = "muon"
        if vocab is not None:
            cfg.model.vocab_size = vocab
        cfg.model.dropout = dropout
        t0 = time.perf_counter()
        losses, eng = run_steps(cfg, steps=steps, uneven=uneven, micro=micro, with_engine=True)
        total, tokens = eng.eval_loss(micro_batches(99, eng.dp_rank, eng.dp_size, vocab=cfg.model.vocab_size))
        out[name] = {"losses": losses, "eval": total / tokens, "time": time.perf_counter() - t0,
                     "comm": eng.comm_bytes()}
    return out


def two_rank_suite(layouts: list[dict]) -> dict[str, object]:
    """Everything the 2-rank tests need, in one spawn (process start-up dominates on 2 cores)."""
    return {"layouts": run_layouts(layouts), "comm": comm_volumes(), "local_sgd": local_sgd()}


def four_rank_suite(layouts: list[dict], root: str) -> dict[str, object]:
    """Everything the 4-rank parity tests need, in one spawn: the layouts, and local SGD under PP2 x DP2."""
    return {"layouts": run_layouts(layouts), "local_sgd_pp": local_sgd_pipeline(root)}


def train_local_sgd(cfg, steps: range, ckpt_dir, save_at: int | None, resume: bool) -> list[float]:
    """AdamW steps ``steps`` (0-based, clipped to norm 1) of a ``sync_every > 1`` run; saves a checkpoint
    (outer state included) after step ``save_at``, or first resumes from the newest one in ``ckpt_dir``."""
    from mtnlg.checkpoint import load_checkpoint, save_checkpoint
    from mtnlg.train.step import build_train_step as build_engine

    torch.manual_seed(0)
    eng = build_engine(cfg, torch.device("cpu"))
    params = [p for part in eng.model_parts for p in part.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    if resume:
        path = sorted(ckpt_dir.glob("step_*"))[-1]
        state = load_checkpoint(path, eng.model_parts, [opt], outer=eng.outer)
        assert "outer" in state and state["outer"]["replicas"] == cfg.parallel.dp_replicate
    losses = []
    for step in steps:
        out = eng.train_step(micro_batches(step, eng.dp_rank, eng.dp_size))
        eng.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        eng.after_optimizer_step(step + 1)
        losses.append(out.loss)
        if step + 1 == save_at:
            save_checkpoint(ckpt_dir, step + 1, eng.model_parts, [opt], {"step": step + 1}, keep=1, outer=eng.outer)
    return losses


LOCAL_SGD_PP = {"every": 2, "steps": 5, "save_at": 3}  # resumed: step 4 applies the (async: in-flight) outer
# step of round 1 with the restored anchors and momentum, step 5's loss shows it


def local_sgd_pipeline(root: str) -> dict[str, list[list[float]]]:
    """PP2 x DP2 (two replicas of a two-stage pipeline), sync_every=2, synchronous and asynchronous:
    the losses of ``steps`` steps straight (saving mid-round at ``save_at``) and of the resumed rest."""
    from pathlib import Path

    every, steps, k = LOCAL_SGD_PP["every"], LOCAL_SGD_PP["steps"], LOCAL_SGD_PP["save_at"]
    out = {}
    for overlap in (False, True):
        cfg = tiny_config(pp=2, dp_replicate=2, dp_shard=1, sync_every=every, outer_async=overlap,
                          outer_lr=0.7, outer_momentum=0.9)
        d = Path(root) / f"pp2_dp2_{overlap}"
        straight = train_local_sgd(cfg, range(steps), d, save_at=k, resume=False)
        resumed = train_local_sgd(cfg, range(k, steps), d, save_at=None, resume=True)
        out["async" if overlap else "sync"] = [straight, resumed]
    return out


def local_sgd_reference(overlap: bool) -> list[float]:
    """One process playing both replicas of :func:`local_sgd_pipeline` (each its own engine and AdamW,
    on its half of every batch), with the outer step of :func:`mtnlg.parallel.data.outer_reference`:
    the global token-mean loss of each step."""
    from mtnlg.parallel.data import outer_reference
    from mtnlg.train.step import build_train_step as build_engine

    every, steps = LOCAL_SGD_PP["every"], LOCAL_SGD_PP["steps"]
    replicas = []
    for _ in range(2):
        torch.manual_seed(0)
        eng = build_engine(tiny_config(), torch.device("cpu"))
        params = [p for part in eng.model_parts for p in part.parameters()]
        replicas.append((eng, params, torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)))
    sums = [[0.0, 0] for _ in range(steps)]

    def inner(r: int, step: int, tensors: list[torch.Tensor]) -> None:
        eng, params, opt = replicas[r]
        with torch.no_grad():
            for p, t in zip(params, tensors):
                p.copy_(t)
        res = eng.train_step(micro_batches(step - 1, r, 2))
        eng.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for p, t in zip(params, tensors):
                t.copy_(p)
        sums[step - 1][0] += res.loss * res.tokens
        sums[step - 1][1] += res.tokens

    start = [[p.detach().clone() for p in params] for _, params, _ in replicas]
    outer_reference(start, inner, every, steps, lr=0.7, momentum=0.9, overlap=overlap)
    return [s / n for s, n in sums]


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
    out["dp_1mb_later"] = []  # replayed from the first count, without the dispatch mode
    for _ in range(3):
        eng.train_step(micro_batches(0, eng.dp_rank, eng.dp_size, micro=4))
        out["dp_1mb_later"].append(eng.comm_bytes())
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
