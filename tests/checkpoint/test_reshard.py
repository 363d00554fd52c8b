"""Checkpoints move between layouts: a run saved under TP2, FSDP2, PP2 or TP2xPP2 (gloo, CPU) with a
vocabulary that needs padding (97 rows -> 98 under TP2) resumes under every other layout, and under one
process, and continues the one-process loss curve within 1e-5 relative, data position included (the
real :class:`~mtnlg.data.datasets.BatchSampler` state travels in the trainer state). FSDP2 x TP2 (4
ranks, 2-D DTensors) saves and resumes against TP2, PP2, TP2xPP2 and FSDP2 as well. DDP2
(``dp_replicate=2``: a 2-D replicate x 1-way-shard mesh) saves and resumes under TP2xPP2 and one
process, and resumes FSDP2 x TP2's checkpoint (three runs, not a full row and column).

fp32 on CPU: TP and FSDP change only the summation order, so 1e-5 relative holds (as in tests/parallel).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from mtnlg import checkpoint as ckpt
from mtnlg.config import Config
from mtnlg.data.datasets import BatchSampler
from mtnlg.errors import CheckpointError
from tests.parallel.harness import max_rel, spawn

VOCAB, SEQ, GLOBAL, MICRO, SAMPLES = 97, 8, 4, 1, 10
SAVE_AT, STEPS = 2, 4
RTOL = 1e-5
LAYOUTS = {"tp2": {"tp": 2}, "fsdp2": {}, "pp2": {"pp": 2}, "tp2pp2": {"tp": 2, "pp": 2},
           "tp2fsdp2": {"tp": 2, "dp_shard": 2}, "ddp2": {"dp_replicate": 2, "dp_shard": 1}}
WORLD = {"tp2": 2, "fsdp2": 2, "pp2": 2, "tp2pp2": 4, "tp2fsdp2": 4, "ddp2": 2, "one": 1}


def config(layout: str) -> Config:
    cfg = Config()
    m = cfg.model
    m.vocab_size, m.hidden_size, m.num_layers, m.num_heads, m.ffn_hidden_size, m.max_seq_len = VOCAB, 16, 2, 2, 32, 16
    cfg.train.seq_len, cfg.train.seed, cfg.train.device = SEQ, 3, "cpu"
    for k, v in LAYOUTS.get(layout, {}).items():
        setattr(cfg.parallel, k, v)
    return cfg.validate()


def sample(i: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(500 + i)
    start, stride = torch.randint(0, VOCAB, (1,), generator=g), torch.randint(1, 4, (1,), generator=g)
    return (start + stride * torch.arange(SEQ + 1)) % VOCAB


class Run:
    """One layout's engine, optimizer and data sampler (what the trainer holds)."""

    def __init__(self, layout: str):
        from mtnlg.train.step import build_train_step as build_engine

        torch.manual_seed(0)
        self.cfg = config(layout)
        self.eng = build_engine(self.cfg, torch.device("cpu"))
        self.parts = list(self.eng.model_parts)
        self.opts = [torch.optim.AdamW(p.parameters(), lr=1e-2, weight_decay=0.1) for p in self.parts]
        self.sampler = BatchSampler(SAMPLES, seed=11, dp_rank=self.eng.dp_rank, dp_size=self.eng.dp_size)
        self.step = 0

    def train(self, until: int) -> list[float]:
        losses = []
        while self.step < until:
            tokens = torch.stack([sample(i) for i in self.sampler.next_batch(GLOBAL)])
            micro = [(t[:, :-1], t[:, 1:]) for t in tokens.split(MICRO)]
            out = self.eng.train_step(micro)
            self.eng.clip_grad_norm_(1.0)
            for o in self.opts:
                o.step()
                o.zero_grad(set_to_none=True)
            self.step += 1
            losses.append(out.loss)
        return losses

    def save(self, root: Path) -> Path:
        return ckpt.save_checkpoint(root, self.step, self.parts, self.opts,
                                    {"step": self.step, "sampler": self.sampler.state_dict()}, keep=1,
                                    config=self.cfg)

    def resume(self, path: Path) -> None:
        state = ckpt.load_checkpoint(path, self.parts, self.opts)
        self.step = int(state["step"])
        self.sampler.load_state_dict(state["sampler"])


def _save_and_resume(base: str, save: list[str], resume: list[tuple[str, str]]) -> dict:
    """On every rank: save the ``save`` layouts at SAVE_AT; resume each ``(saved, layout)`` pair."""
    out: dict = {}
    for layout in save:
        r = Run(layout)
        out[("trained", layout)] = r.train(SAVE_AT)
        r.save(Path(base) / layout)
    for saved, layout in resume:
        r = Run(layout)
        r.resume(ckpt.find_checkpoint(Path(base) / saved))
        out[(saved, layout)] = r.train(STEPS)
    return out if dist.get_rank() == 0 else {}


@pytest.mark.slow
def test_resharding_matrix(tmp_path):
    ref = Run("one").train(STEPS)
    two = ["tp2", "fsdp2", "pp2"]
    got: dict = {}
    got.update(spawn(2, _save_and_resume, str(tmp_path), [*two, "ddp2"], [])[0])
    four = [(s, "tp2pp2") for s in (*two, "ddp2")] + [(s, "tp2fsdp2") for s in ("tp2", "pp2", "tp2pp2")]
    got.update(spawn(4, _save_and_resume, str(tmp_path), ["tp2pp2", "tp2fsdp2"], four)[0])
    got.update(spawn(2, _save_and_resume, str(tmp_path), [],
                     [(s, lay) for lay in two for s in ("tp2", "fsdp2", "pp2", "tp2pp2") if s != lay]
                     + [("tp2fsdp2", "fsdp2"), ("tp2fsdp2", "ddp2")])[0])
    for saved in LAYOUTS:  # and each in one process without a process group
        r = Run("one")
        r.resume(ckpt.find_checkpoint(tmp_path / saved))
        got[(saved, "one")] = r.train(STEPS)
    # the padded vocabulary is stored unpadded
    md = ckpt.safe_read.read_metadata(ckpt.find_checkpoint(tmp_path / "tp2"))
    assert list(md.state_dict_metadata["model.tok_embeddings.weight"].size) == [VOCAB, 16]
    for layout in LAYOUTS:
        assert max_rel(got[("trained", layout)], ref[:SAVE_AT]) < RTOL, layout
    pairs = [k for k in got if k[0] != "trained"]
    assert len(pairs) == 24
    for saved, layout in pairs:
        assert max_rel(got[(saved, layout)], ref[SAVE_AT:]) < RTOL, (saved, layout, got[(saved, layout)], ref)


def test_changed_model_is_one_line_naming_the_field(tmp_path):
    r = Run("one")
    r.train(1)
    path = r.save(tmp_path)
    cfg = config("one")
    cfg.model.hidden_size = 32
    from mtnlg.train.step import build_train_step as build_engine

    eng = build_engine(cfg, torch.device("cpu"))
    opts = [torch.optim.AdamW(p.parameters()) for p in eng.model_parts]
    with pytest.raises(CheckpointError, match=r"model.hidden_size is 16 in the checkpoint but 32 in this run"):
        ckpt.load_checkpoint(path, eng.model_parts, opts)
    (path / "config.yaml").unlink()  # without the saved config, the tensor that differs is named
    with pytest.raises(CheckpointError, match=r"'tok_embeddings.weight' has shape \[97, 16\] in the checkpoint but "
                                              r"\[97, 32\]"):
        ckpt.load_checkpoint(path, eng.model_parts, opts)
    # a missing shard file (manifest rewritten so only DCP notices) is one line too
    r2 = Run("one")
    r2.train(1)
    p2 = r2.save(tmp_path / "b")
    next(p2.glob("*.distcp")).unlink()
    with pytest.raises(CheckpointError) as err:
        ckpt.load_checkpoint(p2, r2.parts, r2.opts)
    assert "\n" not in str(err.value) and "distcp" in str(err.value)
