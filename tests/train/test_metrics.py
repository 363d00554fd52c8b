"""FLOPs per token against Megatron's eq. 3, the cached peak, and the writers."""

from __future__ import annotations

import json

import pytest
import torch

from mtnlg.config import ModelConfig
from mtnlg.train import metrics


def test_flops_per_token_matches_megatron_eq3_when_ffn_is_4h():
    from mtnlg.plan.flops import flops_per_iteration

    cfg = ModelConfig(vocab_size=51200, hidden_size=1024, num_layers=24, num_heads=16, ffn_hidden_size=4096,
                      max_seq_len=2048)
    B, s = 8, 2048
    expected = flops_per_iteration(B, s, 24, 1024, 51200, recompute="none")  # 72 B s l h^2 (...)
    assert metrics.flops_per_token(cfg, s) * B * s == pytest.approx(expected, rel=1e-12)


def test_flops_per_token_uses_ffn_hidden_size():
    base = ModelConfig(hidden_size=64, ffn_hidden_size=256, num_layers=2, num_heads=4, vocab_size=100)
    wide = ModelConfig(hidden_size=64, ffn_hidden_size=512, num_layers=2, num_heads=4, vocab_size=100)
    # Each extra ffn unit costs 4h forward FLOPs per layer per token, times 3 for training.
    assert metrics.flops_per_token(wide, 32) - metrics.flops_per_token(base, 32) == 3 * 2 * 4 * 64 * 256


def test_peak_is_the_best_measurement_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("MTNLG_CACHE", str(tmp_path))
    dev = torch.device("cpu")
    assert metrics.peak_tflops(dev, torch.float32, given=12.5) == 12.5
    first = metrics.peak_tflops(dev, torch.float32)
    assert first > 0
    cached = json.loads((tmp_path / "matmul_peak.json").read_text())
    assert list(cached.values()) == [first]
    cached[next(iter(cached))] = 1e6  # a peak this CPU never reaches: kept, as the best seen
    (tmp_path / "matmul_peak.json").write_text(json.dumps(cached))
    assert metrics.peak_tflops(dev, torch.float32) == 1e6


def test_writer_jsonl_and_tensorboard(tmp_path):
    w = metrics.MetricsWriter(tmp_path)
    w.write({"step": 1, "split": "train", "loss": 2.5, "lr": 1e-3, "comm_bytes": {"all_reduce": 10}, "mfu": None})
    w.write({"step": 1, "split": "valid", "loss": float("nan")})
    w.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["split"] for x in lines] == ["train", "valid"]
    assert json.loads(lines[1])["loss"] is None  # NaN is not valid JSON
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
