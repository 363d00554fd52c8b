"""Build the data of mtnlg's local lm-eval tasks from the held-out poems (no download).

The held-out poems are the ``test`` split of the built-in ``poems`` corpus under the default data
config (``data.split="90,5,5"``, ``data.seed=1234``): exactly the documents a default training run
never sees (:func:`mtnlg.data.datasets.split_documents`). From them::

    lambada_poems.jsonl   LAMBADA-style: the whole poem so far -> its last character before a
                          line-final 。？！ (the rhyme position)              loglikelihood (acc, perplexity)
    poem_cloze.jsonl      the poem so far -> which of 4 same-length lines comes next
                          (3 distractors from other held-out poems)          multiple_choice (acc, acc_norm)
    poems.jsonl           whole poems                                        loglikelihood_rolling (bits/byte)

``mtnlg_poem_next_line`` (generate_until) reuses ``poem_cloze.jsonl``. Regenerate with
``python -m mtnlg.eval.poem_tasks``; the output is deterministic and committed under ``tasks/data/``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from mtnlg.data.corpora import load_corpus
from mtnlg.data.datasets import split_documents

DATA_DIR = Path(__file__).resolve().parent / "tasks" / "data"
SPLIT, SEED = "90,5,5", 1234  # mtnlg.config.DataConfig defaults
LINE_END = "。？！"
NUM_CHOICES = 4


def heldout_poems(split: str = "test") -> list[str]:
    docs = load_corpus("poems")
    return [docs[int(i)] for i in sorted(split_documents(len(docs), SPLIT, SEED)[split])]


def _verse(poem: str) -> list[str]:
    """The poem's lines without the attribution line (``——作者《题目》``) the corpus stores after the body."""
    return [line for line in poem.split("\n") if not line.startswith("——")]


def _body_start(lines: list[str]) -> int:
    """Index of the first verse line (after the 《title》 and 作者： lines)."""
    k = 0
    while k < len(lines) and (lines[k].startswith("《") or lines[k].startswith("作者")):
        k += 1
    return k


def lambada_examples(poems: list[str]) -> list[dict]:
    out = []
    for p, poem in enumerate(poems):
        lines = _verse(poem)
        start = _body_start(lines)
        for k in range(start + 1, len(lines)):  # at least one verse line of context
            line = lines[k]
            if len(line) >= 2 and line[-1] in LINE_END and "\u4e00" <= line[-2] <= "\u9fff":
                prefix = "\n".join(lines[:k] + [line[:-2]])
                out.append({"poem": p, "context": prefix, "target": line[-2]})
    return out


def cloze_examples(poems: list[str], seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    by_len: dict[int, list[tuple[int, str]]] = {}
    for p, poem in enumerate(poems):
        lines = _verse(poem)
        for line in lines[_body_start(lines):]:
            by_len.setdefault(len(line), []).append((p, line))
    out = []
    for p, poem in enumerate(poems):
        lines = _verse(poem)
        start = _body_start(lines)
        for k in range(start + 1, len(lines)):
            gold = lines[k]
            pool = sorted({line for q, line in by_len.get(len(gold), []) if q != p and line != gold})
            if len(pool) < NUM_CHOICES - 1:
                continue
            choices = rng.sample(pool, NUM_CHOICES - 1)
            label = rng.randrange(NUM_CHOICES)
            choices.insert(label, gold)
            out.append({"poem": p, "context": "\n".join(lines[:k]) + "\n", "choices": choices, "label": label,
                        "target": gold})
    return out


def build(out_dir: Path = DATA_DIR) -> dict[str, int]:
    """Write the three JSONL files; returns the number of examples in each."""
    poems = heldout_poems()
    files = {"lambada_poems.jsonl": lambada_examples(poems), "poem_cloze.jsonl": cloze_examples(poems),
             "poems.jsonl": [{"poem": p, "text": t} for p, t in enumerate(poems)]}
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in files.items():
        (out_dir / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return {name: len(rows) for name, rows in files.items()}


if __name__ == "__main__":
    for name, n in build().items():
        print(f"{DATA_DIR / name}: {n} examples")
