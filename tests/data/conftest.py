"""Fixtures for the data tests: a private cache directory and one small poem tokenizer per session."""

from __future__ import annotations

import pytest

from mtnlg.data.corpora import load_corpus
from mtnlg.data.tokenizer import train_bpe


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Every test gets its own MTNLG_CACHE so tests never read or fill the user's cache."""
    monkeypatch.setenv("MTNLG_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="session")
def poem_tok():
    return train_bpe(load_corpus("poems"), 1000)
