"""The training loss: summed token cross entropy, plain or fused with the LM head in chunks.

The fused form never holds the full ``[tokens, vocab]`` fp32 logits: it walks the tokens in chunks,
and for each computes the chunk's logits, its loss, and (when gradients are wanted) the gradient of
the summed loss with respect to the hidden states and the head weight right away (Liger's
fused-linear-cross-entropy)::

    for each chunk c of tokens:   z = h_c W^T (+ vocab mask)         [c, V] fp32, freed after the chunk
                                  loss += nll(log_softmax(z), y)     (labels -100 ignored)
                                  dz = s * (softmax(z) - onehot(y))  (0 on ignored rows; s = grad scale)
                                  dh_c = dz W ;  dW += dz^T h_c
    backward: (dh, dW) * upstream / s

Same FLOPs as the plain head + cross entropy, a chunk of logits in memory instead of all of them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Summed token cross entropy of ``logits`` [..., V] (labels -100 ignored; ``mask`` (0 / -inf
    per vocabulary entry) removes the padded vocabulary). Works on vocab-sharded DTensor logits
    inside ``loss_parallel()``."""
    if mask is not None:
        logits = logits + mask
    return F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), ignore_index=IGNORE, reduction="sum")


def default_chunk(vocab: int, device: torch.device | None = None) -> int:
    """Tokens per chunk: about 4M logits (16 MB in fp32, cache-sized) at a time on CPU, 64M (256 MB)
    on a GPU, where bigger matmuls pay; at least 64 rows."""
    budget = 1 << 26 if device is not None and device.type == "cuda" else 1 << 22
    return max(64, budget // vocab)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         mask: torch.Tensor | None = None, chunk: int | None = None,
                         grad_scale: float = 1.0) -> torch.Tensor:
    """``cross_entropy_sum(hidden @ weight.T, labels, mask)`` without materialising all the logits.

    ``hidden`` [..., h], ``weight`` [V, h] (the tied head), ``labels`` [...]. Returns the summed
    loss (fp32 scalar); differentiable in ``hidden`` and ``weight``. The gradients are computed in
    the forward pass with the same kernels autograd runs for the plain form (log-softmax and NLL
    backward), pre-scaled by ``grad_scale``: when the caller back-propagates ``loss * grad_scale``
    (as the training step does) they are bit-for-bit those of the plain form on one chunk.
    """
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1)
    need = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    kind = h.device.type
    # the matmuls run in autocast's dtype when it is on (bf16 on CUDA), the softmax in fp32
    dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else h.dtype
    return _LinearCrossEntropy.apply(h, weight, y, mask, chunk or default_chunk(weight.shape[0], h.device), need,
                                     float(grad_scale), dtype)


_SUM = 2  # at::Reduction::Sum


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, y, mask, chunk, need_grad, grad_scale, dtype):  # noqa: D102
        with torch.autocast(h.device.type, enabled=False):
            return _LinearCrossEntropy._forward(ctx, h, weight, y, mask, chunk, need_grad, grad_scale, dtype)

    @staticmethod
    def _forward(ctx, h, weight, y, mask, chunk, need_grad, grad_scale, dtype):
        grad_h = torch.empty_like(h) if need_grad and ctx.needs_input_grad[0] else None
        grad_w = None
        want_w = need_grad and ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        g = torch.full((), grad_scale, dtype=torch.float32, device=h.device)
        w = weight.to(dtype)
        for s in range(0, h.shape[0], chunk):
            hc, yc = h[s:s + chunk].to(dtype), y[s:s + chunk]
            z = (hc @ w.t()).float()
            if mask is not None:
                z = z + mask
            logp = torch._log_softmax(z, 1, False)
            del z
            loss, count = torch.ops.aten.nll_loss_forward(logp, yc, None, _SUM, IGNORE)
            total += loss
            if grad_h is None and not want_w:
                continue
            dlogp = torch.ops.aten.nll_loss_backward(g, logp, yc, None, _SUM, IGNORE, count)
            dz = torch.ops.aten._log_softmax_backward_data(dlogp, logp, 1, torch.float32)
            del dlogp, logp
            dz = dz.to(dtype)
            if grad_h is not None:
                if dtype == h.dtype:
                    torch.mm(dz, w, out=grad_h[s:s + chunk])
                else:
                    grad_h[s:s + chunk] = dz.mm(w)
            if want_w:
                dw = dz.t().mm(hc).to(weight.dtype)
                grad_w = dw if grad_w is None else grad_w.add_(dw)
        if want_w and grad_w is None:
            grad_w = torch.zeros_like(weight)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.grad_scale = grad_scale
        return total

    @staticmethod
    def backward(ctx, g):  # noqa: D102
        grad_h, grad_w = ctx.saved_tensors
        factor = g / ctx.grad_scale  # exactly 1.0 when the caller scaled by grad_scale: the grads stay bit-exact
        dh = grad_h * factor.to(grad_h.dtype) if grad_h is not None else None
        dw = grad_w * factor.to(grad_w.dtype) if grad_w is not None else None
        return dh, dw, None, None, None, None, None, None
