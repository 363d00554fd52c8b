"""Decode-time projections through the blocked weight: same values as nn.Linear, never stale, never in training."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mtnlg.model import decode_linear
from mtnlg.model.decode_linear import project


@pytest.fixture
def two_threads(monkeypatch):
    """Two threads, and the blocked path taken wherever it is allowed (whether it pays is measured per
    machine: :func:`test_the_choice_is_measured_once_per_shape_and_rows`)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    monkeypatch.setattr(decode_linear, "blocked_pays", lambda *a, **k: True)
    yield
    torch.set_num_threads(before)


def test_the_choice_is_measured_once_per_shape_and_rows(monkeypatch):
    monkeypatch.setattr(decode_linear, "_PAYS", {})
    w, b = torch.randn(64, 48), torch.randn(64)
    calls = []
    real = decode_linear.blocked

    def counting(*a):
        calls.append(1)
        return real(*a)

    monkeypatch.setattr(decode_linear, "blocked", counting)
    first = decode_linear.blocked_pays(w, b, 2, rows=1)
    assert isinstance(first, bool) and decode_linear.blocked_pays(w, b, 2, rows=1) == first
    assert len(calls) == 1  # measured once, then remembered
    decode_linear.blocked_pays(w, b, 2, rows=8)
    assert len(calls) == 2 and set(decode_linear._PAYS) == {(64, 48, 2, True, 1), (64, 48, 2, True, 8)}


def test_where_the_blocks_do_not_pay_the_plain_linear_runs(monkeypatch):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(decode_linear, "blocked_pays", lambda *a, **k: False)
        lin = nn.Linear(48, 64)
        x = torch.randn(1, 1, 48)
        with torch.no_grad():
            torch.testing.assert_close(project(lin, x), lin(x), rtol=1e-5, atol=1e-6)
        assert decode_linear._CACHE not in lin.__dict__
    finally:
        torch.set_num_threads(before)


def test_decode_rows_match_linear_and_use_the_blocks(two_threads):
    lin = nn.Linear(48, 64)
    for shape in ((1, 1, 48), (8, 1, 48), (3, 48)):
        x = torch.randn(shape)
        with torch.no_grad():
            torch.testing.assert_close(project(lin, x), lin(x), rtol=1e-5, atol=1e-6)
    assert decode_linear._CACHE in lin.__dict__  # the fast path ran


def test_the_blocks_follow_weight_updates(two_threads):
    lin = nn.Linear(32, 16)
    x = torch.randn(1, 32)
    with torch.no_grad():
        project(lin, x)
        lin.weight.mul_(-3.0)  # an optimizer step: in place, the version counter moves
        torch.testing.assert_close(project(lin, x), lin(x), rtol=1e-5, atol=1e-6)


def test_training_prefill_and_hooked_layers_keep_nn_linear(two_threads):
    lin = nn.Linear(32, 16)
    x = torch.randn(1, 32, requires_grad=True)
    y = project(lin, x)  # autograd on: the plain path, gradients flow to the weight
    y.sum().backward()
    assert lin.weight.grad is not None and decode_linear._CACHE not in lin.__dict__
    with torch.no_grad():
        project(lin, torch.randn(40, 32))  # more rows than a decode step: the GEMM
        assert decode_linear._CACHE not in lin.__dict__
        seen = []
        lin.register_forward_hook(lambda m, i, o: seen.append(o.shape))
        project(lin, torch.randn(1, 32))
    assert seen == [torch.Size([1, 16])] and decode_linear._CACHE not in lin.__dict__


def test_the_decode_head_takes_a_whole_batch_and_a_tied_weight(two_threads):
    from mtnlg.model.decode_linear import decode_head

    emb = nn.Embedding(64, 48)
    out = nn.Linear(48, 64, bias=False)
    out.weight = emb.weight  # tied, as GPT ties its head
    head = decode_head(out)
    x = torch.randn(16, 1, 48)  # 16 rows: more than a layer's DECODE_ROWS, within the head's
    with torch.no_grad():
        torch.testing.assert_close(head(x), out(x), rtol=1e-5, atol=1e-6)
        assert decode_linear._CACHE in out.__dict__
        emb.weight.add_(1.0)  # the tied weight changes: the head follows
        torch.testing.assert_close(head(x), out(x), rtol=1e-5, atol=1e-6)
    big = nn.Linear(48, 64, bias=False)
    with torch.no_grad():
        project(big, torch.randn(16, 1, 48))
    assert decode_linear._CACHE not in big.__dict__  # a layer's projection keeps the GEMM at 16 rows
