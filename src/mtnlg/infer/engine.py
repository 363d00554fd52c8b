"""Continuous batching: many requests share one model, joining and leaving the batch at every step.

::

    submit() ──► waiting (bounded: max_queue) ──admit into a free slot──► prefill (fills the slot's KV)
                                                                            │ first token
                         ┌──────────────────────────────────────────────────┘
                         ▼
    running ──► one batched decode step for every running request (per-row position + mask) ──► sample
       ▲                          │ each row its own SamplingParams / generator
       └── not finished ◄─────────┤
                                  └── finished (stop token / stop string / max_tokens / cancelled) ──► slot freed

The KV cache is a slot-indexed tensor pair ``[layers, slots, heads, max_len, head_dim]``; a request owns
one slot from admission to finish, so nothing is ever copied between requests. The number of slots is
``min(max_batch, kv_cache_mb // bytes_per_slot)``. The loop runs in a background thread (PyTorch
releases the GIL in its kernels); results reach asyncio consumers through ``call_soon_threadsafe``.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from mtnlg.errors import ConfigError
from mtnlg.infer.sampling import SamplingParams, process_logits, sample, top_logprobs
from mtnlg.infer.streaming import StopStringFilter, StreamDecoder

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The waiting queue holds ``max_queue`` requests already: the caller should retry later (HTTP 429)."""


class EngineStopped(Exception):
    """The engine is shutting down and takes no new requests (HTTP 503)."""


class RequestTooLong(ConfigError):
    """Prompt plus max_tokens exceed the context (HTTP 400)."""


# -- metrics -----------------------------------------------------------------------------------------------
class Histogram:
    """A Prometheus-style cumulative histogram (thread-safe enough: appends under the GIL)."""

    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def render(self, name: str, help_: str) -> list[str]:
        lines = [f"# HELP {name} {help_}", f"# TYPE {name} histogram"]
        total = 0
        for b, c in zip(self.buckets, self.counts):
            total += c
            lines.append(f'{name}_bucket{{le="{b}"}} {total}')
        lines.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        lines += [f"{name}_sum {self.sum}", f"{name}_count {self.count}"]
        return lines


LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class EngineMetrics:
    """Counters the server exposes at /metrics (requests, tokens, TTFT and inter-token latency)."""

    requests_finished: dict[str, int] = field(default_factory=dict)  # finish_reason -> count
    prompt_tokens: int = 0
    generation_tokens: int = 0
    ttft: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    itl: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))


# -- requests ----------------------------------------------------------------------------------------------
@dataclass
class TokenLogprob:
    """The chosen token's log-probability and the ``top`` most likely alternatives (id, logprob)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Output:
    """One event of a request: new text (maybe empty) and, on the last event, why it finished."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" on the final event
    prompt_tokens: int = 0
    completion_tokens: int = 0


_ids = itertools.count()
PREFILL_TOKENS = 4096  # padded tokens per batched prefill forward


class Request:
    """A submitted request: its prompt, parameters, and where its outputs go.

    ``sink(output)`` is called from the engine thread; :meth:`Engine.submit_async` wires it to an
    ``asyncio.Queue`` and :meth:`Engine.generate` to a blocking wait.
    """

    def __init__(self, prompt_ids: list[int], params: SamplingParams, max_tokens: int,
                 sink: Callable[[list[Output]], None], loop: Any = None):
        self.id = next(_ids)
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.max_tokens = max_tokens
        self.sink = sink
        self.loop = loop  # an asyncio loop: outputs are delivered with call_soon_threadsafe
        self.arrival = time.perf_counter()
        self.slot = -1
        self.length = 0  # positions of the slot's KV cache that are filled
        self.generated: list[int] = []
        self.next_token = -1  # sampled, emitted, not yet fed to the model
        self.last_token_time = 0.0
        self.cancelled = False
        self.finished = False
        self.generator: torch.Generator | None = None
        self.detok: StreamDecoder | None = None  # token ids -> complete UTF-8 characters
        self.stops: StopStringFilter | None = None  # holds back what could become a stop string

    def cancel(self) -> None:
        """Stop generating and free the slot at the engine's next step (client disconnected)."""
        self.cancelled = True


# -- the slot KV cache -------------------------------------------------------------------------------------
class SlotKVCache:
    """Keys and values for ``slots`` independent sequences; implements the model's ``LayerCache``.

    Before each forward the engine says which rows take part: :meth:`for_prefill` (new prompts, right-
    padded to one length, written from position 0 of their slots) or :meth:`for_decode` (a token per row
    at that row's own position). Rows attend only to their own slot; the engine's attention mask hides
    padding and positions past each row's length.
    """

    def __init__(self, num_layers: int, slots: int, heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (num_layers, slots, heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0  # unused: the engine always passes explicit positions
        self._slots: torch.Tensor | None = None
        self._rows: torch.Tensor | None = None
        self._rows_slice: slice | None = None
        self._pos: torch.Tensor | None = None
        self._span = 0

    @staticmethod
    def bytes_per_slot(num_layers: int, heads: int, max_len: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * heads * max_len * head_dim * torch.empty((), dtype=dtype).element_size()

    def for_prefill(self, slots: list[int]) -> None:
        self._slots, self._rows = torch.tensor(slots, device=self.k.device), None

    def for_decode(self, rows: list[int], pos: torch.Tensor, span: int) -> None:
        self._rows = torch.tensor(rows, device=self.k.device)
        contiguous = rows == list(range(rows[0], rows[0] + len(rows)))
        self._rows_slice = slice(rows[0], rows[0] + len(rows)) if contiguous else None
        self._pos, self._span = pos, span

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._rows is None:  # prefill from position 0: attend over the new keys only
            T = k.shape[2]
            self.k[layer, self._slots, :, :T] = k
            self.v[layer, self._slots, :, :T] = v
            return k, v
        self.k[layer, self._rows, :, self._pos] = k[:, :, 0]
        self.v[layer, self._rows, :, self._pos] = v[:, :, 0]
        rows = self._rows_slice if self._rows_slice is not None else self._rows
        return self.k[layer, rows, :, : self._span], self.v[layer, rows, :, : self._span]

    def advance(self, num_tokens: int) -> None:
        pass


# -- the engine --------------------------------------------------------------------------------------------
class Engine:
    """Continuous-batching generation over one model (a :class:`~mtnlg.api.MegatronLmModel`).

    ``max_model_len`` caps prompt + output per request (default: the model's context). Slots (the
    running-batch limit) = ``min(max_batch, kv_cache_mb / bytes per slot)``; ``max_queue`` bounds the
    waiting requests (:class:`QueueFull` beyond it).
    """

    def __init__(self, lm: Any, max_batch: int = 16, max_model_len: int | None = None, max_queue: int = 64,
                 kv_cache_mb: float = 256.0):
        self.lm = lm
        self.model = lm.model.eval()
        self.tokenizer = lm.tokenizer
        cfg = self.model.cfg
        if max_model_len is None:
            max_model_len = cfg.max_seq_len
        if not 2 <= max_model_len <= cfg.max_seq_len:
            raise ConfigError(f"serve.max_model_len={max_model_len} must be in [2, {cfg.max_seq_len}] "
                              f"(the model's max_position_embeddings)")
        self.max_model_len = max_model_len
        self.vocab_size = min(self.tokenizer.vocab_size, self.model.vocab_size)
        p = next(self.model.parameters())
        self.device, self.dtype = p.device, p.dtype
        per_slot = SlotKVCache.bytes_per_slot(cfg.num_layers, cfg.num_heads, max_model_len, cfg.head_dim, p.dtype)
        by_memory = int(kv_cache_mb * 2**20 // per_slot)
        if by_memory < 1:
            raise ConfigError(f"serve.kv_cache_mb={kv_cache_mb} is too small for one sequence of {max_model_len} "
                              f"tokens ({per_slot / 2**20:.1f} MiB); raise serve.kv_cache_mb or lower "
                              f"serve.max_model_len")
        self.num_slots = min(max_batch, by_memory)
        self.max_queue = max_queue
        self.cache = SlotKVCache(cfg.num_layers, self.num_slots, cfg.num_heads, max_model_len, cfg.head_dim,
                                 p.dtype, p.device)
        self.metrics = EngineMetrics()
        self._free = list(range(self.num_slots))
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []
        self._cv = threading.Condition()
        self._stopping = False
        self._crashed = False
        self._thread: threading.Thread | None = None
        self.steps = 0
        log.info("engine: %d slots x %d tokens (%.1f MiB KV cache), queue %d", self.num_slots, max_model_len,
                 self.num_slots * per_slot / 2**20, max_queue)

    # -- public API -------------------------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def healthy(self) -> bool:
        """False once the loop has died (a bug or a device error): /health then answers 503."""
        return not self._crashed

    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="mtnlg-engine", daemon=True)
            self._thread.start()
        return self

    def shutdown(self, timeout: float | None = None) -> None:
        """Take no new requests, let waiting and running ones finish, then stop the loop."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def check_length(self, prompt_len: int, max_tokens: int) -> None:
        """Raise :class:`RequestTooLong` naming both numbers when the request cannot fit the context."""
        if prompt_len + max_tokens > self.max_model_len:
            raise RequestTooLong(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{prompt_len + max_tokens} tokens ({prompt_len} in the messages, {max_tokens} in the completion). "
                f"Please reduce the length of the messages or completion.")

    def submit(self, prompt_ids: list[int], params: SamplingParams, max_tokens: int,
               sink: Callable[[list[Output]], None], loop: Any = None) -> Request:
        """Queue a request; outputs go to ``sink`` (a list of :class:`Output` per engine step)."""
        if not prompt_ids:
            raise ConfigError("the prompt is empty; give at least one token")
        if max_tokens < 1:
            raise ConfigError(f"max_tokens must be >= 1, got {max_tokens}")
        self.check_length(len(prompt_ids), max_tokens)
        bad = [t for t in prompt_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ConfigError(f"prompt token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        req = Request(prompt_ids, params, max_tokens, sink, loop)
        with self._cv:
            if self._stopping:
                raise EngineStopped("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} waiting requests); retry later")
            self._waiting.append(req)
            self._cv.notify()
        return req

    def generate(self, prompt_ids: list[int], params: SamplingParams, max_tokens: int,
                 timeout: float | None = None) -> Output:
        """Blocking convenience: run one request to the end and return all of it as one :class:`Output`."""
        done = threading.Event()
        outs: list[Output] = []

        def sink(batch: list[Output]) -> None:
            outs.extend(batch)
            if batch and batch[-1].finish_reason is not None:
                done.set()

        self.submit(prompt_ids, params, max_tokens, sink)
        if not done.wait(timeout):
            raise TimeoutError("generation did not finish in time")
        return merge_outputs(outs)

    # -- the loop ---------------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while True:
                with self._cv:
                    while not self._waiting and not self._running and not self._stopping:
                        self._cv.wait()
                    if self._stopping and not self._waiting and not self._running:
                        return
                    admitted = []
                    while self._waiting and self._free:
                        req = self._waiting.popleft()
                        if req.cancelled:
                            self._finish_silently(req)
                            continue
                        self._free.sort()
                        req.slot = self._free.pop(0)
                        admitted.append(req)
                self._step(admitted)
        except Exception:  # a bug: fail every request instead of hanging their clients
            log.exception("engine loop crashed")
            self._crashed = True
            with self._cv:
                pending = list(self._running) + list(self._waiting)
                self._running.clear()
                self._waiting.clear()
                self._stopping = True
            for req in pending:
                self._deliver([(req, Output("", [], finish_reason="abort", prompt_tokens=len(req.prompt_ids),
                                            completion_tokens=len(req.generated)))])

    def _finish_silently(self, req: Request) -> None:
        req.finished = True
        self._deliver([(req, self._final(req, "abort"))])

    @torch.inference_mode()
    def _step(self, admitted: list[Request]) -> None:
        events: list[tuple[Request, Output]] = []
        # 1. drop cancelled requests: their slots are free for the next admission
        for req in [r for r in self._running if r.cancelled]:
            self._release(req)
            events.append((req, self._final(req, "abort")))
        # 2. prefill the admitted requests together (right-padded) into their slots; each one's first token
        #    comes from its last prompt position and goes out before the decode step
        for group in self._prefill_groups(admitted):
            for req in group:
                self._start(req)
            self._deliver(self._prefill(group))
        # 3. one batched decode step over every running request that has a token to feed
        batch = [r for r in self._running if not r.finished and r.next_token >= 0 and r not in admitted]
        if batch:
            batch.sort(key=lambda r: r.slot)
            pos = torch.tensor([r.length for r in batch], device=self.device)
            span = int(pos.max()) + 1
            self.cache.for_decode([r.slot for r in batch], pos, span)
            tokens = torch.tensor([[r.next_token] for r in batch], device=self.device)
            mask = (torch.arange(span, device=self.device)[None, :] <= pos[:, None])[:, None, None, :]
            logits = self.model(tokens, positions=pos[:, None], cache=self.cache, attn_mask=mask)[:, -1, : self.vocab_size]
            for r in batch:
                r.length += 1
            events += self._emit(batch, logits)
        # 4. finished requests leave the batch
        for req in [r for r in self._running if r.finished]:
            self._release(req)
        self.steps += 1
        self._deliver(events)

    def _prefill_groups(self, admitted: list[Request]) -> list[list[Request]]:
        """Split the admitted requests into prefill batches of at most ``PREFILL_TOKENS`` padded tokens."""
        groups: list[list[Request]] = []
        for req in sorted(admitted, key=lambda r: len(r.prompt_ids)):
            g = groups[-1] if groups else None
            if g is not None and (len(g) + 1) * len(req.prompt_ids) <= PREFILL_TOKENS:
                g.append(req)
            else:
                groups.append([req])
        return groups

    def _prefill(self, group: list[Request]) -> list[tuple[Request, Output]]:
        lens = torch.tensor([len(r.prompt_ids) for r in group], device=self.device)
        T = int(lens.max())
        ids = torch.zeros(len(group), T, dtype=torch.long, device=self.device)
        for i, r in enumerate(group):
            ids[i, : len(r.prompt_ids)] = torch.tensor(r.prompt_ids, device=self.device)
        ar = torch.arange(T, device=self.device)
        mask = (ar[None, :, None] >= ar[None, None, :]) & (ar[None, None, :] < lens[:, None, None])  # [B, T, T]
        self.cache.for_prefill([r.slot for r in group])
        logits = self.model(ids, positions=ar, cache=self.cache, attn_mask=mask[:, None])
        logits = logits[torch.arange(len(group), device=self.device), lens - 1, : self.vocab_size]
        for r in group:
            r.length = len(r.prompt_ids)
            self.metrics.prompt_tokens += r.length
            self._running.append(r)
        return self._emit(group, logits)

    def _start(self, req: Request) -> None:
        p = req.params
        seed = p.seed if p.seed is not None else int.from_bytes(torch.randint(0, 2**31, (1,)).numpy().tobytes()[:4], "little")
        req.generator = torch.Generator(device=self.device).manual_seed(seed)
        req.detok = StreamDecoder(self.tokenizer, skip_special_tokens=True)
        req.stops = StopStringFilter(p.stop)

    def _release(self, req: Request) -> None:
        if req in self._running:
            self._running.remove(req)
            self._free.append(req.slot)
        req.finished = True

    def _emit(self, batch: list[Request], logits: torch.Tensor) -> list[tuple[Request, Output]]:
        """Sample one token per row (each with its own params and generator), record it, check the stop
        conditions and build the events."""
        logits = logits.float()
        params = [r.params for r in batch]
        histories = [r.prompt_ids + r.generated for r in batch] if any(p.needs_history() for p in params) else None
        processed = process_logits(logits, params, histories, [len(r.prompt_ids) for r in batch])
        tokens_t, logprobs_t = sample(processed, params, [r.generator for r in batch], raw_logits=logits)
        tokens = tokens_t.tolist()
        want = [p.logprobs is not None for p in params]
        top_ids: list[list[int]] = [[] for _ in batch]
        top_lps: list[list[float]] = [[] for _ in batch]
        if any(want):
            k = max(p.logprobs or 0 for p in params)
            if k:
                ids, lps = top_logprobs(logits, k)
                top_ids, top_lps = ids.tolist(), lps.tolist()
        chosen_lps = logprobs_t.tolist() if any(want) else [0.0] * len(batch)
        now = time.perf_counter()
        events = []
        for i, r in enumerate(batch):
            tok, p = tokens[i], params[i]
            if not r.generated:
                self.metrics.ttft.observe(now - r.arrival)
            else:
                self.metrics.itl.observe(now - r.last_token_time)
            r.last_token_time = now
            r.generated.append(tok)
            r.next_token = tok
            self.metrics.generation_tokens += 1
            reason = None
            if tok in p.stop_token_ids and not p.ignore_eos:
                reason = "stop"
                delta = self._drain(r)
            else:
                delta, hit = r.stops.push(r.detok.push(tok))
                if hit:
                    reason = "stop"
                elif len(r.generated) >= r.max_tokens or r.length + 1 >= self.max_model_len:
                    reason = "length"
                    delta += self._drain(r)
            lp = None
            if want[i]:
                n = p.logprobs or 0
                lp = [TokenLogprob(tok, chosen_lps[i], list(zip(top_ids[i][:n], top_lps[i][:n])))]
            out = Output(delta, [tok], lp)
            if reason is not None:
                r.finished = True
                out.finish_reason = reason
                out.prompt_tokens, out.completion_tokens = len(r.prompt_ids), len(r.generated)
                self.metrics.requests_finished[reason] = self.metrics.requests_finished.get(reason, 0) + 1
            events.append((r, out))
        return events

    @staticmethod
    def _drain(r: Request) -> str:
        """Generation ended for a reason other than a stop string: release every held-back character."""
        delta, _ = r.stops.push(r.detok.flush())
        return delta + r.stops.finish()

    def _final(self, req: Request, reason: str) -> Output:
        self.metrics.requests_finished[reason] = self.metrics.requests_finished.get(reason, 0) + 1
        return Output("", [], finish_reason=reason, prompt_tokens=len(req.prompt_ids),
                      completion_tokens=len(req.generated))

    def _deliver(self, events: list[tuple[Request, Output]]) -> None:
        """Hand each request its outputs of this step: one cross-thread call per event loop."""
        per_req: dict[int, tuple[Request, list[Output]]] = {}
        for req, out in events:
            per_req.setdefault(req.id, (req, []))[1].append(out)
        by_loop: dict[int, tuple[Any, list[tuple[Request, list[Output]]]]] = {}
        for req, outs in per_req.values():
            if req.loop is None:
                req.sink(outs)
            else:
                by_loop.setdefault(id(req.loop), (req.loop, []))[1].append((req, outs))
        for loop, items in by_loop.values():
            try:
                loop.call_soon_threadsafe(_dispatch, items)
            except RuntimeError:  # the event loop is closed (server gone): nobody is listening
                pass


def _dispatch(items: list[tuple[Request, list[Output]]]) -> None:
    for req, outs in items:
        req.sink(outs)


def merge_outputs(outs: list[Output]) -> Output:
    """Concatenate a request's events into one :class:`Output`."""
    merged = Output("", [])
    logprobs: list[TokenLogprob] = []
    for o in outs:
        merged.text += o.text
        merged.token_ids += o.token_ids
        if o.logprobs:
            logprobs += o.logprobs
        if o.finish_reason is not None:
            merged.finish_reason = o.finish_reason
            merged.prompt_tokens, merged.completion_tokens = o.prompt_tokens, o.completion_tokens
    merged.logprobs = logprobs if any(o.logprobs is not None for o in outs) else None
    return merged


def slots_for_budget(num_layers: int, heads: int, head_dim: int, max_len: int, kv_cache_mb: float,
                     dtype: torch.dtype = torch.float32) -> int:
    """How many full-length sequences fit in ``kv_cache_mb``."""
    return int(kv_cache_mb * 2**20 // SlotKVCache.bytes_per_slot(num_layers, heads, max_len, head_dim, dtype))


__all__ = ["Engine", "EngineMetrics", "EngineStopped", "Histogram", "Output", "QueueFull", "Request",
           "RequestTooLong", "SlotKVCache", "TokenLogprob", "merge_outputs", "slots_for_budget"]
