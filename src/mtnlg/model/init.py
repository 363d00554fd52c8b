"""Meta-device construction and explicit, deterministic materialization.

``build_model(cfg)`` allocates nothing: every parameter lives on the meta device, so the spec's
6B config costs no memory until it is materialized (or sharded first, then materialized).

Initialisation (MT-NLG / Megatron):
  * weights ~ Normal(0, init_std) (embeddings, QKV, fc1);
  * the two output layers of each block (``attn.proj``, ``mlp.fc2``) ~ Normal(0, init_std / sqrt(2 L))
    unless ``output_layer_init`` names another rule ("normal": plain init_std, "zeros");
  * biases 0, LayerNorm weight 1.

Each parameter draws from its own generator seeded by (seed, parameter name), so the values do not
depend on the order of construction, on which pipeline stage owns a layer, or on how a tensor is
sharded: every layout starts from the same weights as one process.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from mtnlg.config import ModelConfig
from mtnlg.model.transformer import GPT

OUTPUT_LAYERS = ("attn.proj.weight", "mlp.fc2.weight")


def build_model(cfg: ModelConfig, device: str | torch.device = "meta") -> GPT:
    """Construct :class:`GPT` on ``device`` (default meta: no memory) without initialising it."""
    cfg.validate()
    with torch.device(device):
        return GPT(cfg)


def param_std(name: str, cfg: ModelConfig) -> float | None:
    """Standard deviation of the normal init for parameter ``name``; None for constant inits."""
    if name.endswith(OUTPUT_LAYERS):
        rule = cfg.output_layer_init or "scaled_normal"
        if rule == "zeros":
            return 0.0
        if rule == "scaled_normal":
            return cfg.init_std / math.sqrt(2.0 * cfg.num_layers)
        return cfg.init_std
    return cfg.init_std


def init_value(name: str, shape: torch.Size, cfg: ModelConfig, seed: int) -> torch.Tensor:
    """The full fp32 initial value of parameter ``name`` (on CPU), independent of any layout."""
    leaf = name.rsplit(".", 1)[-1]
    is_norm = ".ln_" in f".{name}" or name.startswith("norm.")
    if leaf == "bias":
        return torch.zeros(shape)
    if is_norm:
        return torch.ones(shape)
    std = param_std(name, cfg)
    if not std:
        return torch.zeros(shape)
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    return torch.empty(shape).normal_(0.0, std, generator=gen)


def named_inits(model: nn.Module, cfg: ModelConfig, seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    for name, p in model.named_parameters():
        yield name, init_value(name, p.shape, cfg, seed)


def _canonical(model: nn.Module, name: str) -> str:
    """The head's weight is the embedding's (tied): a pipeline stage's own copy of it
    (``output.weight`` without an embedding next to it) starts from the embedding's value."""
    return "tok_embeddings.weight" if name == "output.weight" else name


@torch.no_grad()
def init_weights(model: GPT, seed: int = 0, cfg: ModelConfig | None = None, vocab_rows: int | None = None,
                 assign: Callable[[torch.Tensor, torch.Tensor], None] | None = None) -> GPT:
    """Fill every parameter of an already-allocated model with its deterministic initial value.

    ``cfg`` (default ``model.cfg``) names the init rules; ``vocab_rows`` (default: all) is the
    layout-independent padded vocabulary whose embedding rows are drawn, extra rows (padding for
    tensor parallelism) start at zero; ``assign(param, full_value)`` writes a value into a sharded
    parameter (default ``param.copy_``), so parallel code can hand in its local slice.
    """
    cfg = cfg or model.cfg
    for name, p in model.named_parameters():
        name = _canonical(model, name)
        shape = torch.Size(p.shape)
        if name == "tok_embeddings.weight" and vocab_rows is not None and shape[0] != vocab_rows:
            value = torch.zeros(shape)
            value[:vocab_rows] = init_value(name, torch.Size((vocab_rows, shape[1])), cfg, seed)
        else:
            value = init_value(name, shape, cfg, seed)
        if assign is not None:
            assign(p, value)
        else:
            p.copy_(value.to(p.dtype))
    return model


@torch.no_grad()
def materialize(model: GPT, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                seed: int = 0, init: bool = True, cfg: ModelConfig | None = None, vocab_rows: int | None = None,
                assign: Callable[[torch.Tensor, torch.Tensor], None] | None = None) -> GPT:
    """Allocate a meta model's (or a pipeline stage's, possibly sharded) storage on ``device`` in
    ``dtype`` and (optionally) initialise it; see :func:`init_weights` for the keywords."""
    model.to_empty(device=device)
    if dtype != torch.float32:
        model.to(dtype)
    model.tie_weights()
    if init:
        init_weights(model, seed, cfg=cfg, vocab_rows=vocab_rows, assign=assign)
    return model
