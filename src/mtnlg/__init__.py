"""mtnlg: pre-train, evaluate and serve Megatron-Turing-NLG-style language models.

``from mtnlg import MegatronModelConfig, MegatronLmModel`` is the spec's API (see :mod:`mtnlg.api`).
Imports are lazy so that ``mtnlg --help`` does not pay for importing torch.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["MegatronModelConfig", "MegatronLmModel", "Config", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("MegatronModelConfig", "MegatronLmModel"):
        from mtnlg import api

        return getattr(api, name)
    if name == "Config":
        from mtnlg.config import Config

        return Config
    raise AttributeError(f"module 'mtnlg' has no attribute '{name}'")
