"""Drive headless Chromium over the DevTools protocol through a pipe (``--remote-debugging-pipe``).

No websocket library needed: Chromium reads JSON commands (NUL-terminated) from fd 3 and writes
replies and events to fd 4. Used by the web-page test; runnable by hand too::

    python tests/e2e/browser.py http://127.0.0.1:8000/?q=hello shot.png
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--remote-debugging-pipe", "--window-size=1000,800"]


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Browser:
    """A headless Chromium with one page, controlled by CDP commands over two pipes."""

    def __init__(self, binary: str):
        self.profile = tempfile.mkdtemp(prefix="mtnlg-chromium-")
        cmd_r, self._cmd_w = os.pipe()  # we write commands, Chromium reads fd 3
        self._out_r, out_w = os.pipe()  # Chromium writes fd 4, we read
        # copies above fd 10, so moving them onto 3 and 4 in the child cannot clobber one another
        hi_r, hi_w = fcntl.fcntl(cmd_r, fcntl.F_DUPFD, 10), fcntl.fcntl(out_w, fcntl.F_DUPFD, 10)
        os.close(cmd_r)
        os.close(out_w)

        def child_fds() -> None:
            os.dup2(hi_r, 3)
            os.dup2(hi_w, 4)

        self.proc = subprocess.Popen(
            [binary, *FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            pass_fds=(3, 4, hi_r, hi_w), preexec_fn=child_fds)
        os.close(hi_r)
        os.close(hi_w)
        self._buf = b""
        self._next = 0
        self.session: str | None = None

    def call(self, method: str, timeout: float = 30.0, **params) -> dict:
        self._next += 1
        msg = {"id": self._next, "method": method, "params": params}
        if self.session and not method.startswith("Target."):
            msg["sessionId"] = self.session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" not in self._buf:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no reply to {method}")
                chunk = os.read(self._out_r, 1 << 20)
                if not chunk:
                    raise RuntimeError("chromium closed the DevTools pipe")
                self._buf += chunk
            raw, self._buf = self._buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._next:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def open(self, url: str) -> None:
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Page.enable")
        self.call("Runtime.enable")
        self.call("Page.navigate", url=url)

    def eval(self, expression: str):
        res = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return res.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float = 60.0, poll: float = 0.1):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.eval(expression)
            if value:
                return value
            time.sleep(poll)
        raise TimeoutError(f"page never satisfied: {expression}")

    def screenshot(self, path: str) -> None:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))

    def close(self) -> None:
        try:
            os.close(self._cmd_w)
            os.close(self._out_r)
        except OSError:
            pass
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.profile, ignore_errors=True)


def chat_once(url: str, png: str, timeout: float = 60.0) -> dict:
    """Load the page (which auto-sends ``?q=``), wait for the streamed reply, save a screenshot."""
    binary = find_chromium()
    if binary is None:
        raise FileNotFoundError("chromium is not installed")
    browser = Browser(binary)
    try:
        browser.open(url)
        browser.wait_for("document.body && document.body.dataset.done === '1'", timeout)
        result = browser.eval("""JSON.stringify({
            user: [...document.querySelectorAll('.msg.user')].map(e => e.textContent),
            assistant: [...document.querySelectorAll('.msg.assistant')].map(e => e.textContent),
            errors: [...document.querySelectorAll('.msg.error')].map(e => e.textContent),
            stats: document.getElementById('stats').textContent})""")
        browser.screenshot(png)
        return json.loads(result)
    finally:
        browser.close()


if __name__ == "__main__":
    print(json.dumps(chat_once(sys.argv[1], sys.argv[2]), ensure_ascii=False, indent=2))
