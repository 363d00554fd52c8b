"""A tiny trained model with its optimizer, saved as a run (checkpoint + config + tokenizer)."""

from __future__ import annotations

from pathlib import Path

import torch

from mtnlg import checkpoint as ckpt
from mtnlg.config import Config, ModelConfig, TrainConfig
from mtnlg.data.tokenizer import byte_tokenizer
from mtnlg.model.init import build_model, materialize
from mtnlg.train.optim import build_optimizer


def tiny_cfg() -> Config:
    cfg = Config()
    cfg.model = ModelConfig(vocab_size=byte_tokenizer().vocab_size, hidden_size=32, num_layers=2, num_heads=4,
                            ffn_hidden_size=64, max_seq_len=64)
    cfg.train.seq_len = 32
    return cfg


def trained(cfg: Config, steps: int = 1, seed: int = 0):
    model = materialize(build_model(cfg.model), seed=seed)
    opt = build_optimizer([model], TrainConfig(lr=1e-2))
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        model(torch.randint(0, cfg.model.vocab_size, (2, 8), generator=g)).logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def save_run(run: Path, step: int, cfg: Config | None = None, keep: int = 5, seed: int = 0):
    """Save ``RUN/checkpoints/step_N`` (with config.yaml and tokenizer/) and return it with the model."""
    cfg = cfg or tiny_cfg()
    model, opt = trained(cfg, 1, seed)
    tok_dir = run / "tokenizer"
    if not tok_dir.is_dir():
        byte_tokenizer().save(tok_dir)
        cfg.save(run / "config.yaml")
    path = ckpt.save_checkpoint(run / "checkpoints", step, [model], [opt], {"step": step}, keep=keep, config=cfg,
                                tokenizer_dir=tok_dir)
    return path, model, opt


class Evil:
    """Unpickling this runs code: it creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))
