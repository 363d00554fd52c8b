"""Shared fixtures: tiny configs and models that run in milliseconds on CPU."""

from __future__ import annotations

import os

import pytest
import torch

# Tests share 2 cores; subprocess ranks inherit this too.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

from mtnlg.config import ModelConfig  # noqa: E402
from mtnlg.model.init import build_model, materialize  # noqa: E402


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    return ModelConfig(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, ffn_hidden_size=64, max_seq_len=64)


@pytest.fixture
def tiny_model(tiny_cfg):
    return materialize(build_model(tiny_cfg), seed=0).eval()
