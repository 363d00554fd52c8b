"""Moved to :mod:`mtnlg.checkpoint` (below both ``train/`` and ``infer/``); re-exported here so that
``from mtnlg.train import checkpoint`` keeps working."""

from mtnlg.checkpoint import *  # noqa: F403
from mtnlg.checkpoint import __all__  # noqa: F401
