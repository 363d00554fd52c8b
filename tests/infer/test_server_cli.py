"""``mtnlg serve`` as a user runs it: load a saved model, answer, and shut down gracefully on Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from mtnlg.api import MegatronLmModel, MegatronModelConfig


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("model") / "tiny"
    cfg = MegatronModelConfig(vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                              intermediate_size=64, max_position_embeddings=2048)
    MegatronLmModel(cfg).materialize(seed=0).save_pretrained(d)
    return d


def start(args: list[str], env_extra: dict | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    proc = subprocess.Popen([sys.executable, "-m", "mtnlg", "serve", *args, "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {proc.stdout.read()}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("server did not come up")


@pytest.mark.slow
def test_serve_answers_and_drains_on_sigint(saved):
    proc, url = start(["--checkpoint", str(saved), "--serve.max_batch=4", "--serve.max_model_len=1024"],
                      {"MTNLG_API_KEY": "k1"})
    try:
        assert httpx.get(url + "/v1/models").status_code == 401  # the key came from the environment
        headers = {"Authorization": "Bearer k1"}
        models = httpx.get(url + "/v1/models", headers=headers).json()
        assert models["data"][0]["max_model_len"] == 1024
        body = {"prompt": "hello", "max_tokens": 400, "stream": True, "ignore_eos": True,
                "stream_options": {"include_usage": True}}
        with httpx.stream("POST", url + "/v1/completions", json=body, headers=headers, timeout=120) as resp:
            lines = resp.iter_lines()
            first = next(line for line in lines if line)
            assert first.startswith("data: ")
            proc.send_signal(signal.SIGINT)  # Ctrl-C while the request is in flight
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        usage = json.loads(rest[-2][6:])["usage"]
        assert usage["completion_tokens"] == 400  # it finished despite the shutdown
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_reports_bad_input(tmp_path, saved, capsys):
    from mtnlg.cli import main

    port = str(free_port())  # not the default 8000, which something else may hold (that is the next test)
    assert main(["serve", "--checkpoint", str(tmp_path / "nope"), "--port", port]) == 2
    assert main(["serve", "--checkpoint", str(saved), "--serve.max_model_len=99999", "--port", port]) == 2
    err = capsys.readouterr().err
    assert "mtnlg serve: error:" in err and "max_model_len" in err and "Traceback" not in err
    assert main(["serve", "--checkpoint", str(saved), "--api-key", "", "--port", port]) == 2  # "$KEY" with KEY unset
    assert "--api-key is empty, which would leave the server open" in capsys.readouterr().err


def test_a_port_in_use_is_one_line_naming_port_before_the_model_loads(tmp_path):
    from mtnlg.errors import ConfigError
    from mtnlg.infer.httpd import run_app

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        # no checkpoint there: the answer names the port, so it was checked before anything was loaded
        r = subprocess.run([sys.executable, "-m", "mtnlg", "serve", "--checkpoint", str(tmp_path / "nope"),
                            "--port", str(port)], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 2, r.stderr
        assert r.stdout == "" and r.stderr.strip().splitlines() == [
            f"mtnlg serve: error: --port {port}: 127.0.0.1:{port} is already in use (another server?); choose "
            f"another port with --port"]
        # taken while the model loads (after that check): the server's own bind says the same, uvicorn never runs
        with pytest.raises(ConfigError, match=f"^--port {port}: 127.0.0.1:{port} is already in use"):
            run_app(lambda scope, receive, send: None, "127.0.0.1", port)
    with pytest.raises(ConfigError, match="^--host 203.0.113.7: not an address of this machine"):
        run_app(lambda scope, receive, send: None, "203.0.113.7", port)
