"""train.threads: the governor drops a thread while another process slows the steps, and takes it back."""

from __future__ import annotations

import torch

from mtnlg.train import threads as T


def _run(speeds, steps: int, gov: T.ThreadGovernor, now: list[int]) -> list[int]:
    """Feed ``gov`` the step time ``speeds(threads)`` of a simulated machine; the thread count per step."""
    seen = []
    for _ in range(steps):
        gov.observe(speeds(now[-1]))
        seen.append(now[-1])
    return seen


def test_an_idle_machine_keeps_every_thread_and_a_busy_one_drops_one_then_gets_it_back():
    now = [2]
    gov = T.ThreadGovernor(2, set_threads=now.append)
    idle = {2: 0.064, 1: 0.104}  # the default job's step on this VM: 2 threads idle, 1 thread
    busy = {2: 0.200, 1: 0.105}  # beside a process that keeps one core busy
    assert set(_run(idle.get, 300, gov, now)) == {2}  # nothing tried while the steps run at full speed
    assert now == [2]
    seen = _run(busy.get, 3 * T.PROBE_EVERY, gov, now)
    assert seen[-1] == 1 and gov.current == 1  # one look after the slowdown: one thread is faster
    seen = _run(idle.get, 3 * T.PROBE_EVERY, gov, now)
    assert seen[-1] == 2 and gov.current == 2  # the busy process went away: both threads again


def test_a_trial_that_is_not_faster_is_undone():
    now = [2]
    gov = T.ThreadGovernor(2, set_threads=now.append)
    _run({2: 0.06, 1: 0.1}.get, 40, gov, now)
    slow_everywhere = {2: 0.2, 1: 0.4}  # slower at full threads, but one thread is slower still
    seen = _run(slow_everywhere.get, 4 * T.PROBE_EVERY, gov, now)
    assert 1 in now and seen[-1] == 2 and gov.current == 2  # tried, measured worse, went back
    assert now.count(1) == 1  # and took the slower steps as the speed now: no trial every 50 steps after


def test_short_runs_and_pinned_counts_never_change_threads(monkeypatch):
    now = [2]
    gov = T.ThreadGovernor(2, set_threads=now.append)
    _run({2: 0.06, 1: 0.01}.get, 5, gov, now)  # the warm-up alone: no look yet
    _run({2: 1.0, 1: 0.01}.get, T.PROBE_EVERY, gov, now)
    assert now == [2]  # a test-sized run (under warm-up + PROBE_EVERY steps) keeps its count: bit-exact
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    assert T.governor_for(3, torch.device("cpu"), 1) is None and calls == [3]  # train.threads=3: exactly 3
    assert T.governor_for(0, torch.device("cpu"), 2) is None  # several processes: each already has its share
    assert T.governor_for(0, torch.device("cuda"), 1) is None
