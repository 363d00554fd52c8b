"""Integrity: saved weights are verified against their checksums on load (one line naming the file);
a non-finite model is never saved; ``convert --output`` never deletes anything; config mistakes are
one-line ConfigErrors."""

from __future__ import annotations

import math
import os
import stat

import pytest
import torch

from mtnlg import checkpoint as ckpt
from mtnlg.api import MegatronLmModel, MegatronModelConfig
from mtnlg.cli import main
from mtnlg.config import Config
from mtnlg.errors import CheckpointError, ConfigError

from .helpers import tiny_cfg, trained

TINY = dict(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=32)


def _flip(path, at: float = 0.75):
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x01  # inside the tensor data: safetensors itself would not notice
    path.write_bytes(bytes(data))


def test_bit_flip_in_saved_weights_is_named(tmp_path, capsys):
    m = MegatronLmModel(MegatronModelConfig(**TINY)).materialize(seed=1)
    out = m.save_pretrained(tmp_path / "m")
    _flip(out / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model.safetensors is corrupt: its sha256 does not match"):
        MegatronLmModel.from_pretrained(out)
    # exported Hugging Face weights carry a manifest too, checked when mtnlg imports them
    m.save_pretrained(tmp_path / "m2")
    assert main(["convert", "--to", "hf", "--checkpoint", str(tmp_path / "m2"), "--output", str(tmp_path / "hf")]) == 0
    _flip(tmp_path / "hf" / "model.safetensors")
    capsys.readouterr()
    rc = main(["convert", "--from", "hf", "--input", str(tmp_path / "hf"), "--output", str(tmp_path / "back")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "model.safetensors is corrupt" in err
    assert not (tmp_path / "back").exists()


def test_non_finite_weights_are_never_saved(tmp_path):
    cfg = tiny_cfg()
    model, opt = trained(cfg)
    with torch.no_grad():
        model.layers["1"].mlp.fc1.weight[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match=r"not finite \(layers.1.mlp.fc1.weight on rank 0\); not saving"):
        ckpt.save_checkpoint(tmp_path, 3, [model], [opt], {"step": 3}, keep=2)
    assert list(tmp_path.iterdir()) == []  # no step dir, no temp dir
    model, opt = trained(cfg)
    next(v for v in opt.state.values() if "exp_avg_sq" in v)["exp_avg_sq"].fill_(math.inf)
    with pytest.raises(CheckpointError, match="not finite"):
        ckpt.save_checkpoint(tmp_path, 3, [model], [opt], {"step": 3}, keep=2)
    assert list(tmp_path.iterdir()) == []
    model, opt = trained(cfg)
    next(v for v in opt.state.values() if "momentum_buffer" in v)["momentum_buffer"].fill_(math.nan)  # Muon's
    with pytest.raises(CheckpointError, match="not finite"):
        ckpt.save_checkpoint(tmp_path, 3, [model], [opt], {"step": 3}, keep=2)
    assert list(tmp_path.iterdir()) == []


def test_checkpoints_are_readable_like_any_download(tmp_path):
    """A checkpoint is built in a 0700 temp dir; renamed into place it is 0755 / 0644 (less the umask)."""
    model, opt = trained(tiny_cfg())
    final = ckpt.save_checkpoint(tmp_path, 3, [model], [opt], {"step": 3}, keep=2)
    umask = os.umask(0)
    os.umask(umask)
    modes = {p: stat.S_IMODE(p.stat().st_mode) for p in [final, *final.rglob("*")]}
    assert final / ".metadata" in modes and len(modes) > 3
    assert all(m == (0o755 if p.is_dir() else 0o644) & ~umask for p, m in modes.items()), modes


def test_convert_output_never_deletes(tmp_path, capsys):
    m = MegatronLmModel(MegatronModelConfig(**TINY)).materialize(seed=1)
    src = m.save_pretrained(tmp_path / "m")
    keep = tmp_path / "busy"
    keep.mkdir()
    (keep / "precious.txt").write_text("mine")
    for output, extra, why in [(keep, [], "not empty"), (src, ["--force"], "overlaps the input"),
                               (tmp_path, ["--force"], "overlaps the input"), (src / "sub", ["--force"], "overlaps")]:
        capsys.readouterr()
        rc = main(["convert", "--to", "hf", "--checkpoint", str(src), "--output", str(output), *extra])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and "\n" not in err and why in err, (output, err)
    assert (keep / "precious.txt").read_text() == "mine" and (src / "model.safetensors").is_file()
    (tmp_path / "file").write_text("x")
    assert main(["convert", "--to", "hf", "--checkpoint", str(src), "--output", str(tmp_path / "file")]) == 2
    (tmp_path / "empty").mkdir()
    assert main(["convert", "--to", "hf", "--checkpoint", str(src), "--output", str(tmp_path / "empty")]) == 0
    assert main(["convert", "--to", "hf", "--checkpoint", str(src), "--output", str(keep), "--force"]) == 0
    assert (keep / "config.json").is_file() and not (keep / "precious.txt").exists()
    MegatronLmModel.from_pretrained(src)  # the input is intact


@pytest.mark.parametrize("override,field", [("train.beta1=2", "train.beta1"), ("train.weight_decay=.nan",
                                                                              "train.weight_decay"),
                                            ("train.lr=1e999", "train.lr"), ("train.beta2=-0.1", "train.beta2"),
                                            ("train.eps=0", "train.eps"), ("train.grad_clip=-1", "train.grad_clip")])
def test_bad_optimizer_values_are_one_line_config_errors(override, field, capsys):
    with pytest.raises(ConfigError, match=field):
        Config.load(None, [override])
    assert main(["train", f"--{override}", "--train.steps=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and field in err


def test_non_utf8_yaml_is_a_config_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"train:\n  steps: 3  # caf\xe9\n")
    with pytest.raises(ConfigError, match="not UTF-8 text.*0xe9"):
        Config.load(bad)
    assert main(["train", "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "UTF-8" in err


def test_diverged_run_exits_non_zero_and_saves_nothing(tmp_path, capsys):
    """lr=1e20 is finite (accepted) but diverges: the loss turns NaN, the run stops with one line and
    exit 2, and no checkpoint is written."""
    from pathlib import Path

    tiny = Path(__file__).resolve().parents[2] / "examples" / "tiny.yaml"
    rc = main(["train", "--config", str(tiny), "--output", str(tmp_path / "run"), "--no-progress",
               "--log.peak_tflops=1.0", "--train.lr=1e20", "--train.warmup_steps=0", "--train.steps=3"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and "non-finite loss" in err and "not saving" in err
    assert not ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")


def test_cli_reports_os_and_dcp_errors_on_one_line(tmp_path, capsys, monkeypatch):
    from torch.distributed.checkpoint.api import CheckpointException

    from mtnlg.commands import config as config_cmd

    (tmp_path / "file").write_text("x")
    rc = main(["train", "--output", str(tmp_path / "file"), "--train.steps=1"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "file" in err

    def boom(_args):
        raise CheckpointException("save failed", {0: (OSError(28, "No space left on device"), None)})

    monkeypatch.setattr(config_cmd, "run", boom)
    assert main(["config"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "checkpoint I/O failed (OSError: [Errno 28] No space left on device)" in err
