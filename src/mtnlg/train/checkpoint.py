"""Sharded, atomic, verifiable checkpoints through ``torch.distributed.checkpoint`` (DCP).

Layout of one checkpoint::

    RUN/checkpoints/step_00000100/
        .metadata, __0_0.distcp, ...   model + optimizer (DCP: each rank writes its own shards)
        trainer_rank0.pt ...           step, consumed samples, scheduler, data sampler, RNG states (per rank)
        config.yaml, tokenizer/        so that the directory alone is loadable
        manifest.json                  size + sha256 of every file above; written last

Writes go to ``RUN/checkpoints/.step_00000100.tmp-XXXX`` and the directory is renamed to
``step_00000100`` only after the manifest is written, so a directory named ``step_*`` is complete
unless its files were damaged later, which :func:`verify_checkpoint` detects (CheckpointError naming
the file). Model and optimizer states are keyed by parameter name (flattened optimizer state), so a
checkpoint saved on one layout (FSDP2, TP, several processes) loads on another, including one
process without a process group (``no_dist``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from mtnlg.config import CheckpointConfig, Config, ModelConfig
from mtnlg.errors import CheckpointError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
STEP_RE = re.compile(r"^step_(\d+)$")
_OPTS = StateDictOptions(flatten_optimizer_state_dict=True)


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _dist() else 0


def _world() -> int:
    return dist.get_world_size() if _dist() else 1


def _barrier() -> None:
    if _dist():
        dist.barrier()


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


# -- state of the model parts and their optimizers -------------------------------------------------


def model_state(model_parts: Sequence[nn.Module]) -> dict[str, Any]:
    """One name-keyed state dict over all parts (parts keep global parameter names)."""
    out: dict[str, Any] = {}
    for part in model_parts:
        out.update(get_model_state_dict(part, options=_OPTS))
    return out


def optimizer_state(model_parts: Sequence[nn.Module], optimizers: Sequence[torch.optim.Optimizer]) -> dict[str, Any]:
    """Flattened (``state.<param>.<key>``, ``param_groups.<param>.<key>``) optimizer states of all parts."""
    out: dict[str, Any] = {}
    for part, opt in zip(model_parts, optimizers, strict=True):
        out.update(get_optimizer_state_dict(part, opt, options=_OPTS))
    return out


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- files and manifest ----------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_manifest(directory: Path, step: int, extra: dict[str, Any] | None = None) -> None:
    """Checksum every file under ``directory`` into ``manifest.json`` (written atomically, last)."""
    files = {}
    for p in sorted(directory.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            rel = p.relative_to(directory).as_posix()
            files[rel] = {"size": p.stat().st_size, "sha256": _sha256(p)}
    manifest = {"format": "mtnlg-dcp-1", "step": step, "files": files, **(extra or {})}
    tmp = directory / (MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    tmp.rename(directory / MANIFEST)


def verify_checkpoint(directory: str | Path) -> dict[str, Any]:
    """Check that ``directory`` is a complete, undamaged checkpoint; return its manifest.

    Raises :class:`CheckpointError` naming the first missing, truncated or corrupt file."""
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"{d}: no such checkpoint directory")
    mpath = d / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(f"{mpath} is missing: the checkpoint is incomplete (interrupted save?)")
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"{mpath} is corrupt (not a valid manifest)") from None
    if ".metadata" not in files:
        raise CheckpointError(f"{mpath} lists no DCP .metadata file; not an mtnlg checkpoint")
    for rel, info in files.items():
        p = d / rel
        if not p.is_file():
            raise CheckpointError(f"{p} is missing from checkpoint {d}")
        size = p.stat().st_size
        if size != info["size"]:
            raise CheckpointError(f"{p} is truncated or altered: {size} bytes, manifest says {info['size']}")
        if _sha256(p) != info["sha256"]:
            raise CheckpointError(f"{p} is corrupt: its sha256 does not match {MANIFEST}")
    return manifest


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """``(step, dir)`` of every ``step_*`` directory under ``root``, newest first (not verified)."""
    r = Path(root)
    if not r.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in r.iterdir() if p.is_dir() and (m := STEP_RE.match(p.name))]
    return sorted(found, reverse=True)


def newest_complete(root: str | Path, fallback: bool = False) -> Path | None:
    """The newest checkpoint under ``root`` that verifies. A damaged newest one raises
    CheckpointError unless ``fallback``, which then tries the previous ones (logging why)."""
    for _step, path in list_checkpoints(root):
        try:
            verify_checkpoint(path)
            return path
        except CheckpointError as e:
            if not fallback:
                raise CheckpointError(f"{e}; pass --checkpoint.fallback=true to resume from the previous "
                                      "complete checkpoint, or --checkpoint.resume=none to start over") from None
            log.warning("skipping damaged checkpoint: %s", e)
    return None


def resolve_resume(cfg: CheckpointConfig, root: str | Path) -> Path | None:
    """The checkpoint to resume from under ``checkpoint.resume``: ``none``, ``auto`` (newest complete
    under ``root``, or None on a fresh run) or an explicit checkpoint / RUN / checkpoints path."""
    if cfg.resume == "none":
        return None
    if cfg.resume == "auto":
        return newest_complete(root, cfg.fallback)
    return find_checkpoint(cfg.resume, fallback=cfg.fallback)


def find_checkpoint(path: str | Path, fallback: bool = False) -> Path:
    """A checkpoint dir, a ``checkpoints/`` dir or a RUN dir -> the (verified) checkpoint directory."""
    p = Path(path)
    if (p / MANIFEST).is_file() or STEP_RE.match(p.name):
        verify_checkpoint(p)
        return p
    for root in (p / "checkpoints", p):
        if list_checkpoints(root):
            found = newest_complete(root, fallback)
            if found is None:
                raise CheckpointError(f"{root} holds no complete checkpoint")
            return found
    raise CheckpointError(f"{p} is not a checkpoint, a checkpoints directory or a run directory with checkpoints")


# -- save / load -----------------------------------------------------------------------------------


def save_checkpoint(root: str | Path, step: int, model_parts: Sequence[nn.Module],
                    optimizers: Sequence[torch.optim.Optimizer], trainer_state: dict[str, Any],
                    keep: int, config: Config | None = None, tokenizer_dir: str | Path | None = None) -> Path:
    """Collective: every rank calls it. Writes ``root/step_N`` atomically and prunes to ``keep``."""
    root = Path(root)
    rank = _rank()
    final = root / step_dir_name(step)
    name = [None]
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        name[0] = tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root)
    if _dist():
        dist.broadcast_object_list(name, src=0)
    tmp = Path(name[0])
    try:
        state = {"model": model_state(model_parts), "optim": optimizer_state(model_parts, optimizers)}
        with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.save(state, checkpoint_id=str(tmp), no_dist=not _dist())
        trainer_state = {**trainer_state, "rng": rng_state(), "world_size": _world(), "rank": rank}
        torch.save(trainer_state, tmp / f"trainer_rank{rank}.pt")
        _barrier()
        if rank == 0:
            if config is not None:
                config.save(tmp / "config.yaml")
            if tokenizer_dir is not None and Path(tokenizer_dir).is_dir():
                shutil.copytree(tokenizer_dir, tmp / "tokenizer")
            write_manifest(tmp, step, {"world_size": _world()})
            _fsync_dir(tmp)
            if final.exists():  # re-saving a step (e.g. after resuming from it): move the old one aside first
                _delete(final)
            tmp.rename(final)
            _fsync_dir(root)
            prune(root, keep)
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    _barrier()
    if rank == 0:  # one line per checkpoint, not one per rank
        log.info("saved checkpoint %s", final)
    return final


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints."""
    for _step, path in list_checkpoints(root)[keep:]:
        _delete(path)


def _delete(path: Path) -> None:
    """Rename ``step_N`` to a temporary name, then delete it: a crash mid-delete never leaves a
    half-deleted directory under a checkpoint's name."""
    doomed = path.with_name(f".{path.name}.tmp-del{os.getpid()}")
    path.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def remove_stale_temps(root: str | Path) -> None:
    """Remove ``.step_*.tmp-*`` left by a run killed while saving (rank 0, before training)."""
    r = Path(root)
    if r.is_dir():
        for p in r.glob(".step_*.tmp-*"):
            shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(path: str | Path, model_parts: Sequence[nn.Module],
                    optimizers: Sequence[torch.optim.Optimizer]) -> dict[str, Any]:
    """Collective: load model + optimizer (resharding onto this layout) and return the trainer state
    of this rank (or of rank 0 when the world size changed). ``path`` must be verified already."""
    path = Path(path)
    state = {"model": model_state(model_parts), "optim": optimizer_state(model_parts, optimizers)}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, checkpoint_id=str(path), no_dist=not _dist())
    except Exception as e:  # DCP wraps reader errors in CheckpointException
        raise CheckpointError(f"{path}: cannot load ({str(e).splitlines()[0][:300]})") from None
    for part, opt in zip(model_parts, optimizers, strict=True):
        set_model_state_dict(part, state["model"], options=StateDictOptions(strict=False))
        set_optimizer_state_dict(part, opt, state["optim"], options=_OPTS)
    mine = path / f"trainer_rank{_rank()}.pt"
    saved = torch.load(path / "trainer_rank0.pt", weights_only=False)
    if saved.get("world_size") == _world() and mine.is_file():
        saved = torch.load(mine, weights_only=False)
    elif saved.get("world_size") != _world():
        log.info("resuming a %s-process checkpoint on %s processes (resharded)", saved.get("world_size"), _world())
    return saved


# -- inference loading -----------------------------------------------------------------------------


def load_for_inference(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Any]:
    """A RUN dir, its ``checkpoints/`` dir or one checkpoint dir -> ``(ModelConfig, full fp32 CPU
    state dict, Tokenizer)``. Works in one process without a process group, whatever the layout the
    checkpoint was saved with."""
    from torch.distributed.checkpoint import FileSystemReader

    from mtnlg.data.tokenizer import Tokenizer
    from mtnlg.model.init import build_model

    ckpt = find_checkpoint(path)
    cfg_file = next((p for p in (ckpt / "config.yaml", ckpt.parent.parent / "config.yaml") if p.is_file()), None)
    if cfg_file is None:
        raise CheckpointError(f"{ckpt}: no config.yaml in the checkpoint or its run directory")
    cfg = Config.load(cfg_file)
    tok_dir = next((p for p in (ckpt / "tokenizer", ckpt.parent.parent / "tokenizer") if p.is_dir()), None)
    if tok_dir is None:
        raise CheckpointError(f"{ckpt}: no tokenizer/ in the checkpoint or its run directory")
    tokenizer = Tokenizer.load(tok_dir)
    meta = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    key = "model.tok_embeddings.weight"
    mcfg = cfg.model
    if key in meta:  # the saved table may be padded (tensor parallelism); keep every row
        rows = int(meta[key].size[0])
        mcfg = ModelConfig(**{**mcfg.__dict__, "vocab_size": rows, "make_vocab_size_divisible_by": 1})
    model = build_model(mcfg)
    model.to_empty(device="cpu")
    model.tie_weights()
    sd = model.state_dict()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dcp.load({"model": sd}, checkpoint_id=str(ckpt), no_dist=True)
    except Exception as e:
        raise CheckpointError(f"{ckpt}: cannot load the model weights ({str(e).splitlines()[0][:300]})") from None
    return mcfg, sd, tokenizer
