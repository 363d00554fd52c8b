"""Incremental detokenization that only ever emits complete UTF-8 characters, and stop strings.

A byte-level BPE token can end in the middle of a character (a Chinese character is 3 bytes and
often spans two tokens), so decoding token by token would print broken bytes. :class:`StreamDecoder`
keeps the trailing partial character back until its last byte arrives::

    tokens:  [e5 ba]  [8a]  [e5 89 8d]      ("床前")
    emitted:   ""     "床"    "前"

:class:`StopStringFilter` holds back the end of the text that could still turn into a stop string,
so a streamed reply never shows the beginning of a stop string it later cuts off.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Sequence

from mtnlg.data.tokenizer import SPECIAL_TOKENS, Tokenizer


class StreamDecoder:
    """Feed token ids, get the newly completed text (never half a character).

    ``skip_special_tokens`` drops ``<|endoftext|>``, role tokens etc. from the text. Invalid byte
    sequences become U+FFFD once they are known to be invalid (as ``bytes.decode(errors="replace")``).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.special = {i for i in (tokenizer.token_to_id(t) for t in SPECIAL_TOKENS) if i is not None}

    def feed(self, tokens: int | Iterable[int]) -> str:
        """Add one token id or several; return the text they complete."""
        skip = self.special if self.skip_special_tokens else ()
        if isinstance(tokens, int):  # one token a step while decoding: no generator, no join
            data = self.tokenizer.token_bytes(tokens) if tokens not in skip else b""
        else:
            data = b"".join(self.tokenizer.token_bytes(t) for t in tokens if t not in skip)
        return self._dec.decode(data) if data else ""

    push = feed  # the serving engine's name

    def flush(self) -> str:
        """End of stream: return whatever is pending (an incomplete character becomes U+FFFD)."""
        return self._dec.decode(b"", final=True)

    def reset(self) -> None:
        self._dec.reset()


def find_stop(text: str, stops: Sequence[str], start: int = 0) -> int | None:
    """Index of the earliest stop string in ``text`` that ends at or after ``start`` (None if none)."""
    best = None
    for s in stops:
        i = text.find(s, max(0, start - len(s) + 1))
        if i >= 0 and (best is None or i < best):
            best = i
    return best


def held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of ``text`` could be the start of a stop string."""
    keep = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), keep, -1):
            if text.endswith(s[:n]):
                keep = n
                break
    return keep


class StopStringFilter:
    """Accumulate streamed text; release only what can no longer become part of a stop string.

    ``push(delta) -> (safe_delta, stopped)``; after a stop, ``text`` ends just before the stop string
    (with ``include``: just after it). ``finish()`` releases the held-back tail when generation ends
    for another reason.
    """

    def __init__(self, stops: Sequence[str], include: bool = False):
        self.stops = [s for s in stops if s]
        self.include = include
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def push(self, delta: str, detect: bool = True) -> tuple[str, bool]:
        """``detect=False``: add ``delta`` without looking for stop strings in it (vLLM's ``min_tokens``:
        no stop before that many tokens); a stop that begins there and ends later still counts."""
        if self.stopped:
            return "", True
        start = len(self.text)
        self.text += delta
        hit = find_stop(self.text, self.stops, start) if self.stops and detect else None
        if hit is not None:
            # the stop string that completed first (the shortest of those starting at the hit)
            end = hit + min(len(x) for x in self.stops if self.text.startswith(x, hit)) if self.include else hit
            self.text = self.text[:end]
            self.stopped = True
            end = len(self.text)
        else:
            end = len(self.text) - held_back(self.text, self.stops)
        out = self.text[self.emitted:end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return out, self.stopped

    def finish(self) -> str:
        out = self.text[self.emitted:]
        self.emitted = len(self.text)
        return out
