"""Each memory term: model states by ZeRO stage, Korthikanti activations, in-flight microbatches."""

from __future__ import annotations

import pytest

from mtnlg.config import ModelConfig
from mtnlg.model import count_parameters
from mtnlg.plan import Layout, get_gpu, plan
from mtnlg.plan.memory import (activation_bytes_per_layer, estimate_memory, in_flight_microbatches,
                               model_state_bytes, params_per_gpu)
from mtnlg.plan.presets import PRESETS

S, B, H, A = 8, 2, 16, 4  # sbh = 256; 5·a·s/h = 10


def test_activations_without_recompute():
    assert activation_bytes_per_layer(S, B, H, A, tp=1, recompute="none") == 256 * (34 + 10)
    # TP without SP: sbh(10 + 24/t + 5as/(ht)) at t=2 -> 256·(10 + 12 + 5)
    assert activation_bytes_per_layer(S, B, H, A, tp=2, recompute="none", sp=False) == 256 * 27
    # TP + SP: sbh(34 + 5as/h)/t
    assert activation_bytes_per_layer(S, B, H, A, tp=2, recompute="none", sp=True) == 256 * 44 / 2


def test_activations_selective_and_full_recompute():
    assert activation_bytes_per_layer(S, B, H, A, tp=4, recompute="selective", sp=True) == 34 * 256 / 4
    assert activation_bytes_per_layer(S, B, H, A, tp=4, recompute="selective", sp=False) == 256 * (10 + 6)
    assert activation_bytes_per_layer(S, B, H, A, tp=1, recompute="full") == 2 * 256
    assert activation_bytes_per_layer(S, B, H, A, tp=4, recompute="full", sp=True) == 2 * 256 / 4
    assert activation_bytes_per_layer(S, B, H, A, tp=4, recompute="full", sp=False) == 2 * 256
    # fp32 activations double the 16-bit constants
    assert activation_bytes_per_layer(S, B, H, A, recompute="full", dtype_bytes=4) == 4 * 256


def test_in_flight_microbatches_by_schedule():
    assert in_flight_microbatches("1f1b", 1, 64) == 1
    assert in_flight_microbatches("gpipe", 4, 16) == 16
    assert in_flight_microbatches("1f1b", 4, 16) == 4
    assert in_flight_microbatches("zb", 4, 16) == 4
    assert in_flight_microbatches("interleaved", 4, 16, vpp=2) == pytest.approx(4 * (1 + 3 / 8))


def test_model_states_by_zero_stage():
    P, dp = 1000, 4
    assert model_state_bytes(P, dp, 0) == {"weights": 2000, "gradients": 2000, "optimizer": 12000}
    assert model_state_bytes(P, dp, 1) == {"weights": 2000, "gradients": 2000, "optimizer": 3000}
    assert model_state_bytes(P, dp, 2) == {"weights": 2000, "gradients": 500, "optimizer": 3000}
    assert model_state_bytes(P, dp, 3) == {"weights": 500, "gradients": 500, "optimizer": 3000}
    assert model_state_bytes(P, 1, 3, mixed_precision=False) == {"weights": 4000, "gradients": 4000,
                                                                 "optimizer": 8000}


def test_params_per_gpu():
    cfg = ModelConfig(vocab_size=100, hidden_size=16, num_layers=4, num_heads=4, ffn_hidden_size=64, max_seq_len=8,
                      make_vocab_size_divisible_by=8)
    assert params_per_gpu(cfg, 1, 1) == count_parameters(cfg)
    h, f = 16, 64
    sharded = 3 * h * h + 3 * h + h * h + h * f + f + f * h
    # tp=2, pp=2: 2 layers with sharded weights halved, replicated LayerNorms/biases, the first-stage embeddings
    assert params_per_gpu(cfg, 2, 2) == 2 * (sharded / 2 + 6 * h) + cfg.padded_vocab_size(2) * h / 2 + 8 * h


def test_estimate_memory_sums_its_terms():
    cfg = PRESETS["gpt3-175b"].cfg
    mem = estimate_memory(cfg, 2048, 1, tp=8, pp=8, dp=16, microbatches=96, schedule="1f1b", recompute="full",
                          zero=1)
    per_layer = activation_bytes_per_layer(2048, 1, 12288, 96, 8, "full", True)
    assert mem.activations == per_layer * 12 * 8  # 96/8 layers x p=8 microbatches in flight
    assert mem.recompute_working_set == activation_bytes_per_layer(2048, 1, 12288, 96, 8, "none", True)
    assert mem.logits == 0  # the first stage is not the last
    assert mem.total == pytest.approx(sum(mem.as_dict().values()))
    one_stage = estimate_memory(cfg, 2048, 1, tp=8, pp=1, dp=128, microbatches=12)
    assert one_stage.logits == 4 * 2048 * cfg.padded_vocab_size(8) / 8


@pytest.mark.parametrize("zero", [0, 1])
def test_530b_on_one_80gb_gpu_per_replica_does_not_fit(zero):
    p = plan(PRESETS["mtnlg-530b"], Layout(gpus=8, tp=1, pp=1, global_batch=8, zero=zero), get_gpu("a100-80gb"))
    assert not p.fits
    assert p.memory.weights == pytest.approx(2 * p.params)  # 1 TB of bf16 weights alone
    # ... while MT-NLG's own layout (8-way TP, 35-way PP) fits.
    ok = plan(PRESETS["mtnlg-530b"], Layout(gpus=2240, tp=8, pp=35, global_batch=1920, zero=zero),
              get_gpu("a100-80gb"))
    assert ok.fits


@pytest.mark.parametrize("seq,hidden,heads", [(64, 128, 4), (256, 256, 4)])
def test_korthikanti_matches_what_autograd_saves(seq, hidden, heads):
    """The no-recompute formula vs the bytes autograd keeps for one of our Blocks (fp32 activations,
    dropout on as in the paper's accounting, math attention that keeps the softmax): within 15%."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from mtnlg.model import build_model, materialize

    cfg = ModelConfig(vocab_size=64, hidden_size=hidden, num_layers=1, num_heads=heads, ffn_hidden_size=4 * hidden,
                      max_seq_len=seq, dropout=0.1, attention_dropout=0.1)
    block = materialize(build_model(cfg), seed=0).train().layers["0"]
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x = torch.randn(2, seq, hidden, requires_grad=True)
    with sdpa_kernel(SDPBackend.MATH), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x)
    predicted = activation_bytes_per_layer(seq, 2, hidden, heads, recompute="none", dtype_bytes=4)
    assert sum(saved.values()) == pytest.approx(predicted, rel=0.15)
