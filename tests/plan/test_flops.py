"""Eq. 2 and eq. 3 (Narayanan et al. 2021) on hand-computed cases, and against FLOPs counted by torch."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mtnlg.config import ModelConfig
from mtnlg.model import build_model, count_parameters, materialize
from mtnlg.plan.flops import flops_per_iteration, params_eq2, params_exact
from mtnlg.plan.presets import PRESETS


def test_eq2_hand_computed():
    # l=2, h=4, V=10, s=8: 12·2·16 = 384; 384·13/48 = 104; 384·18/96 = 72 -> 560.
    assert params_eq2(2, 4, 10, 8) == pytest.approx(560)
    # l=1, h=2, V=4, s=2: 48·(1 + 13/24 + 6/24) = 48 + 26 + 12 = 86.
    assert params_eq2(1, 2, 4, 2) == pytest.approx(86)


def test_eq2_is_the_exact_count_less_the_final_layernorm():
    cfg = ModelConfig(vocab_size=10, hidden_size=4, num_layers=2, num_heads=2, ffn_hidden_size=16, max_seq_len=8)
    assert count_parameters(cfg) == 568  # 560 + the final LayerNorm's 2h
    assert params_exact(cfg) == count_parameters(cfg) == params_eq2(2, 4, 10, 8) + 2 * 4
    model = materialize(build_model(cfg))
    assert sum(p.numel() for p in model.parameters()) == 568


def test_eq3_hand_computed():
    # B=1, s=2, l=1, h=6, V=48: a layer's forward is 24·B·s·h² + 4·B·s²·h = 1728 + 96 = 1824 FLOPs,
    # the logit layer's forward + backward 6·B·s·h·V = 3456.
    assert flops_per_iteration(1, 2, 1, 6, 48, "full") == pytest.approx(4 * 1824 + 3456)  # = 10752, factor 96
    assert flops_per_iteration(1, 2, 1, 6, 48, "none") == pytest.approx(3 * 1824 + 3456)  # = 8928, factor 72
    assert flops_per_iteration(1, 2, 1, 6, 48, "selective") == pytest.approx(3 * 1824 + 96 + 3456)
    assert flops_per_iteration(1, 2, 1, 6, 48, "full") == pytest.approx(10752)


def test_eq3_equals_flops_counted_by_torch():
    """Forward + backward of our GPT (4h FFN, math attention) costs exactly eq. 3's no-recompute form,
    and full recomputation adds exactly one forward pass of the layers."""
    cfg = ModelConfig(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, ffn_hidden_size=256, max_seq_len=32)
    model = materialize(build_model(cfg), seed=0)
    B, s = 3, 32
    tokens = torch.randint(0, 256, (B, s))
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):
        model(tokens).sum().backward()
    assert counter.get_total_flops() == flops_per_iteration(B, s, 2, 64, 256, "none")
    layers = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        h = model.embed(tokens)
        with layers:
            for layer in model.layers.values():
                h = layer(h)
    assert counter.get_total_flops() + layers.get_total_flops() == flops_per_iteration(B, s, 2, 64, 256, "full")


def test_presets_pad_the_vocabulary_as_megatron():
    cfg = PRESETS["mtnlg-530b"].cfg
    assert cfg.padded_vocab_size(1) == 50304 and cfg.padded_vocab_size(8) == 51200
    # Narayanan et al. 2021 Table 1 lists this architecture as 529.6B parameters.
    assert params_exact(cfg, tp=8) == pytest.approx(529.6e9, rel=1e-3)
    assert params_eq2(105, 20480, 51200, 2048) == pytest.approx(529.6e9, rel=1e-3)
    assert params_exact(PRESETS["gpt3-175b"].cfg, tp=8) == pytest.approx(174.6e9, rel=1e-3)
    assert params_exact(PRESETS["megatron-1t"].cfg, tp=8) == pytest.approx(1008.0e9, rel=1e-3)
