"""Dropout 0.1 gives the one-process loss under TP2, TP2+SP and FSDP2 (2 gloo ranks, 1e-5 relative):
the masks are hashes of each element's global coordinates (``mtnlg.model.dropout``)."""

from __future__ import annotations

import pytest
import torch

from mtnlg.errors import ConfigError
from tests.parallel.harness import RTOL, max_rel, run_steps, spawn, tiny_config

LAYOUTS = {"tp2": dict(tp=2, sequence_parallel=False), "tp2_sp": dict(tp=2), "fsdp2": dict(dp_shard=2)}
STEPS = 4


def _cfg(dropout: float, **parallel):
    cfg = tiny_config(grad_sync="token_weighted", **parallel)
    cfg.model.dropout = dropout
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


def test_dropout_is_refused_with_pipeline_parallelism():
    with pytest.raises(ConfigError, match=r"model.dropout=0.1 with parallel.pp=2"):
        _cfg(0.1, pp=2)


def test_dropout_matches_one_process_in_every_layout():
    ref = run_steps(_cfg(0.1), steps=STEPS)
    assert max_rel(ref, run_steps(_cfg(0.0), steps=STEPS)) > 1e-3  # dropout is on
    out = spawn(2, _layouts)[0]
    for name, losses in out.items():
        assert max_rel(losses, ref) < RTOL, (name, losses, ref)
