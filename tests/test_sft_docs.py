"""docs/sft.md's settings table lists every ``sft`` key with the default ``mtnlg config`` reports."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from mtnlg.config import SftConfig

DOC = Path(__file__).resolve().parents[1] / "docs" / "sft.md"


def documented_defaults() -> dict[str, str]:
    """``{field: default as written}`` from the table's rows (a row may list several keys and values)."""
    out = {}
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`sft."):
            continue
        keys = re.findall(r"`sft\.(\w+)`", cells[0])
        values = [v.strip().strip("`") for v in cells[1].split(",")]
        assert len(keys) == len(values), line
        out.update(zip(keys, values))
    return out


def test_the_settings_table_matches_sft_config():
    doc = documented_defaults()
    fields = {f.name: f.default for f in dataclasses.fields(SftConfig)}
    assert set(doc) == set(fields)
    for name, default in fields.items():
        written = doc[name]
        if default is None:
            assert written == "none", name
        elif isinstance(default, bool):
            assert written == str(default).lower(), name
        else:
            assert float(written) == float(default), (name, written, default)


def test_no_stale_measurements():
    text = DOC.read_text()
    assert "4.440 -> 4.483" in text and "5.59 to 4.29" in text
    for stale in ("4.657", "8.30 -> 7.97"):
        assert stale not in text
