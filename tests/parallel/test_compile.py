"""Compiled blocks (``train.compile``) train like eager ones: the same losses within 1e-5 relative
over 5 steps, in one process and under TP2 and FSDP2 (2 gloo ranks)."""

from __future__ import annotations

from tests.parallel.harness import RTOL, max_rel, run_steps, spawn, tiny_config

STEPS = 5


def _losses(compile: bool, **parallel) -> list[float]:
    cfg = tiny_config(**parallel)
    cfg.model.num_layers = 2  # every block shares one compiled graph; fewer layers only save time
    cfg.train.compile = compile
    return run_steps(cfg, steps=STEPS)


def compiled_and_eager(layouts: dict[str, dict]) -> dict[str, tuple[list[float], list[float]]]:
    return {name: (_losses(False, **p), _losses(True, **p)) for name, p in layouts.items()}


def test_compiled_equals_eager_one_process():
    eager, compiled = compiled_and_eager({"1": {}})["1"]
    assert max_rel(compiled, eager) < RTOL, (compiled, eager)


def test_compiled_equals_eager_tp2_and_fsdp2():
    out = spawn(2, compiled_and_eager, {"tp2": {"tp": 2}, "fsdp2": {"dp_shard": 2}}, timeout=600)
    for name, (eager, compiled) in out[0].items():
        assert max_rel(compiled, eager) < RTOL, (name, compiled, eager)
    assert out[0] == out[1]  # every rank reports the same global losses
