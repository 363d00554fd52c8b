"""Crash consistency: SIGKILL the trainer at random moments while it saves a checkpoint.

Each trial forks a child (sharing the already-imported torch, so a trial costs a fraction of a second,
not an interpreter start) that runs the trainer's real save path,
:func:`mtnlg.checkpoint.save_checkpoint`, with its own step-specific weights and optimizer state,
and dies by SIGKILL (no handler, no cleanup: a node losing power, the OOM killer) at a random moment of
that save. The moment is picked two ways:

* by the clock: the parent sleeps a random fraction of the measured save duration, then kills;
* by progress: the child counts Python profile events and kills itself at a random event, uniformly
  over the whole save or within its short commit phase (manifest, rename, pruning of old checkpoints),
  where a wall-clock window of a few milliseconds would rarely be hit on a busy machine.

After every kill, exactly what a restarted trainer does is checked:

* every directory that *looks like* a checkpoint (``step_*``) is complete and verifies against its
  manifest: a half-written or half-deleted directory is never left under a checkpoint name;
* after removing stale temporaries, ``resume=auto`` finds a complete checkpoint, and it is either the
  one being saved (the kill came after the commit) or the previous complete one;
* loading it gives back bit-for-bit the weights, optimizer state and trainer state of that step.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from mtnlg.config import CheckpointConfig, ModelConfig
from mtnlg.errors import CheckpointError
from mtnlg.model.init import build_model, materialize
from mtnlg import checkpoint as ckpt

pytestmark = [pytest.mark.skipif(not hasattr(os, "fork"), reason="the crash trials fork the trainer (POSIX only)"),
              pytest.mark.filterwarnings("ignore:torch.distributed is disabled")]

TRIALS = 16
KEEP = 2
CFG = ModelConfig(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, ffn_hidden_size=256, max_seq_len=128)


def _trainer():
    model = materialize(build_model(CFG), seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return model, opt


def _set_step_state(model, opt, step: int) -> None:
    """Give the model and the optimizer values that identify ``step`` (and differ from every other step)."""
    g = torch.Generator().manual_seed(1000 + step)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
            p.grad = torch.randn(p.shape, generator=g)
    opt.step()  # optimizer state (exp_avg, exp_avg_sq, step) now depends on the step too
    opt.zero_grad(set_to_none=True)


def _save(root: Path, model, opt, step: int) -> Path:
    return ckpt.save_checkpoint(root, step, [model], [opt], {"step": step, "consumed_samples": 8 * step}, keep=KEEP)


def _expected(step: int) -> tuple[dict[str, torch.Tensor], dict]:
    model, opt = _trainer()
    # a fresh optimizer sees one step per saved state; replay exactly what the saver did
    _set_step_state(model, opt, step)
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {k: v.clone() for k, v in ckpt.optimizer_state([model], [opt]).items() if isinstance(v, torch.Tensor)})


def _fork_save(root: Path, step: int, kill_at_event: int | None = None) -> tuple[int, int]:
    """Fork a child that saves ``step``; return (pid, read end of its pipe).

    The child writes ``s`` when it starts saving, then (if it survives) four 8-byte integers: the save's
    duration in microseconds, the number of Python profile events (calls, returns, C calls) the save made,
    the event at which the commit phase (manifest, rename, pruning) began and the event at which
    ``step_N`` appeared (the rename, the commit point). With ``kill_at_event`` it
    SIGKILLs itself at that event: a crash at a reproducible point inside the save."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: the trainer
        code = 1
        try:
            os.close(r)
            model, opt = _trainer()
            _set_step_state(model, opt, step)
            step_dir_name = ckpt.step_dir_name(step)
            events, commit_at, renamed_at = [0], [0], [0]

            def count(frame, event, arg):
                events[0] += 1
                if events[0] == kill_at_event:
                    os.kill(os.getpid(), signal.SIGKILL)
                if not commit_at[0] and event == "call" and frame.f_code.co_name == "write_manifest":
                    commit_at[0] = events[0]
                renamed = event == "c_return" and getattr(arg, "__name__", "") == "rename"
                if commit_at[0] and not renamed_at[0] and renamed and (root / step_dir_name).is_dir():
                    renamed_at[0] = events[0]  # step_N just appeared: the commit point

            os.write(w, b"s")
            t0 = time.perf_counter()
            sys.setprofile(count)
            threading.setprofile(count)
            _save(root, model, opt, step)
            sys.setprofile(None)
            os.write(w, b"".join(int(v).to_bytes(8, "little")
                                 for v in ((time.perf_counter() - t0) * 1e6, events[0], commit_at[0], renamed_at[0])))
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    os.read(r, 1)  # wait until the child is about to save
    return pid, r


def _finish(pid: int, r: int) -> tuple[bool, bytes]:
    """Reap the child; (was it killed, what it reported)."""
    _, status = os.waitpid(pid, 0)
    with os.fdopen(r, "rb") as f:
        report = f.read()
    return os.WIFSIGNALED(status), report


def _check_no_impostors(root: Path) -> list[int]:
    """Every ``step_*`` directory verifies; return their steps. Anything else visible must be hidden (``.``)."""
    steps = []
    for p in root.iterdir():
        if p.name.startswith("."):
            continue  # temporaries: never listed, never loaded
        m = ckpt.STEP_RE.match(p.name)
        assert m and p.is_dir(), f"unexpected entry {p.name} in {root}"
        try:
            ckpt.verify_checkpoint(p)
        except CheckpointError as e:  # pragma: no cover - this is the failure the test exists to catch
            pytest.fail(f"a directory named like a checkpoint is incomplete after a crash: {e}")
        steps.append(int(m.group(1)))
    return sorted(steps)


@pytest.mark.slow
def test_sigkill_during_checkpoint_save_never_leaves_a_loadable_partial(tmp_path: Path):
    root = tmp_path / "checkpoints"
    model, opt = _trainer()
    _set_step_state(model, opt, 1)
    _save(root, model, opt, 1)  # a complete checkpoint to fall back on

    # Measure saves the way the children do them: wall time and the number of Python call events.
    durations, events, commits, renames = [], [], [], []
    for step in (2, 3, 4):
        killed, report = _finish(*_fork_save(root, step))
        assert not killed and len(report) == 32, "a measuring save failed"
        us, n, c, rn = (int.from_bytes(report[i:i + 8], "little") for i in (0, 8, 16, 24))
        durations.append(us / 1e6)
        events.append(n)
        commits.append(c)
        renames.append(rn)
    save_s, save_events, commit_event, rename_event = sorted(durations)[1], min(events), min(commits), min(renames)
    assert 0 < commit_event < rename_event < save_events
    assert _check_no_impostors(root)[-1] == 4

    rng = random.Random(20251129)
    outcomes = []
    newest = 4
    for trial in range(TRIALS):
        step = 5 + trial
        if trial % 3 == 2:  # by the clock: a random moment within the measured save duration
            pid, r = _fork_save(root, step)
            where = f"t={rng.uniform(0.0, 1.0):.2f}"
            time.sleep(float(where[2:]) * save_s)
            os.kill(pid, signal.SIGKILL)
        else:  # at a random point of the save's own execution (immune to CPU contention):
            # or in the short commit phase, where atomicity lives: manifest + rename, or the pruning after it
            lo, hi = {0: (1, save_events - 5), 1: (commit_event, rename_event - 1),
                      4: (rename_event + 1, save_events - 5)}[trial % 6 if trial % 3 == 1 else 0]
            at = rng.randint(lo, hi)
            where = f"event {at}/{save_events}"
            pid, r = _fork_save(root, step, kill_at_event=at)
        killed, _ = _finish(pid, r)

        visible = _check_no_impostors(root)
        ckpt.remove_stale_temps(root)  # what the restarted trainer does first
        assert not [p for p in root.iterdir() if p.name.startswith(".step_")], "stale temporaries survived cleanup"
        found = ckpt.resolve_resume(CheckpointConfig(resume="auto"), root)
        assert found is not None, f"trial {trial}: no complete checkpoint to resume from"
        got = int(ckpt.STEP_RE.match(found.name).group(1))
        assert got in (step, newest), f"trial {trial}: resumed step {got}, expected {step} or {newest}"
        assert got == max(visible)

        # Load it as the trainer would and compare every tensor bit for bit with that step's state.
        m2, o2 = _trainer()
        _set_step_state(m2, o2, 999)  # different values, so a load that does nothing cannot pass
        state = ckpt.load_checkpoint(found, [m2], [o2])
        assert state["step"] == got and state["consumed_samples"] == 8 * got
        want_model, want_optim = _expected(got)
        for k, v in m2.state_dict().items():
            assert torch.equal(v, want_model[k]), f"trial {trial}: {k} differs after resume from step {got}"
        for k, v in ckpt.optimizer_state([m2], [o2]).items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, want_optim[k]), f"trial {trial}: optimizer {k} differs"
        outcomes.append((where, "killed" if killed else "finished", "committed" if got == step else "rolled back"))
        newest = got

    print(f"\nsave: {save_s * 1000:.0f} ms, {save_events} profile events, commit phase from event {commit_event}, "
          f"step_N appears at event {rename_event}; kill point -> child, resume:")
    for o in outcomes:
        print("   ", *o)
    kills = sum(1 for _, k, _ in outcomes if k == "killed")
    assert kills >= 10, f"only {kills} trials killed the trainer while it was saving"
    assert {c for _, _, c in outcomes} == {"committed", "rolled back"}, "kills must land before and after the commit"
