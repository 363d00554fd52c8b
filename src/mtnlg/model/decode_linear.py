"""Batch-1 decoding's projections through a blocked copy of the weight, read by all threads at once,
where that is measured to pay.

While decoding, each ``nn.Linear`` multiplies a handful of rows by its weight: a matrix-vector
product that only streams the weight from memory. On some CPUs the BLAS runs that product on one
thread and reads the weight at about a third of the machine's read bandwidth (measured on an AVX2
2-core box: 8-9 GB/s against 31-33 GB/s for ``torch.sum`` over the same bytes). Split into P column
blocks stored as ``[P, in, out / P]`` (P = the intra-op threads), the same product becomes a batched
matmul whose P blocks run in parallel: 12.9 GB/s there, and 1.2x the tokens/s of the whole decode
loop. On others the BLAS already reads the weight with every thread (an AVX-512 2-core box: 77-87
GB/s for a 288 x 1152 layer either way) and the blocked path only adds operators (its tokens/s was
0.85-0.9x plain ``F.linear``'s). So :func:`blocked_pays` times both on the real weight the first time
a shape is seen in a process (~1 ms; best of :data:`TRIALS`, alternating) and the blocked copy is used
only where it is at least :data:`MARGIN` faster.

:func:`project` takes that path only where it pays and cannot change training: no autograd, CPU,
at most :data:`DECODE_ROWS` rows, not under ``torch.compile`` (a compiled step has its own matmuls), a
plain ``nn.Linear`` without hooks, weights of at most
:data:`MAX_ELEMENTS`. The blocked copy is built on first use and rebuilt whenever the weight
changes (its version counter), so it is never stale; it costs one extra copy of each projection
while a model decodes.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

DECODE_ROWS = 8  # decode steps of up to 8 sequences; prefill and evaluation keep the GEMM
MAX_ELEMENTS = 16 * 2**20  # 64 MB of fp32 per matrix at most (larger models: no second copy)
HEAD_ROWS = 64  # the LM head: every row of a decode batch (one matrix, so a larger copy is allowed)
HEAD_MAX_ELEMENTS = 64 * 2**20
TRIALS = 20
MARGIN = 0.9  # the blocked product must take at most 0.9x plain F.linear's time
_CACHE = "_decode_blocks"  # on a module: (weight storage, version, parts) and its blocks
_PLAN = "_decode_plan"  # on a module: the last call's shape and weight, and its blocks or None
_PAYS: dict[tuple[int, int, int, bool, int], bool] = {}


def _blocks(lin: nn.Linear, rows: int, max_elements: int) -> torch.Tensor | None:
    """The weight as [P, in, out / P] blocks for ``rows`` rows, or None (not eligible, or not faster for
    that many rows here). The answer is kept on the module with what it depends on (rows, threads, the
    weight's identity, storage and version), so a decode step of the same shape pays one comparison."""
    w = lin.weight
    threads = torch.get_num_threads()
    plan = lin.__dict__.get(_PLAN)
    if plan is not None and plan[:5] == (rows, threads, w._version, w.data_ptr(), id(w)):
        return plan[5]
    blocks = _plan(lin, rows, max_elements)
    lin.__dict__[_PLAN] = (rows, threads, w._version, w.data_ptr(), id(w), blocks)
    return blocks


def _plan(lin: nn.Linear, rows: int, max_elements: int) -> torch.Tensor | None:
    w = lin.weight
    parts = block_count(w.shape[0])
    plain = type(w) is nn.Parameter or type(w) is torch.Tensor  # not a DTensor shard, not a quantized weight
    if not plain or parts < 2 or w.numel() > max_elements or w.dtype != torch.float32:
        return None
    if not blocked_pays(w, lin.bias, parts, rows):
        return None
    key = (w.data_ptr(), w._version, parts)
    cached = lin.__dict__.get(_CACHE)
    if cached is None or cached[0] != key:
        cached = (key, blocked(w.detach(), parts))
        lin.__dict__[_CACHE] = cached
    return cached[1]


def blocked_pays(w: torch.Tensor, bias: torch.Tensor | None, parts: int, rows: int = 1) -> bool:
    """Whether ``rows`` rows times ``w`` (plus ``bias``) are faster through :func:`blocked` blocks than
    through ``F.linear`` on this machine: measured once per process for each shape, thread count and
    row count (rounded up to a power of two, at most 64)."""
    rows = min(64, 1 << (max(rows, 1) - 1).bit_length())
    key = (w.shape[0], w.shape[1], parts, bias is not None, rows)
    if key not in _PAYS:
        with torch.no_grad():
            w = w.detach()
            b = bias.detach() if bias is not None else None
            x = torch.randn(rows, 1, w.shape[1], dtype=w.dtype, device=w.device)
            blocks = blocked(w, parts)

            def blk() -> torch.Tensor:
                y = blocked_matmul(x, blocks)
                return y + b if b is not None else y

            best = {"plain": float("inf"), "blocked": float("inf")}
            F.linear(x, w, b), blk()  # warm-up
            for _ in range(TRIALS):
                for name, fn in (("plain", lambda: F.linear(x, w, b)), ("blocked", blk)):
                    t0 = time.perf_counter()
                    fn()
                    best[name] = min(best[name], time.perf_counter() - t0)
        _PAYS[key] = best["blocked"] <= MARGIN * best["plain"]
    return _PAYS[key]


def block_count(out_features: int) -> int:
    """How many blocks a weight with ``out_features`` rows is read in: one per intra-op thread, or 1
    (no split) with one thread or when the threads do not divide the rows."""
    threads = torch.get_num_threads()
    return threads if threads >= 2 and out_features % threads == 0 else 1


def blocked(w: torch.Tensor, parts: int) -> torch.Tensor:
    """A weight [out, in] as ``parts`` blocks of its transpose: [parts, in, out / parts]."""
    out_f, in_f = w.shape
    return w.t().reshape(in_f, parts, out_f // parts).permute(1, 0, 2).contiguous()


def blocked_matmul(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``x @ W^T`` from :func:`blocked` ``(W, P)``: the P blocks in parallel, as one batched matmul."""
    p, _, width = blocks.shape
    rows = x.reshape(1, -1, x.shape[-1]).expand(p, -1, -1)
    return torch.bmm(rows, blocks).permute(1, 0, 2).reshape(*x.shape[:-1], p * width)


def project(lin: nn.Module, x: torch.Tensor, max_rows: int = DECODE_ROWS,
            max_elements: int = MAX_ELEMENTS) -> torch.Tensor:
    """``lin(x)``, through the blocked weight while decoding on CPU (see the module docstring): for at
    most ``max_rows`` rows and a weight of at most ``max_elements``."""
    if (torch.is_grad_enabled() or torch.compiler.is_compiling() or x.device.type != "cpu"
            or type(lin) is not nn.Linear or x.numel() > max_rows * x.shape[-1]
            or lin._forward_hooks or lin._forward_pre_hooks):
        return lin(x)
    blocks = _blocks(lin, x.numel() // x.shape[-1], max_elements)
    if blocks is None:  # the module's own call, less nn.Module's dispatch (no hooks: checked above)
        return F.linear(x, lin.weight, lin.bias)
    y = blocked_matmul(x, blocks)
    return y + lin.bias if lin.bias is not None else y


def decode_head(output: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The LM head for decoding (``GPT.forward``'s ``head``): :func:`project` with the head's limits. On
    an AVX2 box a [1, h] x [V, h]^T ``linear`` with a large V was several times slower than the blocked
    product (5.5 ms vs 1.2 ms for V=8192, h=384); on an AVX-512 box the two are even, and the
    measurement keeps ``F.linear``. Quantized heads, DTensors and GPUs keep the module's own call."""
    return functools.partial(project, output, max_rows=HEAD_ROWS, max_elements=HEAD_MAX_ELEMENTS)
