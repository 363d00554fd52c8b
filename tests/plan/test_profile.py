"""Profiles: lookups, JSON round trip, shipped profiles with sources, one-line errors for bad files."""

from __future__ import annotations

import json
import math

import pytest

from mtnlg.cli import main
from mtnlg.errors import ConfigError
from mtnlg.plan.profile import (COLLECTIVES, SHIPPED, LinkOp, Profile, load_profile, profile_from_dict,
                                ring_factor, shipped_profile)


def small() -> Profile:
    link = {op: LinkOp(1e-5, 1e9) for op in COLLECTIVES}
    rows = [{"op": "all_reduce", "bytes": 1000, "ranks": 2, "seconds": 1e-4},
            {"op": "all_reduce", "bytes": 3000, "ranks": 2, "seconds": 3e-4}]
    return Profile("small", 2e12, [(64, 64, 64, 1e12), (128, 128, 128, 2e12), (64, 64, 128, 1.5e12)], 1e11, 1e-6,
                   {"intra": link, "inter": dict(link)}, attention_kind="fused", attention=[(64, 64, 16, 5e11)],
                   overlap=0.25, concurrency=2, source="unit test", sources={"gemm": "made up"},
                   link_points={"intra": rows}, fsdp_unit_s=4e-4, tp_layer_s=2e-3, shared_speed=0.75,
                   collective_wait_s=3e-4)


def test_gemm_lookup_exact_interpolated_and_clamped():
    p = small()
    assert p.gemm_rate(64, 64, 128) == 1.5e12  # a measured shape is used as measured
    # (64, 128, 64) has the FLOPs of (64, 64, 128): the mean rate of that FLOP count
    assert p.gemm_rate(64, 128, 64) == pytest.approx(1.5e12)
    # halfway in log(FLOPs) between 2·64³ (mean 1e12) and 2·64²·128 (1.5e12)
    assert p.gemm_rate(64, 64, 91) == pytest.approx(1e12 + 0.5e12 * math.log(91 / 64) / math.log(2))
    assert p.gemm_rate(8, 8, 8) == 1e12 and p.gemm_rate(4096, 4096, 4096) == 2e12  # clamped
    assert p.gemm_time(64, 64, 64, count=3) == pytest.approx(3 * 2 * 64**3 / 1e12)
    # a thin shape the table lacks is no faster than its bytes (2·(mk + kn + mn)) at 1e11 B/s ...
    assert p.gemm_time(4096, 4096, 8, elem_bytes=2) == pytest.approx(2 * (2 * 4096 * 8 + 4096**2) / 1e11)
    assert p.batched_gemm_time(3, 256, 256, 8, elem_bytes=2) == pytest.approx(3 * 2 * (2 * 256 * 8 + 256**2) / 1e11)
    # ... but a measured shape already includes its memory traffic
    assert p.gemm_time(64, 64, 64, elem_bytes=2) == pytest.approx(2 * 64**3 / 1e12)


def test_collective_points_interpolate_then_fit():
    d = small().as_dict()
    p = profile_from_dict(d)
    ar = p.links["intra"]["all_reduce"]
    assert ring_factor("all_reduce", 2) == 1.0 and ring_factor("all_gather", 4) == 0.75
    assert ring_factor("send_recv", 2) == 1.0
    assert ar.time("all_reduce", 2000, 2) == pytest.approx(2e-4)  # between the measured points
    assert ar.time("all_reduce", 10_000, 2) == pytest.approx(1e-5 + 10_000 / 1e9)  # outside: the fit
    assert ar.time("all_reduce", 10_000, 1) == 0.0  # one rank: nothing to do
    assert p.links["inter"]["all_reduce"].points == ()  # no points given for inter
    assert p.collective_time("all_gather", 4000, 2, span=16, gpus_per_node=8) == pytest.approx(1e-5 + 2000 / 1e9)
    # 4 of the group's devices on each node: 4 network links carry the node-to-node traffic at once
    assert p.collective_time("all_gather", 4000, 2, 16, 8, lanes=4) == pytest.approx(1e-5 + 2000 / 4 / 1e9)
    assert p.collective_time("all_gather", 4000, 2, 8, 8, lanes=4) == pytest.approx(1e-5 + 2000 / 1e9)  # intra


def test_json_round_trip(tmp_path):
    p = small()
    path = p.save(tmp_path / "prof.json")
    q = load_profile(path)
    assert q.as_dict() == p.as_dict()
    assert q.gemm == p.gemm and q.attention == p.attention and q.overlap == 0.25 and q.concurrency == 2
    assert (q.fsdp_unit_s, q.tp_layer_s, q.shared_speed, q.collective_wait_s) == (4e-4, 2e-3, 0.75, 3e-4)
    assert q.sources["gemm"] == "made up"


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_profiles_state_every_source(name):
    p = shipped_profile(name)
    d = p.as_dict()
    assert p.source
    for key in ("gemm", "attention", "elementwise", "op_overhead", "framework", "links", "overlap", "concurrency"):
        assert len(d[key]["source"]) > 20, key
    assert all(r < p.peak_flops for *_, r in p.gemm)  # no point above the data-sheet peak
    assert profile_from_dict(json.loads(json.dumps(d))).as_dict() == d


@pytest.mark.parametrize("mutate,needle", [
    (lambda d: d.pop("gemm"), "'gemm' section"),
    (lambda d: d["gemm"].update(points=[]), "gemm.points is empty"),
    (lambda d: d["gemm"]["points"][0].pop("k"), "gemm.points[0] needs"),
    (lambda d: d["elementwise"].update(bytes_per_s=-1), "elementwise.bytes_per_s must be > 0"),
    (lambda d: d["links"]["intra"].pop("send_recv"), "links.intra.send_recv is missing"),
    (lambda d: d["overlap"].update(fraction=2), "overlap.fraction must be in [0, 1]"),
    (lambda d: d.update(format="v0"), "'format' must be"),
    (lambda d: d["attention"].update(kind="flash"), "attention.kind"),
    (lambda d: d["framework"].update(tp_layer_s=-1), "framework seconds must be >= 0"),
    (lambda d: d.update(framework=[]), "'framework' must be an object"),
    (lambda d: d["concurrency"].update(shared_speed=1.5), "concurrency.shared_speed must be in (0, 1]"),
])
def test_malformed_profile_is_one_line(tmp_path, mutate, needle):
    d = small().as_dict()
    mutate(d)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ConfigError) as e:
        load_profile(path)
    assert needle in str(e.value) and "\n" not in str(e.value) and str(path) in str(e.value)


def test_cli_profile_errors_exit_2(capsys, tmp_path):
    base = ["plan", "--model", "seed-6b", "--gpus", "8", "--global-batch", "64"]
    assert main([*base, "--profile", str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err
    assert "no such file" in err and "--calibrate" in err and len(err.strip().splitlines()) == 1
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main([*base, "--profile", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "not valid JSON" in err and len(err.strip().splitlines()) == 1


def test_cli_profile_changes_the_estimate(capsys, tmp_path):
    base = ["plan", "--model", "seed-6b", "--gpus", "8", "--global-batch", "64", "--json"]
    main([*base, "--profile", "h100-80gb"])
    h100 = json.loads(capsys.readouterr().out)
    main(base)  # --gpu a100-80gb: its shipped profile
    a100 = json.loads(capsys.readouterr().out)
    path = small().save(tmp_path / "p.json")
    main([*base, "--profile", str(path)])
    mine = json.loads(capsys.readouterr().out)
    assert (h100["profile"], a100["profile"], mine["profile"]) == ("h100-80gb", "a100-80gb", "small")
    assert h100["est_iteration_time_s"] < a100["est_iteration_time_s"]
    assert mine["est_iteration_time_s"] != a100["est_iteration_time_s"]


def test_the_profile_example_in_the_docs_loads(tmp_path):
    """docs/plan.md shows the file format: that block must be a profile this planner reads."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "plan.md").read_text(encoding="utf-8")
    block = doc.split("```json\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "p.json"
    path.write_text(block)
    p = load_profile(path)
    assert p.peak_flops == 312e12 and set(COLLECTIVES) <= set(p.links["inter"])
