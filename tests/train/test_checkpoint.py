"""DCP checkpoints on one process: round trip, manifest verification, corruption, fallback, keep, inference load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mtnlg.config import CheckpointConfig, Config, ModelConfig, TrainConfig
from mtnlg.errors import CheckpointError
from mtnlg.model.init import build_model, materialize
from mtnlg import checkpoint as ckpt
from mtnlg.train.optim import build_optimizer

CFG = ModelConfig(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, ffn_hidden_size=64, max_seq_len=64)


def _trained(steps: int):
    model = materialize(build_model(CFG), seed=0)
    opt = build_optimizer([model], TrainConfig(lr=1e-2))
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        model(torch.randint(0, 97, (2, 8), generator=g)).logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _save(root: Path, step: int, keep: int = 3):
    model, opt = _trained(step)
    return ckpt.save_checkpoint(root, step, [model], [opt], {"step": step}, keep=keep), model, opt


def test_round_trip_is_exact(tmp_path):
    path, model, opt = _save(tmp_path, 2)
    assert path.name == "step_00000002" and (path / "manifest.json").is_file()
    assert not list(tmp_path.glob(".*"))  # no temporary directory left
    m2 = materialize(build_model(CFG), seed=1)
    o2 = build_optimizer([m2], TrainConfig(lr=1e-2))
    state = ckpt.load_checkpoint(path, [m2], [o2])
    assert state["step"] == 2 and state["world_size"] == 1
    for (k, a), b in zip(model.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), k
    s1, s2 = opt.state_dict()["state"], o2.state_dict()["state"]
    assert {k for v in s1.values() for k in v} == {"momentum_buffer", "exp_avg", "exp_avg_sq", "step"}  # Muon + AdamW
    for i in s1:
        assert s1[i].keys() == s2[i].keys()
        for key in s1[i]:
            assert torch.equal(s1[i][key], s2[i][key])


def test_resume_with_the_other_optimizer_is_one_line(tmp_path):
    path, _, _ = _save(tmp_path, 2)  # Muon (the default)
    m2 = materialize(build_model(CFG), seed=1)
    with pytest.raises(CheckpointError, match=r"trained with train.optimizer=muon but this run uses adamw; resume "
                                              r"with --train.optimizer=muon"):
        ckpt.load_checkpoint(path, [m2], [build_optimizer([m2], TrainConfig(lr=1e-2, optimizer="adamw"))])


def test_keep_and_auto_resume(tmp_path):
    for step in (1, 2, 3):
        _save(tmp_path, step, keep=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [3, 2]
    assert ckpt.resolve_resume(CheckpointConfig(resume="auto"), tmp_path).name == "step_00000003"
    assert ckpt.resolve_resume(CheckpointConfig(resume="none"), tmp_path) is None
    assert ckpt.resolve_resume(CheckpointConfig(resume="auto"), tmp_path / "empty") is None


def test_corruption_is_detected_and_fallback_only_when_asked(tmp_path):
    for step in (1, 2):
        _save(tmp_path, step)
    newest = tmp_path / "step_00000002"
    shard = next(newest.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # flip one byte
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=shard.name):
        ckpt.verify_checkpoint(newest)
    with pytest.raises(CheckpointError, match="fallback"):
        ckpt.resolve_resume(CheckpointConfig(resume="auto"), tmp_path)
    assert ckpt.resolve_resume(CheckpointConfig(resume="auto", fallback=True), tmp_path).name == "step_00000001"
    # Truncation and a missing manifest are named too.
    shard.write_bytes(bytes(data[:10]))
    with pytest.raises(CheckpointError, match="truncated"):
        ckpt.verify_checkpoint(newest)
    (tmp_path / "step_00000001" / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="manifest.json is missing"):
        ckpt.verify_checkpoint(tmp_path / "step_00000001")
    with pytest.raises(CheckpointError):
        ckpt.resolve_resume(CheckpointConfig(resume=str(newest)), tmp_path)


def test_load_for_inference_and_from_pretrained(tmp_path):
    from mtnlg.api import MegatronLmModel
    from mtnlg.data.tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    cfg = Config()
    cfg.model = ModelConfig(**{**CFG.__dict__, "vocab_size": tok.vocab_size})
    cfg.train.seq_len = 32
    model = materialize(build_model(cfg.model), seed=3)
    opt = build_optimizer([model], TrainConfig())
    tok.save(tmp_path / "tokenizer")
    root = tmp_path / "checkpoints"
    path = ckpt.save_checkpoint(root, 5, [model], [opt], {"step": 5}, keep=1, config=cfg,
                                tokenizer_dir=tmp_path / "tokenizer")
    assert (path / "config.yaml").is_file() and (path / "tokenizer" / "tokenizer.json").is_file()
    assert "tokenizer/tokenizer.json" in json.loads((path / "manifest.json").read_text())["files"]
    mcfg, state, tok2 = ckpt.load_for_inference(path)
    assert mcfg.hidden_size == 32 and tok2.vocab_size == tok.vocab_size
    for k, v in model.state_dict().items():
        assert torch.equal(state[k], v), k
    x = torch.tensor([[1, 2, 3, 4]])
    for where in (tmp_path, root, path):  # a RUN dir, its checkpoints/ dir, one checkpoint
        loaded = MegatronLmModel.from_pretrained(where)
        torch.testing.assert_close(loaded(x), model(x)[..., : tok.vocab_size], rtol=0, atol=0)
