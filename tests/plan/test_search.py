"""``search``: every listed layout is valid and fits, and the list is sorted by estimated time."""

from __future__ import annotations

from mtnlg.plan import get_gpu, plan
from mtnlg.plan.estimate import validate_layout
from mtnlg.plan.presets import PRESETS
from mtnlg.plan.search import candidate_layouts, search


def _check_valid(model, p, gpus, batch, gpus_per_node=8):
    lo, cfg = p.layout, model.cfg
    assert lo.gpus == gpus and lo.global_batch == batch
    assert lo.tp * lo.pp * lo.dp == gpus
    assert lo.tp <= gpus_per_node and cfg.num_heads % lo.tp == 0
    assert cfg.num_layers % (lo.pp * lo.vpp) == 0
    assert batch % (lo.micro_batch * lo.dp) == 0
    assert lo.pp == 1 or lo.microbatches >= lo.pp
    assert lo.pp == 1 or lo.zero <= 1
    validate_layout(model, lo)
    assert p.fits and p.memory.total <= p.gpu.memory_bytes
    again = plan(model, lo, p.gpu)  # the row is reproducible from its layout alone
    assert again.est_iteration_time_s == p.est_iteration_time_s


def test_search_530b_sorted_and_valid():
    model, gpu = PRESETS["mtnlg-530b"], get_gpu("a100-80gb")
    plans = search(model, 2240, gpu, 1920, top=15)
    assert len(plans) == 15
    times = [p.est_iteration_time_s for p in plans]
    assert times == sorted(times)
    for p in plans:
        _check_valid(model, p, 2240, 1920)


def test_search_small_model_and_top_k():
    model, gpu = PRESETS["seed-6b"], get_gpu("a100-40gb")
    plans = search(model, 16, gpu, 256, top=200)
    assert plans and [p.est_iteration_time_s for p in plans] == sorted(p.est_iteration_time_s for p in plans)
    for p in plans:
        _check_valid(model, p, 16, 256)
    # the search dropped layouts that do not fit: ZeRO-0 without recomputation on one pipeline stage
    fitting = {p.layout for p in plans}
    dropped = [lo for lo in candidate_layouts(model, 16, 256) if lo not in fitting]
    assert any(not plan(model, lo, gpu).fits for lo in dropped)
    assert len(search(model, 16, gpu, 256, top=3)) == 3


def test_search_keeps_tp_inside_a_node_unless_told():
    model = PRESETS["gpt3-175b"]
    assert all(lo.tp <= 8 for lo in candidate_layouts(model, 64, 512))
    assert any(lo.tp == 16 for lo in candidate_layouts(model, 64, 512, max_tp=16))


def test_search_when_nothing_fits():
    assert search(PRESETS["mtnlg-530b"], 8, get_gpu("a100-40gb"), 8) == []
