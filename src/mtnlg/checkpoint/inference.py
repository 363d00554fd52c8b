"""Load a training checkpoint for inference: one process, no process group, any saved layout.

The caller builds the model once (on the device and dtype it wants) and :func:`load_weights` reads the
checkpoint's tensors straight into it; the vocabulary is re-padded to whatever the model uses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtnlg.checkpoint.resolve import Resolved, find_checkpoint, resolve_checkpoint
from mtnlg.checkpoint.safe_read import dcp_load, read_metadata
from mtnlg.checkpoint.sharded import _fit_template, _pad_back
from mtnlg.config import Config, ModelConfig
from mtnlg.errors import CheckpointError


def run_config(resolved: Resolved) -> Config:
    """The run configuration saved with a checkpoint (in it, else in its run directory)."""
    cfg_file = resolved.find("config.yaml")
    if cfg_file is None:
        raise CheckpointError(f"{resolved.path}: no config.yaml in the checkpoint or its run directory")
    return Config.load(cfg_file)


def run_tokenizer(resolved: Resolved) -> Any:
    from mtnlg.data.tokenizer import Tokenizer

    tok_dir = resolved.find("tokenizer", want_dir=True)
    if tok_dir is None:
        raise CheckpointError(f"{resolved.path}: no tokenizer/ in the checkpoint or its run directory")
    return Tokenizer.load(tok_dir)


def pretrained_tokenizer(path: str | Path | Resolved) -> Any:
    """The tokenizer of what ``MegatronLmModel.from_pretrained(path)`` loads (resolved the same way), without
    reading any weights: a saved model's own, or a training checkpoint's run tokenizer."""
    resolved = resolve_checkpoint(path)
    if resolved.kind == "checkpoint":
        return run_tokenizer(resolved)
    from mtnlg.data.tokenizer import Tokenizer

    return Tokenizer.load(resolved.path)


@torch.no_grad()
def load_weights(model: nn.Module, checkpoint: str | Path) -> None:
    """Read the model tensors of sharded ``checkpoint`` (verified already) into ``model``, a
    materialized :class:`~mtnlg.model.transformer.GPT` on any device and dtype."""
    path = Path(checkpoint)
    meta = {k.split(".", 1)[1]: v for k, v in read_metadata(path).state_dict_metadata.items()
            if k.startswith("model.")}
    tied = getattr(model, "output", None) is not None and getattr(model, "tok_embeddings", None) is not None \
        and model.output.weight is model.tok_embeddings.weight
    state = {k: v for k, v in model.state_dict().items() if not (tied and k == "output.weight")}
    vocab = getattr(model, "vocab_size", None)
    swapped = _fit_template(state, meta, vocab, path)
    dcp_load({"model": state}, path, no_dist=True)
    _pad_back(state, swapped, vocab or 0)
    params = dict(model.state_dict())
    for key in swapped:
        params[key].copy_(state[key])


def load_for_inference(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Any]:
    """A RUN dir, its ``checkpoints/`` dir or one checkpoint dir -> ``(ModelConfig, full fp32 CPU state
    dict, Tokenizer)``, whatever the layout the checkpoint was saved with."""
    from mtnlg.model.init import build_model, materialize

    resolved = Resolved("checkpoint", find_checkpoint(path))
    mcfg = run_config(resolved).model
    tokenizer = run_tokenizer(resolved)
    model = materialize(build_model(mcfg), init=False)
    load_weights(model, resolved.path)
    return mcfg, model.state_dict(), tokenizer
