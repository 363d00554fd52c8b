"""Shared pieces of the parallel parity tests: a tiny config, synthetic batches, a 10-step run,
and a spawner for gloo ranks (each rank runs several layouts in sequence to save start-up time)."""

from __future__ import annotations

import dataclasses
import faulthandler
import os
import socket
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mtnlg.config import Config

STEPS = 10
SEQ = 16
GLOBAL_BATCH = 8
MICRO = 2
RTOL = 1e-5


def tiny_config(**parallel) -> Config:
    cfg = Config()
    m = cfg.model
    m.vocab_size, m.hidden_size, m.num_layers, m.num_heads, m.ffn_hidden_size, m.max_seq_len = 96, 32, 4, 4, 64, 32
    cfg.train.seq_len = SEQ
    cfg.train.seed = 7
    cfg.train.device = "cpu"
    cfg.train.optimizer = "adamw"  # run_steps' AdamW; a layout's "_muon" makes it Muon (train.muon)
    for k, v in parallel.items():
        setattr(cfg.parallel, k, v)
    return cfg.validate()


def batch(step: int, uneven: bool = True, vocab: int = 96) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of ``step``: inputs and labels [GLOBAL_BATCH, SEQ]; with ``uneven`` the
    sequences are right-padded (labels -100) to very different lengths."""
    g = torch.Generator().manual_seed(1000 + step)
    start = torch.randint(0, vocab, (GLOBAL_BATCH, 1), generator=g)
    stride = torch.randint(1, 4, (GLOBAL_BATCH, 1), generator=g)
    tokens = (start + stride * torch.arange(SEQ + 1)) % vocab  # learnable arithmetic sequences
    x, y = tokens[:, :-1].clone(), tokens[:, 1:].clone()
    if uneven:
        for i in range(GLOBAL_BATCH):
            keep = 2 + (i * 5 + step) % (SEQ - 2) if i >= GLOBAL_BATCH // 2 else SEQ
            y[i, keep:] = -100
    return x, y


def micro_batches(step: int, dp_rank: int, dp_size: int, uneven: bool = True, micro: int = MICRO,
                  vocab: int = 96):
    x, y = batch(step, uneven, vocab)
    per = GLOBAL_BATCH // dp_size
    x, y = x[dp_rank * per:(dp_rank + 1) * per], y[dp_rank * per:(dp_rank + 1) * per]
    return [(x[i:i + micro], y[i:i + micro]) for i in range(0, per, micro)]


def run_steps(cfg: Config, steps: int = STEPS, uneven: bool = True, micro: int = MICRO,
              with_engine: bool = False):
    """Train ``steps`` AdamW (or Muon) steps with the engine; return the per-step losses (and the engine)."""
    from mtnlg.train.optim import build_optimizer
    from mtnlg.train.step import build_train_step as build_engine

    torch.manual_seed(0)
    eng = build_engine(cfg, torch.device("cpu"))
    if cfg.train.optimizer == "muon":  # the trainer's Muon + AdamW, one per model part as the loop builds them
        tc = dataclasses.replace(cfg.train, lr=1e-2, weight_decay=0.1)
        opts = [build_optimizer([part], tc) for part in eng.model_parts]
    else:
        params = [p for part in eng.model_parts for p in part.parameters()]
        opts = [torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)]
    losses = []
    for step in range(steps):
        out = eng.train_step(micro_batches(step, eng.dp_rank, eng.dp_size, uneven, micro, cfg.model.vocab_size))
        eng.clip_grad_norm_(1.0)
        assert eng.grads_finite()
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
        eng.after_optimizer_step(step + 1)
        losses.append(out.loss)
    return (losses, eng) if with_engine else losses


def max_rel(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    faulthandler.enable()  # a rank killed by a C++ abort still shows its Python stack
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        result = fn(*args)
        queue.put((rank, "ok", result))
    except BaseException:  # report to the parent instead of hanging it
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(world: int, fn, *args, timeout: float = 240.0) -> dict[int, object]:
    """Run ``fn(*args)`` on ``world`` gloo ranks; return {rank: result} or raise with a rank's traceback."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, fn, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    errors: dict[int, str] = {}
    try:
        for _ in range(world):
            try:
                rank, status, value = queue.get(timeout=timeout if not errors else 20)
            except Exception:  # noqa: BLE001 - a rank died or hangs after another failed
                break
            (results if status == "ok" else errors)[rank] = value
        if errors or len(results) < world:
            shown = "\n".join(f"--- rank {r}:\n{e}" for r, e in sorted(errors.items()))
            raise AssertionError(f"{len(errors)} rank(s) failed, {world - len(results) - len(errors)} silent:\n{shown}")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
    return results
