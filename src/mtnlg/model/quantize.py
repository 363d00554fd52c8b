"""Weight-only int8 quantization for inference (``quantize=True``).

Every block Linear (``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``) and the LM head become
:class:`Int8Linear`: int8 weights with symmetric scales, one per output channel (or one per
``group_size`` inputs of each channel), ``w ≈ q * scale`` with ``q`` in [-127, 127]. The token
embedding stays in full precision (the head is quantized from a copy, so it is no longer tied).

The matmul path was picked by measurement on the 2-core CPU (one 4096 x 15360 layer, batch 1):
PyTorch's ``_weight_int8pack_mm`` with bf16 activations reads ~9 GB/s of int8 weights (6.9 ms);
with fp32 activations only 1.3 GB/s; dequantizing to fp32 then a gemv costs the dequantization
plus a 14 GB/s gemv over 4x the bytes (17.8 ms). Decoding (up to 32 activation rows) takes mtnlg's
own kernel (:mod:`mtnlg.model.int8_gemv`: fp32 activations, 0.85-0.93 of a buffer read's bandwidth
against ``_weight_int8pack_mm``'s 0.73-0.80) where it is built; longer inputs (a prefill) and
machines without a C compiler use ``_weight_int8pack_mm`` with bf16 activations (output cast back);
grouped scales (which neither kernel expresses) and other devices dequantize and run ``F.linear``.
``benchmarks/quantized_6b.py`` re-measures the paths.

``materialize_quantized`` builds the spec's 6B config layer by layer from the meta device: each
Linear is initialised in fp32, quantized and freed before the next, so the fp32 model never exists
(peak RSS ≈ int8 weights + fp32 embeddings + one fp32 layer).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mtnlg.errors import CheckpointError, ConfigError
from mtnlg.model import int8_gemv
from mtnlg.model.init import init_value
from mtnlg.model.transformer import GPT

log = logging.getLogger(__name__)

BLOCK_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
QMAX = 127


@dataclass
class QuantConfig:
    """``quantize_config``: bits (8 only), group_size (None = per output channel), symmetric (True
    only), per_channel (False = one scale per tensor)."""

    bits: int = 8
    group_size: int | None = None
    symmetric: bool = True
    per_channel: bool = True

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> QuantConfig:
        c = cls(**(d or {}))
        if c.bits != 8:
            raise ConfigError(f"quantize_config.bits={c.bits} is not supported; only 8-bit weights are")
        if not c.symmetric:
            raise ConfigError("quantize_config.symmetric=False is not supported; use symmetric int8")
        if c.group_size is not None and c.group_size <= 0:
            raise ConfigError(f"quantize_config.group_size must be a positive integer, got {c.group_size}")
        return c


def quantize_weight(w: torch.Tensor, group_size: int | None = None,
                    per_channel: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """fp weight [out, in] -> (int8 [out, in], fp32 scales [out] or [out, in / group_size])."""
    w = w.detach().float()
    out, inp = w.shape
    if group_size:
        if inp % group_size:
            raise ConfigError(f"quantize_config.group_size={group_size} does not divide the input width {inp}")
        g = w.view(out, inp // group_size, group_size)
        scales = (g.abs().amax(-1) / QMAX).clamp_(min=1e-12)
        q = torch.round(g / scales.unsqueeze(-1)).clamp_(-QMAX, QMAX).to(torch.int8).view(out, inp)
        return q, scales
    amax = w.abs().amax(-1) if per_channel else w.abs().amax().expand(out)
    scales = (amax / QMAX).clamp(min=1e-12).contiguous()
    q = torch.round(w / scales.unsqueeze(1)).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scales


class Int8Linear(nn.Module):
    """``y = x @ dequant(q).T + bias`` with int8 ``q`` and fp32 scales (buffers: they are not trained)."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight.contiguous())  # the decode kernel walks rows in memory order
        self.register_buffer("scales", scales.float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.grouped = scales.dim() == 2
        self._scales_bf16 = None if self.grouped else scales.to(torch.bfloat16)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None,
                    config: QuantConfig | None = None) -> Int8Linear:
        c = config or QuantConfig()
        q, s = quantize_weight(weight, c.group_size, c.per_channel)
        return cls(q, s, bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: QuantConfig | None = None) -> Int8Linear:
        return cls.from_weight(linear.weight, linear.bias, config)

    def dequantize(self) -> torch.Tensor:
        if self.grouped:
            g = self.scales.shape[1]
            q = self.qweight.view(self.out_features, g, -1).float()
            return (q * self.scales.unsqueeze(-1)).view(self.out_features, self.in_features)
        return self.qweight.float() * self.scales.unsqueeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the int8 kernels have no backward: inputs that need a gradient (prompt tuning over an int8
        # model) take the dequantized path, whose gradient flows to x (the int8 weights stay frozen)
        if not self.grouped and x.device.type == "cpu" and not (x.requires_grad and torch.is_grad_enabled()):
            shape = x.shape
            rows = x.numel() // self.in_features
            if int8_gemv.applies(x, rows):  # decode: the weights streamed by mtnlg's own kernel, fp32 activations
                y = int8_gemv.int8_gemv(x.reshape(rows, self.in_features), self.qweight, self.scales, self.bias)
                return y.view(*shape[:-1], self.out_features)
            if self.in_features % 16 == 0:  # PyTorch's kernel returns wrong sums for other widths (2.13, AVX-512)
                y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, self.in_features).to(torch.bfloat16),
                                                       self.qweight, self._scales_bf16)
                y = y.to(x.dtype).view(*shape[:-1], self.out_features)
                return y + self.bias if self.bias is not None else y
        return F.linear(x, self.dequantize().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, grouped={self.grouped}"


def _targets(model: GPT) -> list[str]:
    names = [f"layers.{i}.{n}" for i in model.layers for n in BLOCK_LINEARS]
    return names + (["output"] if model.output is not None else [])


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


@torch.no_grad()
def quantize_model(model: GPT, config: QuantConfig | dict | None = None) -> GPT:
    """Replace the block Linears and the LM head of a materialized ``model`` by :class:`Int8Linear` in place."""
    c = config if isinstance(config, QuantConfig) else QuantConfig.from_dict(config)
    for name in _targets(model):
        lin = model.get_submodule(name)
        if isinstance(lin, Int8Linear):
            continue
        _set(model, name, Int8Linear.from_linear(lin, c))
    model.requires_grad_(False)
    return model


# read(name, shape) -> the tensor stored under ``name`` (fp32 or int8, on CPU) or None when absent
Reader = Callable[[str, torch.Size], "torch.Tensor | None"]


@torch.no_grad()
def materialize_quantized(model: GPT, config: QuantConfig | dict | None = None, seed: int = 0,
                          device: str | torch.device = "cpu") -> GPT:
    """Materialize a meta ``model`` straight into its quantized form, one Linear at a time.

    Values equal ``quantize_model(materialize(model, seed=seed))`` but the peak memory is the
    quantized model plus one fp32 Linear.
    """
    cfg = model.cfg

    def init(name: str, shape: torch.Size) -> torch.Tensor | None:
        if name.endswith((".qweight", ".scales")):
            return None
        return init_value(name, shape, cfg, seed)

    return load_quantized(model, init, config, device)


@torch.no_grad()
def load_quantized(model: GPT, read: Reader, config: QuantConfig | dict | None = None,
                   device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> GPT:
    """Fill a meta ``model`` in its quantized form from ``read``, one tensor at a time.

    Each target Linear is taken as saved int8 (``NAME.qweight`` + ``NAME.scales``) when the source
    has it, else its fp32 ``NAME.weight`` (the head: the token embedding) is read, quantized and
    freed before the next, so the full-precision model never exists: peak memory is the int8 model,
    the fp32 embeddings and one fp32 Linear. The other parameters are read as they are.
    """
    c = config if isinstance(config, QuantConfig) else QuantConfig.from_dict(config)
    for name in _targets(model):
        lin = model.get_submodule(name)
        out_f, in_f = lin.weight.shape
        bias = read(f"{name}.bias", torch.Size([out_f])) if lin.bias is not None else None
        q = read(f"{name}.qweight", lin.weight.shape)
        if q is not None:
            scales = read(f"{name}.scales", torch.Size([out_f]))
            mod = Int8Linear(q, scales, bias).to(device)
        else:
            wname = "tok_embeddings.weight" if name == "output" else f"{name}.weight"
            w = read(wname, lin.weight.shape)
            if w is None:
                raise CheckpointError(f"the checkpoint has neither {name}.qweight nor {wname}")
            mod = Int8Linear.from_weight(w[:out_f], bias, c).to(device)
            del w  # freed here by refcount: only one fp32 Linear is alive at a time
        del bias, q
        _set(model, name, mod)
    for mod_name, mod in model.named_modules():
        for pname, p in list(mod.named_parameters(recurse=False)):
            if p.is_meta:
                full = f"{mod_name}.{pname}" if mod_name else pname
                t = read(full, p.shape)
                if t is None:
                    raise CheckpointError(f"the checkpoint has no {full}")
                if tuple(t.shape) != tuple(p.shape):
                    raise CheckpointError(f"{full} has shape {tuple(t.shape)} in the checkpoint but the config "
                                          f"needs {tuple(p.shape)}")
                setattr(mod, pname, nn.Parameter(t.to(device, dtype), requires_grad=False))
    return model


def quantized_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers (what the quantized model holds)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen and not t.is_meta:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total
