"""``mtnlg train``: train the configured model into a run directory, with a progress bar.

With no arguments it trains the embedded default (a ~1.1M-parameter MT-NLG model on the built-in
Chinese corpora, poems weighted up, then the SFT stage, on CPU). ``--nproc N`` re-launches the same command under torchrun
(``python -m torch.distributed.run``) with N local processes; any layout the config asks for
(``--parallel.tp=2`` ...) then applies. ``--checkpoint.resume=auto`` (the default) continues the
newest complete checkpoint in ``--output``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from mtnlg.cli import add_config_arguments, load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, output=True)
    parser.add_argument("--nproc", type=int, default=None, metavar="N",
                        help="launch N local processes with torchrun (gloo on CPU, nccl on GPUs)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (one line every log.interval steps)")


def _relaunch(args: argparse.Namespace, output: Path) -> int:
    """Run this command again under torchrun with ``--nproc`` processes."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
           "-m", "mtnlg", "train", "--output", str(output)]
    if args.config:
        cmd += ["--config", args.config]
    if args.no_progress:
        cmd.append("--no-progress")
    cmd += list(args.overrides)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc)))
    proc = subprocess.Popen(cmd, env=env)
    # Ctrl-C reaches torchrun and its workers through the terminal's process group; they checkpoint
    # and exit, and this parent waits for them instead of dying first.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return proc.wait()
    finally:
        signal.signal(signal.SIGINT, previous)


class _Progress:
    """A tqdm bar over optimizer steps: loss, tokens/s and the ETA (tqdm's)."""

    def __init__(self, total: int, enabled: bool, tty: bool, interval: int):
        self.total, self.enabled, self.tty, self.interval, self.bar = total, enabled, tty, interval, None
        self.valid: float | None = None
        self.post: dict[str, str] = {}
        self.t0 = time.monotonic()

    def _line(self, record: dict) -> None:
        """Without a terminal: one line every log.interval steps (evaluations are logged by the loop)."""
        if record["split"] == "train" and (record["step"] % self.interval == 0 or record["step"] == self.total):
            print(f"step {record['step']}/{self.total} loss {record['loss']:.4f} lr {record['lr']:.2e} "
                  f"{record['tokens_per_s']:.0f} tok/s elapsed {time.monotonic() - self.t0:.0f}s",
                  file=sys.stderr, flush=True)

    def __call__(self, record: dict) -> None:
        if not self.enabled:
            return
        if not self.tty:
            self._line(record)
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, initial=record["step"] - 1, unit="step", dynamic_ncols=True,
                            desc="train")
        if record["split"] == "valid":  # shown at once, not with the next step's record
            self.valid = record["loss"]
            self.post["valid"] = f"{self.valid:.3f}"
            self.bar.set_postfix(self.post, refresh=True)
        if record["split"] != "train":
            return
        self.bar.update(record["step"] - self.bar.n)
        post = {"loss": f"{record['loss']:.3f}", "lr": f"{record['lr']:.1e}",
                "tok/s": f"{record['tokens_per_s']:.0f}"}
        if record.get("mfu"):
            post["mfu"] = f"{100 * record['mfu']:.0f}%"
        if self.valid is not None:
            post["valid"] = f"{self.valid:.3f}"
        self.post = post
        self.bar.set_postfix(post, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args)  # validate before launching anything
    output = Path(args.output) if args.output else None
    if args.nproc is not None and args.nproc < 1:
        from mtnlg.errors import ConfigError

        raise ConfigError(f"--nproc must be >= 1, got {args.nproc}")
    if args.nproc and args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        from mtnlg.parallel.mesh import resolve_degrees

        resolve_degrees(cfg.parallel, args.nproc)  # a layout that does not fit fails here, once, not in N ranks
        output = output or Path("runs") / time.strftime("%Y%m%d-%H%M%S")
        rc = _relaunch(args, output)
        return _sft(cfg, output) if rc == 0 else rc

    from mtnlg.train.loop import new_trainer

    is_main = int(os.environ.get("RANK", "0")) == 0
    progress = _Progress(cfg.train.steps, enabled=is_main, tty=sys.stderr.isatty() and not args.no_progress,
                         interval=cfg.log.interval)
    trainer = new_trainer(cfg, output, on_record=progress)
    if is_main:
        from mtnlg.model.transformer import count_parameters

        print(f"run directory: {trainer.run_dir}  ({count_parameters(cfg.model) / 1e6:.1f}M parameters, "
              f"{trainer.world} process(es), device {trainer.device})", file=sys.stderr)
    # While the bar is drawn, log lines go through tqdm.write: each on its own line, the bar redrawn below.
    from tqdm.contrib.logging import logging_redirect_tqdm

    redirect = logging_redirect_tqdm() if progress.enabled and progress.tty else contextlib.nullcontext()
    try:
        with redirect:
            result = trainer.fit()
    finally:
        progress.close()
    if is_main:
        parts = [f"{result.status} at step {result.step}"]
        for name in ("train", "valid", "test"):
            value = getattr(result, f"{name}_loss")
            if value is not None:
                parts.append(f"{name} loss {value:.4f}")
        if result.tokens_per_s:
            parts.append(f"{result.tokens_per_s:.0f} tokens/s")
        if "step_time_s" in result.extra:
            parts.append(f"{result.extra['step_time_s']:.2f} s/step (first step {result.extra['first_step_s']:.1f} s)")
        if result.skipped_steps:
            parts.append(f"{result.skipped_steps} skipped steps")
        print(f"{', '.join(parts)}; run directory {result.run_dir}", file=sys.stderr)
    if result.status == "interrupted":
        return 130
    if result.status == "finished" and trainer.world == 1:  # under torchrun: the launching parent runs it
        return _sft(cfg, result.run_dir)
    return 0


def _sft(cfg, run_dir: Path) -> int:
    """The SFT stage (``sft.enabled``): fine-tune the run on conversations so that chat answers."""
    if not cfg.sft.enabled:
        return 0
    from mtnlg.device import pick_device
    from mtnlg.train.sft import sft_stage

    def progress(step: int, loss: float) -> None:
        if step % 10 == 0 or step == cfg.sft.steps:
            print(f"sft step {step}/{cfg.sft.steps} loss {loss:.4f}", file=sys.stderr, flush=True)

    result = sft_stage(cfg, run_dir, device=pick_device(cfg.train.device), on_step=progress)
    if result is not None:
        print(f"SFT: {result.steps} steps on {result.conversations} conversations in {result.seconds:.0f}s, "
              f"assistant loss {result.loss_before:.4f} -> {result.loss_after:.4f}; checkpoint {result.checkpoint} "
              f"(the run's newest: generation, chat and serve load it)", file=sys.stderr)
    return 0
