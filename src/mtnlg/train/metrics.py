"""Training metrics: FLOPs per token (Megatron's formula), TFLOP/s and MFU, peak memory, and the
writers (``metrics.jsonl`` and TensorBoard).

FLOPs (Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters",
eq. 3) count the matmuls of one training iteration. Per token and per layer, the forward pass costs

    QKV 6h^2 + attention scores 2sh + attention over values 2sh + output projection 2h^2
    + MLP 4hf                                           = 8h^2 + 4hf + 4sh

and the LM head 2hV. Backward costs twice the forward, so a training token costs

    F = 3 * (L * (8h^2 + 4hf + 4sh) + 2hV)

With f = 4h this is exactly eq. 3 without recomputation, 72 B s L h^2 (1 + s/6h + V/12Lh) per
batch of B s tokens; we keep the general f (``ffn_hidden_size``). MFU uses these *model* FLOPs, so
activation recomputation does not inflate it (eq. 3's factor 4 instead of 3 would give HFU).
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

from mtnlg.config import ModelConfig

log = logging.getLogger(__name__)


def flops_per_token(cfg: ModelConfig, seq_len: int, vocab_size: int | None = None) -> float:
    """Model FLOPs to train on one token (forward + backward), see the module docstring."""
    h, f, L, s = cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_layers, seq_len
    V = vocab_size if vocab_size is not None else cfg.padded_vocab_size()
    return 3.0 * (L * (8 * h * h + 4 * h * f + 4 * s * h) + 2 * h * V)


def megatron_eq3_flops(batch: int, seq_len: int, layers: int, hidden: int, vocab: int,
                       recompute: bool = False) -> float:
    """Eq. 3 verbatim (f = 4h): 96 B s l h^2 (1 + s/6h + V/16lh) with full recomputation, else
    72 B s l h^2 (1 + s/6h + V/12lh). Used to check :func:`flops_per_token`."""
    B, s, l, h, V = batch, seq_len, layers, hidden, vocab
    if recompute:
        return 96 * B * s * l * h * h * (1 + s / (6 * h) + V / (16 * l * h))
    return 72 * B * s * l * h * h * (1 + s / (6 * h) + V / (12 * l * h))


# -- peak FLOP/s -----------------------------------------------------------------------------------


def cache_dir() -> Path:
    """``$MTNLG_CACHE`` or ``~/.cache/mtnlg`` (the same cache as the data pipeline)."""
    env = os.environ.get("MTNLG_CACHE")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "mtnlg"


def _device_key(device: torch.device, dtype: torch.dtype) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).replace(" ", "_")
    else:
        name = f"cpu{os.cpu_count()}-threads{torch.get_num_threads()}"
    return f"{name}-{str(dtype).replace('torch.', '')}"


def measure_matmul_tflops(device: torch.device, dtype: torch.dtype = torch.float32, n: int | None = None,
                          seconds: float = 0.5) -> float:
    """Achieved TFLOP/s of a square matmul (n x n @ n x n), best of several timed runs."""
    if n is None:
        n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        a @ b
    sync()
    best = 0.0
    deadline = time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        a @ b
        sync()
        dt = time.perf_counter() - t0
        best = max(best, 2 * n**3 / dt / 1e12)
        if time.perf_counter() > deadline:
            return best


def peak_tflops(device: torch.device, dtype: torch.dtype, given: float | None = None) -> float:
    """The per-device peak for MFU: ``given`` (log.peak_tflops), else the best matmul throughput this
    machine has shown, cached in :func:`cache_dir` per device, dtype and thread count. Each call
    measures again briefly (0.3 s) and keeps the maximum, so a first measurement taken while other
    processes loaded the machine does not stay as a too-low peak (and an MFU above 100%)."""
    if given:
        return float(given)
    key = _device_key(device, dtype)
    path = cache_dir() / "matmul_peak.json"
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    value = max(float(cached.get(key, 0.0)), measure_matmul_tflops(device, dtype, seconds=0.3))
    if cached.get(key) == value:
        return value
    cached[key] = value
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(cached, indent=1))
        tmp.replace(path)
    except OSError as e:  # a read-only home is not an error
        log.debug("could not cache the matmul peak: %s", e)
    return value


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated accelerator memory, or this process's peak resident set size on CPU (MiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def perplexity(loss: float) -> float:
    if math.isnan(loss):
        return loss
    return math.exp(loss) if loss < 50 else float("inf")


# -- writers ---------------------------------------------------------------------------------------


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else (1e308 if value > 0 else -1e308)
    return value


class MetricsWriter:
    """Appends one JSON object per record to ``RUN/metrics.jsonl`` and scalars to ``RUN/tb``.

    Records carry ``step`` and an optional ``split`` (``train`` by default, ``valid``, ``test``);
    TensorBoard tags are ``<split>/<key>``. Only rank 0 should create one.
    """

    def __init__(self, run_dir: str | Path, jsonl: bool = True, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self._file = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") if jsonl else None
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tb"))

    def write(self, record: dict[str, Any]) -> None:
        record = {k: _clean(v) for k, v in record.items()}
        if self._file is not None:
            self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
            self._file.flush()
        if self._tb is not None:
            split = record.get("split", "train")
            step = int(record["step"])
            for key, value in record.items():
                if key in ("step", "split") or isinstance(value, bool):
                    continue
                if isinstance(value, (int, float)):
                    self._tb.add_scalar(f"{split}/{key}", value, step)
                elif isinstance(value, dict):
                    for sub, v in value.items():
                        if isinstance(v, (int, float)):
                            self._tb.add_scalar(f"{split}/{key}/{sub}", v, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl`` (a truncated last line, from a killed run, is skipped)."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
