"""Per-row logits processing and sampling, the UTF-8-safe stream decoder and stop-string holdback."""

from __future__ import annotations

import math

import torch

from mtnlg.data.tokenizer import byte_tokenizer, train_bpe
from mtnlg.infer.sampling import SamplingParams, banned_ngram_tokens, process_logits, sample
from mtnlg.infer.streaming import StopStringFilter, StreamDecoder, find_stop

INF = float("inf")


def test_each_row_gets_its_own_parameters():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]] * 4)
    ps = [SamplingParams(), SamplingParams(temperature=2.0), SamplingParams(temperature=1.0, top_k=2),
          SamplingParams(temperature=1.0, top_p=0.7)]
    out = process_logits(logits, ps)
    assert out[0].tolist() == [2.0, 1.0, 0.0, -1.0]  # greedy: untouched
    assert out[1].tolist() == [1.0, 0.5, 0.0, -0.5]  # temperature
    assert out[2].tolist() == [2.0, 1.0, -INF, -INF]  # top-k
    p = torch.softmax(logits[0], -1)  # [0.64, 0.24, 0.09, 0.03]: 0.64 < 0.7 so the top two stay
    assert p[0] < 0.7 < p[0] + p[1]
    assert out[3].tolist() == [2.0, 1.0, -INF, -INF]


def test_logit_bias_is_added_first_and_checked():
    import pytest

    from mtnlg.errors import ConfigError

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]] * 2)
    ps = [SamplingParams(logit_bias={3: 5.0, 0: -100.0}), SamplingParams(temperature=2.0, logit_bias={1: 2.0})]
    out = process_logits(logits, ps)
    assert out[0].tolist() == [-98.0, 1.0, 0.0, 4.0]  # greedy rows get it too: it moves the argmax
    assert out[1].tolist() == [1.0, 1.5, 0.0, -0.5]  # before the temperature
    assert not ps[0].is_plain_greedy() and SamplingParams().is_plain_greedy()
    masked = process_logits(logits[:1], ps[:1], allowed=torch.tensor([[True, True, True, False]]))
    assert masked[0, 3] == -INF  # a bias never brings back a masked token
    for bad in ({-1: 1.0}, {1: 100.5}, {1: float("nan")}, {"1": 1.0}):
        with pytest.raises(ConfigError, match="logit_bias"):
            SamplingParams(logit_bias=bad).validate()
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        SamplingParams(logit_bias={4: 1.0}).clamped(4)


def test_stop_token_ids_are_checked_like_logit_bias_keys():
    import pytest

    from mtnlg.errors import ConfigError

    for bad in ([-1], [True], ["3"], [1.0]):
        with pytest.raises(ConfigError, match="stop_token_ids must be token ids"):
            SamplingParams(stop_token_ids=bad).validate()
    with pytest.raises(ConfigError, match=r"stop token id 300 is outside the vocabulary \[0, 300\)"):
        SamplingParams(stop_token_ids=[0, 300], vocab_limit=300).validate()  # the tokenizer's vocabulary
    with pytest.raises(ConfigError, match=r"stop token id 999999 is outside the vocabulary \[0, 4\)"):
        SamplingParams(stop_token_ids=[999999]).validate().clamped(4)  # the model's
    assert SamplingParams(stop_token_ids=[0, 3], vocab_limit=4).validate().clamped(4).stop_token_ids == [0, 3]


def test_min_p_and_penalties_exact():
    logits = torch.tensor([[math.log(0.5), math.log(0.3), math.log(0.15), math.log(0.05)]])
    out = process_logits(logits, [SamplingParams(temperature=1.0, min_p=0.2)])
    assert torch.isinf(out[0]).tolist() == [False, False, False, True]  # 0.05 < 0.2 * 0.5
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    out = process_logits(logits, [SamplingParams(repetition_penalty=2.0)], [[0, 1]])
    assert out[0].tolist() == [1.0, -4.0, 1.0, 0.5]
    # presence/frequency count only the output (after the prompt): token 2 twice, token 3 once
    out = process_logits(logits, [SamplingParams(presence_penalty=1.0, frequency_penalty=0.25)],
                         [[0, 2, 2, 3]], [1])
    assert out[0].tolist() == [2.0, -2.0, 1.0 - 1.0 - 0.5, 0.5 - 1.0 - 0.25]
    out = process_logits(logits, [SamplingParams(no_repeat_ngram_size=2)], [[1, 3, 2, 1]])
    assert out[0].tolist() == [2.0, -2.0, 1.0, -INF]


def test_banned_ngrams():
    assert banned_ngram_tokens([1, 2, 3, 1, 2], 3) == [3]
    assert banned_ngram_tokens([1, 2, 3, 1, 2], 2) == [3]
    assert banned_ngram_tokens([5, 5], 1) == [5]
    assert banned_ngram_tokens([1], 3) == []


def test_sample_greedy_rows_and_seeded_rows():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    ps = [SamplingParams(), SamplingParams(temperature=1.0, seed=1), SamplingParams(temperature=1.0, seed=1)]
    gens = [None, torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)]
    toks, lps = sample(process_logits(logits, ps), ps, gens, raw_logits=logits)
    assert int(toks[0]) == int(logits[0].argmax())
    gens2 = [None, torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)]
    assert toks.tolist() == sample(process_logits(logits, ps), ps, gens2)[0].tolist()
    expect = torch.log_softmax(logits, -1).gather(1, toks[:, None])[:, 0]
    torch.testing.assert_close(lps, expect)


def test_stream_decoder_chinese_byte_by_byte():
    tok = byte_tokenizer()
    text = "床前明月光，疑是地上霜。🙂 ok"
    dec = StreamDecoder(tok)
    deltas = [dec.feed(t) for t in tok.encode(text)]
    assert "".join(deltas) + dec.flush() == text
    assert all("\ufffd" not in d for d in deltas)
    assert deltas[:3] == ["", "", "床"]  # nothing until the 3rd byte of 床


def test_stream_decoder_with_bpe_and_specials():
    tok = train_bpe(["床前明月光，疑是地上霜。举头望明月，低头思故乡。"] * 20, vocab_size=300)
    text = "举头望明月，低头思故乡。"
    dec = StreamDecoder(tok)
    ids = tok.encode(text) + [tok.eod_id]
    assert "".join(dec.feed(t) for t in ids) + dec.flush() == text  # the special token is skipped
    assert StreamDecoder(tok, skip_special_tokens=False).feed(ids) == text + "<|endoftext|>"
    broken = StreamDecoder(byte_tokenizer())
    assert broken.feed(list("床".encode())[:2]) == "" and broken.flush() == "\ufffd"


def test_stop_string_filter_holds_back_prefixes():
    f = StopStringFilter(["\n\n", "END"])
    out = [f.push(x) for x in ["ab", "c\n", "x", "E", "N", "D!!"]]
    assert out == [("ab", False), ("c", False), ("\nx", False), ("", False), ("", False), ("", True)]
    assert f.text == "abc\nx"
    g = StopStringFilter(["END"])
    assert g.push("xE") == ("x", False) and g.finish() == "E"
    assert find_stop("hello world", ["wor", "lo"]) == 3
    h = StopStringFilter(["END", "E"], include=True)  # vLLM's include_stop_str_in_output: the stop stays
    assert h.push("abE") == ("abE", True) and h.text == "abE"
    m = StopStringFilter(["END"])  # min_tokens: a stop inside text added without detection does not count,
    assert m.push("xEND", detect=False) == ("xEND", False) and m.push("yEN", detect=True) == ("y", False)
    assert m.push("D") == ("", True) and m.text == "xENDy"  # one that ends after it does
    k = StopStringFilter(["\n\n"], include=True)
    assert [k.push(x) for x in ["a\n", "\nb"]] == [("a", False), ("\n\n", True)] and k.text == "a\n\n"


def test_seeded_rows_draw_what_torch_multinomial_draws():
    """The batched draw (argmax p / q, q ~ Exp(1) from each row's generator) is torch.multinomial's own
    algorithm: the same tokens and the same generator states, so seeded outputs did not change."""
    torch.manual_seed(0)
    for V, B in ((7, 1), (264, 5), (5000, 3)):
        logits = torch.randn(B, V) * 3
        logits[logits < -2.5] = -INF
        ps = [SamplingParams(temperature=1.0)] * B
        ours = [torch.Generator().manual_seed(10 + i) for i in range(B)]
        ref = [torch.Generator().manual_seed(10 + i) for i in range(B)]
        for _ in range(3):
            tokens, _ = sample(logits, ps, ours)
            probs = logits.softmax(-1)
            expected = [int(torch.multinomial(probs[i], 1, generator=ref[i])) for i in range(B)]
            assert tokens.tolist() == expected
        assert all(torch.equal(a.get_state(), b.get_state()) for a, b in zip(ours, ref))
