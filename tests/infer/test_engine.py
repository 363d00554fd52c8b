"""The continuous-batching engine: batched output equals solo output, slots, queue, cancel, stop, drain."""

from __future__ import annotations

import threading

import pytest
import torch

from mtnlg.api import MegatronLmModel, MegatronModelConfig
from mtnlg.errors import ConfigError
from mtnlg.infer.scheduler import Engine, QueueFull, SlotKVCache, merge_outputs
from mtnlg.infer.sampling import SamplingParams

GREEDY = dict(temperature=0.0)


@pytest.fixture(scope="module")
def lm():
    cfg = MegatronModelConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=128, max_position_embeddings=96)
    return MegatronLmModel(cfg).materialize(seed=1)


@pytest.fixture(scope="module")
def engine(lm):
    eng = Engine(lm, max_batch=8, max_model_len=96).start()
    yield eng
    eng.shutdown()


def params(**kw) -> SamplingParams:
    return SamplingParams(**kw)


PROMPTS = ["hello world", "床前明月光，疑是地上霜。", "a", "The quick brown fox jumps over the lazy dog"]


def run_concurrently(engine: Engine, jobs: list[tuple[list[int], SamplingParams, int]]):
    results = [None] * len(jobs)

    def go(i):
        results[i] = engine.generate(*jobs[i], timeout=60)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def reference_greedy(lm, prompt: list[int], n: int) -> list[int]:
    """Plain full-recompute greedy decoding: the ground truth for the slot cache and the masks."""
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            logits = lm.model(torch.tensor([ids]))[0, -1, : lm.tokenizer.vocab_size]
            ids.append(int(logits.argmax()))
    return ids[len(prompt):]


def test_greedy_equals_full_recompute(lm, engine):
    prompt = lm.tokenizer.encode(PROMPTS[3])
    out = engine.generate(prompt, params(**GREEDY, ignore_eos=True), 20)
    assert out.token_ids == reference_greedy(lm, prompt, 20)
    assert out.finish_reason == "length" and out.completion_tokens == 20 and out.prompt_tokens == len(prompt)


def test_greedy_same_alone_or_batched(lm, engine):
    jobs = [(lm.tokenizer.encode(p), params(**GREEDY, ignore_eos=True), 12 + 5 * i) for i, p in enumerate(PROMPTS)]
    solo = [engine.generate(*j, timeout=60).token_ids for j in jobs]
    batched = [r.token_ids for r in run_concurrently(engine, jobs * 2)]  # 8 at once, leaving at different steps
    assert batched == solo * 2


def test_seeded_sampling_same_alone_or_batched(lm, engine):
    jobs = [(lm.tokenizer.encode(PROMPTS[i % 4]), params(temperature=1.0, top_p=0.95, seed=100 + i), 16)
            for i in range(6)]
    solo = [engine.generate(*j, timeout=60).token_ids for j in jobs]
    assert len({tuple(s) for s in solo}) > 1  # different seeds, different samples
    assert [r.token_ids for r in run_concurrently(engine, jobs)] == solo


def test_requests_join_while_others_run(lm, engine):
    long_prompt = lm.tokenizer.encode(PROMPTS[0])
    p = params(**GREEDY, ignore_eos=True)
    solo_long = engine.generate(long_prompt, p, 60).token_ids
    solo_short = [engine.generate(lm.tokenizer.encode(x), p, 5).token_ids for x in PROMPTS[1:]]
    outs: list = []
    done = threading.Event()

    def sink(batch):
        outs.extend(batch)
        if batch[-1].finish_reason:
            done.set()

    engine.submit(long_prompt, p, 60, sink)
    shorts = run_concurrently(engine, [(lm.tokenizer.encode(x), p, 5) for x in PROMPTS[1:]])
    assert done.wait(60)
    assert merge_outputs(outs).token_ids == solo_long
    assert [s.token_ids for s in shorts] == solo_short


def test_stop_string_cuts_text(lm, engine):
    prompt = lm.tokenizer.encode("hello")
    full = engine.generate(prompt, params(**GREEDY, ignore_eos=True), 30)
    text = full.text
    assert len(text) > 6
    stop = text[3:5]
    cut = engine.generate(prompt, params(**GREEDY, ignore_eos=True, stop=[stop]), 30)
    assert cut.finish_reason == "stop"
    assert cut.text == text[: text.index(stop)]


def test_stop_token(lm, engine):
    prompt = lm.tokenizer.encode("hello")
    full = engine.generate(prompt, params(**GREEDY, ignore_eos=True), 10)
    stop_tok = full.token_ids[4]
    out = engine.generate(prompt, params(**GREEDY, stop_token_ids=[stop_tok]), 10)
    assert out.finish_reason == "stop" and out.token_ids == full.token_ids[: full.token_ids.index(stop_tok) + 1]


def test_context_limit_and_validation(lm, engine):
    with pytest.raises(ConfigError, match="96 tokens.*100 tokens"):
        engine.check_length(50, 50)
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        engine.submit([99999], params(), 1, sink=lambda _: None)
    # a request that reaches the end of the context stops with "length"
    out = engine.generate(lm.tokenizer.encode("x" * 90), params(**GREEDY, ignore_eos=True), 6)
    assert out.finish_reason == "length" and out.completion_tokens == 6


def test_slots_follow_the_memory_budget(lm):
    per_slot = SlotKVCache.bytes_per_slot(2, 4, 96, 16, torch.float32)
    eng = Engine(lm, max_batch=16, max_model_len=96, kv_cache_mb=3.5 * per_slot / 2**20)
    assert eng.num_slots == 3 and tuple(eng.cache.k.shape) == (2, 3, 4, 96, 16)
    assert Engine(lm, max_batch=2, max_model_len=96).num_slots == 2
    with pytest.raises(ConfigError, match="kv_cache_mb"):
        Engine(lm, max_model_len=96, kv_cache_mb=0.5 * per_slot / 2**20)
    with pytest.raises(ConfigError, match="max_model_len"):
        Engine(lm, max_model_len=1000)


def test_queue_is_bounded(lm):
    eng = Engine(lm, max_batch=1, max_model_len=32, max_queue=2)  # not started: nothing leaves the queue
    prompt = lm.tokenizer.encode("hi")
    eng.submit(prompt, params(), 4, sink=lambda _: None)
    eng.submit(prompt, params(), 4, sink=lambda _: None)
    with pytest.raises(QueueFull):
        eng.submit(prompt, params(), 4, sink=lambda _: None)
    assert eng.queue_depth == 2
    eng.start()
    eng.shutdown(timeout=60)  # graceful: both queued requests still finish
    assert eng.queue_depth == 0 and eng.num_running == 0 and eng.metrics.requests_finished.get("length") == 2


def test_cancel_frees_the_slot(lm):
    eng = Engine(lm, max_batch=1, max_model_len=96).start()
    try:
        first = threading.Event()
        finished: list = []

        def sink(batch):
            first.set()
            finished.extend(o.finish_reason for o in batch if o.finish_reason)

        req = eng.submit(lm.tokenizer.encode("hi"), params(**GREEDY, ignore_eos=True), 90, sink)
        assert first.wait(30)
        req.cancel()
        # the only slot is free again, so a new request runs to completion
        out = eng.generate(lm.tokenizer.encode("hey"), params(**GREEDY, ignore_eos=True), 3, timeout=60)
        assert out.completion_tokens == 3
        assert finished == ["abort"] and len(req.generated) < 90
    finally:
        eng.shutdown()


def test_shutdown_lets_in_flight_requests_finish(lm):
    eng = Engine(lm, max_batch=2, max_model_len=64).start()
    results: list = []
    lock = threading.Lock()

    def sink(batch):
        with lock:
            results.extend(o for o in batch if o.finish_reason)

    for i in range(4):
        eng.submit(lm.tokenizer.encode(PROMPTS[i]), params(**GREEDY, ignore_eos=True), 10, sink)
    eng.shutdown(timeout=60)
    assert sorted(o.finish_reason for o in results) == ["length"] * 4
    assert all(o.completion_tokens == 10 for o in results)
    from mtnlg.infer.scheduler import EngineStopped

    with pytest.raises(EngineStopped):
        eng.submit(lm.tokenizer.encode("late"), params(), 2, sink)


def test_logprobs(lm, engine):
    prompt = lm.tokenizer.encode("hello")
    out = engine.generate(prompt, params(**GREEDY, ignore_eos=True, logprobs=3), 4)
    assert len(out.logprobs) == 4
    with torch.inference_mode():
        logits = lm.model(torch.tensor([prompt]))[0, -1, : lm.tokenizer.vocab_size]
    lp = torch.log_softmax(logits.float(), -1)
    first = out.logprobs[0]
    assert first.token_id == out.token_ids[0] == int(lp.argmax())
    assert first.logprob == pytest.approx(float(lp.max()), abs=1e-4)
    assert [t for t, _ in first.top] == torch.topk(lp, 3).indices.tolist()


def test_a_burst_of_arrivals_is_prefilled_in_one_forward(lm):
    """#16: requests still being parsed (``incoming``) hold the idle engine, so a burst shares one prefill."""
    eng = Engine(lm, max_batch=8, max_model_len=64).start()
    eng.admit_wait = 30.0  # ends when the last one is submitted; generous so a loaded machine cannot flake
    prefills: list[int] = []
    orig = eng._prefill
    eng._prefill = lambda chunk: prefills.append(len(chunk)) or orig(chunk)
    done = threading.Semaphore(0)
    try:
        arrivals = [eng.incoming() for _ in range(4)]
        for a in arrivals:
            a.__enter__()
        for i, a in enumerate(arrivals):
            eng.submit(lm.tokenizer.encode(PROMPTS[i]), params(**GREEDY), 3,
                       lambda b: b[-1].finish_reason and done.release())
            a.__exit__(None, None, None)
        for _ in range(4):
            assert done.acquire(timeout=60)
        assert prefills == [4]
        # the wait is bounded: a request on its way in that never arrives does not stop the others
        eng.admit_wait = 0.05
        with eng.incoming():
            out = eng.generate(lm.tokenizer.encode("hi"), params(**GREEDY, ignore_eos=True), 5, timeout=60)
        assert out.completion_tokens == 5
    finally:
        eng.shutdown()


def test_deliver_returns_once_the_loop_ran_the_consumers():
    """The engine waits on this before decoding on, so the event loop sends first tokens first."""
    import asyncio

    from mtnlg.infer.events import Output, deliver

    loop = asyncio.new_event_loop()
    seen: list[str] = []

    class Req:
        id = 0

        def __init__(self, queue):
            self.queue, self.loop = queue, loop

        def sink(self, outs):
            self.queue.put_nowait(outs)

        def cancel(self):
            pass

    async def consumer(queue):
        seen.extend(o.text for o in await queue.get())

    queue = asyncio.Queue()
    task = loop.create_task(consumer(queue))
    thread = threading.Thread(target=loop.run_until_complete, args=(task,))
    thread.start()
    try:
        done = deliver([(Req(queue), Output("tok", [1]))])
        assert done is not None and done.wait(30)
        assert seen == ["tok"]
        assert deliver([]) is None  # no loop involved: nothing to wait for
    finally:
        thread.join(30)
        loop.close()
