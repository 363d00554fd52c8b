"""The quality anchors: a Kneser-Ney character n-gram that is a proper distribution, and the poem figures."""

from __future__ import annotations

import math

import pytest

from mtnlg.errors import ConfigError
from mtnlg.eval.quality import EOS, KneserNey, Unigram, bits_per_char, corpus_splits, goals_met, poem_figures

TRAIN = ["床前明月光，疑是地上霜。举头望明月，低头思故乡。", "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。"] * 5


@pytest.mark.parametrize("order", [1, 2, 3, 5])
def test_kneser_ney_is_a_distribution_over_the_alphabet(order):
    alphabet = set("".join(TRAIN)) | {"雪"}  # one character never seen in training
    m = KneserNey(order, alphabet).fit(TRAIN)
    for history in ["", "床前", "明月", "低头思故", "雪雪雪雪"]:
        total = sum(m.prob(history, w) for w in alphabet | {EOS})
        assert total == pytest.approx(1.0, abs=1e-9), history
    assert m.prob("举头望明", "月") > 0.5 if order >= 3 else True
    assert m.prob("床前", "雪") > 0  # smoothing: never zero


def test_ngram_orders_and_unigram_rank_as_expected():
    alphabet = set("".join(TRAIN))
    test = [TRAIN[0]]
    uni = Unigram(alphabet).fit(TRAIN)
    bi = KneserNey(2, alphabet).fit(TRAIN)
    four = KneserNey(4, alphabet).fit(TRAIN)
    assert bits_per_char(four, test) < bits_per_char(bi, test) < bits_per_char(uni, test)
    # the unigram by hand: add-one over the alphabet and the end of document
    counts = {c: "".join(TRAIN).count(c) for c in alphabet}
    total = sum(counts.values()) + len(TRAIN) + len(alphabet) + 1
    want = -sum(math.log2((counts[c] + 1) / total) for c in test[0]) - math.log2((len(TRAIN) + 1) / total)
    assert uni.doc_bits(test[0]) == pytest.approx(want)


def test_corpus_splits_match_training(tmp_path, monkeypatch):
    from mtnlg.data.corpora import load_corpus
    from mtnlg.data.datasets import split_documents

    parts = corpus_splits("poems", "90,5,5", 1234)["poems"]
    docs = load_corpus("poems")
    ids = split_documents(len(docs), "90,5,5", 1234)
    assert parts["test"] == [docs[i] for i in ids["test"]] and len(parts["train"]) == len(ids["train"])


def test_poem_figures_count_form_corpus_characters_and_first_lines():
    prompt = "床前明月光，疑是地上霜。"
    outputs = {0: ["举头望明月，", "低头思故乡。"], 1: ["举头望明月，", "低头思故乡。"], 2: ["春眠不觉晓，", "雪落知多少。"],
               3: ["太长的一行字啊，", "短。"]}

    def fake(seed):
        if seed == 4:
            raise ConfigError("the model could not produce a 5-character line")
        return outputs[seed]

    f = poem_figures(fake, prompt, set("".join(TRAIN)), n=5)
    assert f.right_form == 3 and f.distinct_first_lines == 3
    chars = "举头望明月低头思故乡" * 2 + "春眠不觉晓雪落知多少" + "太长的一行字啊短"
    known = sum(c in set("".join(TRAIN)) for c in chars)
    assert f.chars_in_corpus == pytest.approx(known / len(chars))
    assert f.samples[4].startswith("<failed")
    report = {"bits_per_char": {"all": {"gain_vs_ngram": 0.12}}, "poems": {**f.to_dict()}, "chat": None}
    goals = goals_met(report)
    assert goals["bits_per_char >= 10% below the n-gram"] is True and goals["100% right form"] is False
    assert goals[">= 8/10 chat replies in poem form"] is None
