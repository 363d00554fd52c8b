"""Classical Chinese poem form: parse the given lines, constrain decoding to lines of the same form, continue.

The given lines fix the form: 5 or 7 characters per line (五言 / 七言), "，" after odd lines and "。"
after even ones. Decoding is constrained token by token (:class:`LineConstraint`): a byte-level
token is allowed only if the line stays a prefix of "N Chinese characters, then the right
punctuation mark", so the model cannot end a line early, run over, or punctuate wrongly.
Used by ``mtnlg poem``, the web page's poem mode and the quality benchmark.
"""

from __future__ import annotations

import codecs
import dataclasses
import re

import torch

from mtnlg.errors import ConfigError

PUNCT = "，。"
LINE_RE = re.compile(r"([^，。,.!?！？；;、\s]+)([，。,.!?！？；;])")


def is_hanzi(ch: str) -> bool:
    return "\u4e00" <= ch <= "\u9fff"


def parse_poem(text: str) -> tuple[int, list[str]]:
    """(characters per line, the lines) of the given text; raises if lines are not all 5 or all 7 long."""
    lines = [m.group(1) for m in LINE_RE.finditer(text.strip())]
    if not lines:
        raise ConfigError(f"could not find poem lines ending in ， or 。 in {text!r}; e.g. \"床前明月光，疑是地上霜。\"")
    lengths = {len(line) for line in lines}
    if len(lengths) != 1 or next(iter(lengths)) not in (5, 7) or not all(map(is_hanzi, "".join(lines))):
        raise ConfigError(f"the lines {lines} must all have 5 or all 7 Chinese characters (五言 or 七言)")
    return lengths.pop(), lines


def _hanzi_prefix(b: bytes) -> bool:
    """Whether ``b`` (1-2 bytes) can start a character in U+4E00..U+9FFF (UTF-8 E4 B8 80 .. E9 BF BF)."""
    if not 0xE4 <= b[0] <= 0xE9:
        return False
    if len(b) >= 2 and not (0x80 <= b[1] <= 0xBF and (b[0] != 0xE4 or b[1] >= 0xB8)):
        return False
    return len(b) < 3


class LineConstraint:
    """A logits hook that only lets the line grow toward ``n`` Chinese characters plus ``punct``.

    The state after some tokens is (complete characters so far, trailing partial bytes); the set of
    allowed tokens depends only on that state, so it is computed once per state and cached.
    """

    def __init__(self, tokenizer, n: int, punct: str, vocab_size: int):
        self.tok, self.n, self.punct = tokenizer, n, punct
        self.token_bytes = [tokenizer.token_bytes(i) for i in range(vocab_size)]
        self.cache: dict[tuple[int, bytes], torch.Tensor] = {}

    def state(self, ids: list[int]) -> tuple[int, bytes]:
        dec = codecs.getincrementaldecoder("utf-8")(errors="strict")
        data = b"".join(self.token_bytes[i] for i in ids)
        text = dec.decode(data)
        pending = dec.getstate()[0]
        return len(text), pending

    def _ok(self, done: int, pending: bytes, tb: bytes) -> bool:
        if not tb:
            return False
        data = pending + tb
        dec = codecs.getincrementaldecoder("utf-8")(errors="strict")
        try:
            text = dec.decode(data)
        except UnicodeDecodeError:
            return False
        left = dec.getstate()[0]
        for k, ch in enumerate(text, start=done):
            if k < self.n:
                if not is_hanzi(ch):
                    return False
            elif k == self.n:
                if ch != self.punct:
                    return False
            else:
                return False
        if left:
            k = done + len(text)
            return _hanzi_prefix(left) if k < self.n else k == self.n and self.punct.encode().startswith(left)
        return True

    def allowed(self, done: int, pending: bytes) -> torch.Tensor:
        key = (done, pending)
        if key not in self.cache:
            self.cache[key] = torch.tensor([self._ok(done, pending, tb) for tb in self.token_bytes])
        return self.cache[key]

    def __call__(self, row: int, generated: list[int], logits: torch.Tensor) -> None:
        ok = self.allowed(*self.state(generated))
        if bool(ok.any()):
            logits[: ok.shape[0]].masked_fill_(~ok.to(logits.device), float("-inf"))
            logits[ok.shape[0]:] = float("-inf")


def continue_poem(lm, text: str, num_lines: int = 2, params=None) -> list[str]:
    """The next ``num_lines`` lines (each with its punctuation) after ``text``."""
    from mtnlg.infer.generate import generate
    from mtnlg.infer.sampling import SamplingParams

    n, lines = parse_poem(text)
    # the layout the model was trained on (the poems corpus and the chat replies): one couplet a line,
    # so after a "。" the model sees the newline it expects before the next couplet
    context = "".join(m.group(0) + ("\n" if m.group(2) == "。" else "") for m in LINE_RE.finditer(text.strip()))
    base = params or SamplingParams(temperature=0.8, top_k=40, seed=0)
    vocab = min(lm.tokenizer.vocab_size, lm.model.vocab_size)
    out = []
    for j in range(num_lines):
        punct = "，" if (len(lines) + j) % 2 == 0 else "。"
        hook = LineConstraint(lm.tokenizer, n, punct, vocab)
        p = dataclasses.replace(base, max_new_tokens=3 * (n + 1) + 2, stop=[punct], stop_token_ids=[],
                                vocab_limit=vocab, num_beams=1,
                                seed=None if base.seed is None else base.seed + j)
        prompt, soft = lm.encode_prompt(context)
        room = lm.model.cfg.max_seq_len - p.max_new_tokens - 1
        prompt = prompt[-room:]
        c = generate(lm.model, [prompt], p, lm.tokenizer, soft_prompt=soft, logits_hook=hook)[0]
        line = c.text + punct  # the stop string (the punctuation mark) is cut from the text
        if not (c.finish_reason == "stop" and len(line) == n + 1 and all(map(is_hanzi, line[:-1]))):
            raise ConfigError(f"the model could not produce a {n}-character line (got {line!r}); is the "
                              f"tokenizer able to spell Chinese characters?")
        out.append(line)
        context += line + ("\n" if punct == "。" else "")
    return out
