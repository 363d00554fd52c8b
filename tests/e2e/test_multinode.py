"""Multi-node training as users run it: one torchrun per node, c10d rendezvous, TP2 x DP2 over 2 nodes.

The two "nodes" are two network namespaces of this machine joined by a veth pair (192.0.2.1 and
192.0.2.2, TEST-NET-1: see :mod:`tests.e2e.netns`); nothing else is reachable from them. Each runs::

    torchrun --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d --rdzv-endpoint 192.0.2.1:29500 \\
        -m mtnlg train --config examples/tiny.yaml --parallel.tp=2 --train.steps=3 --output RUN

    node A (192.0.2.1): ranks 0,1 = TP pair of DP replica 0     node B (192.0.2.2): ranks 2,3 = TP pair of replica 1

and the per-step training losses must equal a one-process run of the same config (1e-5 relative, as
the parallel engine's parity tests: fp32 reductions in a different order differ in the last bits).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.netns import can_create_namespaces, two_nodes

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "examples" / "tiny.yaml"
STEPS = 3
RTOL = 1e-5

_no_netns = can_create_namespaces() if sys.platform.startswith("linux") else "network namespaces are Linux-only"
pytestmark = [pytest.mark.skipif(_no_netns is not None, reason=f"cannot create network namespaces: {_no_netns}")]


def _train_args(run: Path) -> list[str]:
    return ["-m", "mtnlg", "train", "--config", str(TINY), "--output", str(run), "--no-progress",
            f"--train.steps={STEPS}", "--train.eval_batches=1", "--log.tensorboard=false", "--train.device=cpu",
            "--checkpoint.resume=none"]


def _losses(run: Path) -> list[float]:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = sorted((r for r in recs if r.get("split") == "train"), key=lambda r: r["step"])
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    return [r["loss"] for r in train]


def _namespaces_left(*nodes) -> list[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    return [n.ns for n in nodes if n.ns in listed]


def test_namespaces_are_removed_even_on_failure():
    with pytest.raises(RuntimeError, match="boom"), two_nodes() as (a, b):
        assert sorted(_namespaces_left(a, b)) == sorted([a.ns, b.ns])
        ping = subprocess.run(["ip", "netns", "exec", a.ns, sys.executable, "-c",
                               f"import socket; s = socket.create_connection(('{b.addr}', 9), timeout=2)"],
                              capture_output=True, text=True)
        assert "Connection refused" in ping.stderr, ping.stderr  # B answers (RST) over the veth: linked
        raise RuntimeError("boom")
    assert not _namespaces_left(a, b)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_node_torchrun_tp2_dp2_matches_one_process(tmp_path: Path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

    run = tmp_path / "two_nodes"
    logs = [tmp_path / "node0.log", tmp_path / "node1.log"]
    with two_nodes() as (a, b):
        endpoint = f"{a.addr}:29500"
        procs = []
        try:
            for i, (node, log) in enumerate(zip((a, b), logs)):
                argv = node.torchrun(nnodes=2, nproc=2, endpoint=endpoint, is_host=i == 0, rdzv_id="mtnlg-mn")
                with open(log, "w") as f:
                    procs.append(subprocess.Popen(argv + _train_args(run) + ["--parallel.tp=2"], env=env, stdout=f,
                                                  stderr=subprocess.STDOUT, start_new_session=True))
            codes = [p.wait(timeout=240) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
    assert not _namespaces_left(a, b), "the namespaces outlived the test"
    text = "\n".join(f"--- {log.name}\n{log.read_text()[-4000:]}" for log in logs)
    assert codes == [0, 0], f"torchrun exit codes {codes}\n{text}"
    assert "4 process(es)" in text, text  # one job of 4 ranks over both nodes (rank 0 prints it)
    assert "dp_shard=2 x tp=2" in text, text  # the TP2 x DP2 layout

    ref = tmp_path / "one_process"
    r = subprocess.run([sys.executable, *_train_args(ref)], env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-4000:]

    got, want = _losses(run), _losses(ref)
    print(f"\nper-step loss, TP2xDP2 on 2 nodes vs 1 process: {list(zip(got, want))}")
    for step, (g, w) in enumerate(zip(got, want), start=1):
        assert math.isclose(g, w, rel_tol=RTOL), f"step {step}: two nodes {g!r} vs one process {w!r}"
