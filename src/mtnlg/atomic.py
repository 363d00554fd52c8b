"""Write a whole directory or nothing: build it beside its final name, then rename it into place."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from mtnlg.errors import ConfigError


@contextlib.contextmanager
def atomic_directory(out: str | Path) -> Iterator[Path]:
    """Yield a hidden temporary directory next to ``out``; when the block succeeds it replaces ``out``
    (an existing ``out`` is renamed away first and then deleted), when it fails it is removed.
    A crash at any moment leaves the old ``out`` or the new one, never a half-written one."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} exists and is not a directory; choose another output path")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        ordinary_permissions(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def ordinary_permissions(directory: str | Path) -> None:
    """Directories 0755 and files 0644, minus what the umask takes away, for ``directory`` and everything
    in it: a temporary directory is owner-only (0700) and some writers (safetensors) make owner-only
    files, but a model or checkpoint is shared like any other download once it is renamed into place."""
    umask = os.umask(0)
    os.umask(umask)
    directory = Path(directory)
    directory.chmod(0o755 & ~umask)
    for p in directory.rglob("*"):
        if not p.is_symlink():
            p.chmod((0o755 if p.is_dir() else 0o644) & ~umask)
