"""Continuous batching: many requests share one model, joining and leaving the batch at every step.

::

    submit() ──► waiting (bounded: max_queue) ──admit into a free slot (reusing a cached prompt prefix)
                                                  │
    every step:  0. admit every waiting request that has a slot; requests the server is still parsing
                    (Engine.incoming) are waited for, briefly, so a burst shares one prefill forward
                 1. one prefill chunk (at most ``prefill_chunk`` prompt tokens, oldest requests first);
                    its first tokens are handed to the event loop and sent before decoding goes on
                 2. one batched decode step for every request whose prompt is in (a token per row)
                 3. sample per row (decode.RowState: stop tokens / strings, budget, UTF-8 guard, logprobs)
                 4. finished / cancelled / failed requests leave; their slots are free

Long prompts are prefilled in chunks between decode steps, so running requests keep streaming and a
new request's first token does not wait for others' whole prompts. The KV cache is a
:class:`~mtnlg.model.kv_cache.SlotKVCache` ``[layers, slots, heads, max_len, head_dim]``; a request
owns one slot from admission to finish. A slot keeps its keys and values after its request leaves,
so a later prompt that starts with the same tokens (a system prompt, a chat history) skips them: the
prefix cache (hit rate in :class:`~mtnlg.infer.metrics.EngineMetrics`). The loop runs in a background
thread (or, in the engine process, :meth:`Engine.run_once` beside the pipe); an exception while serving
one request fails that request only.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from mtnlg.errors import ConfigError
from mtnlg.infer.events import EngineStopped, Output, QueueFull, TokenLogprob, deliver, merge_outputs
from mtnlg.infer.decode import (RequestTooLong, RowState, allowed_matrix, checked_request, pick_greedy,
                                token_budget)
from mtnlg.infer.metrics import EngineMetrics, Histogram
from mtnlg.infer.sampling import SamplingParams, process_logits, sample, top_logprobs
from mtnlg.infer.poem_form import PoemForm
from mtnlg.infer.utf8 import Utf8Guard
from mtnlg.model.decode_linear import decode_head
from mtnlg.model.kv_cache import SlotKVCache

log = logging.getLogger(__name__)
_ids = itertools.count()
PREFILL_CHUNK = 512  # prompt tokens prefilled per engine step (between two decode steps)
ADMIT_WAIT = 0.02  # s: the longest an idle engine waits for requests still being parsed (see Engine.incoming)
FLUSH_WAIT = 0.005  # s: the longest decoding waits for the event loop to send new first tokens


class Request:
    """A submitted request: its prompt, its decode state, and where its outputs go.

    ``sink(outputs)`` is called from the engine thread, or through ``loop.call_soon_threadsafe``
    when ``loop`` (an asyncio loop) is given.
    """

    def __init__(self, prompt_ids: list[int], params: SamplingParams, state: RowState,
                 sink: Callable[[list[Output]], None], loop: Any = None):
        self.id = next(_ids)
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.max_tokens = state.budget
        self.state = state
        self.sink = sink
        self.loop = loop
        self.arrival = time.perf_counter()
        self.slot = -1
        self.length = 0  # positions of the slot's KV cache that are filled
        self.next_token = -1  # sampled, emitted, not yet fed to the model
        self.last_token_time = 0.0
        self.cancelled = False
        self.finished = False
        self.generator: torch.Generator | None = None

    @property
    def generated(self) -> list[int]:
        """Tokens emitted so far (a final stop token included)."""
        s = self.state
        return s.token_ids + ([s.stop_token] if s.stop_token is not None else [])

    def cancel(self) -> None:
        """Stop generating and free the slot at the engine's next step (client disconnected)."""
        self.cancelled = True


class Engine:
    """Continuous-batching generation over one model (a :class:`~mtnlg.api.MegatronLmModel`).

    ``max_model_len`` caps prompt + output per request (default: the model's context). Slots (the
    running-batch limit) = ``min(max_batch, kv_cache_mb / bytes per slot)``; ``max_queue`` bounds the
    waiting requests (:class:`QueueFull` beyond it).
    """

    def __init__(self, lm: Any, max_batch: int = 16, max_model_len: int | None = None, max_queue: int = 64,
                 kv_cache_mb: float = 256.0, prefill_chunk: int = PREFILL_CHUNK, prefix_cache: bool = True):
        self.lm = lm
        self._poem_lock = threading.Lock()
        self.model = lm.model.eval()
        self.tokenizer = lm.tokenizer
        cfg = self.model.cfg
        if max_model_len is None:
            max_model_len = cfg.max_seq_len
        if not 2 <= max_model_len <= cfg.max_seq_len:
            raise ConfigError(f"serve.max_model_len={max_model_len} must be in [2, {cfg.max_seq_len}] "
                              f"(the model's max_position_embeddings)")
        if prefill_chunk < 1:
            raise ConfigError(f"prefill_chunk={prefill_chunk} must be >= 1")
        self.max_model_len = max_model_len
        self.prefill_chunk = prefill_chunk
        self.prefix_cache = prefix_cache
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
        self.head = decode_head(self.model.output)
        self.guard = Utf8Guard.for_tokenizer(self.tokenizer)
        PoemForm.for_tokenizer(self.tokenizer)  # built now (~45 ms for 6.7K tokens), not in a first poem's TTFT
        self.metrics = EngineMetrics()
        self._free = list(range(self.num_slots))
        self._slot_tokens: list[list[int]] = [[] for _ in range(self.num_slots)]  # what each slot's KV holds
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []
        self._cv = threading.Condition()
        self.admit_wait = ADMIT_WAIT
        self._incoming = 0  # requests being parsed and tokenized by the server, not yet submitted
        self._last_step = 0.0  # s, the previous step's duration: the bound on an admission wait while decoding
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
        """False once the loop itself has died: /health then answers 503."""
        return not self._crashed and (self._thread is None or self._thread.is_alive() or self._stopping)

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

    @contextmanager
    def incoming(self) -> Iterator[None]:
        """Mark a request on its way in (the server parses and tokenizes it, then submits). Before a
        step the engine waits for such requests (at most ``ADMIT_WAIT``, or one step's time while others
        decode), so a burst of arrivals is admitted into one batched prefill instead of one per step."""
        with self._cv:
            self._incoming += 1
        try:
            yield
        finally:
            with self._cv:
                self._incoming -= 1
                self._cv.notify_all()

    def check_length(self, prompt_len: int, max_tokens: int) -> None:
        """Raise :class:`RequestTooLong` naming both numbers when the request cannot fit the context."""
        token_budget(prompt_len, SamplingParams(max_new_tokens=max_tokens), self.max_model_len)

    def submit(self, prompt_ids: list[int], params: SamplingParams, max_tokens: int | None,
               sink: Callable[[list[Output]], None], loop: Any = None) -> Request:
        """Queue a request; outputs go to ``sink`` (a list of :class:`Output` per engine step).
        ``max_tokens`` (None: ``params.max_new_tokens``) is the budget, checked by the one budget rule."""
        params, budget = checked_request(prompt_ids, params, max_tokens, self.vocab_size, self.max_model_len)
        state = RowState(prompt_ids, params, budget, self.tokenizer, self.guard)
        req = Request(prompt_ids, params, state, sink, loop)
        with self._cv:
            if self._stopping:
                raise EngineStopped("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} waiting requests); retry later")
            self._waiting.append(req)
            self._cv.notify()
        return req

    def poem(self, text: str, lines: int, params: SamplingParams) -> list[str]:
        """The next ``lines`` lines of the poem ``text``, in its form (:func:`~mtnlg.infer.poem_form.continue_poem`:
        line candidates sampled under a line constraint and ranked, which the batch's decode state does not
        do), one poem at a time beside the batch. Raises ConfigError when the form cannot be kept."""
        from mtnlg.infer.poem_form import continue_poem

        with self._poem_lock:
            return continue_poem(self.lm, text, lines, params)

    def generate(self, prompt_ids: list[int], params: SamplingParams, max_tokens: int | None = None,
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
                    while not self.has_work and not self._stopping:
                        self._cv.wait()
                    if self._stopping and not self.has_work:
                        return
                    self._await_arrivals()
                self.run_once()
        except BaseException:  # the loop itself broke: fail every request instead of hanging their clients
            self.crash()

    has_work = property(lambda self: bool(self._waiting or self._running))

    def run_once(self) -> None:
        """The loop's body: admit waiting requests into free slots, then one step. The engine process
        (:mod:`mtnlg.infer.engine_core`) calls it from the thread that also reads its pipe."""
        with self._cv:
            while self._waiting and self._free:
                req = self._waiting.popleft()
                if req.cancelled:
                    self._deliver([(req, self._final(req, "abort"))])
                    continue
                try:
                    self._admit(req)
                except Exception as e:  # noqa: BLE001 - this request only
                    log.exception("request %d could not be admitted", req.id)
                    self._fail([req], e)
        t0 = time.perf_counter()
        try:
            self._step()
        except Exception as e:  # noqa: BLE001 - a step failed outside any one request: fail its batch only
            log.exception("engine step failed")
            self._fail(list(self._running), e)
        self._last_step = time.perf_counter() - t0

    def crash(self) -> None:
        """The loop broke: abort every request (their clients get an answer) and stop."""
        log.exception("engine loop crashed")
        self._crashed = True
        with self._cv:
            pending = list(self._running) + list(self._waiting)
            self._running.clear()
            self._waiting.clear()
            self._stopping = True
        for req in pending:
            self._deliver([(req, self._final(req, "abort"))])

    def _await_arrivals(self) -> None:
        """(Holding the lock.) While requests are still being parsed and a slot is free for them, wait
        for them to be submitted, so that they join this step's prefill: bounded by ``ADMIT_WAIT``, and
        by the previous step's time while other requests are decoding (their stall is at most one step)."""
        if not self._incoming or len(self._free) <= len(self._waiting):
            return
        deadline = time.perf_counter() + (min(self.admit_wait, self._last_step) if self._running else self.admit_wait)
        while self._incoming and len(self._free) > len(self._waiting) and not self._stopping:
            left = deadline - time.perf_counter()
            if left <= 0:
                return
            self._cv.wait(left)

    def _admit(self, req: Request) -> None:
        """Give ``req`` a free slot, preferring the one whose cached tokens share the longest prefix with
        its prompt; a prefix cached in a busy slot is copied. At least one prompt token is always run."""
        p = req.params
        seed = p.seed if p.seed is not None else int(torch.randint(0, 2**31, (1,)))
        req.generator = torch.Generator(device=self.device).manual_seed(seed)
        prompt = req.prompt_ids
        best_free = min(self._free, key=lambda i: len(self._slot_tokens[i]))  # keep other prefixes if no hit
        best_any, hit_free, hit_any = -1, 0, 0
        if self.prefix_cache:
            for slot, toks in enumerate(self._slot_tokens):
                n = _common_prefix(toks, prompt, len(prompt) - 1)
                if slot in self._free and n > hit_free:
                    best_free, hit_free = slot, n
                if n > hit_any:
                    best_any, hit_any = slot, n
        slot, hit = best_free, hit_free
        if hit_any > hit_free and best_any not in self._free:
            self.cache.copy_prefix(best_any, slot, hit_any)
            hit = hit_any
        self._free.remove(slot)
        self._slot_tokens[slot] = prompt[:hit]
        req.slot, req.length = slot, hit
        self.metrics.prefix_cache_queries += len(prompt)
        self.metrics.prefix_cache_hits += hit
        self._running.append(req)

    @torch.inference_mode()
    def _step(self) -> None:
        events: list[tuple[Request, Output]] = []
        for req in [r for r in self._running if r.cancelled]:
            self._release(req)
            events.append((req, self._final(req, "abort")))
        # 1. one prefill chunk, oldest requests first
        room, chunk = self.prefill_chunk, []
        for r in self._running:
            todo = len(r.prompt_ids) - r.length
            if todo > 0 and room > 0:
                chunk.append((r, min(todo, room)))
                room -= chunk[-1][1]
        if chunk:
            first = self._guarded(self._prefill, chunk)
            flushed = self._deliver(first)
            if flushed is not None and any(r.next_token >= 0 and not r.finished for r in self._running):
                flushed.wait(FLUSH_WAIT)  # let the event loop send the first tokens before decoding on
        # 2. one decode step for every request that has a token to feed
        batch = [r for r in self._running if not r.finished and r.next_token >= 0]
        if batch:
            events += self._guarded(self._decode, sorted(batch, key=lambda r: r.slot))
        for req in [r for r in self._running if r.finished]:
            self._release(req)
        self.steps += 1
        self._deliver(events)

    def _guarded(self, fn, rows: list) -> list[tuple[Request, Output]]:
        """Run ``fn(rows)``; if it raises, undo its cache bookkeeping and run each row alone, so that
        only the failing request fails (nothing but ``length`` changes before the sampling succeeded)."""
        reqs = [row[0] if isinstance(row, tuple) else row for row in rows]
        saved = [(r.length, len(self._slot_tokens[r.slot])) for r in reqs]
        try:
            return fn(rows)
        except Exception as e:  # noqa: BLE001
            log.exception("engine batch failed; retrying its requests one by one")
            if len(rows) == 1:
                return self._fail(reqs, e, deliver=False)
        for r, (n, m) in zip(reqs, saved):
            r.length = n
            del self._slot_tokens[r.slot][m:]
        events = []
        for row in rows:
            events += self._guarded(fn, [row])
        return events

    def _forward(self, reqs: list[Request], ids: list[list[int]]) -> torch.Tensor:
        """Run ``ids[i]`` at positions ``reqs[i].length ..`` of each request's slot; logits [B, V] of the
        last token of each row."""
        dev = self.device
        starts, counts = [r.length for r in reqs], [len(x) for x in ids]
        T = max(counts)
        span = self.cache.select([r.slot for r in reqs], starts, counts)
        tok = torch.tensor([x + [0] * (T - len(x)) for x in ids], device=dev)  # right-padded [B, T]
        pos = torch.tensor([[min(s + j, self.max_model_len - 1) for j in range(T)] for s in starts], device=dev)
        mask = (torch.arange(span, device=dev)[None, None, :] <= pos[:, :, None])[:, None]  # [B, 1, T, span]
        at = 0 if T == 1 else torch.tensor([c - 1 for c in counts], device=dev)
        logits = self.model(tok, positions=pos, cache=self.cache, attn_mask=mask, logits_at=at, head=self.head)
        for r, x in zip(reqs, ids):
            r.length += len(x)
            self._slot_tokens[r.slot].extend(x)
        return logits[:, : self.vocab_size]

    def _prefill(self, chunk: list[tuple[Request, int]]) -> list[tuple[Request, Output]]:
        reqs = [r for r, _ in chunk]
        ids = [r.prompt_ids[r.length: r.length + n] for r, n in chunk]
        logits = self._forward(reqs, ids)
        done = [i for i, r in enumerate(reqs) if r.length == len(r.prompt_ids)]
        for i in done:
            self.metrics.prompt_tokens += len(reqs[i].prompt_ids)
        if not done:
            return []
        return self._emit([reqs[i] for i in done], logits[done])

    def _decode(self, batch: list[Request]) -> list[tuple[Request, Output]]:
        logits = self._forward(batch, [[r.next_token] for r in batch])
        return self._emit(batch, logits)

    def _emit(self, batch: list[Request], logits: torch.Tensor) -> list[tuple[Request, Output]]:
        """Pick one token per row (each with its own params and generator) and push it to the row's state."""
        logits = logits.float()
        rows = [r.state for r in batch]
        params = [r.params for r in batch]
        if all(p.is_plain_greedy() for p in params):
            tokens_t = pick_greedy(logits, rows)
            logprobs_t = torch.log_softmax(logits, -1).gather(1, tokens_t[:, None])[:, 0]
        else:
            histories = [s.history for s in rows] if any(p.needs_history() for p in params) else None
            processed = process_logits(logits, params, histories, [len(r.prompt_ids) for r in batch],
                                       allowed=allowed_matrix(rows, logits.shape[-1], logits.device))
            tokens_t, logprobs_t = sample(processed, params, [r.generator for r in batch], raw_logits=logits)
        tokens, chosen = tokens_t.tolist(), logprobs_t.tolist()
        k = max(p.logprobs or 0 for p in params)
        top_ids, top_lps = (t.tolist() for t in top_logprobs(logits, k)) if k else ([[]] * len(batch),) * 2
        now = time.perf_counter()
        events = []
        for i, r in enumerate(batch):
            try:
                events.append((r, self._record(r, tokens[i], chosen[i], list(zip(top_ids[i], top_lps[i])), now)))
            except Exception as e:  # noqa: BLE001 - this request's text or state broke: fail it alone
                log.exception("request %d failed", r.id)
                events += self._fail([r], e, deliver=False)
        return events

    def _record(self, r: Request, tok: int, lp: float, top: list[tuple[int, float]], now: float) -> Output:
        """Push one sampled token to ``r``'s decode state and build its event."""
        p, s = r.params, r.state
        (self.metrics.ttft if r.next_token < 0 else self.metrics.itl).observe(
            now - (r.arrival if r.next_token < 0 else r.last_token_time))
        r.last_token_time, r.next_token = now, tok
        self.metrics.generation_tokens += 1
        top = top[: p.logprobs or 0]
        out = Output(s.push(tok, lp, top), [tok], [TokenLogprob(tok, lp, top)] if p.logprobs is not None else None)
        if s.done:
            r.finished = True
            self._count(s.finish_reason)
            out.finish_reason = s.finish_reason
            out.prompt_tokens, out.completion_tokens = len(r.prompt_ids), len(r.generated)
        return out

    def _fail(self, reqs: list[Request], exc: BaseException, deliver: bool = True) -> list[tuple[Request, Output]]:
        """Abort ``reqs`` with the error; the engine and the other requests go on."""
        events = []
        for r in reqs:
            if r.finished:
                continue
            self.metrics.request_errors += 1
            self._release(r)
            if r.slot >= 0:
                self._slot_tokens[r.slot] = []  # its cache may be half written
            out = self._final(r, "abort")
            out.error = f"{type(exc).__name__}: {exc}"
            events.append((r, out))
        if deliver:
            self._deliver(events)
        return events

    def _release(self, req: Request) -> None:
        if req in self._running:
            self._running.remove(req)
            self._free.append(req.slot)
            del self._slot_tokens[req.slot][req.length:]
        req.finished = True

    def _count(self, reason: str) -> None:
        self.metrics.requests_finished[reason] = self.metrics.requests_finished.get(reason, 0) + 1

    def _final(self, req: Request, reason: str) -> Output:
        req.finished = True
        self._count(reason)
        return Output(req.state.finish(reason), [], finish_reason=reason, prompt_tokens=len(req.prompt_ids),
                      completion_tokens=len(req.generated))

    def _deliver(self, events: list[tuple[Request, Output]]) -> threading.Event | None:
        return deliver(events)


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    n = min(len(a), len(b), limit)
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def slots_for_budget(num_layers: int, heads: int, head_dim: int, max_len: int, kv_cache_mb: float,
                     dtype: torch.dtype = torch.float32) -> int:
    """How many full-length sequences fit in ``kv_cache_mb``."""
    return int(kv_cache_mb * 2**20 // SlotKVCache.bytes_per_slot(num_layers, heads, max_len, head_dim, dtype))


__all__ = ["Engine", "EngineMetrics", "EngineStopped", "Histogram", "Output", "QueueFull", "Request",
           "RequestTooLong", "SlotKVCache", "TokenLogprob", "merge_outputs", "slots_for_budget"]
