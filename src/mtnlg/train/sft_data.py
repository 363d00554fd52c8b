"""Conversations for supervised fine-tuning: OpenAI-messages JSONL files and the built-in poem set.

A conversation is a list of ``{"role", "content"}`` messages; a JSONL file holds one
``{"messages": [...]}`` object per line (the OpenAI fine-tuning format).

The built-in set is made at run time from the ``poems`` corpus (nothing generated is stored): for
each regular 五言 / 七言 poem a user asks for a poem about a topic taken from its title or from a
key word of its lines (``写一首关于明月的诗``, ``以《静夜思》为题作一首诗``, ``来一首写春天的五言诗`` ...)
and the assistant answers with the poem's body (at most four couplets, one couplet a line); some
conversations carry a system message and some go on for a second poem (``再来一首``)::

    user:       写一首关于秋天的诗
    assistant:  空山新雨后，天气晚来秋。
                明月松间照，清泉石上流。
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mtnlg.data.poem_text import HANZI, poem_lines
from mtnlg.errors import DataError

Conversation = list[dict[str, str]]

MAX_LINES = 8  # four couplets: a chat reply stays short enough for the context and the reply budget

# (topic as a user would say it, characters / words that make a poem about it)
TOPICS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("春天", ("春",)), ("秋天", ("秋",)), ("月亮", ("月",)), ("明月", ("明月",)), ("山", ("山",)),
    ("江水", ("江",)), ("雪", ("雪",)), ("酒", ("酒",)), ("花", ("花",)), ("风", ("风",)), ("雨", ("雨",)),
    ("夜晚", ("夜",)), ("杨柳", ("柳",)), ("梅花", ("梅",)), ("故乡", ("乡", "归")), ("离别", ("别", "送")),
    ("边塞", ("塞", "边", "征", "戍", "胡")), ("思念", ("思", "忆")), ("朋友", ("友", "故人", "君")),
    ("白云", ("白云",)), ("黄河", ("黄河",)), ("长安", ("长安",)), ("江南", ("江南",)), ("田园", ("田", "农")),
    ("夕阳", ("夕阳", "落日", "斜阳", "暮")), ("飞鸟", ("鸟", "雁", "莺", "燕")), ("孤独", ("孤", "独")),
    ("流水", ("流水", "水")), ("青山", ("青山",)), ("寺庙", ("寺", "僧", "禅")), ("松树", ("松",)),
    ("竹子", ("竹",)), ("琴声", ("琴",)), ("小船", ("舟", "船", "帆")), ("登高", ("登",)), ("清晨", ("晓", "晨")),
    ("战争", ("战", "兵", "将军")), ("宫廷", ("宫",)), ("美人", ("美人", "佳人")), ("芳草", ("草",)),
    ("天涯", ("天涯",)), ("人生", ("人生", "白发", "老")), ("大海", ("海",)), ("鸟鸣", ("啼", "鸣")),
)

ASK = ("写一首关于{t}的诗", "写一首关于{t}的诗", "写一首关于{t}的诗。", "请写一首关于{t}的诗", "请你写一首关于{t}的诗。",
       "能写一首关于{t}的诗吗？", "来一首关于{t}的诗", "写首诗，关于{t}", "以{t}为题写一首诗", "给我写一首{t}的诗吧")
ASK_FORM = ("写一首关于{t}的{f}", "来一首写{t}的{f}", "请作一首{f}，题材是{t}")
ASK_TITLE = ("以《{title}》为题作一首诗", "写一首诗，题目是《{title}》", "写一首关于{title}的诗")
MORE = ("再来一首", "再写一首", "再写一首关于{t}的诗", "换一首关于{t}的")
SYSTEM = ("你是一位诗人，用古诗回答。", "你是一个会写中国古诗的助手。")


@dataclass(frozen=True)
class Poem:
    title: str | None  # a topic-like title ("静夜思"), or None when the title is not usable as one
    lines: tuple[str, ...]  # "床前明月光，" ... each with its punctuation mark

    @property
    def chars(self) -> int:
        return len(self.lines[0]) - 1

    def text(self) -> str:
        """The poem as a reply: one couplet a line."""
        return "\n".join("".join(self.lines[i:i + 2]) for i in range(0, len(self.lines), 2))

    def topics(self) -> list[str]:
        body = "".join(self.lines)
        return [t for t, keys in TOPICS if any(k in body for k in keys)]


def _clean_title(line: str) -> str | None:
    m = re.search(r"《([^》]+)》", line)
    if not m:
        return None
    title = re.split(r"[・·（(]", m.group(1))[0].strip()
    return title if 2 <= len(title) <= 8 and re.fullmatch(rf"[{HANZI}]+", title) else None


def parse_poem_document(doc: str) -> Poem | None:
    """A corpus document -> a regular Poem, or None. Reads both layouts of the ``poems`` corpus: the raw
    ``《title》`` / ``作者：`` header above the body, and the body followed by ``——author《title》``."""
    title, body = None, []
    for line in doc.splitlines():
        s = line.strip()
        if s.startswith("——") or ("《" in s and not body):
            title = title or _clean_title(s)
        elif s.startswith(("作者", "题目")) and not body:
            title = title or _clean_title(s)
        elif s:
            body.append(s)
    lines = poem_lines("".join(body), MAX_LINES)
    return Poem(title, lines) if lines else None


def corpus_poems() -> list[Poem]:
    """The regular poems of the built-in ``poems`` corpus (needs fortunes-zh)."""
    from mtnlg.data.corpora import load_corpus

    return [p for p in map(parse_poem_document, load_corpus("poems")) if p is not None]


def _ask(poem: Poem, rng: random.Random) -> tuple[str, str | None]:
    """A request the poem answers, and the topic used (None for a title request)."""
    topics = poem.topics()
    if poem.title and (not topics or rng.random() < 0.2):
        return rng.choice(ASK_TITLE).format(title=poem.title), None
    topic = rng.choice(topics or ["人生"])
    if rng.random() < 0.2:
        form = "五言诗" if poem.chars == 5 else "七言诗"
        return rng.choice(ASK_FORM).format(t=topic, f=form), topic
    return rng.choice(ASK).format(t=topic), topic


def poem_conversations(poems: Sequence[Poem] | None = None, per_poem: int = 2, multi_turn: float = 0.5,
                       system: float = 0.15, seed: int = 0, max_turns: int = 4) -> list[Conversation]:
    """The built-in conversation set: ``per_poem`` requests per poem, each going on to another exchange
    (another poem) with probability ``multi_turn``, up to ``max_turns`` exchanges, and a share with a system
    message. Deterministic for ``seed``."""
    poems = list(corpus_poems() if poems is None else poems)
    if not poems:
        raise DataError("no regular 5- or 7-character poems to build conversations from")
    rng = random.Random(seed)
    out: list[Conversation] = []
    for _ in range(per_poem):
        for poem in poems:
            conv: Conversation = []
            if rng.random() < system:
                conv.append({"role": "system", "content": rng.choice(SYSTEM)})
            ask, _topic = _ask(poem, rng)
            conv += [{"role": "user", "content": ask}, {"role": "assistant", "content": poem.text()}]
            turns = 1
            while turns < max_turns and rng.random() < multi_turn:
                turns += 1
                other = rng.choice(poems)
                topics = other.topics()
                more = rng.choice(MORE)
                if "{t}" in more and not topics:
                    more = MORE[0]
                conv += [{"role": "user", "content": more.format(t=rng.choice(topics) if topics else "")},
                         {"role": "assistant", "content": other.text()}]
            out.append(conv)
    rng.shuffle(out)
    return out


def builtin_conversations(sft) -> list[Conversation]:
    """The built-in set as an :class:`~mtnlg.config.SftConfig` asks for it (``seed``, ``multi_turn``, ``max_turns``)."""
    return poem_conversations(seed=sft.seed, multi_turn=sft.multi_turn, max_turns=sft.max_turns)


def load_conversations(path: str | Path) -> list[Conversation]:
    """Read a ``{"messages": [...]}``-per-line JSONL file; one-line DataError naming the line on bad input."""
    from mtnlg.errors import ConfigError
    from mtnlg.data.chat_template import as_messages

    p = Path(path)
    if not p.is_file():
        raise DataError(f"--data {p}: no such file (a .jsonl with one {{\"messages\": [...]}} object per line)")
    out: list[Conversation] = []
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{p}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or "messages" not in obj:
                raise DataError(f"{p}:{n}: expected an object with a \"messages\" list")
            try:
                msgs = as_messages(obj["messages"])
            except ConfigError as e:
                raise DataError(f"{p}:{n}: {e}") from None
            if not any(m.role == "assistant" and m.content for m in msgs):
                raise DataError(f"{p}:{n}: the conversation has no assistant message to learn from")
            out.append([{"role": m.role, "content": m.content} for m in msgs])
    if not out:
        raise DataError(f"{p} holds no conversations")
    return out


def write_conversations(conversations: Sequence[Conversation], path: str | Path) -> Path:
    """Write conversations as OpenAI-messages JSONL (what ``mtnlg sft --data`` reads)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "w", encoding="utf-8") as f:
        for conv in conversations:
            f.write(json.dumps({"messages": list(conv)}, ensure_ascii=False) + "\n")
    return p
