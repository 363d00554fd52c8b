"""The chat page in a real headless Chromium: load it, send messages, watch the reply stream in, screenshot.

Skips (with the reason) where Chromium is not installed; ``setup.sh`` installs the Debian package.
The screenshots are written to ``$MTNLG_ARTIFACTS`` when set, else to pytest's tmp dir.
"""

from __future__ import annotations

import json
import os
import urllib.parse
from pathlib import Path

import pytest

from mtnlg.api import MegatronLmModel, MegatronModelConfig
from mtnlg.data.tokenizer import train_bpe
from mtnlg.infer.engine import Engine
from mtnlg.infer.server import BackgroundServer, create_app
from tests.e2e.browser import Browser, find_chromium

CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")

TEXT = ["the moon is bright over the quiet river", "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
        "spring wind brings rain to the green hills"] * 20
STATE = """JSON.stringify({
  user: [...document.querySelectorAll('.msg.user')].map(e => e.textContent),
  assistant: [...document.querySelectorAll('.msg.assistant')].map(e => e.textContent),
  errors: [...document.querySelectorAll('.msg.error')].map(e => e.textContent),
  streaming: document.querySelectorAll('.msg.streaming').length,
  stats: document.getElementById('stats').textContent,
  history: history.length})"""


@pytest.fixture(scope="module")
def server():
    tok = train_bpe(TEXT, vocab_size=330)
    cfg = MegatronModelConfig(vocab_size=330, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=128, max_position_embeddings=256)
    lm = MegatronLmModel(cfg, tokenizer=tok).materialize(seed=5)
    with BackgroundServer(create_app(Engine(lm, max_batch=4), "tiny")) as srv:
        yield srv


@pytest.fixture
def browser():
    b = Browser(CHROMIUM)
    yield b
    b.close()


def shot_path(tmp_path: Path, name: str) -> Path:
    out = Path(os.environ.get("MTNLG_ARTIFACTS", tmp_path))
    out.mkdir(parents=True, exist_ok=True)
    return out / name


def test_chat_streams_and_keeps_the_conversation(server, browser, tmp_path):
    q = urllib.parse.quote("hello, moon")
    browser.open(f"{server.url}/?q={q}&temperature=1&seed=3&max_tokens=24")
    browser.wait_for("document.body && document.body.dataset.done === '1'")
    state = json.loads(browser.eval(STATE))
    assert state["user"] == ["hello, moon"] and not state["errors"] and state["streaming"] == 0
    assert state["assistant"][0].strip() and state["assistant"][0] != "(no text)"
    assert "tokens/s" in state["stats"] and state["history"] == 2
    # a second turn through the form: the history (user, assistant, user, assistant) goes with it
    browser.eval("document.getElementById('input').value = 'and the river?';"
                 "document.getElementById('composer').requestSubmit()")
    browser.wait_for("document.body.dataset.done === '2'")
    state = json.loads(browser.eval(STATE))
    assert state["user"] == ["hello, moon", "and the river?"] and len(state["assistant"]) == 2
    assert state["history"] == 4 and not state["errors"]
    png = shot_path(tmp_path, "web_chat.png")
    browser.screenshot(str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_poem_mode_continues_two_lines(server, browser, tmp_path):
    q = urllib.parse.quote("床前明月光，\n疑是地上霜。")
    browser.open(f"{server.url}/?mode=poem&q={q}&temperature=1&seed=3")
    browser.wait_for("document.body && document.body.dataset.done === '1'")
    state = json.loads(browser.eval(STATE))
    assert state["user"] == ["床前明月光，\n疑是地上霜。"] and not state["errors"]
    assert "\n" not in state["assistant"][0]  # one line out
    assert state["history"] == 0  # poem mode is stateless
    browser.screenshot(str(shot_path(tmp_path, "web_poem.png")))
