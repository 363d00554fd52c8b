"""The text rule of a regular Chinese poem (五言 / 七言), one place for the SFT set, chat and the quality figures.

A regular poem here is at least two couplets of lines that all have 5 or all 7 Chinese characters, the
first line of each couplet ending in "，" and the second in "。", "？" or "！"; white space is ignored.
"""

from __future__ import annotations

import re

HANZI = "\u4e00-\u9fff"
_SEGMENT = re.compile(rf"([{HANZI}]+)([，。？！；：、])")


def poem_lines(text: str, max_lines: int | None = None) -> tuple[str, ...] | None:
    """The lines (each with its mark) of the regular poem ``text`` starts with, cut to ``max_lines``
    whole couplets; None when it does not start with two such couplets."""
    return _lines(_flat(text), max_lines)


def is_poem_form(text: str) -> bool:
    """Whether the whole of ``text`` is a regular poem (nothing before, between or after its lines)."""
    flat = _flat(text)
    lines = _lines(flat)
    return lines is not None and "".join(lines) == flat


def _flat(text: str) -> str:
    return re.sub(r"\s+", "", text)


def _lines(flat: str, max_lines: int | None = None) -> tuple[str, ...] | None:
    lines: list[str] = []
    n = None
    for m in _SEGMENT.finditer(flat):
        chars, mark = m.groups()
        n = n or len(chars)
        good = len(chars) == n and n in (5, 7) and (mark == "，" if len(lines) % 2 == 0 else mark in "。？！")
        if not good or len(lines) == max_lines:
            break
        lines.append(chars + mark)
    lines = lines[: len(lines) // 2 * 2]
    return tuple(lines) if len(lines) >= 4 else None
