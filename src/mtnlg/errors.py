"""One family of errors, each carrying a one-line message that names the field and the fix.

The CLI prints ``str(err)`` on a single line and exits with status 2.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class MtnlgError(Exception):
    """Base class of every error mtnlg raises on purpose (bad input, not a bug)."""


class ConfigError(MtnlgError, ValueError):
    """A configuration value or keyword is invalid."""


class DataError(MtnlgError):
    """A data file, corpus or tokenizer is missing, corrupt or malformed."""


class CheckpointError(MtnlgError):
    """A checkpoint is missing, incomplete or corrupt."""


def closest(name: str, choices: Iterable[str]) -> str | None:
    """The valid name closest to ``name`` (for "did you mean" hints), or None."""
    choices = list(choices)
    hits = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    if hits:
        return hits[0]
    # Fall back on a substring match (e.g. "layers" -> "num_layers").
    subs = [c for c in choices if name.lower() in c.lower() or c.lower() in name.lower()]
    return subs[0] if subs else None


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """A ``"; did you mean 'x'?"`` suffix, or an empty string."""
    hit = closest(name, choices)
    return f"; did you mean '{hit}'?" if hit else ""
