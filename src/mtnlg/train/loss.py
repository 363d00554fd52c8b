"""The training loss: summed token cross entropy, plain or fused with the LM head in chunks.

The fused form never holds the full ``[tokens, vocab]`` fp32 logits: it walks the tokens in chunks,
and for each computes the chunk's logits, its loss, and (when gradients are wanted) the gradient of
the summed loss with respect to the hidden states and the head weight right away (Liger's
fused-linear-cross-entropy)::

    for each chunk c of tokens:   z = h_c W^T (+ vocab mask)         [c, V] fp32, freed after the chunk
                                  p = softmax(z); loss += -log p[y]   (labels -100 ignored)
                                  dz = softmax(z) - onehot(y)  (in place over p; 0 on ignored rows)
                                  dh_c = s * dz W ;  dW += s * dz^T h_c   (s = grad scale)
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
    the forward pass, pre-scaled by ``grad_scale`` (the caller back-propagates ``loss * grad_scale``,
    as the training step does), from ``softmax - onehot`` written over the chunk's softmax (the scale
    applied to the small products): one fused softmax instead of autograd's log-softmax, NLL backward
    and log-softmax backward kernels and their buffers (a third of the time on CPU). They equal the plain form's to float rounding (tests/train/test_loss.py).
    """
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1)
    need = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    kind = h.device.type
    # the matmuls run in autocast's dtype when it is on (bf16 on CUDA), the softmax in fp32
    dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else h.dtype
    return _LinearCrossEntropy.apply(h, weight, y, mask, chunk or default_chunk(weight.shape[0], h.device), need,
                                     float(grad_scale), dtype)


# -log p below which fp32 softmax keeps the target's probability to full precision (p > ~1e-26);
# rows beyond it (rare: a confidently wrong model) get the exact logsumexp(z) - z[y]
_FAR = 60.0


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
        w = weight.to(dtype)
        for s in range(0, h.shape[0], chunk):
            hc, yc = h[s:s + chunk].to(dtype), y[s:s + chunk]
            z = (hc @ w.t()).float()
            if mask is not None:
                z += mask
            keep = yc != IGNORE
            yk = yc.clamp(min=0)
            p = torch.softmax(z, 1)  # one fused pass; softmax less the one-hot is the gradient
            nll = -torch.log(p.gather(1, yk[:, None])[:, 0])
            far = nll > _FAR  # a target so unlikely that its probability lost precision: exact there
            has_far, has_ignored = torch.stack((far.any(), ~keep.all())).tolist()  # one host sync
            if has_far:
                zf = z[far]
                nll[far] = torch.logsumexp(zf, 1) - zf.gather(1, yk[far][:, None])[:, 0]
            del z
            total += torch.where(keep, nll, 0.0).sum()
            if grad_h is None and not want_w:
                continue
            # dz = softmax(z) - onehot(y) on kept rows, 0 on ignored ones, written over p in place; the
            # scale g goes on the small products (dh [c, h], dw [V, h]), not on the [c, V] chunk, and
            # the ignored rows are zeroed only in a chunk that has some (pretraining's have none)
            p[torch.arange(p.shape[0], device=p.device), yk] -= 1.0
            if has_ignored:
                p.masked_fill_(~keep[:, None], 0.0)
            dz = p
            del p
            dz = dz.to(dtype)
            if grad_h is not None:
                out = grad_h[s:s + chunk]
                if dtype == h.dtype:
                    torch.mm(dz, w, out=out)
                else:
                    out.copy_(dz.mm(w))
                if grad_scale != 1.0:
                    out.mul_(grad_scale)
            if want_w:
                dw = dz.t().mm(hc).to(weight.dtype)
                if grad_scale != 1.0:
                    dw.mul_(grad_scale)
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
