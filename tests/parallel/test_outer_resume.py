"""Local SGD (``sync_every > 1``, sync and ``outer_async``) stops and resumes exactly: 2 gloo ranks as 2
replicas, a tiny GPT, N steps straight vs k steps + checkpoint + a fresh engine resumed to N.

Bit-exact (``==`` on the loss floats): the resumed run does the same float operations in the same order
on the same values (the in-flight async average is waited for at save time; its value, not its timing,
is what the next sync point applies)."""

from __future__ import annotations

import torch

from tests.parallel.harness import micro_batches, spawn, tiny_config

N = 7


def _train(cfg, steps: range, ckpt_dir, save_at: int | None, resume: bool) -> list[float]:
    from mtnlg.checkpoint import load_checkpoint, save_checkpoint
    from mtnlg.train.step import build_train_step as build_engine

    torch.manual_seed(0)
    eng = build_engine(cfg, torch.device("cpu"))
    params = [p for part in eng.model_parts for p in part.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    if resume:
        path = sorted(ckpt_dir.glob("step_*"))[-1]
        state = load_checkpoint(path, eng.model_parts, [opt], outer=eng.outer)
        assert "outer" in state and state["outer"]["replicas"] == 2
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


def _cases(root: str) -> dict[str, list[list[float]]]:
    from pathlib import Path

    out = {}
    for every, overlap, k in ((2, False, 3), (3, False, 4), (2, True, 4), (3, True, 5)):
        cfg = tiny_config(dp_replicate=2, dp_shard=1, sync_every=every, outer_async=overlap,
                          outer_lr=0.7, outer_momentum=0.9)
        d = Path(root) / f"{every}-{overlap}"
        straight = _train(cfg, range(N), d, save_at=k, resume=False)
        resumed = _train(cfg, range(k, N), d, save_at=None, resume=True)
        out[f"{every}-{overlap}-{k}"] = [straight, resumed]
    return out


def test_local_sgd_resume_continues_the_loss_curve_exactly(tmp_path):
    out = spawn(2, _cases, str(tmp_path))
    for case, (straight, resumed) in out[0].items():
        k = int(case.rsplit("-", 1)[1])
        assert resumed == straight[k:], case  # bit-exact
    assert out[0] == out[1]  # losses are global: every rank reports the same
