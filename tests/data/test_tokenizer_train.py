from mtnlg.cli import main
from mtnlg.data.corpora import load_corpus
from mtnlg.data.tokenizer import EOD, PAD, ROLE_TOKENS, SPECIAL_TOKENS, Tokenizer


def test_trained_bpe_respects_vocab_and_round_trips_chinese(poem_tok):
    assert poem_tok.vocab_size == 1000
    for t in SPECIAL_TOKENS:
        assert poem_tok.token_to_id(t) is not None
    for doc in load_corpus("poems")[:50] + ["混合 mixed 文本 🙂\n\ttabs", "生僻字：𠀀𪚥"]:
        ids = poem_tok.encode(doc)
        assert poem_tok.decode(ids) == doc
    poem = load_corpus("poems")[0]
    assert len(poem_tok.encode(poem)) < len(poem.encode())  # merges learned: fewer tokens than bytes


def test_tokenizer_train_command(tmp_path, capsys):
    txt = tmp_path / "a.txt"
    txt.write_text("\n".join(load_corpus("poems")[:100]), encoding="utf-8")
    assert main(["tokenizer", "train", "--input", str(txt), "--vocab-size", "400", "--output", str(tmp_path / "t")]) == 0
    assert "400-token" in capsys.readouterr().out
    tok = Tokenizer.load(tmp_path / "t")
    assert tok.vocab_size == 400 and tok.eod_id == tok.token_to_id(EOD) and tok.pad_id == tok.token_to_id(PAD)
    assert tok.token_to_id(ROLE_TOKENS["assistant"]) is not None
    assert main(["tokenizer", "train", "--corpus", "poems", "--vocab-size", "100", "--output", str(tmp_path / "x")]) == 2
    capsys.readouterr()
    assert main(["tokenizer", "train", "--input", str(txt), "--min-frequency", "-1", "--output", str(tmp_path / "y")]) == 2
    (tmp_path / "empty.txt").write_text("")
    assert main(["tokenizer", "train", "--input", str(tmp_path / "empty.txt"), "--output", str(tmp_path / "z")]) == 2
    err = capsys.readouterr().err
    assert "--min-frequency must be >= 1" in err and "training text is empty" in err and "Traceback" not in err


def test_tokenizer_covers_every_character_of_its_corpus_and_sizes_itself():
    from collections import Counter

    from mtnlg.data.tokenizer import train_bpe, uncovered_characters

    docs = load_corpus("poems")
    tok = train_bpe(docs)  # vocab_size=None: the corpus decides
    assert uncovered_characters(tok, docs) == set()
    chars = set("".join(docs))
    for ch in chars:  # one token per character, and it decodes to that character
        ids = tok.encode(ch)
        assert len(ids) == 1 and tok.decode(ids) == ch
    assert tok.vocab_size > 256 + len(chars) - sum(c.isascii() for c in chars)  # sized by the corpus, not 2,048
    assert all(tok.decode(tok.encode(d)) == d for d in docs[:50])
    # a smaller budget is met exactly: the most frequent characters get tokens first
    small = train_bpe(docs, 1000)
    assert small.vocab_size == 1000
    missing = uncovered_characters(small, docs)
    counts = Counter("".join(docs))
    covered = chars - missing
    assert missing and min(counts[c] for c in covered if not c.isascii()) >= max(counts[c] for c in missing)


def test_default_job_tokenizer_covers_all_of_fortunes_zh(tmp_path, monkeypatch):
    from mtnlg.config import Config
    from mtnlg.data.datasets import prepare_tokenizer
    from mtnlg.data.tokenizer import uncovered_characters

    monkeypatch.setenv("MTNLG_CACHE", str(tmp_path))
    cfg = Config()
    assert cfg.model.vocab_size is None and cfg.data.corpus == "poems:0.1,zh:0.9"
    tok = prepare_tokenizer(cfg)
    assert cfg.model.vocab_size == tok.vocab_size  # the model's vocabulary follows the tokenizer's
    assert uncovered_characters(tok, load_corpus("poems") + load_corpus("zh")) == set()
    import pytest

    from mtnlg.errors import ConfigError

    with pytest.raises(ConfigError, match="model.vocab_size=10 is too small"):  # the field the user set
        prepare_tokenizer(Config.load(overrides=["--model.vocab_size=10"]))
