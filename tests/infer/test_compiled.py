"""The compiled decode step (compile_decode=True): the same tokens as the eager loop, one compile per shape."""

from __future__ import annotations

import pytest
import torch

from mtnlg.errors import ConfigError
from mtnlg.infer import compiled
from mtnlg.infer.generate import SamplingParams, generate
from mtnlg.model.init import build_model, materialize
from mtnlg.model.kv_cache import StaticKVCache


def test_static_cache_writes_named_columns_and_returns_whole_buffers():
    c = StaticKVCache(num_layers=2, max_len=8)
    k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    c.at(torch.tensor([2, 3, 4]))
    ks, vs = c.update(1, k, v)
    assert ks.shape == (1, 2, 8, 4) and len(c.k) == 2
    torch.testing.assert_close(ks[:, :, 2:5], k)
    torch.testing.assert_close(vs[:, :, 2:5], v)
    assert not ks[:, :, :2].any() and not ks[:, :, 5:].any()  # unwritten columns are zeros (finite under a mask)
    assert not c.k[0].any()


def test_static_length_is_a_power_of_two_capped_by_the_context():
    assert compiled.static_length(10, 512) == 64
    assert compiled.static_length(65, 512) == 128
    assert compiled.static_length(300, 400) == 400
    assert compiled.static_length(96, 96) == 96


def test_compiled_decoding_gives_the_eager_tokens(byte_model):
    """Greedy on a left-padded batch, then sampling with penalties, stop strings and logprobs: the
    compiled step and the eager loop pick the same tokens (one compile each for batch 2 and batch 1)."""
    model, tok = byte_model
    prompts = [tok.encode("秋天的夜晚，"), tok.encode("星光")]
    for params in (SamplingParams(max_new_tokens=20, logprobs=0),
                   SamplingParams(max_new_tokens=20, temperature=0.9, top_k=40, repetition_penalty=1.3, seed=5)):
        eager = generate(model, prompts, params, tok)
        comp = generate(model, prompts, SamplingParams(**{**params.__dict__, "compile_decode": True}), tok)
        assert [c.token_ids for c in comp] == [e.token_ids for e in eager]
        for c, e in zip(comp, eager):
            torch.testing.assert_close(torch.tensor(c.logprobs), torch.tensor(e.logprobs), atol=1e-4, rtol=1e-4)
    one = SamplingParams(max_new_tokens=30, temperature=0.8, seed=2, stop=["，"])
    eager = generate(model, [prompts[0]], one, tok)[0]
    comp = generate(model, [prompts[0]], SamplingParams(**{**one.__dict__, "compile_decode": True}), tok)[0]
    assert (comp.token_ids, comp.text, comp.finish_reason) == (eager.token_ids, eager.text, eager.finish_reason)


def test_compiled_decoding_sees_weights_changed_after_the_compile(byte_model):
    """Weights are inputs of the compiled step, not constants baked into it: after an in-place change
    the compiled step follows the eager loop (no stale weights)."""
    model, tok = byte_model
    p = SamplingParams(max_new_tokens=12)
    comp = SamplingParams(max_new_tokens=12, compile_decode=True)
    prompt = [tok.encode("秋天的夜晚，")[:5]]
    generate(model, prompt, comp, tok)
    saved = model.layers["0"].mlp.fc1.weight.detach().clone()
    try:
        with torch.no_grad():
            model.layers["0"].mlp.fc1.weight.mul_(-3.0)
        assert generate(model, prompt, comp, tok)[0].token_ids == generate(model, prompt, p, tok)[0].token_ids
    finally:
        with torch.no_grad():
            model.layers["0"].mlp.fc1.weight.copy_(saved)


def test_compile_decode_rejects_what_it_cannot_run(byte_model):
    model, _ = byte_model
    with pytest.raises(ConfigError, match="compile_decode"):
        generate(model, [[1, 2]], SamplingParams(compile_decode=True, num_beams=2))
    with pytest.raises(ConfigError, match="compile_decode"):
        generate(model, [[1, 2]], SamplingParams(compile_decode=True, use_cache=False))


def test_the_compile_is_announced_before_any_text_is_streamed(byte_model, caplog):
    """The log line about compiling comes when the stream is created, before its first delta (it never
    lands inside the printed text), once per model, batch and cache length; bad options fail there too."""
    import logging

    from mtnlg.infer.generate import stream

    model, tok = byte_model
    fresh = materialize(build_model(model.cfg), seed=3).eval()  # a model this process has not compiled for
    with caplog.at_level(logging.INFO, logger="mtnlg.infer.compiled"):
        stream(fresh, tok, tok.encode("秋天"), SamplingParams(max_new_tokens=8, compile_decode=True))
        assert sum("compiling the decode step" in r.message for r in caplog.records) == 1
        stream(fresh, tok, tok.encode("秋天"), SamplingParams(max_new_tokens=8, compile_decode=True))
        assert sum("compiling the decode step" in r.message for r in caplog.records) == 1
    fresh.output = None  # a pipeline stage without a head: refused when the stream is created
    with pytest.raises(ConfigError, match="compile_decode"):
        stream(fresh, tok, tok.encode("秋天"), SamplingParams(max_new_tokens=8, compile_decode=True))
