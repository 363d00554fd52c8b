"""The engine in its own process (``serve.engine_process``): the same answers as the engine in a thread,
over real HTTP, and a server that stays honest when that process dies."""

from __future__ import annotations

import json
import os
import signal
import time

import httpx
import pytest
import torch

from mtnlg.api import MegatronLmModel, MegatronModelConfig
from mtnlg.data.tokenizer import train_bpe
from mtnlg.infer.engine_core import EngineClient
from mtnlg.infer.scheduler import Engine
from mtnlg.infer.server import BackgroundServer, create_app

TEXT = ["the moon is bright over the quiet river", "床前明月光，疑是地上霜。举头望明月，低头思故乡。"] * 20
KW = {"max_batch": 4, "max_model_len": 96, "max_queue": 8}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tok = train_bpe(TEXT, vocab_size=300)
    cfg = MegatronModelConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=128, max_position_embeddings=128)
    lm = MegatronLmModel(cfg, tokenizer=tok).materialize(seed=5)
    path = tmp_path_factory.mktemp("core") / "model"
    lm.save_pretrained(path)
    return lm, str(path)


def _completions(url: str, bodies: list[dict]) -> list[dict]:
    with httpx.Client(base_url=url, timeout=60) as c:
        return [c.post("/v1/completions", json=b).json() for b in bodies]


def test_the_engine_process_answers_as_the_engine_thread(saved):
    lm, path = saved
    bodies = [{"prompt": p, "max_tokens": 12, "temperature": 0, "ignore_eos": True, "logprobs": 2}
              for p in ("the moon", "床前明月光，")] + [{"prompt": "the", "max_tokens": 6, "seed": 3, "n": 2}]
    poem = {"prompt": "床前明月光，疑是地上霜。", "lines": 2, "temperature": 1, "seed": 1}
    with BackgroundServer(create_app(Engine(lm, **KW), "tiny")) as srv:
        local = _completions(srv.url, bodies)
        local_poem = httpx.post(srv.url + "/v1/poem", json=poem, timeout=60).json()
    client = EngineClient(path, torch.device("cpu"), torch.float32, lm.tokenizer, **KW)
    assert client.max_model_len == 96 and client.num_slots == 4
    with BackgroundServer(create_app(client, "tiny")) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        remote = _completions(srv.url, bodies)
        for a, b in zip(local, remote):  # the same tokens, text, logprobs and usage
            assert [x["text"] for x in a["choices"]] == [x["text"] for x in b["choices"]]
            assert a["usage"] == b["usage"]
            for x, y in zip(a["choices"], b["choices"]):
                assert x["finish_reason"] == y["finish_reason"]
                if x["logprobs"]:
                    assert x["logprobs"]["token_logprobs"] == pytest.approx(y["logprobs"]["token_logprobs"], abs=1e-5)
        with c.stream("POST", "/v1/completions", json={**bodies[0], "stream": True}) as s:
            events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
        assert "".join(e["choices"][0]["text"] for e in events) == remote[0]["choices"][0]["text"]
        too_long = c.post("/v1/completions", json={"prompt": "the moon", "max_tokens": 500})
        assert too_long.status_code == 400 and "96 tokens" in too_long.json()["error"]["message"]
        remote_poem = c.post("/v1/poem", json=poem).json()  # written in the engine process
        assert remote_poem["lines"] == local_poem["lines"] and [len(x) for x in remote_poem["lines"]] == [6, 6]
        metrics = c.get("/metrics").text  # fetched from the engine process
        generated = sum(r["usage"]["completion_tokens"] for r in remote) + 12  # the streamed one: 12, ignore_eos
        assert f"mtnlg_generation_tokens_total {generated}\n" in metrics
        assert c.get("/health").json() == {"status": "ok"}
    assert not client._proc.is_alive()  # the server's shutdown stopped the engine process


def test_serve_with_the_engine_process_reads_no_weights_in_the_server_process(saved, monkeypatch):
    """``serve()`` as ``mtnlg serve`` calls it, on the CPU: the engine process writes completions and poems,
    while the server process loads only the tokenizer (``from_pretrained`` is never called in it)."""
    import mtnlg.infer.server as server
    from mtnlg.config import ServeConfig

    lm, path = saved

    def no_weights_here(*args, **kwargs):
        raise AssertionError("the server process loaded the model")

    monkeypatch.setattr(MegatronLmModel, "from_pretrained", no_weights_here)
    answers = []

    def run_app(app, host, port):  # serve the app serve() built, as uvicorn would, and ask it
        with BackgroundServer(app) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
            answers.append(c.post("/v1/completions", json={"prompt": "the moon", "max_tokens": 4}).json())
            answers.append(c.post("/v1/poem", json={"prompt": "床前明月光，疑是地上霜。", "lines": 1}).json())

    monkeypatch.setattr(server, "run_app", run_app)
    server.serve(path, ServeConfig(max_batch=2, max_model_len=64), torch.device("cpu"), torch.float32)
    assert answers[0]["usage"]["completion_tokens"] == 4 and answers[0]["model"] == "mtnlg"
    assert len(answers[1]["lines"][0]) == 6 and answers[1]["lines"][0][-1] == "，"


def test_fuzzed_requests_never_5xx_with_the_engine_process(saved):
    """The server's fuzzer (numeric extremes, lone surrogates, junk on every JSON route) against the
    engine in its own process: never a 5xx, and the engine process stays healthy."""
    from tests.infer.test_server import fuzz_never_5xx

    lm, path = saved
    client = EngineClient(path, torch.device("cpu"), torch.float32, lm.tokenizer, **KW)
    with BackgroundServer(create_app(client, "tiny")) as srv:
        fuzz_never_5xx(srv.url, {"Content-Type": "application/json"})
        assert client._proc.is_alive() and client.healthy


def test_a_dead_engine_process_fails_requests_instead_of_hanging(saved):
    lm, path = saved
    client = EngineClient(path, torch.device("cpu"), torch.float32, lm.tokenizer, **KW)
    with BackgroundServer(create_app(client, "tiny")) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        assert c.get("/health").status_code == 200
        os.kill(client._proc.pid, signal.SIGKILL)
        client._proc.join(10)
        deadline = time.monotonic() + 10
        while client.healthy and time.monotonic() < deadline:
            time.sleep(0.01)
        assert c.get("/health").status_code == 503
        r = c.post("/v1/completions", json={"prompt": "the moon", "max_tokens": 4})
        assert r.status_code == 503 and "Traceback" not in r.text
        assert "engine process stopped" in r.json()["error"]["message"]  # not "shutting down": it died
        r = c.post("/v1/poem", json={"prompt": "床前明月光，疑是地上霜。", "lines": 1})
        assert r.status_code == 503 and r.json()["error"]["code"] == "service_unavailable"
        r = c.get("/metrics")  # the scrape asks the engine process: a 503 saying so, not a bare 500
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"


def test_an_engine_process_that_cannot_load_says_why_in_one_line(tmp_path):
    from mtnlg.errors import ConfigError

    with pytest.raises(ConfigError, match=r"engine process could not start: CheckpointError: .*missing"):
        EngineClient(str(tmp_path / "missing"), torch.device("cpu"), torch.float32, None, **KW)


def test_the_engine_process_pipe_through_the_writer_thread_and_concurrent_metrics(saved, monkeypatch):
    """Every message from the event loop through the writer thread (as a big submit goes: the loop, which
    also reads the pipe, never blocks sending), in order: the same answers; a client that goes away
    cancels its request; two /metrics at once each get the engine's answer; a trailing slash redirects."""
    import concurrent.futures

    from mtnlg.infer import engine_core

    lm, path = saved
    body = {"prompt": "the moon", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    client = EngineClient(path, torch.device("cpu"), torch.float32, lm.tokenizer, **KW)
    with BackgroundServer(create_app(client, "tiny")) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        inline = c.post("/v1/completions", json=body).json()["choices"][0]["text"]
        monkeypatch.setattr(engine_core, "INLINE_SEND_BYTES", 0)
        assert [c.post("/v1/completions", json=body).json()["choices"][0]["text"] for _ in range(3)] == [inline] * 3
        assert client._writer is not None and not client._backlog
        with c.stream("POST", "/v1/completions", json={**body, "max_tokens": 80, "stream": True}) as s:
            next(s.iter_lines())  # one event, then go away
        deadline = time.monotonic() + 10
        while client._requests and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not client._requests  # cancelled in the engine, which answered with its abort
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            pages = list(pool.map(lambda _: c.get("/metrics"), range(4)))
        assert all(p.status_code == 200 and "mtnlg_generation_tokens_total" in p.text for p in pages)
        moved = c.post("/v1/completions/", json=body)
        assert moved.status_code == 307 and moved.headers["location"].endswith("/v1/completions")
