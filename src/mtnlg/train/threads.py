"""CPU threads while training: all of them, fewer while another process slows the steps (``train.threads``).

With two or more intra-op threads every parallel operator waits for all of them, so when another
process keeps a core busy each operator waits for a scheduler slice. Measured on this 2-core VM, the
default job's step (4 x 96, 8 x 128 tokens): 64 ms on 2 threads idle, 175-227 ms on 2 threads beside
one busy process, 100-109 ms on 1 thread either way (a tiny model: 0.013 s a step idle, 1.2 s beside a
busy process). ``train.threads=0`` (the default; CPU, one process) keeps torch's thread count while the
steps run near the fastest seen at it; when they run ``SLOWER`` times that for a while, it tries one
thread fewer for a few steps and keeps whichever is faster, and at fewer threads it tries one more
every ``PROBE_EVERY`` steps, so an idle machine gets all its threads back::

    n = full: steps > 1.5x the fastest at full (a look every PROBE_EVERY steps) ─► try n-1 ─► keep the faster
    n < full: every PROBE_EVERY steps ─────────────────────────────────────────► try n+1 ─► keep the faster

A different thread count sums in a different order, so a run that changed threads differs from an idle
run's in the last bits of its losses; ``train.threads=N`` fixes the count at N (bit-reproducible under
any load, the way ``OMP_NUM_THREADS`` does).
"""

from __future__ import annotations

import logging
import statistics
from collections import deque

import torch

log = logging.getLogger(__name__)

PROBE_EVERY = 50  # steps between looks (the first after the warm-up): short test runs never change threads
TRIAL_STEPS = 4  # steps timed at the other thread count
WARMUP_STEPS = 10  # first steps (allocation, caches) are not representative
SLOWER = 1.5  # steps this many times the fastest seen at full threads: something else is using the cores
GAIN = 0.9  # a trial wins when its median step takes at most this fraction of the steps before it


class ThreadGovernor:
    """Chooses the intra-op thread count from observed step times, per token (:meth:`observe` after every step)."""

    def __init__(self, full: int, set_threads=torch.set_num_threads):
        self.full = self.current = full
        self._set = set_threads
        self.fastest_full = float("inf")
        self.recent: deque[float] = deque(maxlen=TRIAL_STEPS * 2)
        self.trial: int | None = None
        self.trial_times: list[float] = []
        self.seen = 0
        self.since = 0

    def observe(self, seconds: float) -> int | None:
        """Record one step's time (per token, so that a batch-size ramp is not a slowdown); returns the new
        thread count when this step changed it."""
        self.seen += 1
        if self.seen <= WARMUP_STEPS:
            return None
        if self.trial is not None:
            self.trial_times.append(seconds)
            return self._end_trial() if len(self.trial_times) >= TRIAL_STEPS else None
        self.recent.append(seconds)
        if self.current == self.full:
            self.fastest_full = min(self.fastest_full, seconds)
        self.since += 1
        if self.since < PROBE_EVERY or len(self.recent) < TRIAL_STEPS:
            return None
        self.since = 0
        typical = statistics.median(self.recent)
        if self.current == self.full and typical <= SLOWER * self.fastest_full:
            return None  # running at full speed: nothing to try
        target = self.current - 1 if self.current == self.full else self.current + 1
        if target < 1:
            return None
        self.trial, self.trial_times = target, []
        self._set(target)
        return None

    def _end_trial(self) -> int | None:
        before, tried = statistics.median(self.recent), statistics.median(self.trial_times)
        target, self.trial = self.trial, None
        if tried <= GAIN * before:
            why = "another process is using the cores" if target < self.current else "the cores are free again"
            log.info("%.3g us a token on %d thread(s), %.3g on %d: training on %d (%s; train.threads=N fixes "
                     "the count)", before * 1e6, self.current, tried * 1e6, target, target, why)
            self.current = target
            self.recent.clear()
            self.recent.extend(self.trial_times)
            return target
        self._set(self.current)
        if self.current == self.full:  # fewer threads were not faster: this is the speed now (a longer sequence,
            self.fastest_full = before  # a larger batch ...), not another process: no new trial until it drops
        return None


def governor_for(threads: int, device: torch.device, world: int) -> ThreadGovernor | None:
    """Apply ``train.threads`` in this process: N > 0 sets N threads for good; 0 on the CPU in a run of one
    process returns the governor that adapts the count (None where there is nothing to adapt)."""
    if threads > 0:
        torch.set_num_threads(threads)
        return None
    if device.type != "cpu" or world > 1 or torch.get_num_threads() < 2:
        return None
    return ThreadGovernor(torch.get_num_threads())
