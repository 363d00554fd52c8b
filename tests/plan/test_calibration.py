"""``mtnlg plan --calibrate`` and benchmarks/plan_calibration.py at a tiny size.

The benchmark's accuracy is a benchmark figure, not a test: here its six layouts (1 process, DP2,
FSDP2, TP2 + SP, PP2 1F1B, TP2 x PP2 on 4 processes) train for real through ``mtnlg train`` and the
report must be complete and self-consistent.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mtnlg.cli import main
from mtnlg.plan import Layout, get_gpu, plan
from mtnlg.plan.calibrate import fit_link
from mtnlg.plan.presets import load_model
from mtnlg.plan.profile import COLLECTIVES, load_profile
from mtnlg.plan.timemodel import lookup_shapes

ROOT = Path(__file__).resolve().parents[2]


def test_fit_link_recovers_latency_and_bandwidth():
    rows = [{"op": "all_gather", "bytes": b, "ranks": 4, "seconds": 2e-5 + b * 0.75 / 5e9} for b in (1e3, 1e5, 1e7)]
    link = fit_link(rows, "all_gather")
    assert link.latency_s == pytest.approx(2e-5) and link.busbw == pytest.approx(5e9)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("calib") / "cpu.json"
    assert main(["plan", "--calibrate", "--model", str(ROOT / "examples/tiny.yaml"), "--micro-batch", "2",
                 "--output", str(out)]) == 0
    return out


@pytest.mark.slow
@pytest.mark.distributed
def test_calibrate_measures_the_layout_shapes(calibrated):
    prof = load_profile(calibrated)
    model = load_model(str(ROOT / "examples/tiny.yaml"))
    shapes, atts = lookup_shapes(plan(model, Layout(2, tp=2, global_batch=4, micro_batch=2), get_gpu("cpu")).shape)
    measured = {(m, n, k) for m, n, k, _ in prof.gemm}
    assert shapes <= measured  # the TP2 shapes are looked up as measured, not interpolated
    assert all(r > 0 for *_, r in prof.gemm) and prof.peak_flops == max(r for *_, r in prof.gemm)
    assert {(s, s, d) for _, s, d in atts} <= {(m, n, k) for m, n, k, _ in prof.attention}
    assert prof.elementwise_bw > 0 and prof.op_overhead_s > 0 and prof.concurrency == max(1, os.cpu_count())
    assert prof.fsdp_unit_s > 0 and prof.tp_layer_s > 0  # hooks and DTensor dispatch cost host time on a CPU
    assert 0 < prof.shared_speed <= 1
    assert "1-rank gloo group" in prof.sources["framework"]
    for op in COLLECTIVES:
        assert len(prof.links["intra"][op].points) >= 4 and prof.links["intra"][op].busbw > 0
    assert "measured by `mtnlg plan --calibrate`" in prof.sources["gemm"]


@pytest.mark.slow
@pytest.mark.distributed
def test_benchmark_runs_every_layout_tiny(calibrated, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks/plan_calibration.py"), "--size", "tiny", "--steps", "2",
                        "--profile", str(calibrated), "--workdir", str(tmp_path), "--json"],
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    names = [row["layout"] for row in res["layouts"]]
    assert names == ["1 process", "DP2 (DDP)", "FSDP2", "TP2 + SP", "PP2 1F1B m=4", "TP2 x PP2"]
    assert [row["processes"] for row in res["layouts"]] == [1, 2, 2, 2, 2, 4]
    for row in res["layouts"]:
        assert row["measured_s"] > 0 and row["predicted_s"] > 0 and math.isfinite(row["ratio"])
        assert row["ratio"] == pytest.approx(row["predicted_s"] / row["measured_s"])
        assert row["predicted_s"] == pytest.approx(sum(row["terms_s"].values()))
    assert res["worst_error"] == pytest.approx(max(abs(row["ratio"] - 1) for row in res["layouts"]))
    assert isinstance(res["rank_agreement"], bool)
    assert res["rank_agreement"] == (res["predicted_order"] == res["measured_order"])
    assert len(res["load_average_before"]) == 3
