"""Poem continuation: the new lines have the form of the given ones (5 / 7 characters, ，/。)."""

from __future__ import annotations

import pytest

from mtnlg.api import MegatronLmModel, MegatronModelConfig
from mtnlg.infer.poem_form import LineConstraint, continue_poem, is_hanzi, parse_poem, poem_context
from mtnlg.data.tokenizer import byte_tokenizer, train_bpe
from mtnlg.errors import ConfigError
from mtnlg.infer.sampling import SamplingParams

POEMS = ["床前明月光，疑是地上霜。举头望明月，低头思故乡。", "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。",
         "朝辞白帝彩云间，千里江陵一日还。两岸猿声啼不住，轻舟已过万重山。"]


def model(tok):
    cfg = MegatronModelConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=64, max_position_embeddings=128, init_method_std=0.3)
    return MegatronLmModel(cfg, tok).materialize(seed=0).eval()


def test_parse_poem():
    assert parse_poem("床前明月光，疑是地上霜。") == (5, ["床前明月光", "疑是地上霜"])
    assert parse_poem(POEMS[2])[0] == 7
    for bad in ("hello", "床前明月，疑是地上霜。", "abcde，fghij。", "床前明月光，疑是地上"):
        with pytest.raises(ConfigError):
            parse_poem(bad)
    # a line without its mark is a line, not dropped: it gets the mark its place calls for
    assert parse_poem("床前明月光，疑是地上霜") == (5, ["床前明月光", "疑是地上霜"])
    assert poem_context("床前明月光 疑是地上霜\n举头望明月") == "床前明月光，疑是地上霜。\n举头望明月，"


def test_continuation_counts_an_unpunctuated_last_line_and_keeps_the_budget():
    tok = train_bpe(POEMS * 10, vocab_size=300)
    lm = model(tok)
    params = SamplingParams(temperature=0.0)
    # the second line has no 。: it is still the second line, so the next one opens a couplet with "，"
    assert continue_poem(lm, "床前明月光，疑是地上霜", 1, params) == continue_poem(lm, "床前明月光，疑是地上霜。", 1, params)
    assert continue_poem(lm, "床前明月光，疑是地上霜", 1, params)[0][-1] == "，"
    with pytest.raises(ConfigError, match="1 to 8 lines"):
        continue_poem(lm, POEMS[0], 9, params)
    with pytest.raises(ConfigError, match="over the model's context of 128 tokens"):  # never a silently cut opening
        continue_poem(lm, POEMS[0] * 3, 8, params)


@pytest.mark.parametrize("tok", [byte_tokenizer(), train_bpe(POEMS * 10, vocab_size=300)], ids=["bytes", "bpe"])
def test_new_lines_match_length_and_punctuation(tok):
    lm = model(tok)
    for text, greedy in ((POEMS[0][:12], True), (POEMS[2][:16], False)):
        n, lines = parse_poem(text)
        params = SamplingParams(temperature=0.0 if greedy else 1.0, top_k=20, seed=3)
        out = continue_poem(lm, text, num_lines=3, params=params)
        assert [line[-1] for line in out] == ["，", "。", "，"]
        for line in out:
            assert len(line) == n + 1 and all(map(is_hanzi, line[:-1]))


def test_constraint_allows_multi_character_tokens_only_within_the_line():
    tok = train_bpe(POEMS * 10)  # sized by the text: every character, then merges (two-character tokens)
    c = LineConstraint(tok, 5, "，", tok.vocab_size)
    two = [i for i in range(tok.vocab_size) if len(tok.decode([i])) == 2 and all(map(is_hanzi, tok.decode([i])))]
    assert two, "the BPE should have learned some two-character tokens"
    allowed_start = c.allowed(0, b"")
    assert bool(allowed_start[two].all())
    assert not bool(c.allowed(4, b"")[two].any())  # 4 + 2 characters would overrun the line
    comma = tok.encode("，")
    assert bool(c.allowed(5, b"")[comma[0]]) and not bool(allowed_start[comma[0]])


# ---- a whole poem as a chat reply: SamplingParams.form, enforced by the decode state -------------------------

@pytest.mark.parametrize("form", ["poem", "poem5", "poem7"])
def test_form_makes_every_reply_a_whole_poem(form):
    from mtnlg.data.tokenizer import END_OF_TURN
    from mtnlg.infer.generate import generate, stream
    from mtnlg.infer.poem_form import is_poem_form

    tok = train_bpe(POEMS * 10)  # has two-character tokens, so lines are not always one token a character
    lm = model(tok)
    end = tok.token_to_id(END_OF_TURN)
    prompt = tok.encode("写一首诗")
    seen_lengths = set()
    for seed in range(6):
        p = SamplingParams(max_new_tokens=100, temperature=1.0 if seed else 0.0, seed=seed, form=form,
                           stop_token_ids=[tok.eod_id, end], vocab_limit=tok.vocab_size).validate()
        c = generate(lm.model, [prompt], p, tok)[0]
        assert c.finish_reason == "stop" and is_poem_form(c.text), (seed, c.text)
        couplets = c.text.split("\n")
        assert 2 <= len(couplets) <= 4 and all(len(x) in (12, 16) for x in couplets), c.text
        seen_lengths.add(len(couplets[0]) // 2 - 1)
        if form != "poem":
            assert seen_lengths == {int(form[-1])}
        assert "".join(stream(lm.model, tok, prompt, p)) == c.text  # the streamed reply is the same poem
    free = generate(lm.model, [prompt], SamplingParams(max_new_tokens=60, stop_token_ids=[end]), tok)[0]
    assert not is_poem_form(free.text)  # the untrained model does not write poems by itself


@pytest.mark.parametrize("budget", [14, 20, 30, 45])
def test_a_reply_cut_by_its_budget_still_ends_on_a_whole_couplet(budget):
    """max_new_tokens smaller than a whole poem: the form stops at the last couplet that fits, never
    in the middle of a line (and a 7-character first line only when its couplet fits)."""
    from mtnlg.data.tokenizer import END_OF_TURN
    from mtnlg.infer.generate import generate
    from mtnlg.infer.poem_form import is_poem_form

    tok = train_bpe(POEMS * 10)
    lm = model(tok)
    end = tok.token_to_id(END_OF_TURN)
    for seed in range(4):
        p = SamplingParams(max_new_tokens=budget, temperature=1.0, seed=seed, form="poem",
                           stop_token_ids=[tok.eod_id, end], vocab_limit=tok.vocab_size).validate()
        c = generate(lm.model, [tok.encode("写一首诗")], p, tok)[0]
        couplets = c.text.split("\n")
        assert c.text.endswith("。") and all(len(x) in (12, 16) for x in couplets), (budget, seed, c.text)
        assert len(c.token_ids) <= budget
        if budget >= 2 * 17:
            assert is_poem_form(c.text)  # room for two couplets: a whole regular poem


def test_form_is_refused_with_beams_and_unknown_names():
    with pytest.raises(ConfigError, match="form"):
        SamplingParams(form="sonnet").validate()
    with pytest.raises(ConfigError, match="beam"):
        SamplingParams(form="poem", num_beams=2).validate()


def test_requested_form_reads_the_request():
    from mtnlg.infer.poem_form import form_of_conversation, requested_form

    for text in ("写一首关于秋天的诗", "请你写一首关于月亮的诗。", "以《静夜思》为题作一首诗", "给我写一首梅花的诗吧", "来一首绝句"):
        assert requested_form(text) == "poem", text
    assert requested_form("来一首写春天的五言诗") == "poem5" and requested_form("写一首七律") == "poem7"
    for text in ("你好", "这首诗是谁写的？", "hello", "再来一首"):
        assert requested_form(text) is None, text
    poem = "床前明月光，疑是地上霜。\n举头望明月，低头思故乡。"
    history = [{"role": "user", "content": "写一首关于月亮的诗"}, {"role": "assistant", "content": poem},
               {"role": "user", "content": "再来一首"}]
    assert form_of_conversation(history) == "poem"
    history[1]["content"] = "不会。"
    assert form_of_conversation(history) is None


def test_best_of_keeps_the_candidate_the_model_finds_likeliest():
    import torch

    from mtnlg.infer.poem_form import CANDIDATE_SEED_STRIDE

    tok = byte_tokenizer()  # one token a byte: a line's tokens are its encoding, so its score can be recomputed
    lm = model(tok)
    text = POEMS[0][:12]
    base = SamplingParams(temperature=1.0, top_k=50, seed=7)
    singles = [continue_poem(lm, text, 1, SamplingParams(temperature=1.0, top_k=50, seed=7 + CANDIDATE_SEED_STRIDE * i), best_of=1)[0]
               for i in range(4)]
    assert len(set(singles)) > 1, "the candidates should differ"
    context = tok.encode(text + "\n")

    def score(line: str) -> float:
        ids = tok.encode(line)
        with torch.no_grad():
            logits = lm.model(torch.tensor([context + ids]))[0, len(context) - 1:-1, :tok.vocab_size]
        return float(torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(ids)[:, None]).sum())

    best = continue_poem(lm, text, 1, base, best_of=4)[0]
    assert best in singles and score(best) == pytest.approx(max(map(score, singles)), abs=1e-4)
