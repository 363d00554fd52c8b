"""Elastic restart: ``kill -9`` one worker mid-training; torchrun restarts the group, which resumes
from the newest complete checkpoint and finishes with exactly the losses of an uninterrupted run.

::

    torchrun --standalone --nproc-per-node 2 --max-restarts 1 -m mtnlg train ... --checkpoint.interval=3
        step 1 2 3 [ckpt] 4 5 6 [ckpt] 7 ─ SIGKILL rank 1
                                          torchrun: stop the group, start a new one (restart 1 of 1)
                          resume step_6 ─► 7 8 9 ... 18  == the uninterrupted run, bit for bit (CPU, fp32)

The restart time (kill -> first training step logged by the new group) is measured and printed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "examples" / "tiny.yaml"
STEPS = 18
INTERVAL = 3

pytestmark = [pytest.mark.slow, pytest.mark.distributed,
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads worker pids from /proc (Linux)")]


def _argv(run: Path, max_restarts: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "--max-restarts", str(max_restarts), "--monitor-interval", "0.1",
            "-m", "mtnlg", "train", "--config", str(TINY), "--output", str(run), "--no-progress",
            f"--train.steps={STEPS}", f"--checkpoint.interval={INTERVAL}", "--checkpoint.keep=2",
            "--checkpoint.resume=auto", "--train.eval_interval=1000", "--train.eval_batches=1",
            "--log.interval=1", "--log.tensorboard=false", "--train.device=cpu"]


def _env() -> dict[str, str]:
    # TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: torchrun (c10d rendezvous) otherwise hands every worker group
    # the same TCPStore without a per-restart prefix, and a restarted group can read the dead group's
    # gloo/NCCL addresses ("Connection refused" in connectFullMesh): pytorch/pytorch#135712, #167288.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "MTNLG_LOG_LEVEL": "INFO",
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def _records(run: Path, split: str = "train") -> dict[int, dict]:
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("split") == split:
            out[int(rec["step"])] = rec
    return out


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in env:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


class _Lines:
    """Collect a process's output lines with the time each arrived (for the restart time)."""

    def __init__(self, stream):
        self.lines: list[tuple[float, str]] = []
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream) -> None:
        for line in iter(stream.readline, ""):
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)


def test_kill9_worker_restarts_group_and_matches_uninterrupted_run(tmp_path: Path):
    # The interrupted run: kill -9 rank 1 as soon as a checkpoint exists and training goes on.
    run = tmp_path / "elastic"
    proc = subprocess.Popen(_argv(run, max_restarts=1), env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    out = _Lines(proc.stdout)
    try:
        ckpts = run / "checkpoints"
        victim = None
        deadline = time.monotonic() + 120
        while victim is None:
            assert proc.poll() is None, f"training ended before a checkpoint appeared:\n{out.text()}"
            assert time.monotonic() < deadline, f"no checkpoint after 120 s:\n{out.text()}"
            if ckpts.is_dir() and any(p.name.startswith("step_") for p in ckpts.iterdir()):
                victim = next((c for c in _children(proc.pid) if _rank_of(c) == 1), None)
            time.sleep(0.01)
        first_group = set(_children(proc.pid))
        t_kill = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        t_respawn = None  # when torchrun started the new group's workers
        deadline = t_kill + 180
        while proc.poll() is None and time.monotonic() < deadline:
            if t_respawn is None and set(_children(proc.pid)) - first_group:
                t_respawn = time.monotonic()
            time.sleep(0.01)
        rc = proc.poll() if proc.poll() is not None else "a timeout (180 s)"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        out.thread.join(timeout=10)
    log = out.text()
    assert rc == 0, f"torchrun ended with {rc}:\n{log}"
    assert victim in first_group

    # The new group resumed from a checkpoint taken before the kill, mid-training.
    resumed = [(t, int(m.group(1))) for t, line in out.lines
               if t > t_kill and (m := re.search(r"resumed from \S+ at step (\d+)", line))]
    assert resumed, f"no worker resumed from a checkpoint after the kill:\n{log}"
    resume_step = resumed[0][1]
    assert INTERVAL <= resume_step < STEPS and resume_step % INTERVAL == 0
    first_step = next((t for t, line in out.lines
                       if t > resumed[0][0] and re.match(rf"step {resume_step + 1}/{STEPS} loss", line)), None)
    assert first_step is not None, f"no 'step {resume_step + 1}/{STEPS} loss' line after the resume:\n{log}"
    restart_s = first_step - t_kill
    assert t_respawn is not None
    print(f"\nelastic restart: kill -9 of rank 1 at t=0 -> new workers started {t_respawn - t_kill:.2f} s -> "
          f"checkpoint loaded {resumed[0][0] - t_kill:.2f} s -> first step after restart (step {resume_step + 1}, "
          f"resumed from step {resume_step}) {restart_s:.2f} s")

    # The same run, never interrupted.
    ref = tmp_path / "reference"
    r = subprocess.run(_argv(ref, max_restarts=0), env=_env(), capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr

    got, want = _records(run), _records(ref)
    assert sorted(got) == list(range(1, STEPS + 1)), "every step is logged exactly once after the restart"
    assert [got[s]["loss"] for s in sorted(got)] == [want[s]["loss"] for s in sorted(want)]
    assert got[STEPS]["loss"] == want[STEPS]["loss"]  # the final loss, bit for bit
    assert _records(run, "test")[STEPS]["loss"] == _records(ref, "test")[STEPS]["loss"]
