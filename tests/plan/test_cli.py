"""``mtnlg plan`` as a user runs it (in-process through the CLI entry point)."""

from __future__ import annotations

import json

import pytest

from mtnlg.cli import main

KEYS = {"params", "params_eq2", "flops_per_iteration", "memory_per_gpu_bytes", "memory_breakdown",
        "bubble_fraction", "est_iteration_time_s", "fits", "time_breakdown_s", "limiting_term", "largest_loss",
        "profile"}
TERMS = {"gemm", "attention", "elementwise", "overhead", "tp_comm", "pp_comm", "bubble", "dp_comm", "optimizer"}
MTNLG = ["--gpus", "2240", "--gpu", "a100-80gb", "--tp", "8", "--pp", "35", "--global-batch", "1920",
         "--micro-batch", "1"]


def run(capsys, *argv):
    rc = main(["plan", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_json_keys_and_iteration_time(capsys):
    rc, out, _ = run(capsys, "--model", "mtnlg-530b", *MTNLG, "--json")
    d = json.loads(out)
    assert rc == 0 and KEYS <= set(d) and "tflops_per_gpu" not in d
    assert d["fits"] is True and d["layout"]["dp"] == 8 and d["layout"]["microbatches"] == 240
    assert set(d["time_breakdown_s"]) == TERMS and d["profile"] == "a100-80gb"
    assert d["est_iteration_time_s"] == pytest.approx(sum(d["time_breakdown_s"].values()))
    rc, out, _ = run(capsys, "--model", "mtnlg-530b", *MTNLG, "--iteration-time", "60.1", "--json")
    assert json.loads(out)["tflops_per_gpu"] == pytest.approx(126, rel=0.02)


def test_yaml_model_equals_preset(capsys):
    _, preset, _ = run(capsys, "--model", "mtnlg-530b", *MTNLG, "--json")
    _, yaml_out, _ = run(capsys, "--model", "examples/plan-530b.yaml", *MTNLG, "--json")
    a, b = json.loads(preset), json.loads(yaml_out)
    for key in ("params", "params_eq2", "flops_per_iteration", "memory_per_gpu_bytes", "est_iteration_time_s"):
        assert a[key] == b[key]


def test_human_table(capsys):
    rc, out, _ = run(capsys, "--model", "seed-6b", "--gpus", "8", "--gpu", "h100-80gb", "--tp", "2",
                     "--global-batch", "64", "--micro-batch", "2", "--recompute", "selective", "--zero", "2")
    assert rc == 0
    for label in ("parameters", "FLOPs / iteration", "memory / GPU", "optimizer", "activations", "bubble fraction",
                  "est. iteration time", "fits", "gemm", "tp_comm", "dp_comm", "limited by", "profile"):
        assert label in out


def test_seq_len_and_recompute_none(capsys):
    _, out, _ = run(capsys, "--model", "seed-6b", "--gpus", "8", "--global-batch", "64", "--seq-len", "1024",
                    "--recompute", "none", "--json")
    d = json.loads(out)
    assert d["layout"]["seq_len"] == 1024 and d["memory_breakdown"]["recompute_working_set"] == 0


def test_errors_exit_2(capsys, tmp_path):
    rc, _, err = run(capsys, "--model", "mtnlg-350b", "--gpus", "8", "--global-batch", "8")
    assert rc == 2 and "mtnlg-530b" in err
    rc, _, err = run(capsys, "--model", "mtnlg-530b", "--gpus", "2240", "--tp", "8", "--pp", "36",
                     "--global-batch", "1920")
    assert rc == 2 and "--gpus 2240" in err
    bad = tmp_path / "m.yaml"
    bad.write_text("num_layer: 2\nhidden_size: 64\n")
    rc, _, err = run(capsys, "--model", str(bad), "--gpus", "1", "--global-batch", "1")
    assert rc == 2 and "num_layers" in err
    rc, _, err = run(capsys, "--model", "seed-6b", "--gpus", "8")
    assert rc == 2 and "--global-batch" in err


def test_search_table_and_json(capsys):
    rc, out, _ = run(capsys, "--search", "--model", "seed-6b", "--gpus", "16", "--gpu", "a100-80gb",
                     "--global-batch", "256", "--top", "4")
    assert rc == 0 and "tokens/s" in out and len(out.strip().splitlines()) == 2 + 4
    assert "limited by" in out and all(line.split()[-2] in TERMS for line in out.strip().splitlines()[2:])
    rc, out, _ = run(capsys, "--search", "--model", "seed-6b", "--gpus", "16", "--global-batch", "256", "--json")
    layouts = json.loads(out)["layouts"]
    times = [d["est_iteration_time_s"] for d in layouts]
    assert times == sorted(times) and all(d["fits"] for d in layouts)
    for d in layouts:
        terms = d["time_breakdown_s"]
        assert d["limiting_term"] == max(terms, key=terms.get)
        assert d["largest_loss"] == max((k for k in terms if k not in ("gemm", "attention")), key=terms.get)


def test_timeline_command(capsys, tmp_path):
    out_png = tmp_path / "sched" / "1f1b.png"
    rc, out, _ = run(capsys, "--timeline", "--schedule", "1f1b", "--pp", "4", "--microbatches", "12",
                     "--output", str(out_png), "--json")
    d = json.loads(out)
    assert rc == 0 and out_png.read_bytes()[:4] == b"\x89PNG"
    assert d["bubble_fraction"] == pytest.approx(3 / 15)
    rc, _, err = run(capsys, "--timeline", "--schedule", "1f1b", "--pp", "4", "--microbatches", "100000",
                     "--output", str(tmp_path / "big.png"))  # refused at once, not minutes of drawing
    assert rc == 2 and "lower --microbatches" in err and not (tmp_path / "big.png").exists()


def test_schedules_change_bubble_and_memory(capsys):
    base = ["--model", "gpt3-175b", "--gpus", "1024", "--tp", "8", "--pp", "8", "--global-batch", "1536", "--json"]
    res = {}
    for extra in (["--schedule", "gpipe"], ["--schedule", "1f1b"], ["--vpp", "2"], ["--schedule", "zb"]):
        rc, out, _ = run(capsys, *base, *extra)
        assert rc == 0
        d = json.loads(out)
        res[d["layout"]["schedule"]] = d
    p, m = 8, 96
    assert res["gpipe"]["bubble_fraction"] == res["1f1b"]["bubble_fraction"] == pytest.approx((p - 1) / (m + p - 1))
    assert res["interleaved"]["bubble_fraction"] == pytest.approx((7 / 2) / (96 + 7 / 2))
    assert res["zb"]["bubble_fraction"] < res["interleaved"]["bubble_fraction"]
    acts = {k: v["memory_breakdown"]["activations"] for k, v in res.items()}
    assert acts["gpipe"] == pytest.approx(acts["1f1b"] * m / p)  # m vs p microbatches in flight
    assert acts["interleaved"] == pytest.approx(acts["1f1b"] * (1 + (p - 1) / (p * 2)))
    rc, _, err = run(capsys, *base, "--schedule", "gpipe", "--vpp", "2")
    assert rc == 2 and "--vpp" in err
