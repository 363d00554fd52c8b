"""Which directory a path given by the user means: one answer for every command.

``resolve_checkpoint(path)`` accepts a saved model (``config.json`` + ``model.safetensors``), one
sharded checkpoint (``step_N/`` with ``manifest.json``), a ``checkpoints/`` directory or a run directory
(its newest complete checkpoint), and says plainly when the path does not exist or is none of these.

After a run continues from an older step, the newer checkpoints of the abandoned history are moved
aside into ``checkpoints/abandoned/`` (kept, never deleted), so that neither ``resume=auto`` nor
``from_pretrained(run)`` picks them and pruning never counts them against the new run.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

from mtnlg.checkpoint.manifest import MANIFEST, verify_checkpoint
from mtnlg.config import CheckpointConfig
from mtnlg.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

STEP_RE = re.compile(r"^step_(\d+)$")
ABANDONED = "abandoned"
CONFIG_JSON = "config.json"
WEIGHTS_FILE = "model.safetensors"
MODEL_TYPE = "mtnlg"  # the model_type of an mtnlg config.json


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


@dataclass(frozen=True)
class Resolved:
    """A loadable model location: ``kind`` is ``"pretrained"`` (``save_pretrained`` layout) or
    ``"checkpoint"`` (a verified sharded checkpoint)."""

    kind: str
    path: Path

    @property
    def run_dir(self) -> Path | None:
        """The run directory a sharded checkpoint belongs to (``RUN/checkpoints/step_N``), if any."""
        if self.kind != "checkpoint":
            return None
        run = self.path.parent.parent
        return run if (run / "config.yaml").is_file() else None

    def find(self, name: str, want_dir: bool = False) -> Path | None:
        """``name`` in the checkpoint itself, else in its run directory."""
        for base in (self.path, self.run_dir):
            if base is not None:
                p = base / name
                if (p.is_dir() if want_dir else p.is_file()):
                    return p
        return None


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """``(step, dir)`` of every ``step_*`` directory under ``root``, newest first (not verified)."""
    r = Path(root)
    if not r.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in r.iterdir() if p.is_dir() and (m := STEP_RE.match(p.name))]
    return sorted(found, reverse=True)


def newest_complete(root: str | Path, fallback: bool = False, hint: str | None = None) -> Path | None:
    """The newest checkpoint under ``root`` that verifies. A damaged newest one raises
    CheckpointError (with ``hint``) unless ``fallback``, which then tries the previous ones."""
    for _step, path in list_checkpoints(root):
        try:
            verify_checkpoint(path)
            return path
        except CheckpointError as e:
            if not fallback:
                raise CheckpointError(f"{e}; {hint}" if hint else str(e)) from None
            log.warning("skipping damaged checkpoint: %s", e)
    return None


RESUME_HINT = ("pass --checkpoint.fallback=true to resume from the previous complete checkpoint, or "
               "--checkpoint.resume=none to start over")
LOAD_HINT = "load an older checkpoint by giving its step_N directory"


def find_checkpoint(path: str | Path, fallback: bool = False, hint: str = LOAD_HINT) -> Path:
    """A checkpoint dir, a ``checkpoints/`` dir or a RUN dir -> the (verified) checkpoint directory."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p} does not exist")
    if (p / MANIFEST).is_file() or STEP_RE.match(p.name):
        verify_checkpoint(p)
        return p
    for root in (p / "checkpoints", p):
        if list_checkpoints(root):
            found = newest_complete(root, fallback, hint)
            if found is None:
                raise CheckpointError(f"{root} holds no complete checkpoint")
            return found
    raise CheckpointError(f"{p} is not a saved model ({CONFIG_JSON} + {WEIGHTS_FILE}), a checkpoint, a checkpoints "
                          "directory or a run directory with checkpoints")


def check_not_hf(directory: Path) -> None:
    """A one-line CheckpointError when ``directory`` holds a Hugging Face model (its ``config.json`` has
    ``architectures`` or a ``model_type`` other than mtnlg's), which ``mtnlg convert --from hf`` imports."""
    try:
        cfg = json.loads((directory / CONFIG_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # missing or unreadable: the loader says so
    if not isinstance(cfg, dict):
        return
    model_type = cfg.get("model_type", MODEL_TYPE)
    if "architectures" in cfg or model_type != MODEL_TYPE:
        raise CheckpointError(f"{directory} is a Hugging Face model (model_type '{model_type}'), not an mtnlg "
                              f"checkpoint; import it first with `mtnlg convert --from hf --input {directory} "
                              "--output OUT` and load OUT")


def resolve_checkpoint(path: str | Path | Resolved) -> Resolved:
    """What every command and ``from_pretrained`` load from ``path`` (see the module doc). A
    :class:`Resolved` is returned as it is (so a command resolves and verifies once)."""
    if isinstance(path, Resolved):
        return path
    if path is None or str(path) == "":
        raise ConfigError("no checkpoint given: pass --checkpoint PATH (a run dir, checkpoint dir or saved model)")
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p} does not exist")
    if not p.is_dir():
        raise CheckpointError(f"{p} is a file; give the directory holding the model (a run dir, checkpoint dir "
                              "or saved model)")
    if (p / WEIGHTS_FILE).is_file() or ((p / CONFIG_JSON).is_file() and not (p / ".metadata").is_file()):
        check_not_hf(p)
        if not (p / WEIGHTS_FILE).is_file() or not (p / CONFIG_JSON).is_file():
            missing = WEIGHTS_FILE if not (p / WEIGHTS_FILE).is_file() else CONFIG_JSON
            raise CheckpointError(f"{p} is not a complete saved model: {missing} is missing")
        return Resolved("pretrained", p)
    return Resolved("checkpoint", find_checkpoint(p))


def resolve_resume(cfg: CheckpointConfig, root: str | Path) -> Path | None:
    """The checkpoint to resume from under ``checkpoint.resume``: ``none``, ``auto`` (newest complete
    under ``root``, or None on a fresh run) or an explicit checkpoint / RUN / checkpoints path."""
    if cfg.resume == "none":
        return None
    if cfg.resume == "auto":
        return newest_complete(root, cfg.fallback, RESUME_HINT)
    return find_checkpoint(cfg.resume, fallback=cfg.fallback, hint=RESUME_HINT)


def abandon_after(root: str | Path, step: int) -> list[Path]:
    """Move every ``step_N`` with ``N > step`` under ``root`` into ``root/abandoned/<time>/`` (rank 0).

    Called when a run continues from ``step`` (or starts over, ``step=0``): those checkpoints belong to
    a history that is no longer followed; kept for the user, invisible to resume and pruning."""
    newer = [p for s, p in list_checkpoints(root) if s > step]
    if not newer:
        return []
    dest = Path(root) / ABANDONED / time.strftime("%Y%m%d-%H%M%S")
    n = 0
    while dest.exists():
        n += 1
        dest = dest.with_name(f"{dest.name.split('.')[0]}.{n}")
    dest.mkdir(parents=True)
    moved = []
    for p in sorted(newer):
        target = dest / p.name
        p.rename(target)
        moved.append(target)
    log.warning("continuing from step %d: moved the newer checkpoints %s aside to %s", step,
                ", ".join(p.name for p in moved), dest)
    return moved


def check_output_dir(output: str | Path, force: bool = False, inputs: tuple[str | Path | None, ...] = ()) -> Path:
    """Refuse to write ``output`` over anything: it must not exist or be an empty directory, unless
    ``force``; and it may never be, contain or sit inside one of ``inputs``."""
    out = Path(output)
    resolved = out.resolve()
    for inp in inputs:
        if inp is None:
            continue
        src = Path(inp).resolve()
        if resolved == src or src.is_relative_to(resolved) or resolved.is_relative_to(src):
            raise ConfigError(f"--output {out} overlaps the input {inp}; choose another output directory")
    if out.exists():
        if not out.is_dir():
            raise ConfigError(f"--output {out} exists and is a file; choose another output directory")
        if any(out.iterdir()) and not force:
            raise ConfigError(f"--output {out} exists and is not empty; choose another directory or pass --force "
                              "to replace it")
    return out
