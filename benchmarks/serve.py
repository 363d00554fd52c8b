"""Serving benchmark: continuous batching vs one request at a time, over real HTTP.

Starts ``mtnlg serve`` (a subprocess) on a tiny random model and streams completions at concurrency
1, 4 and 16 (closed loop) and with Poisson arrivals at several rates (open loop). Per scenario:
TTFT, TPOT (time per output token after the first) and ITL (gaps between streamed events) at p50 / p99,
request and output-token throughput. Goal: output-token throughput at 16 concurrent >= 6x the
sequential throughput, with p50 TTFT at most 2x the single-request TTFT.

    python benchmarks/serve.py            # a table
    python benchmarks/serve.py --json     # one JSON object (keys: throughput_ratio_16, ttft_ratio_16, ...)

Measured 2026-11-30 (2 shared cores, load average 2.4-3.1; medians of 3 runs each, alternated):

    =====================================  ======================  ======================
    figure                                 before (1ffe43e)        after (issue16-ttft)
    =====================================  ======================  ======================
    p50 TTFT, 1 stream / 16 streams        7.57 / 51.5 ms          6.40 / 41.1 ms
    ttft_ratio_16 (per-run median)         6.14 (5.31 - 8.10)      6.42 (6.09 - 7.48)
    output tokens/s at 16 streams          2,284                   2,439
    throughput_ratio_16 (per-run median)   5.62 (3.91 - 6.02)      5.63 (4.81 - 6.29)
    p50 TTFT, Poisson 32 requests/s        16.5 ms                 9.3 ms
    =====================================  ======================  ======================

Why ``ttft_ratio_16`` stays above 2: the closed loop makes waves of 16 requests that start, and so
finish, together; the whole wave must be parsed by the server's one event loop (uvicorn, Starlette,
a tokenizer: ~2,200 Python calls per request) before the median request's first token, and that work
shares the GIL with the engine. A lone request pays it once. A trace of one wave (2026-12-01; server
and client timestamps on one clock): the wave's first request is taken alone as it arrives, and its
one-row step (prefill or decode, ~1-2 ms of work) then takes 17-22 ms, because the engine thread
holds the GIL only between the event loop's turns while that loop parses the other 15 (~1 ms of
Python each; a 0.5 ms switch interval instead of 5 made no difference); those 15 are submitted
meanwhile and prefilled together after that step, all first tokens ~30-40 ms after the wave began.
Since then the engine runs in its own process (``serve.engine_process``, :mod:`mtnlg.infer.engine_core`;
``--engine thread`` measures the old way). Alternated three runs each (2026-12-01): p50 TTFT at 16
streams 26-27.5 -> 18-23 ms, ``ttft_ratio_16`` 6.3-7.0 -> 5.1-5.4, 16-stream output 3,690-4,120 ->
4,570-6,720 tokens/s, one stream 520-575 -> 660-830. What is left is CPU: the benchmark client, the
server process and the engine process now share the 2 cores, and a wave's requests reach the engine
over ~45 ms (one every ~2.5 ms), each first token 6-13 ms after its submission. Earlier the same day,
uvicorn's httptools protocol on uvloop instead of h11 on asyncio raised output tokens/s at 16 streams
from 3,000-3,980 to 4,270-5,140 (``throughput_ratio_16`` 5.7-6.0 -> 6.4-8.8).

Later that day a trace of a burst found the median first token waiting on three things: thread
hand-overs (the engine process's pipe reader took the GIL from the engine's steps; the server's reader
thread waited up to 4 ms to be scheduled), FastAPI's layers (~0.7-1 ms of parsing per request on the
one event loop) and asyncio's order (a burst's parse steps were all ready at once, so first tokens
the engine had sent 9 ms earlier left only after the whole burst was parsed). After the fix (one
thread in the engine process, the pipe read on the event loop, the generation routes answered by the
outer ASGI layer, parsing in 1 ms slices; :mod:`mtnlg.infer.guard`), alternated three times each
against the commit before: p50 TTFT at 16 streams 16.4-22.9 -> 11.8-15.5 ms with ``--threads 2``
(``ttft_ratio_16`` 3.8-4.8 -> 2.7-3.4) and 13.0-19.0 -> 9.4-15.0 ms with ``--threads 1`` (2.4-4.8 ->
2.9-3.3); with ``--requests 160`` (ten bursts instead of three) 12.3-12.5 -> 9.5-10.4 ms, ratio
2.5-2.9 -> 2.05-2.17. What is left is CPU on 2 cores: per streamed request the server process spends
~4.8 ms (64 events at ~70 us, ~50 of them the kernel's loopback write), the engine process ~9 ms
and this client ~2.6 ms, so during a burst three processes queue for two cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

PROMPTS = ["The moon rose over the quiet river and", "In the spring the wind brings rain to the hills,",
           "Once upon a time a small boat drifted", "The old man looked at the mountains and said",
           "Under the willow tree the children sang", "A letter arrived from the far city telling"]


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def build_model(directory: Path, hidden: int, layers: int, max_len: int) -> None:
    import torch

    from mtnlg.api import MegatronLmModel, MegatronModelConfig

    torch.manual_seed(0)
    cfg = MegatronModelConfig(vocab_size=264, hidden_size=hidden, num_hidden_layers=layers,
                              num_attention_heads=max(hidden // 32, 1), intermediate_size=4 * hidden,
                              max_position_embeddings=max_len)
    MegatronLmModel(cfg).materialize(seed=0).save_pretrained(directory)


def start_server(checkpoint: Path, max_batch: int, threads: int, engine: str = "process") -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MTNLG_LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen([sys.executable, "-m", "mtnlg", "serve", "--checkpoint", str(checkpoint), "--port",
                             str(port), f"--serve.max_batch={max_batch}", "--serve.max_queue=1024", "--device=cpu",
                             f"--serve.engine_process={'true' if engine == 'process' else 'false'}"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the server exited during startup")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not start")


class RawStream:
    """A minimal HTTP/1.1 client for one streamed POST (asyncio streams; chunked transfer decoding).

    httpx costs several times more CPU per SSE event; on a 2-core machine that CPU comes out of the
    server's share and would distort the very latencies being measured.
    """

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port

    async def post_stream(self, path: str, body: dict):
        reader, writer = await asyncio.open_connection(self.host, self.port)
        data = json.dumps(body).encode()
        writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode() + data)
        await writer.drain()
        status = (await reader.readline()).split()[1]
        if status != b"200":
            raise RuntimeError(f"HTTP {status.decode()}")
        while (await reader.readline()) not in (b"\r\n", b""):
            pass
        buf = b""
        try:
            while True:
                size = int((await reader.readline()).strip() or b"0", 16)
                if size == 0:
                    break
                buf += await reader.readexactly(size + 2)
                *events, buf = buf.split(b"\n\n")
                for e in events:
                    yield e.decode()
        finally:
            writer.close()


async def one_request(client: RawStream, prompt: str, max_tokens: int) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.8, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    times: list[float] = []
    tokens = 0
    async for event in client.post_stream("/v1/completions", body):
        line = event.strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        if '"choices": []' not in line:  # a token chunk
            times.append(time.perf_counter())
        elif '"usage": {' in line:
            tokens = json.loads(line[6:])["usage"]["completion_tokens"]
    end = time.perf_counter()
    return {"ttft": times[0] - t0, "latency": end - t0, "tokens": tokens,
            # per token after the first (one event can carry several tokens when the server coalesces them)
            "tpot": (times[-1] - times[0]) / max((tokens or len(times)) - 1, 1),
            "itl": [b - a for a, b in zip(times, times[1:])], "start": t0, "end": end}


def _client(url: str) -> RawStream:
    host, port = url.removeprefix("http://").split(":")
    return RawStream(host, int(port))


async def closed_loop(url: str, concurrency: int, num_requests: int, max_tokens: int) -> list[dict]:
    results: list[dict] = []
    counter = iter(range(num_requests))
    client = _client(url)

    async def worker() -> None:
        for i in counter:
            results.append(await one_request(client, PROMPTS[i % len(PROMPTS)], max_tokens))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


async def poisson(url: str, rate: float, num_requests: int, max_tokens: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    client = _client(url)
    tasks = []
    for i in range(num_requests):
        tasks.append(asyncio.create_task(one_request(client, PROMPTS[i % len(PROMPTS)], max_tokens)))
        await asyncio.sleep(rng.expovariate(rate))
    return list(await asyncio.gather(*tasks))


def summarize(name: str, results: list[dict]) -> dict:
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    itl = [x for r in results for x in r["itl"]]
    ms = 1000.0
    return {
        "scenario": name, "requests": len(results), "output_tokens": tokens, "wall_s": round(wall, 3),
        "request_throughput": round(len(results) / wall, 3), "output_throughput": round(tokens / wall, 1),
        "ttft_p50_ms": round(percentile([r["ttft"] for r in results], 50) * ms, 2),
        "ttft_p99_ms": round(percentile([r["ttft"] for r in results], 99) * ms, 2),
        "tpot_p50_ms": round(percentile([r["tpot"] for r in results], 50) * ms, 2),
        "tpot_p99_ms": round(percentile([r["tpot"] for r in results], 99) * ms, 2),
        "itl_p50_ms": round(percentile(itl, 50) * ms, 2), "itl_p99_ms": round(percentile(itl, 99) * ms, 2),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rates", default="8,32", help="Poisson arrival rates (requests/s)")
    ap.add_argument("--requests", type=int, default=48, help="requests per concurrent / Poisson scenario")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    ap.add_argument("--engine", choices=["process", "thread"], default="process",
                    help="the engine in its own process (serve.engine_process, the default) or a server thread")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "model"
        build_model(ckpt, args.hidden, args.layers, 512)
        proc, url = start_server(ckpt, 16, args.threads, args.engine)
        try:
            asyncio.run(closed_loop(url, 4, 8, 8))  # warm up
            rows = []
            for c in (1, 4, 16):
                n = max(8, args.requests // 16 * c) if c > 1 else 8
                rows.append(summarize(f"concurrency {c}", asyncio.run(closed_loop(url, c, n, args.max_tokens))))
            for rate in [float(r) for r in args.rates.split(",") if r]:
                rows.append(summarize(f"poisson {rate:g}/s",
                                      asyncio.run(poisson(url, rate, args.requests, args.max_tokens))))
        finally:
            proc.terminate()
            proc.wait(60)

    seq, c16 = rows[0], rows[2]
    result = {
        "model": {"hidden": args.hidden, "layers": args.layers, "max_tokens": args.max_tokens}, "engine": args.engine,
        "scenarios": rows,
        "throughput_ratio_16": round(c16["output_throughput"] / seq["output_throughput"], 2),
        "ttft_ratio_16": round(c16["ttft_p50_ms"] / seq["ttft_p50_ms"], 2),
    }
    result["goal_met"] = result["throughput_ratio_16"] >= 6 and result["ttft_ratio_16"] <= 2
    if args.json:
        print(json.dumps(result))
        return 0
    cols = ["scenario", "requests", "output_throughput", "request_throughput", "ttft_p50_ms", "ttft_p99_ms",
            "tpot_p50_ms", "tpot_p99_ms", "itl_p50_ms", "itl_p99_ms"]
    heads = ["scenario", "reqs", "out tok/s", "req/s", "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99", "ITL p50",
             "ITL p99"]
    widths = [max(len(h), *(len(str(r[c])) for r in rows)) for h, c in zip(heads, cols)]
    print("  ".join(h.ljust(w) for h, w in zip(heads, widths)) + "   (latencies in ms)")
    for r in rows:
        print("  ".join(str(r[c]).ljust(w) for c, w in zip(cols, widths)))
    print(f"\noutput-token throughput at 16 concurrent / sequential: {result['throughput_ratio_16']}x (goal >= 6x)")
    print(f"p50 TTFT at 16 concurrent / sequential: {result['ttft_ratio_16']}x (goal <= 2x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
