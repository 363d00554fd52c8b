"""Make plain ``lm_eval --model mtnlg`` work: register ``mtnlg`` whenever lm-eval loads its model table.

lm-eval 0.4 has no plugin entry points: its CLI knows only models registered by modules it imports.
It imports ``lm_eval.models`` (its table of lazy model placeholders) the first time a model is
looked up. :func:`install` puts a tiny import hook on ``sys.meta_path`` that runs right after that
import and adds one more lazy placeholder, ``"mtnlg" -> mtnlg.eval.lm_eval_adapter:MtnlgLM``, so
nothing heavy (torch, mtnlg's model) is imported unless lm-eval is asked for ``--model mtnlg``.

``mtnlg eval --install-lm-eval-hook`` writes :data:`PTH_NAME` into site-packages; its one line calls
:func:`install` at interpreter start-up (as setuptools' ``distutils-precedence.pth`` does) and does
nothing if mtnlg is no longer installed. ``--uninstall-lm-eval-hook`` removes it.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import sysconfig
from pathlib import Path

TARGET = "lm_eval.models"
MODEL_NAME = "mtnlg"
MODEL_PATH = "mtnlg.eval.lm_eval_adapter:MtnlgLM"
PTH_NAME = "mtnlg-lm-eval-hook.pth"
PTH_LINE = ("import importlib.util; importlib.util.find_spec('mtnlg') is not None and "
            "__import__('mtnlg.eval.lm_eval_hook', fromlist=['install']).install()\n")


def register() -> None:
    """Add the lazy ``mtnlg`` placeholder to lm-eval's model registry (idempotent)."""
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=MODEL_PATH)


class _Loader(importlib.abc.Loader):
    def __init__(self, inner: importlib.abc.Loader):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module) -> None:
        self.inner.exec_module(module)
        register()


class _Finder(importlib.abc.MetaPathFinder):
    """Finds ``lm_eval.models`` like the normal path finder, with a loader that registers mtnlg after it."""

    def find_spec(self, fullname, path, target=None):
        if fullname != TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    """Register ``mtnlg`` now if lm-eval's model table is already loaded, else right after it loads."""
    if TARGET in sys.modules:
        register()
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


def pth_path(site_dir: str | Path | None = None) -> Path:
    return Path(site_dir or sysconfig.get_paths()["purelib"]) / PTH_NAME


def install_pth(site_dir: str | Path | None = None) -> Path:
    """Write the start-up hook into ``site_dir`` (default: this interpreter's site-packages)."""
    p = pth_path(site_dir)
    p.write_text(PTH_LINE)
    return p


def uninstall_pth(site_dir: str | Path | None = None) -> bool:
    p = pth_path(site_dir)
    if p.is_file():
        p.unlink()
        return True
    return False
