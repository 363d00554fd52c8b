"""The generation engine: cache == recompute, padded batches, sampling options, stops, streaming, beams."""

from __future__ import annotations

import itertools

import pytest
import torch

from mtnlg.config import ModelConfig
from mtnlg.errors import ConfigError
from mtnlg.infer.generate import SamplingParams, beam_search, generate, generate_ids, stream
from mtnlg.model.init import build_model, materialize

V = 97


@pytest.fixture(scope="module")
def model():
    # A larger init std than training uses, so a random model's greedy output varies (not one repeated token).
    cfg = ModelConfig(vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, ffn_hidden_size=64, max_seq_len=64,
                      init_std=0.3)
    return materialize(build_model(cfg), seed=0).eval()


def recompute_greedy(model, prompt, n):
    """Reference: no cache, the whole sequence through the model for every token."""
    seq, lps = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([seq]))[0, -1, :V]
            t = int(logits.argmax())
            lps.append(float(torch.log_softmax(logits, -1)[t]))
            seq.append(t)
    return seq[len(prompt):], lps


PROMPTS = [[1, 2, 3, 4, 5, 6], [7, 8], [9], [10, 11, 12]]


def test_greedy_cache_equals_full_recompute_for_a_padded_batch(model):
    n = 12
    cached = generate(model, PROMPTS, SamplingParams(max_new_tokens=n, logprobs=0))
    uncached = generate(model, PROMPTS, SamplingParams(max_new_tokens=n, use_cache=False))
    for prompt, c, u in zip(PROMPTS, cached, uncached):
        ref, ref_lps = recompute_greedy(model, prompt, n)
        assert c.token_ids == ref == u.token_ids
        assert c.finish_reason == "length"
        torch.testing.assert_close(torch.tensor(c.logprobs), torch.tensor(ref_lps), atol=1e-5, rtol=1e-5)
    assert len(set(map(tuple, (c.token_ids for c in cached)))) > 1  # the model is not degenerate


def test_batched_rows_equal_solo_runs_and_generate_ids(model):
    batched = generate(model, PROMPTS, SamplingParams(max_new_tokens=8))
    for prompt, c in zip(PROMPTS, batched):
        assert generate_ids(model, prompt, SamplingParams(max_new_tokens=8)) == c.token_ids


def test_seed_reproducible_and_per_row(model):
    p = SamplingParams(max_new_tokens=16, temperature=1.0, seed=123)
    a = generate(model, [[1, 2]], p)[0].token_ids
    b = generate(model, [[1, 2]], p)[0].token_ids
    c = generate(model, [[1, 2]], SamplingParams(max_new_tokens=16, temperature=1.0, seed=7))[0].token_ids
    assert a == b != c
    # the seeded row gives the same tokens whatever shares its batch
    mixed = generate(model, [[5, 6, 7], [1, 2]], [SamplingParams(max_new_tokens=16, temperature=1.0, seed=9), p])
    assert mixed[1].token_ids == a


def test_top_k_never_leaves_the_top_k(model):
    k = 3
    prompt = [4, 5, 6]
    for seed in range(8):
        p = SamplingParams(max_new_tokens=6, temperature=2.0, top_k=k, seed=seed)
        out = generate(model, [prompt], p)[0].token_ids
        seq = list(prompt)
        with torch.no_grad():
            for t in out:
                logits = model(torch.tensor([seq]))[0, -1, :V]
                assert t in torch.topk(logits, k).indices.tolist()
                seq.append(t)


def test_top_k_1_and_tiny_top_p_are_greedy(model):
    greedy = generate(model, [[3, 1]], SamplingParams(max_new_tokens=10))[0].token_ids
    for extra in ({"top_k": 1}, {"top_p": 1e-6}, {"min_p": 1.0}):
        p = SamplingParams(max_new_tokens=10, temperature=1.5, seed=0, **extra)
        assert generate(model, [[3, 1]], p)[0].token_ids == greedy, extra


def test_no_repeat_ngram_and_repetition_penalty(model):
    prompt = [1, 2, 3]
    plain = generate(model, [prompt], SamplingParams(max_new_tokens=30))[0].token_ids
    seq = prompt + plain
    assert len(set(zip(seq, seq[1:]))) < len(seq) - 1  # greedy repeats bigrams here...
    out = generate(model, [prompt], SamplingParams(max_new_tokens=30, no_repeat_ngram_size=2))[0].token_ids
    seq = prompt + out
    assert len(set(zip(seq, seq[1:]))) == len(seq) - 1  # ...but never with no_repeat_ngram_size=2
    rep = generate(model, [prompt], SamplingParams(max_new_tokens=30, repetition_penalty=50.0))[0].token_ids
    assert len(set(rep)) > len(set(plain))


def test_max_length_and_max_new_tokens(model):
    c = generate(model, [[1, 2, 3]], SamplingParams(max_new_tokens=50, max_length=8))[0]
    assert len(c.token_ids) == 5
    with pytest.raises(ConfigError, match="max_length"):
        generate(model, [[1, 2, 3]], SamplingParams(max_length=3))
    with pytest.raises(ConfigError, match="context"):
        generate(model, [list(range(64))], SamplingParams())
    with pytest.raises(ConfigError, match="maximum context length is 64 tokens.*1001 tokens"):
        generate(model, [[1]], SamplingParams(max_new_tokens=1000))  # an error, never a silent clamp
    c = generate(model, [[1]], SamplingParams(max_new_tokens=None))[0]  # None = up to the context
    assert len(c.token_ids) == 63


def test_stop_token_ids(model):
    ref = generate(model, [[1, 2, 3]], SamplingParams(max_new_tokens=12))[0].token_ids
    stop = ref[4]
    c = generate(model, [[1, 2, 3]], SamplingParams(max_new_tokens=12, stop_token_ids=[stop]))[0]
    first = ref.index(stop)
    assert c.token_ids == ref[:first] and c.stop_token == stop and c.finish_reason == "stop"


def test_stop_strings_cut_text_and_stream_never_leaks_them(byte_model):
    model, tok = byte_model
    prompt = tok.encode("床前明月光，")
    full = generate(model, [prompt], SamplingParams(max_new_tokens=40), tok)[0].text
    assert len(full) > 6
    stop = full[3:5]
    cut = full[:full.index(stop)]
    c = generate(model, [prompt], SamplingParams(max_new_tokens=40, stop=[stop]), tok)[0]
    assert c.text == cut and c.finish_reason == "stop"
    s = stream(model, tok, prompt, SamplingParams(max_new_tokens=40, stop=[stop]))
    deltas = list(s)
    assert "".join(deltas) == cut and s.completion.text == cut
    s = stream(model, tok, prompt, SamplingParams(max_new_tokens=40))
    assert "".join(s) == full


def test_stream_emits_whole_characters_only(byte_model):
    model, tok = byte_model
    s = stream(model, tok, tok.encode("疑是地上霜。"), SamplingParams(max_new_tokens=30))
    deltas = list(s)
    text = "".join(deltas)
    assert text == s.completion.text
    assert text == tok.decode(s.completion.token_ids) or "\ufffd" in tok.decode(s.completion.token_ids)
    for d in deltas:  # every delta round-trips through UTF-8 on its own
        assert d.encode("utf-8").decode("utf-8") == d


def test_beam_search_with_all_beams_is_exhaustive(model):
    """With num_beams = V and no length penalty, 2 steps of beam search = the best of all V^2 pairs."""
    prompt = [5, 9, 2]
    c = beam_search(model, prompt, SamplingParams(max_new_tokens=2, num_beams=V, length_penalty=0.0, logprobs=0))
    with torch.no_grad():
        first = torch.log_softmax(model(torch.tensor([prompt]))[0, -1, :V], -1)
        seqs = torch.tensor([prompt + [t] for t in range(V)])
        second = torch.log_softmax(model(seqs)[:, -1, :V], -1)
    total = first[:, None] + second
    best = divmod(int(total.argmax()), V)
    assert tuple(c.token_ids) == best
    assert c.score == pytest.approx(float(total.max()), abs=1e-4)
    assert sum(c.logprobs) == pytest.approx(c.score, abs=1e-4)
    greedy = generate(model, [prompt], SamplingParams(max_new_tokens=2))[0].token_ids
    assert float(total[greedy[0], greedy[1]]) <= c.score + 1e-6
    one_beam = beam_search(model, prompt, SamplingParams(max_new_tokens=6, num_beams=1))
    assert one_beam.token_ids == generate(model, [prompt], SamplingParams(max_new_tokens=6))[0].token_ids


def test_beam_search_finishes_on_stop_token_with_length_penalty(model):
    prompt = [5, 9, 2]
    greedy = generate(model, [prompt], SamplingParams(max_new_tokens=8))[0].token_ids
    stop = greedy[2]
    c = beam_search(model, prompt, SamplingParams(max_new_tokens=8, num_beams=4, stop_token_ids=[stop]))
    assert c.finish_reason in ("stop", "length") and stop not in c.token_ids
    assert generate(model, [prompt], SamplingParams(max_new_tokens=8, num_beams=4, stop_token_ids=[stop]))[0] == c


def test_invalid_options_raise_config_errors(model):
    for bad in ({"temperature": -1}, {"top_p": 0}, {"top_k": -2}, {"repetition_penalty": 0}, {"min_p": 2}):
        with pytest.raises(ConfigError):
            generate(model, [[1]], SamplingParams(**bad))
    with pytest.raises(ConfigError, match="empty"):
        generate(model, [[]], SamplingParams())


def test_all_combinations_of_row_options_run(model):
    opts = [{"temperature": 0.0}, {"temperature": 0.8, "top_k": 5}, {"temperature": 1.0, "top_p": 0.9},
            {"temperature": 1.0, "min_p": 0.1, "presence_penalty": 1.0, "frequency_penalty": 0.5}]
    for combo in itertools.combinations(opts, 2):
        ps = [SamplingParams(max_new_tokens=4, seed=1, **o) for o in combo]
        out = generate(model, [[1, 2], [3]], ps)
        assert all(len(c.token_ids) == 4 for c in out)
