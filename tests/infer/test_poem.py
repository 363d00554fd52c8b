"""Poem continuation: the new lines have the form of the given ones (5 / 7 characters, ，/。)."""

from __future__ import annotations

import pytest

from mtnlg.api import MegatronLmModel, MegatronModelConfig
from mtnlg.infer.poem_form import LineConstraint, continue_poem, is_hanzi, parse_poem
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
    for bad in ("hello", "床前明月，疑是地上霜。", "abcde，fghij。"):
        with pytest.raises(ConfigError):
            parse_poem(bad)


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
