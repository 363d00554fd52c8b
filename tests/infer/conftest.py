"""Fixtures shared by the inference tests."""

from __future__ import annotations

import pytest

from mtnlg.config import ModelConfig
from mtnlg.data.tokenizer import byte_tokenizer
from mtnlg.model.init import build_model, materialize


@pytest.fixture(scope="module")
def byte_model():
    """A random byte-tokenizer model (2 x 32, context 96) and its tokenizer; a larger init std than
    training uses, so that its greedy output varies."""
    tok = byte_tokenizer()
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, num_layers=2, num_heads=4, ffn_hidden_size=64,
                      max_seq_len=96, init_std=0.3)
    return materialize(build_model(cfg), seed=1).eval(), tok
