"""The planner against published runs, with the shipped A100 profile and nothing fitted to them.

The time model (:mod:`mtnlg.plan.timemodel`) prices each part with the shipped ``a100-80gb`` profile,
whose numbers come from data sheets and published matmul tables (their sources are in the JSON), never
from these runs. Each run is planned with the layout its paper states; what a paper leaves out is
inferred and said so below. The trends the papers show must hold (larger models reach more TFLOP/s per
GPU; MT-NLG loses TFLOP/s per GPU as the GPU count grows). The +-10% goal is not met: the two
``xfail(strict=True)`` tests record the miss and turn red the day it passes, so they cannot go stale.

* Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters Using
  Megatron-LM" (arXiv:2104.04473), Table 1 (vocabulary 51200, sequence 2048, A100 80GB, fp16 mixed
  precision, full recomputation; eq. 3 counts its FLOPs). Sec. 5.1: "we use the interleaved pipeline
  schedule with the scatter/gather optimization enabled". Inferred: micro-batch 1 (Megatron's
  interleaved schedule needs the micro-batch count to be a multiple of pp, and with micro-batch 1 every
  row's is: 48/2, 56/4, 96/8, 144/16, 280/35, 512/64; at 2 the 310B row's 72 is not); no sequence
  parallelism and no distributed optimizer (both came to Megatron in 2022), so ZeRO-0; model chunks per
  rank not stated: we take the fewest that interleave (2, or 3 where the layers per stage are odd).
  Predicted - published: +11 +8 +3 +4 +15 +20 +19 +18 +16 +17 % (the unpipelined rows +3..+11%, the
  pipelined +15..+20%: every matmul of h >= 8192 runs at the profile's best-shape rate, 86% of peak).
* Smith et al. 2022, "Using DeepSpeed and Megatron to Train Megatron-Turing NLG 530B"
  (arXiv:2201.11990), system performance: 530B, 8-way TP x 35-way PP (DeepSpeed's pipeline engine: plain 1F1B),
  global batch 1920, sequence 2048 on A100 80GB: 280, 350 and 420 DGX nodes (2240, 2800, 3360 GPUs) at
  60.1, 50.2 and 44.4 s per iteration, 126, 121 and 113 TFLOP/s per GPU. Predicted - published: +39 +41
  +46 %. Megatron itself ran the same model on the same 2240 GPUs at 159 TFLOP/s (Narayanan et al.
  Table 2, batch 2240), so most of this gap is between the two software stacks, which the model does not
  price; the rest is the one Table 1 shows.
"""

from __future__ import annotations

import pytest

from mtnlg.plan import Layout, get_gpu, plan
from mtnlg.plan.presets import PRESETS, _preset

A100 = get_gpu("a100-80gb")


MTNLG = [(2240, 60.1, 126), (2800, 50.2, 121), (3360, 44.4, 113)]


def _mtnlg(gpus: int, seconds: float | None = None):
    layout = Layout(gpus, tp=8, pp=35, global_batch=1920, micro_batch=1, sequence_parallel=False)
    return plan(PRESETS["mtnlg-530b"], layout, A100, iteration_time=seconds)


@pytest.mark.parametrize("gpus,seconds,tflops", MTNLG)
def test_mtnlg_530b_arithmetic(gpus, seconds, tflops):
    p = _mtnlg(gpus, seconds)
    assert p.tflops_per_gpu == pytest.approx(tflops, rel=0.02)  # eq. 3 reproduces the paper's own arithmetic
    assert p.fits and p.profile_name == "a100-80gb"


def test_mtnlg_530b_loses_tflops_as_gpus_grow():
    """Published: 126 (2240 GPUs) > 121 (2800) > 113 (3360); the model must fall too."""
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


def _chunks(layers: int, pp: int) -> int:
    """Model chunks per rank: the fewest that interleave (the paper does not state them)."""
    per_stage = layers // pp
    return 1 if pp == 1 else min(v for v in range(2, per_stage + 1) if per_stage % v == 0)


def _table_1(row):
    billions, heads, hidden, layers, tp, pp, gpus, batch, _ = row
    model = _preset(f"{billions}b", layers, hidden, heads, 51200, 2048)
    layout = Layout(gpus, tp=tp, pp=pp, vpp=_chunks(layers, pp), global_batch=batch, micro_batch=1, zero=0,
                    sequence_parallel=False)
    return plan(model, layout, A100)


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


def _errors(rows) -> list[float]:
    return [round(p / t - 1, 3) for p, t in rows]


@pytest.mark.xfail(strict=True, reason="measured miss, not tuned away: predicted TFLOP/s per GPU are 3-20% above "
                                       "Table 1 (see the module docstring)")
def test_narayanan_table_1_within_10_percent():
    pred = [(_table_1(row).est_tflops_per_gpu, row[-1]) for row in TABLE_1]
    assert all(abs(e) <= 0.10 for e in _errors(pred)), _errors(pred)


@pytest.mark.xfail(strict=True, reason="measured miss, not tuned away: predicted TFLOP/s per GPU are 39-46% above "
                                       "the MT-NLG runs (see the module docstring)")
def test_mtnlg_530b_within_10_percent():
    pred = [(_mtnlg(g).est_tflops_per_gpu, tf) for g, _, tf in MTNLG]
    assert all(abs(e) <= 0.10 for e in _errors(pred)), _errors(pred)
