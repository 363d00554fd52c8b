"""Classical Chinese poem form: parse the given lines, constrain decoding to lines of the same form, continue.

The given lines fix the form: 5 or 7 characters per line (五言 / 七言), "，" after odd lines and "。"
after even ones. Decoding is constrained token by token (:class:`LineConstraint`): a byte-level
token is allowed only if the line stays a prefix of "N Chinese characters, then the right
punctuation mark", so the model cannot end a line early, run over, or punctuate wrongly.
Used by ``mtnlg poem``, the web page's poem mode and the quality benchmark.

A whole poem as a chat reply (:class:`PoemForm`, ``SamplingParams.form``) is the same idea for the
decode state of ``generate()`` and the server: 2-4 couplets, the meter chosen by the first line or by
the request (:func:`requested_form` reads 写一首…诗 / 五言 / 七言 / 再来一首 from the user's message).
"""

from __future__ import annotations

import codecs
import dataclasses
import re

import torch

from mtnlg.data.poem_text import is_poem_form
from mtnlg.errors import ConfigError
from mtnlg.infer.utf8 import PerTokenizer

PUNCT = "，。"
# a line: its characters, then its punctuation mark, or none when white space or the end of the text
# ends it (the mark is then added by position: "，" after odd lines, "。" after even ones)
LINE_RE = re.compile(r"([^，。,.!?！？；;、\s]+)([，。,.!?！？；;]?)")
MAX_POEM_LINES = 8  # new lines one request may ask for (/v1/poem, mtnlg poem): four couplets


def is_hanzi(ch: str) -> bool:
    return "\u4e00" <= ch <= "\u9fff"


def poem_lines_of(text: str) -> list[tuple[str, str]]:
    """The given lines as (characters, punctuation mark); a line the user left without a mark
    (``床前明月光，疑是地上霜``, or lines split by spaces or newlines) gets the one its position calls for."""
    out: list[tuple[str, str]] = []
    for m in LINE_RE.finditer(text.strip()):
        out.append((m.group(1), m.group(2) or PUNCT[len(out) % 2]))
    return out


def poem_context(text: str) -> str:
    """The given lines laid out as the model was trained (the poems corpus, the chat replies): one couplet
    a line, so after a "。" the model sees the newline it expects before the next couplet."""
    return "".join(body + mark + ("\n" if mark == "。" else "") for body, mark in poem_lines_of(text))


def parse_poem(text: str) -> tuple[int, list[str]]:
    """(characters per line, the lines) of the given text; raises if lines are not all 5 or all 7 long."""
    lines = [body for body, _ in poem_lines_of(text)]
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


CANDIDATE_SEED_STRIDE = 7919  # a prime: requests seeded 0, 1, 2 ... or 0, 1000, 2000 ... never share a candidate


def continue_poem(lm, text: str, num_lines: int = 2, params=None, best_of: int = 4) -> list[str]:
    """The next ``num_lines`` lines (each with its punctuation) after ``text``.

    Each line is sampled ``best_of`` times under :class:`LineConstraint` (one batch, seeds
    ``seed + line + CANDIDATE_SEED_STRIDE * i``) and the candidate the model itself finds likeliest is kept: the sum of the
    model's unconstrained log-probabilities of the line's tokens, its punctuation mark included. The
    constraint forces a "，" after the fifth character whether or not the model wanted one there; the
    score prefers a line that the model would have ended there itself (OpenAI's ``best_of``)."""
    from mtnlg.infer.decode import RequestTooLong, token_budget
    from mtnlg.infer.generate import generate
    from mtnlg.infer.sampling import SamplingParams

    if best_of < 1:
        raise ConfigError(f"best_of must be >= 1, got {best_of}")
    if not 1 <= num_lines <= MAX_POEM_LINES:
        raise ConfigError(f"lines={num_lines}: a poem continues by 1 to {MAX_POEM_LINES} lines at a time; ask for "
                          f"more by continuing the result")
    n, lines = parse_poem(text)
    context = poem_context(text)
    base = params or SamplingParams(temperature=0.8, top_k=40, seed=0)
    vocab = min(lm.tokenizer.vocab_size, lm.model.vocab_size)
    k = 1 if base.greedy else best_of  # greedy candidates would all be the same line
    per_line = 3 * (n + 1) + 2  # tokens a line may take: n characters and its mark, each up to 3 byte tokens
    prompt_len = len(lm.encode_prompt(context)[0])
    try:  # the one budget rule, for the whole continuation: never a silently shortened opening
        token_budget(prompt_len, SamplingParams(max_new_tokens=num_lines * per_line), lm.model.cfg.max_seq_len)
    except RequestTooLong:
        raise RequestTooLong(f"the opening lines take {prompt_len} tokens and {num_lines} new lines up to "
                             f"{num_lines * per_line} more, over the model's context of {lm.model.cfg.max_seq_len} "
                             f"tokens; give a shorter opening or ask for fewer lines") from None
    out = []
    for j in range(num_lines):
        punct = "，" if (len(lines) + j) % 2 == 0 else "。"
        hook = LineConstraint(lm.tokenizer, n, punct, vocab)
        p = dataclasses.replace(base, max_new_tokens=per_line, stop=[punct], stop_token_ids=[],
                                vocab_limit=vocab, num_beams=1, logprobs=0)
        prompt, soft = lm.encode_prompt(context)
        plist = [dataclasses.replace(p, seed=None if base.seed is None else base.seed + j + CANDIDATE_SEED_STRIDE * i)
                 for i in range(k)]
        splice = dataclasses.replace(soft, offsets=list(soft.offsets) * k) if soft is not None else None
        cands = generate(lm.model, [prompt] * k, plist, lm.tokenizer, soft_prompt=splice, logits_hook=hook)
        good = [c for c in cands if c.finish_reason == "stop" and len(c.text) == n and all(map(is_hanzi, c.text))]
        if not good:
            raise ConfigError(f"the model could not produce a {n}-character line (got {cands[0].text + punct!r}); "
                              f"is the tokenizer able to spell Chinese characters?")
        line = max(good, key=lambda c: sum(c.logprobs)).text + punct  # the stop string is cut from the text
        out.append(line)
        context += line + ("\n" if punct == "。" else "")
    return out


# ---- a whole poem as a reply (chat): the form as a token mask in the decode state ----------------------------

MIN_COUPLETS, MAX_COUPLETS = 2, 4  # 绝句 .. 律诗, as the SFT replies (mtnlg.train.sft_data.MAX_LINES)
METERS = {"poem": 0, "poem5": 5, "poem7": 7}  # SamplingParams.form -> characters a line (0: the first line chooses)
FORMS = tuple(METERS)
_CLASS = {"，": "C", "。": "P", "\n": "N"}
# (characters per line, 0 = not chosen yet; lines done; characters in this line; right after a "。")
FormState = tuple[int, int, int, bool]


def form_start(form: str) -> FormState:
    return (METERS[form], 0, 0, False)


def _form_step(state: FormState | None, c: str) -> FormState | None:
    """The state after one character class (H hanzi, C "，", P "。", N newline), or None if the text stops
    being the prefix of a regular poem laid out one couplet a line."""
    if state is None:
        return None
    n, line, k, after = state
    if after:
        return (n, line, 0, False) if c == "N" and line < 2 * MAX_COUPLETS else None
    if c == "H":
        return (n, line, k + 1, False) if k < (n or 7) else None
    if c == "C" and line % 2 == 0 and (k == n or (n == 0 and k in (5, 7))):
        return (k, line + 1, 0, False)
    if c == "P" and line % 2 == 1 and k == n:
        return (n, line + 1, 0, True)
    return None


def form_can_end(state: FormState | None, left: int | None = None) -> bool:
    """Whether the reply may end after ``state``: after a whole couplet, once there are at least
    MIN_COUPLETS of them or when ``left`` (tokens of budget left) has no room for another."""
    if state is None or not state[3]:
        return False
    return state[1] >= 2 * MIN_COUPLETS or (left is not None and left < 1 + _need((state[0], state[1], 0, False)))


def _need(state: FormState) -> int:
    """The fewest tokens that finish the couplet ``state`` is in (every character has a token of its own)."""
    n, line, k, after = state
    if after:
        return 0
    n = n or (5 if k <= 5 else 7)
    return n - k + 1 + (n + 1 if line % 2 == 0 else 0)


ROOM_CAP = 2 * (7 + 1) + 2  # a budget at least this large never constrains the next token


class PoemForm(PerTokenizer):
    """Which tokens keep a reply the prefix of a whole regular poem: 2-4 couplets of lines of 5 or 7
    Chinese characters (the first line chooses, unless the request did), "，" then "。", a newline
    between couplets, and the end of the turn only after a whole couplet (forced after the fourth).

    A token is allowed only by the classes of the characters it spells (hanzi / ， / 。 / newline), so
    the tokens are grouped by that shape once and a state's mask is the union of the shapes it
    accepts, cached per state. Tokens that are not whole characters never appear in a poem.
    Driven by :class:`mtnlg.infer.decode.RowState` when ``SamplingParams.form`` is set.
    """

    def __init__(self, tokenizer):
        shapes: dict[str, list[int]] = {}
        for i in range(tokenizer.vocab_size):
            try:
                text = tokenizer.token_bytes(i).decode("utf-8")
            except UnicodeDecodeError:
                continue
            if text and all(is_hanzi(ch) or ch in _CLASS for ch in text):
                shapes.setdefault("".join("H" if is_hanzi(ch) else _CLASS[ch] for ch in text), []).append(i)
        self.shapes = {s: torch.tensor(ids) for s, ids in shapes.items()}
        self.shape_of = {i: s for s, ids in shapes.items() for i in ids}
        self.cache: dict[tuple, torch.Tensor] = {}

    def _run(self, state: FormState | None, shape: str) -> FormState | None:
        for c in shape:
            state = _form_step(state, c)
        return state

    def mask(self, state: FormState, end_ids: frozenset[int], width: int, device: torch.device,
             left: int | None = None) -> torch.Tensor:
        """Bool [width]: the tokens allowed after ``state`` (``end_ids`` only where the poem may end).
        With ``left`` (tokens of budget left, this one included) a token is allowed only if the couplet
        it leads into can still be finished, so a reply cut by its budget still ends on a whole couplet."""
        left = None if left is None or left >= ROOM_CAP else left
        key = (state, end_ids, width, device, left)
        if key not in self.cache:
            m = torch.zeros(width, dtype=torch.bool)
            for shape, ids in self.shapes.items():
                nxt = self._run(state, shape)
                if nxt is not None and (left is None or _need(nxt) <= left - 1):
                    m[ids[ids < width]] = True
            if form_can_end(state, left):
                m[[i for i in end_ids if i < width]] = True
            self.cache[key] = m.to(device)
        return self.cache[key]

    def next_state(self, state: FormState | None, token: int) -> FormState | None:
        shape = self.shape_of.get(token)
        return None if shape is None else self._run(state, shape)


_ASKS = re.compile(r"(写|作|做|来|赋|吟|给我|请).{0,16}(诗|绝句|律诗|五绝|七绝|五律|七律)|(诗|绝句)一首|一首.{0,12}诗")
_MORE = re.compile(r"^(再|又|换).{0,3}(来|写|作|做)?.{0,2}一首")


def requested_form(text: str, previous: str | None = None) -> str | None:
    """The form a chat request asks for: "poem5" / "poem7" / "poem" when it asks for a poem
    (写一首关于秋天的诗, 来一首七言诗, 以《静夜思》为题作一首诗), or for another one after a poem reply
    (再来一首: ``previous`` is the form of the last reply); None otherwise."""
    asks = _ASKS.search(text) is not None
    if not asks and not (previous and _MORE.search(text.strip())):
        return None
    if re.search(r"五言|五绝|五律", text):
        return "poem5"
    if re.search(r"七言|七绝|七律", text):
        return "poem7"
    return "poem" if asks else previous


def form_of_conversation(messages: list) -> str | None:
    """The form to answer a chat history in (OpenAI message dicts or chat_template Messages):
    :func:`requested_form` of the last user message, knowing whether the last assistant reply was a
    poem (so 再来一首 asks for another)."""
    pairs = [(m.get("role"), m.get("content")) if isinstance(m, dict) else (m.role, m.content) for m in messages]
    users = [c for r, c in pairs if r == "user"]
    replies = [c for r, c in pairs if r == "assistant"]
    if not users or not isinstance(users[-1], str):
        return None
    previous = "poem" if replies and isinstance(replies[-1], str) and is_poem_form(replies[-1]) else None
    return requested_form(users[-1], previous)
