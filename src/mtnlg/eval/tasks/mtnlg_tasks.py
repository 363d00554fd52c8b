"""Dataset loaders for mtnlg's local lm-eval tasks: JSONL files next to this file, no download.

lm-eval calls ``custom_dataset(**metadata)`` (metadata includes the model_args), so every loader
takes ``**kwargs``. The data is built from the held-out poems by ``python -m mtnlg.eval.poem_tasks``.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets

DATA = Path(__file__).resolve().parent / "data"


def _load(name: str) -> datasets.DatasetDict:
    rows = [json.loads(line) for line in (DATA / name).read_text(encoding="utf-8").splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def lambada_poems(**kwargs) -> datasets.DatasetDict:
    return _load("lambada_poems.jsonl")


def poem_cloze(**kwargs) -> datasets.DatasetDict:
    return _load("poem_cloze.jsonl")


def poems(**kwargs) -> datasets.DatasetDict:
    return _load("poems.jsonl")
