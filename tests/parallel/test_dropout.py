"""Dropout 0.1 gives the one-process loss under TP2, TP2+SP, FSDP2 and PP2 (2 gloo ranks, 1e-5
relative): the masks are hashes of each element's global coordinates (``mtnlg.model.dropout``). PP2 runs
1F1B with full activation checkpointing, where a stage recomputes a microbatch's forward after the next
one's forward: the row keys travel with each microbatch, not as module state. (PP2 x TP2 at dropout 0.1
is one of the 4-rank layouts of ``test_parity``.)"""

from __future__ import annotations

import torch

from tests.parallel.harness import RTOL, max_rel, run_steps, spawn, tiny_config

LAYOUTS = {"tp2": dict(tp=2, sequence_parallel=False), "tp2_sp": dict(tp=2), "fsdp2": dict(dp_shard=2),
           "pp2_1f1b_recompute": dict(pp=2, _recompute="full")}
STEPS = 4


def _cfg(dropout: float, _recompute: str = "none", **parallel):
    cfg = tiny_config(grad_sync="token_weighted", **parallel)
    cfg.model.dropout = dropout
    cfg.train.activation_checkpointing = _recompute
    return cfg.validate()


def _layouts() -> dict[str, list[float]]:
    return {name: run_steps(_cfg(0.1, **spec), steps=STEPS) for name, spec in LAYOUTS.items()}


def test_masks_are_global_coordinates():
    from mtnlg.model.dropout import keep_mask, row_keys

    tokens = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    keys = row_keys(tokens)
    full = keep_mask(torch.Size([4, 16, 32]), 0.1, 0, 3, keys, 0, torch.device("cpu"))
    # a sequence shard at offset 8 and a row subset draw the same bits as the full tensor
    assert torch.equal(keep_mask(torch.Size([2, 8, 32]), 0.1, 0, 3, keys[2:], 8, torch.device("cpu")), full[2:, 8:])
    assert abs(full.float().mean().item() - 0.9) < 0.03
    other = keep_mask(torch.Size([4, 16, 32]), 0.1, 0, 4, keys, 0, torch.device("cpu"))
    assert not torch.equal(full, other)  # each site (layer, branch) has its own masks
    assert not torch.equal(row_keys(tokens[:, torch.arange(15, -1, -1)]), keys)  # keys see positions


def test_a_later_pipeline_stage_draws_the_masks_of_the_whole_model():
    """Two stages (split as PP2 splits) fed some rows in another order, with those rows' keys, give
    exactly the whole model's training-mode output for them; without the keys the masks differ."""
    from mtnlg.model.dropout import row_keys
    from mtnlg.model.init import build_model, materialize
    from mtnlg.parallel.pipeline import split_stage

    cfg = _cfg(0.1).model
    whole = materialize(build_model(cfg), seed=7).train()
    first, last = (materialize(split_stage(build_model(cfg), [2, 2], s), seed=7).train() for s in (0, 1))
    tokens = torch.randint(0, cfg.vocab_size, (4, 16), generator=torch.Generator().manual_seed(1))
    rows = tokens[[3, 1]]
    got = last(first(rows), row_keys=row_keys(rows))
    torch.testing.assert_close(got, whole(tokens)[[3, 1]], rtol=1e-5, atol=1e-6)
    assert not torch.equal(last(first(rows)), got)


def test_dropout_matches_one_process_in_every_layout():
    ref = run_steps(_cfg(0.1), steps=STEPS)
    assert max_rel(ref, run_steps(_cfg(0.0), steps=STEPS)) > 1e-3  # dropout is on
    out = spawn(2, _layouts)[0]
    for name, losses in out.items():
        assert max_rel(losses, ref) < RTOL, (name, losses, ref)
