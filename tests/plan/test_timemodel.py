"""Each term of the time model against a hand calculation on a small case (a synthetic profile whose
numbers are round: every matmul 1 TFLOP/s, 100 GB/s element-wise, 1 us per op, links 10 us + 1 GB/s)."""

from __future__ import annotations

import dataclasses

import pytest

from mtnlg.config import ModelConfig
from mtnlg.plan import Layout, get_gpu, plan
from mtnlg.plan.presets import PlanModel
from mtnlg.plan.profile import COLLECTIVES, LinkOp, Profile
from mtnlg.plan.timemodel import TERMS, Shape, dp_times, iteration_terms, pp_time, stage_parts, step_ops, step_sync_time, tp_time

R, BW, OP, LAT, LINK = 1e12, 1e11, 1e-6, 1e-5, 1e9


def profile(overlap: float = 0.5, concurrency: int = 8) -> Profile:
    link = {op: LinkOp(LAT, LINK) for op in COLLECTIVES}
    return Profile("test", R, [(64, 64, 64, R)], BW, OP, {"intra": link, "inter": dict(link)},
                   overlap=overlap, concurrency=concurrency)


# layers 2, hidden 8, ffn 32, heads 2 (d = 4), vocab 16, seq 4, micro-batch 1, 2 microbatches, tp 2 + SP, dp 2
SMALL = Shape(layers=2, hidden=8, ffn=32, heads=2, vocab=16, seq=4, micro_batch=1, microbatches=2, tp=2, dp=2,
              recompute="none", zero=0, sp=True, dtype_bytes=2, params_per_gpu=1000.0)


def mm(m: int, n: int, k: int, batch: int = 1) -> float:
    """A matmul the table does not hold: its FLOPs at the rate, or its 2-byte operands and result at the
    element-wise bandwidth, whichever takes longer."""
    return batch * max(2 * m * n * k / R, 2 * (m * k + k * n + m * n) / BW)


def test_compute_terms_by_hand():
    parts = stage_parts(profile(), SMALL, first=True, last=True)
    T = 4

    def linear(m, n, k):  # forward, input-grad, weight-grad
        return mm(m, n, k) + mm(m, k, n) + mm(k, n, m)

    layer = linear(T, 12, 8) + linear(T, 8, 4) + linear(T, 16, 8) + linear(T, 8, 16)  # 1/2 of the weights each
    assert parts["gemm"] == pytest.approx(2 * layer + linear(T, 8, 8))  # 2 layers + logits (T, V/t, h)
    # one head per rank (d = 4): QK^T (s, s, d) and softmax.V (s, d, s), forward + 2 backward matmuls each
    assert parts["attention"] == pytest.approx(2 * 3 * 2 * mm(4, 4, 4))
    # per layer forward: LayerNorms 2·2·T·h/2, residual+dropout 2·3·T·h/2, GELU 2·T·f/2, softmax 4·b·a·s²/2
    layer_elems = 4 * 16 + 6 * 16 + 2 * 4 * 16 + 4 * 2 * 16 / 2
    ew = 2 * layer_elems * 3 * 2 + 3 * 3 * T * 8 * 2 + 5 * T * 8 * 4  # x 3 passes x 2 B; embedding; fp32 CE
    assert parts["elementwise"] == pytest.approx(ew / BW)
    assert parts["overhead"] == pytest.approx((2 * 14 * 3 + 6 + 12) * OP)


def test_framework_overhead_by_hand():
    """Per micro-batch: tp_layer_s per block under tp > 1, fsdp_unit_s per FSDP2 unit (a block each and
    the root) under dp > 1; a profile without them (the GPU ones) adds nothing."""
    fw = dataclasses.replace(profile(), tp_layer_s=1e-3, fsdp_unit_s=1e-4)
    plain = stage_parts(profile(), SMALL, True, True)["overhead"]
    got = stage_parts(fw, SMALL, True, True)["overhead"]
    assert got - plain == pytest.approx(2 * 1e-3 + 3 * 1e-4)  # 2 blocks; 2 block units + the root
    alone = dataclasses.replace(SMALL, tp=1, dp=1)
    assert stage_parts(fw, alone, True, True)["overhead"] == pytest.approx(
        stage_parts(profile(), alone, True, True)["overhead"])
    stage = dataclasses.replace(SMALL, pp=2, tp=1)  # one block per stage: 2 units
    assert (stage_parts(fw, stage, True, False)["overhead"] - stage_parts(profile(), stage, True, False)["overhead"]
            == pytest.approx(2 * 1e-4))


def test_collective_wait_per_tp_call_by_hand():
    """Each synchronising TP call waits ``collective_wait_s``: per micro-batch 4 all-gather + reduce-scatter
    pairs per block (2 blocks), a pair for the embedding and one for the logits, 3 cross-entropy all-reduces."""
    waiting = dataclasses.replace(profile(), collective_wait_s=1e-3)
    assert tp_time(waiting, SMALL) - tp_time(profile(), SMALL) == pytest.approx(((4 * 2 + 2) * 2 + 3) * 1e-3)
    no_sp = dataclasses.replace(SMALL, sp=False)
    assert tp_time(waiting, no_sp) - tp_time(profile(), no_sp) == pytest.approx((4 * 2 + 2 + 3) * 1e-3)
    assert tp_time(waiting, dataclasses.replace(SMALL, tp=1)) == 0.0


def test_shared_speed_slows_kernels_when_several_devices_run():
    """A host whose devices slow each other (CPU cores sharing caches and memory) runs the kernels of a
    multi-device layout at ``shared_speed``; host overhead and links are unchanged, one device is not slowed."""
    slowed = dataclasses.replace(profile(), shared_speed=0.8)
    a, b = iteration_terms(profile(), SMALL), iteration_terms(slowed, SMALL)
    for term in ("gemm", "attention", "elementwise", "optimizer"):
        assert b[term] == pytest.approx(a[term] / 0.8), term
    for term in ("overhead", "tp_comm"):
        assert b[term] == pytest.approx(a[term]), term
    alone = dataclasses.replace(SMALL, tp=1, dp=1)
    assert iteration_terms(slowed, alone) == pytest.approx(iteration_terms(profile(), alone))
    # in the bubble one rank works alone, at full speed: the pipeline's own length uses unshared kernels
    piped = dataclasses.replace(SMALL, pp=2, microbatches=4, bubble_fraction=0.2)
    t = iteration_terms(slowed, piped)
    kern = t["gemm"] + t["attention"] + t["elementwise"]
    busy = kern + t["overhead"] + t["tp_comm"] + t["pp_comm"]
    busy -= step_ops(piped) * OP + step_sync_time(profile(), piped)  # once per step, after the pipeline drains
    assert t["bubble"] == pytest.approx(max(0.0, (busy - kern * 0.2) / 0.8 - busy))
    assert t["bubble"] < iteration_terms(profile(), piped)["bubble"]


def test_full_recompute_adds_a_forward():
    full = dataclasses.replace(SMALL, recompute="full")
    a, b = stage_parts(profile(), SMALL, True, False), stage_parts(profile(), full, True, False)
    layer_fwd = mm(4, 12, 8) + mm(4, 8, 4) + mm(4, 16, 8) + mm(4, 8, 16)
    assert b["gemm"] - a["gemm"] == pytest.approx(2 * layer_fwd)  # 2 layers, one more forward
    assert b["attention"] - a["attention"] == pytest.approx(2 * 2 * mm(4, 4, 4))
    assert b["overhead"] - a["overhead"] == pytest.approx(2 * 14 * OP)


def test_tp_collectives_by_hand():
    act = 1 * 4 * 8 * 2  # b·s·h·2 bytes
    one_ag = LAT + act * (1 / 2) / LINK  # ring factor (n-1)/n for n = 2
    ce = 3 * (LAT + 4 * 4 / LINK)  # vocab-parallel cross entropy: 3 all-reduces of T fp32 values
    # 4 all-reduce equivalents x 2 layers, + embedding and logits (one stage is first and last)
    assert tp_time(profile(), SMALL) == pytest.approx((4 * 2 + 2) * 2 * one_ag + ce)
    no_sp = dataclasses.replace(SMALL, sp=False)
    assert tp_time(profile(), no_sp) == pytest.approx((4 * 2 + 2) * (LAT + act * 1.0 / LINK) + ce)  # 2(n-1)/n = 1
    full = dataclasses.replace(SMALL, recompute="full")
    assert tp_time(profile(), full) == pytest.approx((6 * 2 + 2) * 2 * one_ag + ce)
    two_stages = dataclasses.replace(SMALL, pp=2)  # 1 layer per stage, and only one end
    assert tp_time(profile(), two_stages) == pytest.approx((4 * 1 + 1) * 2 * one_ag + ce)
    assert tp_time(profile(), dataclasses.replace(SMALL, tp=1)) == 0


def test_pipeline_sends_by_hand():
    sh = dataclasses.replace(SMALL, pp=2, chunks=2)
    msg = 1 * 4 * 8 * 2 / 2  # b·s·h/t elements of 2 bytes
    assert pp_time(profile(), sh) == pytest.approx(2 * 2 * (LAT + msg / LINK))  # fwd + bwd per chunk
    assert pp_time(profile(), SMALL) == 0
    # without SP the receiver all-gathers the tp shares of the replicated activation (scatter/gather)
    no_sp = dataclasses.replace(sh, sp=False)
    gather = LAT + 2 * msg * (1 / 2) / LINK  # all-gather of b·s·h·2 bytes over tp = 2
    assert pp_time(profile(), no_sp) == pytest.approx(2 * 2 * (LAT + msg / LINK + gather))


def test_dp_reduction_by_stage():
    ppg = 1000.0  # in 3 collectives each (one per block of the 2, one for the rest): 3 latencies
    assert dp_times(profile(), SMALL)[0] == pytest.approx(3 * LAT + ppg * 2 * 1.0 / LINK)  # all-reduce, 2(n-1)/n = 1
    z1 = dataclasses.replace(SMALL, zero=1)
    assert dp_times(profile(), z1)[0] == pytest.approx(2 * (3 * LAT + ppg * 2 * 0.5 / LINK))  # RS + AG
    z3 = dataclasses.replace(SMALL, zero=3)
    one = 3 * LAT + ppg * 2 * 0.5 / LINK
    # AG forward and backward per micro-batch (2 of them), one RS with the last micro-batch
    assert dp_times(profile(), z3) == pytest.approx((2 * 2 * one + one, 2 * one))
    assert dp_times(profile(), dataclasses.replace(SMALL, dp=1)) == (0.0, 0.0)
    # across nodes (dp 8 x tp 2 = 16 > 8 per node): 4 of the group's devices per node share the traffic
    wide = dataclasses.replace(SMALL, dp=8)
    assert dp_times(profile(), wide)[0] == pytest.approx(3 * LAT + ppg * 2 * (2 * 7 / 8) / 4 / LINK)


def test_iteration_terms_sum_and_overlap():
    p = profile(overlap=0.5)
    t = iteration_terms(p, SMALL)
    assert tuple(t) == TERMS
    parts = stage_parts(p, SMALL, True, True)
    for k in ("gemm", "attention"):
        assert t[k] == pytest.approx(2 * parts[k])  # 2 microbatches
    # the second micro-batch adds its weight gradients into the first's: read both, write one, 2 B each
    assert t["elementwise"] == pytest.approx(2 * parts["elementwise"] + 3 * 1000 * 2 / BW)
    # loss, grad norm, finite check, skip flag and (dp 2) the token count: 8-byte all-reduces over 4 ranks
    sync = 5 * (LAT + 8 * 1.5 / LINK)
    assert t["overhead"] == pytest.approx(2 * parts["overhead"] + (16 + 12 * 2 + 4) * OP + sync)  # once per step
    assert t["tp_comm"] == pytest.approx(2 * tp_time(p, SMALL))
    assert t["bubble"] == 0 and t["pp_comm"] == 0
    total = dp_times(p, SMALL)[0]
    window = (parts["gemm"] + parts["attention"]) * 2 / 3  # the last microbatch's backward
    assert t["dp_comm"] == pytest.approx(total - 0.5 * min(total, window))
    assert t["optimizer"] == pytest.approx((1000 * 30 + 1000 * 4) / BW)
    assert iteration_terms(profile(overlap=0.0), SMALL)["dp_comm"] == pytest.approx(total)


def test_bubble_and_shared_cores():
    sh = dataclasses.replace(SMALL, pp=2, microbatches=4, bubble_fraction=0.2)
    t = iteration_terms(profile(), sh)
    busy = sum(t[k] for k in ("gemm", "attention", "elementwise", "overhead", "tp_comm", "pp_comm"))
    busy -= step_ops(sh) * OP + step_sync_time(profile(), sh)  # once per step, after the pipeline drains
    assert t["bubble"] == pytest.approx(0.2 / 0.8 * busy)
    # 8 ranks on a host that runs 2 at full speed: compute and (gloo's) communication 4x slower
    big = dataclasses.replace(SMALL, dp=4)
    fast, slow = iteration_terms(profile(concurrency=8), big), iteration_terms(profile(concurrency=2), big)
    for term in TERMS:
        if term != "dp_comm":  # its overlap window (the slowed backward) grows too: less of it is exposed
            assert slow[term] == pytest.approx(4 * fast[term]), term
    assert 0 < slow["dp_comm"] <= 4 * fast["dp_comm"]
    # ranks sharing cores: a rank idle in the bubble lends its core, so the pipeline costs only what its
    # full-speed length exceeds the shared-core work by
    piped = dataclasses.replace(big, pp=2, microbatches=4, bubble_fraction=0.2)
    for concurrency, bubble_left in ((2, False), (7, True)):
        shared = iteration_terms(profile(concurrency=concurrency), piped)
        k = 8 / concurrency  # the slow-down of every term
        compute = sum(shared[t] for t in ("gemm", "attention", "elementwise", "overhead"))
        compute -= (step_ops(piped) * OP + step_sync_time(profile(), piped)) * k  # once per step, not pipelined
        comm = shared["tp_comm"] + shared["pp_comm"]
        assert shared["bubble"] == pytest.approx(max(0.0, (compute + comm) / k / 0.8 - (compute + comm)))
        assert (shared["bubble"] > 0) == bubble_left


def test_plan_reports_every_term():
    cfg = ModelConfig(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, ffn_hidden_size=256, max_seq_len=64)
    p = plan(PlanModel("t", cfg, 64), Layout(2, tp=2, global_batch=4, micro_batch=2, recompute="none", zero=0),
             get_gpu("cpu"), profile=profile())
    d = p.as_dict()
    assert set(d["time_breakdown_s"]) == set(TERMS) and d["profile"] == "test"
    assert d["est_iteration_time_s"] == pytest.approx(sum(d["time_breakdown_s"].values()))
    assert d["limiting_term"] == max(d["time_breakdown_s"], key=d["time_breakdown_s"].get)
    assert d["communication_per_iteration"]["tp_s"] == d["time_breakdown_s"]["tp_comm"]
