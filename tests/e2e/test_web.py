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
from mtnlg.infer.scheduler import Engine
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
def lm():
    tok = train_bpe(TEXT, vocab_size=330)
    cfg = MegatronModelConfig(vocab_size=330, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=128, max_position_embeddings=256)
    return MegatronLmModel(cfg, tokenizer=tok).materialize(seed=5)


@pytest.fixture(scope="module")
def server(lm):
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


@pytest.fixture(scope="module")
def short_server(lm):
    with BackgroundServer(create_app(Engine(lm, max_batch=2, max_model_len=64), "tiny")) as srv:
        yield srv


def test_a_long_chat_leaves_out_its_oldest_turns_instead_of_failing(short_server, browser):
    """A 64-token context: by the third message the history no longer fits beside 16 new tokens; the page
    leaves out the oldest exchanges (the server says context_length_exceeded) and every message is answered."""
    browser.open(f"{short_server.url}/?temperature=1&seed=3&max_tokens=16")
    browser.wait_for("document.readyState === 'complete'")
    for n, text in enumerate(["the moon is bright", "and the quiet river?", "spring wind and rain", "green hills",
                              "one more, please"], start=1):
        browser.eval(f"document.getElementById('input').value = {json.dumps(text)};"
                     "document.getElementById('composer').requestSubmit()")
        browser.wait_for(f"document.body.dataset.done === '{n}'")
    state = json.loads(browser.eval(STATE))
    assert not state["errors"] and len(state["assistant"]) == 5 and state["history"] == 10, state
    assert browser.eval("dropped") >= 2 and "earliest messages left out" in state["stats"], state


def test_poem_mode_keeps_the_form_and_chinese_renders_as_glyphs(server, browser, tmp_path):
    q = urllib.parse.quote("床前明月光，\n疑是地上霜。")
    browser.open(f"{server.url}/?mode=poem&q={q}&temperature=1&seed=3")
    browser.wait_for("document.body && document.body.dataset.done === '1'")
    state = json.loads(browser.eval(STATE))
    assert state["user"] == ["床前明月光，\n疑是地上霜。"] and not state["errors"]
    lines = state["assistant"][0].split("\n")  # a couplet in the form of the given lines, as `mtnlg poem` writes
    assert [len(x) for x in lines] == [6, 6] and [x[-1] for x in lines] == ["，", "。"], lines
    assert all("\u4e00" <= ch <= "\u9fff" for x in lines for ch in x[:-1])
    assert state["history"] == 0  # poem mode is stateless
    browser.screenshot(str(shot_path(tmp_path, "web_poem.png")))
    # the screenshot shows glyphs, not tofu: drawn in the page's own font, two different characters differ
    # from each other and from a code point no font has (which every renderer draws as the same empty box)
    pixels = browser.eval(GLYPHS)
    assert pixels["ink"] > 0, pixels
    assert pixels["ming"] != pixels["yue"] and pixels["ming"] != pixels["tofu"], pixels
    # and the font Chromium used for the user's Chinese text is one fontconfig lists for Chinese
    families = platform_fonts(browser, ".msg.user")
    assert families and families <= cjk_families(), (families, cjk_families())


GLYPHS = """(() => {
  const font = getComputedStyle(document.querySelector('.msg.user')).font;
  const draw = (s) => {
    const c = document.createElement('canvas'); c.width = 64; c.height = 64;
    const g = c.getContext('2d'); g.font = font.replace(/\\d+(\\.\\d+)?px/, '40px'); g.fillText(s, 8, 48);
    const d = g.getImageData(0, 0, 64, 64).data; let h = 0, ink = 0;
    for (let i = 3; i < d.length; i += 4) { h = (h * 31 + d[i]) >>> 0; ink += d[i] > 0; }
    return [h, ink];
  };
  const [ming, ink] = draw('明'), [yue] = draw('月'), [tofu] = draw('\\u{10FFFD}');
  return {ming, yue, tofu, ink};
})()"""


def platform_fonts(browser: Browser, selector: str) -> set[str]:
    browser.call("DOM.enable")
    browser.call("CSS.enable")
    root = browser.call("DOM.getDocument")["root"]["nodeId"]
    node = browser.call("DOM.querySelector", nodeId=root, selector=selector)["nodeId"]
    text_node = browser.call("DOM.describeNode", nodeId=node, depth=1)["node"]
    fonts = browser.call("CSS.getPlatformFontsForNode", nodeId=node)["fonts"]
    assert text_node and fonts
    return {f["familyName"] for f in fonts if f["glyphCount"] > 0 and f["familyName"]}


def cjk_families() -> set[str]:
    import subprocess

    out = subprocess.run(["fc-list", ":lang=zh", "family"], capture_output=True, text=True).stdout
    return {name.strip() for line in out.splitlines() for name in line.split(",") if name.strip()}


@pytest.fixture(scope="module")
def keyed_server(lm):
    with BackgroundServer(create_app(Engine(lm, max_batch=2), "tiny", api_key="sk-page")) as srv:
        yield srv


def test_missing_key_points_at_the_key_box_and_the_label_appears_without_reload(keyed_server, browser):
    browser.open(f"{keyed_server.url}/?q=hello")
    browser.wait_for("document.body && document.body.dataset.done === '1'")
    state = json.loads(browser.eval(STATE))
    assert len(state["errors"]) == 1 and "API key\u201d box" in state["errors"][0], state
    assert "Authorization" not in state["errors"][0]  # no header instruction a browser user cannot follow
    assert browser.eval("document.getElementById('api-key').classList.contains('needed')")
    assert browser.eval("document.activeElement.id") == "api-key"
    assert "API key" in browser.eval("document.getElementById('model').textContent")
    # typing the key (a change event) loads the model label at once and the next message goes through
    browser.eval("const k = document.getElementById('api-key'); k.value = 'sk-page';"
                 "k.dispatchEvent(new Event('change'))")
    browser.wait_for("document.getElementById('model').textContent.startsWith('tiny ·')", timeout=30)
    browser.eval("document.getElementById('input').value = 'hello again';"
                 "document.getElementById('composer').requestSubmit()")
    browser.wait_for("document.body.dataset.done === '2'")
    state = json.loads(browser.eval(STATE))
    assert len(state["errors"]) == 1 and state["assistant"][-1].strip() and state["history"] == 2
