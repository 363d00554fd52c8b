"""The planner against published runs, with the shipped A100 profile and nothing fitted to them.

The time model (:mod:`mtnlg.plan.timemodel`) prices each part with the shipped ``a100-80gb`` profile,
whose numbers come from data sheets and published matmul tables (their sources are in the JSON), never
from these runs. The trends the papers show must hold (larger models reach more TFLOP/s per GPU;
MT-NLG loses TFLOP/s per GPU as the GPU count grows). The +-10% goal is not met today: the model
predicts 6-30% more TFLOP/s than Table 1 and ~50-60% more than the MT-NLG runs; that test is an
``xfail(strict=True)`` that records the miss and turns red the day it passes, so it cannot go stale.

* Smith et al. 2022, "Using DeepSpeed and Megatron to Train Megatron-Turing NLG 530B"
  (arXiv:2201.11990), Table 1: 530B, 8-way TP x 35-way PP, global batch 1920, sequence 2048 on A100
  80GB: 280 nodes (2240 GPUs) 60.1 s/iteration, 126 TFLOP/s per GPU; 420 nodes (3360 GPUs) 44.4 s, 113.
* Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters Using
  Megatron-LM" (arXiv:2104.04473), Table 1 (vocabulary 51200, sequence 2048, A100 80GB), e.g. 76.1B
  (80 heads, hidden 10240, 60 layers) at TP 8 x PP 4 on 1024 GPUs, batch 1792: 140 TFLOP/s per GPU
  (45% of peak); 1008B (160 heads, 25600, 128 layers) at TP 8 x PP 64 on 3072 GPUs: 163 TFLOP/s (52%).
  The table does not give the micro-batch size; we plan with 1.
"""

from __future__ import annotations

import pytest

from mtnlg.plan import Layout, get_gpu, plan
from mtnlg.plan.presets import PRESETS, _preset

A100 = get_gpu("a100-80gb")


MTNLG = [(2240, 60.1, 126), (3360, 44.4, 113)]


def _mtnlg(gpus: int, seconds: float | None = None):
    return plan(PRESETS["mtnlg-530b"], Layout(gpus, tp=8, pp=35, global_batch=1920, micro_batch=1), A100,
                iteration_time=seconds)


@pytest.mark.parametrize("gpus,seconds,tflops", MTNLG)
def test_mtnlg_530b_arithmetic(gpus, seconds, tflops):
    p = _mtnlg(gpus, seconds)
    assert p.tflops_per_gpu == pytest.approx(tflops, rel=0.02)  # eq. 3 reproduces the paper's own arithmetic
    assert p.fits and p.profile_name == "a100-80gb"


def test_mtnlg_530b_loses_tflops_as_gpus_grow():
    """Published: 126 (2240 GPUs) > 113 (3360); the model must fall too, through 2800 GPUs."""
    tf = [_mtnlg(g).est_tflops_per_gpu for g in (2240, 2800, 3360)]
    assert tf[0] > tf[1] > tf[2]
    # the cause is the fixed pipeline bubble: fewer microbatches per pipeline as dp grows
    b = [_mtnlg(g).time_breakdown["bubble"] / _mtnlg(g).est_iteration_time_s for g in (2240, 2800, 3360)]
    assert b[0] < b[1] < b[2]


TABLE_1 = [  # billions of parameters, heads, hidden, layers, tp, pp, GPUs, batch, TFLOP/s per GPU
    (1.7, 24, 2304, 24, 1, 1, 32, 512, 137),
    (3.6, 32, 3072, 30, 2, 1, 64, 512, 138),
    (7.5, 32, 4096, 36, 4, 1, 128, 512, 142),
    (18.4, 48, 6144, 40, 8, 1, 256, 1024, 135),
    (39.1, 64, 8192, 48, 8, 2, 512, 1536, 138),
    (76.1, 80, 10240, 60, 8, 4, 1024, 1792, 140),
    (145.6, 96, 12288, 80, 8, 8, 1536, 2304, 148),
    (310.1, 128, 16384, 96, 8, 16, 1920, 2160, 155),
    (529.6, 128, 20480, 105, 8, 35, 2520, 2520, 163),
    (1008.0, 160, 25600, 128, 8, 64, 3072, 3072, 163),
]


def _table_1(row):
    billions, heads, hidden, layers, tp, pp, gpus, batch, _ = row
    model = _preset(f"{billions}b", layers, hidden, heads, 51200, 2048)
    return plan(model, Layout(gpus, tp=tp, pp=pp, global_batch=batch, micro_batch=1), A100)


@pytest.mark.parametrize("billions,heads,hidden,layers,tp,pp,gpus,batch,tflops", TABLE_1)
def test_narayanan_table_1_arithmetic(billions, heads, hidden, layers, tp, pp, gpus, batch, tflops):
    p = _table_1((billions, heads, hidden, layers, tp, pp, gpus, batch, tflops))
    assert p.params_eq2 == pytest.approx(billions * 1e9, rel=0.03)  # the table rounds 1.65B to 1.7
    assert p.fits


def test_narayanan_table_1_larger_models_reach_more():
    """Published: 137-142 TFLOP/s for 1.7-7.5B, 148-163 for 145.6B-1T; the model must rank them alike."""
    tf = [_table_1(row).est_tflops_per_gpu for row in TABLE_1]
    small, large = tf[:3], tf[6:]
    assert max(small) < min(large)
    assert tf[-1] == max(tf)


@pytest.mark.xfail(strict=True, reason="measured miss, not tuned away: predicted TFLOP/s per GPU are 6-30% above "
                                       "Table 1 and ~50-60% above the MT-NLG runs (see the module docstring)")
def test_published_tflops_within_10_percent():
    pred = [(_table_1(row).est_tflops_per_gpu, row[-1]) for row in TABLE_1]
    pred += [(_mtnlg(g).est_tflops_per_gpu, tf) for g, _, tf in MTNLG]
    assert all(abs(p / t - 1) <= 0.10 for p, t in pred), [round(p / t - 1, 3) for p, t in pred]
