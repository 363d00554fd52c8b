"""The planner against published runs (loose tolerances: it is a first-principles model, not a profiler).

* Smith et al. 2022, "Using DeepSpeed and Megatron to Train Megatron-Turing NLG 530B"
  (arXiv:2201.11990), Table 1: 530B, 8-way TP x 35-way PP, global batch 1920, sequence 2048 on A100
  80GB: 280 nodes (2240 GPUs) 60.1 s/iteration, 126 TFLOP/s per GPU; 420 nodes (3360 GPUs) 44.4 s, 113.
* Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters Using
  Megatron-LM" (arXiv:2104.04473), Table 1: 76.1B (80 heads, hidden 10240, 60 layers) at TP 8 x PP 4 on
  1024 A100s, batch 1792: 140 TFLOP/s per GPU (45% of peak); 1008B (160 heads, 25600, 128 layers) at
  TP 8 x PP 64 on 3072 A100s, batch 3072: 163 TFLOP/s (52%).
"""

from __future__ import annotations

import pytest

from mtnlg.plan import Layout, get_gpu, plan
from mtnlg.plan.presets import PRESETS, _preset

A100 = get_gpu("a100-80gb")


@pytest.mark.parametrize("gpus,seconds,tflops", [(2240, 60.1, 126), (3360, 44.4, 113)])
def test_mtnlg_530b(gpus, seconds, tflops):
    p = plan(PRESETS["mtnlg-530b"], Layout(gpus, tp=8, pp=35, global_batch=1920, micro_batch=1), A100,
             iteration_time=seconds)
    assert p.tflops_per_gpu == pytest.approx(tflops, rel=0.02)  # eq. 3 reproduces the paper's own arithmetic
    assert p.est_iteration_time_s == pytest.approx(seconds, rel=0.2)
    assert p.fits


@pytest.mark.parametrize("name,heads,hidden,layers,pp,gpus,batch,tflops", [
    ("76.1b", 80, 10240, 60, 4, 1024, 1792, 140),
    ("1008b", 160, 25600, 128, 64, 3072, 3072, 163),
])
def test_narayanan_table_1(name, heads, hidden, layers, pp, gpus, batch, tflops):
    model = _preset(name, layers, hidden, heads, 51200, 2048)
    p = plan(model, Layout(gpus, tp=8, pp=pp, global_batch=batch, micro_batch=1), A100)
    assert p.est_tflops_per_gpu == pytest.approx(tflops, rel=0.2)
    assert p.fits
