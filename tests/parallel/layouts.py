"""Rank-side functions for the parity tests (imported by spawned processes)."""

from __future__ import annotations

import time

from harness import run_steps, tiny_config


def run_layouts(layouts: list[dict], uneven: bool = True) -> dict[str, object]:
    """Run each layout (parallel overrides, plus optional "_micro") for 10 steps; losses by name."""
    out = {}
    for spec in layouts:
        spec = dict(spec)
        name = spec.pop("_name")
        micro = spec.pop("_micro", 2)
        t0 = time.perf_counter()
        losses, eng = run_steps(tiny_config(**spec), uneven=uneven, micro=micro, with_engine=True)
        out[name] = {"losses": losses, "time": time.perf_counter() - t0, "comm": eng.comm_bytes()}
    return out
