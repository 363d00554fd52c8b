"""Former name of :mod:`mtnlg.infer.scheduler` (kept so existing imports keep working)."""

from mtnlg.infer.scheduler import *  # noqa: F401,F403
from mtnlg.infer.scheduler import __all__  # noqa: F401
