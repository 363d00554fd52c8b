"""The training loop: data -> engine step -> NaN guard -> AdamW -> metrics -> eval -> checkpoints.

::

    resume (newest complete checkpoint) ─┐
    for step in start..steps:            ▼
        batch size  = ramp(consumed samples)          micro-batches = batch / (micro x dp)
        engine.train_step(micro-batches)              forward + backward + grad sync (TP/PP/FSDP)
        norm = engine.clip_grad_norm_(grad_clip)      global norm across every shard
        finite? ── no ─► skip the update, count it; abort after max_bad_steps in a row
           └─ yes ─► AdamW.step, scheduler.step, engine.after_optimizer_step
        metrics (rank 0) ─ valid every eval_interval ─ checkpoint every interval / on SIGTERM, SIGINT
    test split at the end, final checkpoint, loss.png

Every rank runs the same loop; only rank 0 writes metrics and plots. The step (``mtnlg.train.step``,
on a model laid out by ``mtnlg.parallel.parallelize``) owns the layout, loss, precision and
train/eval mode; this module owns the optimizer, the schedule, the data order and the checkpoints.
"""

from __future__ import annotations

import logging
import math
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from mtnlg.config import Config
from mtnlg.device import denormals_flushed, reuse_freed_memory
from mtnlg.errors import ConfigError, MtnlgError
from mtnlg import checkpoint as ckpt
from mtnlg.train.metrics import MetricsWriter, flops_per_token, peak_memory_mb, peak_tflops, perplexity
from mtnlg.train.optim import BatchRamp, build_optimizer, build_scheduler, set_kernel
from mtnlg.train.threads import governor_for

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What :meth:`Trainer.fit` returns."""

    run_dir: Path
    step: int
    status: str  # "finished" | "interrupted" | "time_limit"
    train_loss: float | None = None
    valid_loss: float | None = None
    test_loss: float | None = None
    skipped_steps: int = 0
    tokens_per_s: float | None = None
    checkpoint: Path | None = None
    resumed_from: Path | None = None
    best_valid_loss: float | None = None  # the lowest valid loss of this run and its step
    best_valid_step: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _broadcast(obj: Any) -> Any:
    if not _dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """Builds everything a run needs from a :class:`Config` and a run directory, then :meth:`fit`.

    ``on_record(record)`` (rank 0 only) sees every metrics record as it is written, for progress
    displays; ``on_start(trainer)`` is called once the start step is known.
    """

    def __init__(self, cfg: Config, run_dir: str | Path | None = None,
                 on_record: Callable[[dict[str, Any]], None] | None = None):
        from mtnlg.data.datasets import BatchSampler, build_datasets, prepare_tokenizer
        from mtnlg.device import pick_device
        from mtnlg.parallel.mesh import init_distributed
        from mtnlg.train.step import build_train_step

        self.cfg = cfg
        self.on_record = on_record
        self.device = pick_device(cfg.train.device)
        self.rank, self.world = init_distributed(self.device)
        self.is_main = self.rank == 0
        if run_dir is None:
            run_dir = default_run_dir()
        self.run_dir = Path(_broadcast(str(run_dir)))
        self.ckpt_root = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else self.run_dir / "checkpoints"
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise ConfigError(f"--output {self.run_dir} is an existing file; a run is written into a directory")
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        # Rank 0 fills the tokenizer / data caches first; the others then read them.
        for turn in (True, False):
            if self.is_main == turn:
                self.tokenizer = prepare_tokenizer(cfg, self.run_dir if self.is_main else None)
                self.datasets = build_datasets(cfg, self.tokenizer)
            if _dist():
                dist.barrier()
        if self.is_main:  # after the tokenizer: model.vocab_size=None has become its size
            cfg.save(self.run_dir / "config.yaml")

        seed_everything(cfg.train.seed)
        self.engine = build_train_step(cfg, self.device)  # layout, activation checkpointing, compile
        self.model_parts = list(self.engine.model_parts)
        self.optimizers = [build_optimizer([part], cfg.train) for part in self.model_parts]
        self.schedulers = [build_scheduler(opt, cfg.train) for opt in self.optimizers]
        self.ramp = BatchRamp(cfg.train, self.engine.dp_size)
        self.sampler = BatchSampler(len(self.datasets["train"]), seed=cfg.data.seed,
                                    dp_rank=self.engine.dp_rank, dp_size=self.engine.dp_size)
        self.step = 0
        self.bad_in_a_row = 0
        self.skipped_steps = 0
        self.peak_tflops: float | None = None
        self.writer: MetricsWriter | None = None
        self._stop_signal: int | None = None
        self._stop_now = False
        self.resumed_from: Path | None = None

    # -- state ------------------------------------------------------------------------------------
    def trainer_state(self) -> dict[str, Any]:
        return {"step": self.step, "sampler": self.sampler.state_dict(),
                "schedulers": [s.state_dict() for s in self.schedulers],
                "bad_in_a_row": self.bad_in_a_row, "skipped_steps": self.skipped_steps}

    def save(self) -> Path:
        return ckpt.save_checkpoint(self.ckpt_root, self.step, self.model_parts, self.optimizers,
                                    self.trainer_state(), keep=self.cfg.checkpoint.keep, config=self.cfg,
                                    tokenizer_dir=self.run_dir / "tokenizer", outer=getattr(self.engine, "outer", None))

    def resume(self) -> Path | None:
        """Load the checkpoint chosen by ``checkpoint.resume`` (rank 0 verifies, all ranks load)."""
        found: Any = None
        if self.is_main:
            ckpt.remove_stale_temps(self.ckpt_root)
            try:
                found = ckpt.resolve_resume(self.cfg.checkpoint, self.ckpt_root)
                if found is not None and self.cfg.checkpoint.resume == "auto":
                    found = pretraining_checkpoint(Path(found), self.ckpt_root, self.cfg.train.steps)
            except MtnlgError as e:
                found = e
        found = _broadcast(found)
        if isinstance(found, BaseException):
            raise found
        if found is None:
            if self.is_main and self.cfg.checkpoint.resume == "none":
                ckpt.abandon_after(self.ckpt_root, 0)  # starting over: the old history must not win later
            return None
        state = ckpt.load_checkpoint(found, self.model_parts, self.optimizers, outer=getattr(self.engine, "outer", None))
        for opt in self.optimizers:  # the saved param groups name the saving layout's AdamW kernel
            set_kernel(opt, self.cfg.train.fused_adamw)
        self.step = int(state["step"])
        if self.is_main:
            ckpt.abandon_after(self.ckpt_root, self.step)  # continuing an older step: newer ones are abandoned
        self.sampler.load_state_dict(state["sampler"])
        for sched, s in zip(self.schedulers, state["schedulers"]):
            sched.load_state_dict(s)
        self.bad_in_a_row = int(state.get("bad_in_a_row", 0))
        self.skipped_steps = int(state.get("skipped_steps", 0))
        if state.get("world_size") == self.world:
            ckpt.set_rng_state(state["rng"])
        else:
            seed_everything(self.cfg.train.seed + self.step)
        self.resumed_from = Path(found)
        log.info("resumed from %s at step %d", found, self.step)
        return self.resumed_from

    # -- one step ---------------------------------------------------------------------------------
    def span(self, step: int) -> int:
        """Sequences of ``train.seq_len`` packed into one at 0-based ``step``: ``long_seq_len / seq_len`` on every
        ``train.long_seq_every``-th step, else 1."""
        every = self.cfg.train.long_seq_every
        return self.cfg.long_span() if every and (step + 1) % every == 0 else 1

    def _long_batch(self, batch_size: int, span: int) -> tuple[int, int]:
        """A step's (global sequences, micro-batch size) with ``span`` short sequences packed into each: the same
        tokens as ``batch_size`` short ones where they divide evenly, else at least one sequence a micro-batch."""
        mbs = max(1, self.cfg.train.micro_batch_size // span)
        per_rank = batch_size // self.engine.dp_size // span // mbs * mbs
        return max(mbs, per_rank) * self.engine.dp_size, mbs

    def _batch(self, indices: list[int], dataset, span: int, mbs: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        tokens = torch.stack([dataset.window(i, span) for i in indices]).to(self.device, non_blocking=True)
        return [(t[:, :-1], t[:, 1:]) for t in tokens.split(mbs)]

    def _agree(self, bad: bool) -> tuple[bool, bool]:
        """All ranks agree on (skip this update, stop now) so that no rank waits alone."""
        stop = self._stop_signal is not None
        if not _dist():
            return bad, stop
        flags = torch.tensor([float(bad), float(stop)], device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return bool(flags[0]), bool(flags[1])

    def train_step(self) -> dict[str, Any]:
        """One optimizer step (or a skipped one); returns its metrics record."""
        tc = self.cfg.train
        t0 = time.perf_counter()
        span = self.span(self.step)
        batch_size, mbs = self._long_batch(self.ramp.batch_size(self.sampler.consumed), span)
        indices = self.sampler.next_batch(batch_size * span, span)
        micro = self._batch(indices, self.datasets["train"], span, mbs)
        out = self.engine.train_step(micro)
        loss = float(out.loss)
        grad_norm = float(self.engine.clip_grad_norm_(tc.grad_clip if tc.grad_clip > 0 else float("inf")))
        # a finite global norm (summed over every rank's gradients) means every gradient is finite: no second pass
        bad = not (math.isfinite(loss) and math.isfinite(grad_norm))
        bad, stop = self._agree(bad)
        lr = self.optimizers[0].param_groups[-1]["lr"]  # AdamW's (train.lr); Muon's: train.muon_lr or 4x
        if bad:
            self.bad_in_a_row += 1
            self.skipped_steps += 1
            log.warning("step %d: non-finite loss or gradients (loss=%s, grad norm=%s); update skipped (%d in a row)",
                        self.step + 1, loss, grad_norm, self.bad_in_a_row)
        else:
            self.bad_in_a_row = 0
            for opt in self.optimizers:
                opt.step()
            for sched in self.schedulers:
                sched.step()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        self.step += 1
        if not bad:
            self.engine.after_optimizer_step(self.step)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - t0
        tokens = batch_size * span * tc.seq_len
        tflops = flops_per_token(self.cfg.model, span * tc.seq_len) * tokens / dt / self.world / 1e12
        record = {"step": self.step, "split": "train", "loss": loss, "ppl": perplexity(loss), "lr": lr,
                  "grad_norm": grad_norm, "batch_size": batch_size, "seq_len": span * tc.seq_len,
                  "tokens": self.sampler.consumed * tc.seq_len,
                  "tokens_per_s": tokens / dt, "step_time_s": dt, "tflops": tflops,
                  "mfu": tflops / self.peak_tflops if self.peak_tflops else None,
                  "mem_mb": peak_memory_mb(self.device), "comm_bytes": self.engine.comm_bytes(),
                  "skipped": bad, "skipped_steps": self.skipped_steps}
        if self.bad_in_a_row >= tc.max_bad_steps:
            raise MtnlgError(f"{self.bad_in_a_row} steps in a row had a non-finite loss or gradients (train."
                             f"max_bad_steps={tc.max_bad_steps}); aborting without saving. Lower train.lr, check the "
                             f"data, or resume from the last checkpoint in {self.ckpt_root}")
        self._stop_now = stop
        return record

    # -- evaluation -------------------------------------------------------------------------------
    def evaluate(self, split: str) -> dict[str, Any]:
        """Mean loss over ``split``: every target token exactly once (:func:`eval_sequences`), the same
        tokens ``mtnlg eval`` scores. ``train.eval_batches > 0`` limits the valid split to that many
        global batches' worth of sequences; the test split is always evaluated whole."""
        from mtnlg.data.datasets import eval_sequences, pad_sequences

        tc = self.cfg.train
        seqs = eval_sequences(self.datasets[split])
        if split == "valid" and tc.eval_batches:
            seqs = seqs[:tc.eval_batches * tc.global_batch_size]
        dp, mbs = self.engine.dp_size, tc.micro_batch_size
        per = -(-len(seqs) // dp)
        per = -(-per // mbs) * mbs  # whole micro-batches on every rank; the padding is all ignored labels
        mine = seqs[self.engine.dp_rank * per:(self.engine.dp_rank + 1) * per]
        mine += [torch.empty(0, dtype=torch.long)] * (per - len(mine))
        micro = [tuple(t.to(self.device) for t in pad_sequences(mine[i:i + mbs], tc.seq_len + 1))
                 for i in range(0, per, mbs)]
        loss_sum, count = self.engine.eval_loss(micro)  # eval mode, no grad, then train
        loss = float(loss_sum) / max(1.0, float(count))
        return {"step": self.step, "split": split, "loss": loss, "ppl": perplexity(loss), "tokens": int(count)}

    # -- the loop ---------------------------------------------------------------------------------
    def _emit(self, record: dict[str, Any]) -> None:
        if not self.is_main:
            return
        if self.writer is not None:
            self.writer.write(record)
        if self.on_record is not None:
            self.on_record(record)
        if record["split"] != "train":
            log.info("step %d %s loss %.4f ppl %.2f", record["step"], record["split"], record["loss"], record["ppl"])
        elif record["step"] % self.cfg.log.interval == 0:
            log.debug("step %d loss %.4f lr %.2e %.0f tok/s", record["step"], record["loss"], record["lr"],
                      record["tokens_per_s"])

    def _install_signals(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous = {}

        def handler(signum, _frame):
            if self._stop_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C stops at once
            self._stop_signal = signum
            log.warning("received %s: saving a checkpoint after this step", signal.Signals(signum).name)

        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, handler)
        return previous

    def fit(self) -> TrainResult:
        cfg, tc = self.cfg, self.cfg.train
        self.resume()
        if self.is_main:
            self.peak_tflops = peak_tflops(self.device, _compute_dtype(self.device, tc.precision), cfg.log.peak_tflops)
            metrics = self.run_dir / "metrics.jsonl"
            if metrics.is_file():  # drop what a killed run logged after its last checkpoint
                _truncate_metrics(metrics, self.step)
            if cfg.log.jsonl or cfg.log.tensorboard:
                self.writer = MetricsWriter(self.run_dir, jsonl=cfg.log.jsonl, tensorboard=cfg.log.tensorboard)
        result = TrainResult(run_dir=self.run_dir, step=self.step, status="finished", resumed_from=self.resumed_from)
        previous = self._install_signals()
        self._stop_now = False
        start_time = time.monotonic()
        last_saved = self.step if self.resumed_from else None
        tok_rates: list[float] = []
        step_times: list[float] = []
        threads = torch.get_num_threads()
        governor = governor_for(tc.threads, self.device, self.world)
        try:
            while self.step < tc.steps:
                record = self.train_step()
                if governor is not None and record["tokens_per_s"] > 0:
                    governor.observe(1.0 / record["tokens_per_s"])
                tok_rates.append(record["tokens_per_s"])
                step_times.append(record["step_time_s"])
                result.train_loss = record["loss"]
                self._emit(record)
                if self.step % tc.eval_interval == 0 or self.step == tc.steps:
                    valid = self.evaluate("valid")
                    if valid["tokens"]:  # an empty valid split (data.split=100,0,0) has nothing to score
                        result.valid_loss = valid["loss"]
                        result.extra["valid_step"] = self.step
                        if result.best_valid_loss is None or valid["loss"] < result.best_valid_loss:
                            result.best_valid_loss, result.best_valid_step = valid["loss"], self.step
                        self._emit(valid)
                timed_out = tc.max_time_s is not None and time.monotonic() - start_time > tc.max_time_s
                if tc.max_time_s is not None and _dist():  # rank 0's clock decides, for every rank
                    timed_out = bool(_broadcast(timed_out))
                if not _dist() and self._stop_signal is not None:  # distributed: agreed in the next step
                    self._stop_now = True
                if self._stop_now or timed_out:
                    result.status = "interrupted" if self._stop_now else "time_limit"
                    break
                if cfg.checkpoint.interval and self.step % cfg.checkpoint.interval == 0 and not self.bad_in_a_row:
                    result.checkpoint = self.save()  # never right after a non-finite step (the next good one saves)
                    last_saved = self.step
            if last_saved != self.step:
                if self.bad_in_a_row:
                    raise MtnlgError(f"step {self.step}: the last {self.bad_in_a_row} step(s) had a non-finite loss "
                                     f"or gradients; not saving a diverged model. Lower train.lr, check the data, or "
                                     f"resume from the last checkpoint in {self.ckpt_root}")
                result.checkpoint = self.save()
            if result.status == "finished":
                test = self.evaluate("test")
                if test["tokens"]:
                    result.test_loss = test["loss"]
                    self._emit(test)
            if self.is_main and result.checkpoint is not None and result.best_valid_step is not None:
                _say_which_checkpoint(result, self.step)
        finally:
            if governor is not None:  # the count this process had (evaluation after, SFT, another run)
                torch.set_num_threads(threads)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if self.writer is not None:
                self.writer.close()
                self.writer = None
        result.step = self.step
        result.skipped_steps = self.skipped_steps
        if tok_rates:
            result.tokens_per_s = float(np.median(tok_rates))
            result.extra["step_time_s"] = float(np.median(step_times))  # median: compile / warm-up steps apart
            result.extra["first_step_s"] = step_times[0]
        if self.is_main and cfg.log.jsonl:
            try:
                from mtnlg.train.plot import plot_run

                plot_run(self.run_dir)
            except Exception as e:  # a plot must never fail a finished run
                log.warning("could not plot %s: %s", self.run_dir, e)
        return result


def _say_which_checkpoint(result: TrainResult, step: int) -> None:
    """Generation loads the newest checkpoint of a run (saved at ``step``); say so, and say whether it is
    the one with the best valid loss."""
    last = result.extra.get("valid_step")
    best = Path(result.checkpoint).with_name(f"step_{result.best_valid_step:08d}")
    if result.best_valid_step == step:
        log.info("generation loads %s, the checkpoint with the best valid loss (%.4f)", result.checkpoint,
                 result.best_valid_loss)
    elif last == result.best_valid_step:  # still improving at the last evaluation; newer steps unvalidated
        log.info("generation loads the newest checkpoint %s; the last validation (step %d, loss %.4f) was the best "
                 "so far", result.checkpoint, last, result.best_valid_loss)
    else:
        log.warning("valid loss was lowest at step %d (%.4f), not at the last evaluation (step %s, %.4f): generation "
                    "loads the newest checkpoint %s; %s", result.best_valid_step, result.best_valid_loss, last,
                    result.valid_loss, result.checkpoint,
                    f"pass --checkpoint {best} for the best one" if best.is_dir() else
                    "train fewer steps (or save more often) to keep the best one")


def _compute_dtype(device: torch.device, precision: str) -> torch.dtype:
    from mtnlg.device import compute_dtype

    return compute_dtype(device, precision)


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the records of steps <= ``step`` (those a resumed run will not repeat)."""
    import json

    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if int(rec.get("step", 0)) <= step and not (rec.get("split") == "test"):
            kept.append(line)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
    tmp.replace(path)


def train(cfg: Config, run_dir: str | Path | None = None,
          on_record: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    """Train ``cfg`` into ``run_dir`` (resuming per ``checkpoint.resume``), denormals flushed to zero
    on the CPU while it runs (:func:`mtnlg.device.denormals_flushed`) and freed buffers reused from then
    on (:func:`mtnlg.device.reuse_freed_memory`)."""
    reuse_freed_memory()
    with denormals_flushed():
        return new_trainer(cfg, run_dir, on_record).fit()


def default_run_dir() -> Path:
    """Where a run goes without ``--output``: ``runs/<date>-<time>``."""
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


def new_trainer(cfg: Config, run_dir: str | Path | None,
                on_record: Callable[[dict[str, Any]], None] | None = None) -> Trainer:
    """``Trainer(cfg, run_dir, on_record)``; when it refuses the run (before any step: a batch that does not
    divide, a vocabulary too small ...), the run directory it created is removed again, not left empty."""
    if run_dir is None:
        run_dir = default_run_dir()
    created, missing = None, Path(run_dir).absolute()
    while not missing.exists():  # the outermost directory this call will create (runs/ too, if it is new)
        created, missing = missing, missing.parent
    try:
        return Trainer(cfg, run_dir, on_record)
    except MtnlgError:
        if created is not None and (not _dist() or dist.get_rank() == 0):
            import shutil

            shutil.rmtree(created, ignore_errors=True)
        raise


def pretraining_checkpoint(found: Path, root: Path, steps: int, depth: int = 0) -> Path:
    """Where pretraining resumes when the newest checkpoint is ``found``. The SFT stage saves its model as
    the run's newest checkpoint; a run asked for more ``train.steps`` than that model's pretraining had
    continues from its pretraining source, not from the fine-tuned weights (the SFT checkpoint, then newer,
    is moved aside, and the SFT stage runs again at the end). The source of an SFT of an SFT is followed."""
    from mtnlg.checkpoint.sharded import read_trainer_state

    state = read_trainer_state(found)
    if state.get("stage") != "sft" or depth > 8:
        return found
    src = Path(str(state.get("source", "")))
    match = ckpt.STEP_RE.match(src.name)
    if steps <= (int(match.group(1)) if match else 0):
        return found  # pretraining is done: the run's model is the fine-tuned one
    source = next((p for _, p in ckpt.list_checkpoints(root) if p.name == src.name), None)
    if source is None and src.is_dir():  # fine-tuned from another run (mtnlg sft --output NEW)
        source = src
    if source is None:
        raise ConfigError(f"{found} is an SFT checkpoint and its pretraining checkpoint {src} is not found; to "
                          f"pretrain further, resume from a pretraining checkpoint with --checkpoint.resume=PATH")
    log.warning("%s is an SFT checkpoint: pretraining continues from its source %s (the SFT stage runs again "
                "after it)", found.name, source)
    return pretraining_checkpoint(source, root, steps, depth + 1)
