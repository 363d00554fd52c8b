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
