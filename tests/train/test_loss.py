"""The chunked LM head + cross entropy equals the plain head + cross entropy, values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mtnlg.train.loss import cross_entropy_sum, linear_cross_entropy


def _inputs(n: int = 37, h: int = 16, v: int = 50, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64).float().requires_grad_()
    weight = (0.3 * torch.randn(v, h, generator=g)).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::5] = -100  # ignored tokens
    return hidden, weight, labels


@pytest.mark.parametrize("chunk", [1, 8, 37, 1000])
@pytest.mark.parametrize("padded", [False, True])
def test_chunked_equals_plain_values_and_grads(chunk, padded):
    hidden, weight, labels = _inputs()
    mask = None
    if padded:  # the last 6 vocabulary rows are padding: masked out of the softmax
        mask = torch.zeros(weight.shape[0])
        mask[-6:] = float("-inf")
        labels = labels.masked_fill(labels >= weight.shape[0] - 6, -100)
    want = cross_entropy_sum(hidden @ weight.t(), labels, mask)
    want_dh, want_dw = torch.autograd.grad(0.37 * want, (hidden, weight))
    got = linear_cross_entropy(hidden, weight, labels, mask, chunk=chunk)
    got_dh, got_dw = torch.autograd.grad(0.37 * got, (hidden, weight))
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    torch.testing.assert_close(got_dh, want_dh, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got_dw, want_dw, rtol=1e-5, atol=1e-7)
    # and both equal F.cross_entropy's own sum over the non-ignored tokens
    ref = F.cross_entropy(hidden @ weight.t() + (mask if mask is not None else 0), labels, reduction="sum")
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)


def test_chunked_batched_shape_and_no_grad():
    hidden, weight, labels = _inputs(n=24)
    want = cross_entropy_sum((hidden @ weight.t()).view(4, 6, -1), labels.view(4, 6))
    with torch.no_grad():
        got = linear_cross_entropy(hidden.view(4, 6, -1), weight, labels.view(4, 6), chunk=5)
    assert not got.requires_grad
    assert got.item() == pytest.approx(want.item(), rel=1e-6)


def test_all_tokens_ignored_gives_zero_loss_and_grads():
    hidden, weight, labels = _inputs(n=8)
    labels[:] = -100
    got = linear_cross_entropy(hidden, weight, labels, chunk=3)
    got.backward()
    assert got.item() == 0.0
    assert torch.count_nonzero(hidden.grad) == 0 and torch.count_nonzero(weight.grad) == 0


def test_confidently_wrong_targets_keep_an_exact_loss():
    # logits so peaked that the targets' softmax probabilities underflow fp32: the loss must still be
    # the exact logsumexp - z[y] (about 1e3 per token), and the gradients softmax - onehot
    hidden, weight, labels = _inputs(n=12)
    weight = (weight.detach() * 400).requires_grad_()
    want = cross_entropy_sum(hidden @ weight.t(), labels)
    assert want.item() > 1e3
    got = linear_cross_entropy(hidden, weight, labels, chunk=5)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    want_dh, want_dw = torch.autograd.grad(want, (hidden, weight))
    got_dh, got_dw = torch.autograd.grad(got, (hidden, weight))
    torch.testing.assert_close(got_dh, want_dh, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_dw, want_dw, rtol=1e-5, atol=1e-5)


def test_negative_grad_scale_is_the_plain_gradient_negated():
    hidden, weight, labels = _inputs(n=10)
    want_dh, = torch.autograd.grad(-2.0 * cross_entropy_sum(hidden @ weight.t(), labels), (hidden,))
    got_dh, = torch.autograd.grad(-2.0 * linear_cross_entropy(hidden, weight, labels, chunk=4, grad_scale=-2.0),
                                  (hidden,))
    torch.testing.assert_close(got_dh, want_dh, rtol=1e-5, atol=1e-7)
