"""One decode core: generate() and the scheduler agree token for token; chunked prefill, the prefix cache
and beam search follow the same rules; a failing request fails alone; sampling options are clamped."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch

from mtnlg.api import MegatronLmModel, MegatronModelConfig
from mtnlg.data.tokenizer import byte_tokenizer
from mtnlg.errors import ConfigError
from mtnlg.infer import scheduler as sched
from mtnlg.infer.decode import RequestTooLong, token_budget
from mtnlg.infer.generate import beam_search, generate
from mtnlg.infer.sampling import SamplingParams
from mtnlg.infer.scheduler import Engine

PROMPTS = ["hello world", "床前明月光，疑是地上霜。", "a", "The quick brown fox jumps over the lazy dog, again and again"]


@pytest.fixture(scope="module")
def lm():
    tok = byte_tokenizer()
    cfg = MegatronModelConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=64, max_position_embeddings=128, init_method_std=0.3)
    return MegatronLmModel(cfg, tok).materialize(seed=3)


def gen_params(lm, **kw) -> SamplingParams:
    return SamplingParams(stop_token_ids=[lm.tokenizer.eod_id], vocab_limit=lm.tokenizer.vocab_size, **kw)


def run_engine(engine: Engine, jobs: list[tuple[list[int], SamplingParams]]):
    out = [None] * len(jobs)

    def go(i):
        out[i] = engine.generate(jobs[i][0], jobs[i][1], timeout=120)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


@pytest.mark.parametrize("with_stop", [False, True])
def test_generate_and_scheduler_agree_solo_and_batched(lm, with_stop):
    tok = lm.tokenizer
    prompts = [tok.encode(p) for p in PROMPTS]
    stop = []
    if with_stop:  # stop strings that do occur: characters from the middle of two unconstrained outputs
        texts = [generate(lm.model, [p], gen_params(lm, max_new_tokens=12), tok)[0].text for p in prompts[:2]]
        stop = [t[len(t) // 2] for t in texts if t.strip()]
    params = [gen_params(lm, max_new_tokens=10 + 4 * i, stop=stop) for i in range(len(prompts))]
    solo = [generate(lm.model, [p], [q], tok)[0] for p, q in zip(prompts, params)]
    batched = generate(lm.model, prompts, params, tok)
    assert [c.token_ids for c in batched] == [c.token_ids for c in solo]
    assert [c.text for c in batched] == [c.text for c in solo]
    if stop:
        assert any(c.finish_reason == "stop" for c in solo)  # the stop strings do cut something here
        assert all(not any(s in c.text for s in stop) for c in solo)
    # the scheduler: whole prefill, and prefill in chunks of 5 tokens interleaved with decode steps
    for chunk in (512, 5):
        eng = Engine(lm, max_batch=4, prefill_chunk=chunk, prefix_cache=False).start()
        try:
            alone = [eng.generate(p, q, timeout=120) for p, q in zip(prompts, params)]
            together = run_engine(eng, list(zip(prompts, params)) * 2)
        finally:
            eng.shutdown()
        for c, a, t1, t2 in zip(solo, alone, together, together[len(prompts):]):
            want = c.token_ids + ([c.stop_token] if c.stop_token is not None else [])
            assert a.token_ids == t1.token_ids == t2.token_ids == want
            assert a.text == t1.text == c.text and a.finish_reason == c.finish_reason


def test_prefix_cache_hits_and_gives_identical_tokens(lm):
    tok = lm.tokenizer
    system = tok.encode("You are a helpful poet. Answer in one line. ")
    prompts = [system + tok.encode(q) for q in ("moon?", "river?", "moon? again")]
    p = gen_params(lm, max_new_tokens=8, ignore_eos=True)
    ref = [generate(lm.model, [x], p, tok)[0].token_ids for x in prompts]
    eng = Engine(lm, max_batch=2, prefill_chunk=7).start()
    try:
        outs = [eng.generate(x, p, timeout=120).token_ids for x in prompts]
    finally:
        eng.shutdown()
    assert outs == ref
    m = eng.metrics
    assert m.prefix_cache_queries == sum(map(len, prompts))
    assert m.prefix_cache_hits >= 2 * len(system)  # the 2nd and 3rd request reuse at least the system prompt
    assert 0 < m.prefix_cache_hit_rate < 1
    assert any(line.startswith("mtnlg_prefix_cache_hit_rate ") for line in m.render_extra())


def test_beam_search_honours_stop_strings(lm):
    tok = lm.tokenizer
    prompt = tok.encode("床前明月光")
    full = beam_search(lm.model, prompt, gen_params(lm, max_new_tokens=12, num_beams=3, ignore_eos=True), tok)
    assert len(full.text) >= 2
    stop = full.text[1:3] if len(full.text) >= 3 else full.text[1]
    cut = beam_search(lm.model, prompt, gen_params(lm, max_new_tokens=12, num_beams=3, ignore_eos=True,
                                                     stop=[stop]), tok)
    assert stop not in cut.text and cut.finish_reason == "stop"
    assert "\ufffd" not in full.text


def test_one_budget_rule_everywhere(lm):
    tok = lm.tokenizer
    prompt = tok.encode("x" * 100)
    with pytest.raises(RequestTooLong, match="128 tokens.*150 tokens"):
        generate(lm.model, [prompt], gen_params(lm, max_new_tokens=50), tok)
    eng = Engine(lm, max_batch=1)
    with pytest.raises(RequestTooLong, match="128 tokens.*150 tokens"):
        eng.submit(prompt, gen_params(lm), 50, sink=lambda _: None)
    with pytest.raises(ConfigError, match="max_length=500 exceeds"):
        lm.generate("x", max_length=500)
    assert token_budget(100, SamplingParams(max_new_tokens=None), 128) == 28


def test_a_failing_request_fails_alone(lm, monkeypatch):
    tok = lm.tokenizer
    real = sched.process_logits

    def poisoned(logits, params, *a, **kw):
        if any(p.seed == 666 for p in params):
            raise RuntimeError("boom")
        return real(logits, params, *a, **kw)

    monkeypatch.setattr(sched, "process_logits", poisoned)
    eng = Engine(lm, max_batch=4).start()
    try:
        good = gen_params(lm, max_new_tokens=6, temperature=0.8, seed=1, ignore_eos=True)
        bad = gen_params(lm, max_new_tokens=6, temperature=0.8, seed=666)
        outs = run_engine(eng, [(tok.encode(PROMPTS[0]), good), (tok.encode(PROMPTS[1]), bad),
                                (tok.encode(PROMPTS[2]), good)])
        assert outs[1].finish_reason == "abort" and "boom" in outs[1].error
        assert [o.finish_reason for o in (outs[0], outs[2])] == ["length", "length"]
        assert len(outs[0].token_ids) == 6 and eng.healthy and eng.metrics.request_errors == 1
        assert eng.generate(tok.encode("again"), good, timeout=60).finish_reason == "length"  # still serving
    finally:
        eng.shutdown()


def test_extreme_sampling_values_are_clamped(lm):
    tok = lm.tokenizer
    prompt = tok.encode(PROMPTS[1])
    greedy = generate(lm.model, [prompt], gen_params(lm, max_new_tokens=8), tok)[0].token_ids
    for kw in (dict(temperature=1e-320), dict(temperature=1e-320, top_k=10**20), dict(top_k=10**20)):
        assert generate(lm.model, [prompt], gen_params(lm, max_new_tokens=8, **kw), tok)[0].token_ids == greedy
    tiny, floor = (generate(lm.model, [prompt], gen_params(lm, max_new_tokens=8, repetition_penalty=r), tok)[0]
                   for r in (1e-300, 1e-4))
    assert tiny.token_ids == floor.token_ids  # clamped to the floor, logits stay finite
    wild = dict(temperature=1e30, top_k=10**20, top_p=1e-300, repetition_penalty=1e300, presence_penalty=-1e300,
                frequency_penalty=1e300, seed=10**30, logprobs=10**9, max_new_tokens=8)
    c = generate(lm.model, [prompt], gen_params(lm, **wild), tok)[0]
    assert len(c.token_ids) == 8 and all(torch.isfinite(torch.tensor(c.logprobs)))
    eng = Engine(lm, max_batch=2).start()
    try:
        o = eng.generate(prompt, gen_params(lm, **wild), timeout=60)
        assert o.finish_reason == "length" and len(o.token_ids) == 8
    finally:
        eng.shutdown()
    with pytest.raises(ConfigError, match="temperature"):
        SamplingParams(temperature=float("nan")).validate()
    with pytest.raises(ConfigError, match="presence_penalty"):  # clamping cannot bring NaN into range
        SamplingParams(presence_penalty=float("nan")).validate()


def test_min_new_tokens_holds_the_stop_tokens_back(lm):
    """vLLM's min_tokens: EOS and the other stop_token_ids cannot be picked before that many tokens, in
    generate() and in the engine alike; then they stop the row as usual."""
    tok = lm.tokenizer
    prompt = tok.encode("hello world")
    free = generate(lm.model, [prompt], gen_params(lm, max_new_tokens=8), tok)[0].token_ids
    stop = free[1]  # a token greedy decoding picks second: a stop token from there on
    stops = SamplingParams(stop_token_ids=[tok.eod_id, stop], vocab_limit=tok.vocab_size, max_new_tokens=8)
    early = generate(lm.model, [prompt], stops, tok)[0]
    assert early.token_ids == free[:1] and early.finish_reason == "stop"
    held = dataclasses.replace(stops, min_new_tokens=4)
    late = generate(lm.model, [prompt], held, tok)[0]
    assert len(late.token_ids) >= 4 and stop not in late.token_ids[:4]
    engine = Engine(lm, max_batch=2).start()
    try:
        assert run_engine(engine, [(prompt, held)])[0].token_ids == late.token_ids
    finally:
        engine.shutdown()
    with pytest.raises(ConfigError, match="min_new_tokens=9 is more than the 8 new tokens"):
        token_budget(len(prompt), gen_params(lm, max_new_tokens=8, min_new_tokens=9), 128)
    with pytest.raises(ConfigError, match="min_new_tokens"):
        gen_params(lm, min_new_tokens=2, num_beams=2).validate()
