import pytest

from mtnlg.cli import main
from mtnlg.data.corpora import (chinese_share, clean_poem, clean_zh, corpus_weights, list_corpora, load_corpus,
                                 parse_fortunes)
from mtnlg.errors import DataError


def test_parse_fortunes_strips_ansi_and_splits_on_percent():
    text = "\x1b[32m《静夜思》\x1b[m\n\x1b[33m作者：李白\x1b[m\n床前明月光，疑是地上霜。\n%\n\n%\n第二首\n"
    assert parse_fortunes(text) == ["《静夜思》\n作者：李白\n床前明月光，疑是地上霜。", "第二首"]


def test_poems_are_clean_documents_body_first_then_attribution():
    docs = load_corpus("poems")
    assert len(docs) > 350  # Tang 300 + Song 100 (a few entries hold several poems)
    assert not any("\x1b" in d or d.strip() == "%" for d in docs)
    assert docs[0] == ("兰叶春葳蕤，桂华秋皎洁。\n欣欣此生意，自尔为佳节。\n谁知林栖者，闻风坐相悦。\n"
                       "草木有本心，何求美人折？\n——张九龄《感遇・其一》")
    assert all(d == d.strip() and d for d in docs)
    # no document opens with a title, an author line or a sub-heading; each ends with its attribution
    assert not any(d.startswith(("《", "题目", "作者", "其一")) or "作者" in d for d in docs)
    assert sum(d.splitlines()[-1].startswith("——") for d in docs) == len(docs)


def test_clean_poem_handles_both_header_styles():
    song = "题目:《春居杂兴》二首\n作者:王禹偁（９５４－１００１）\n\n            其一\n\n两株桃杏映篱斜，妆点商山副使家。"
    assert clean_poem(song) == "两株桃杏映篱斜，妆点商山副使家。\n——王禹偁《春居杂兴》二首"
    assert clean_poem("没有标题的一行。") == "没有标题的一行。"


def test_zh_corpus_is_chinese_text_normalized():
    docs = load_corpus("zh")
    assert len(docs) > 5000
    assert all(chinese_share(d) >= 0.1 for d in docs)
    assert not any("\u00a0" in d or "  " in d or "\n\n\n" in d or d != d.strip() for d in docs)
    assert clean_zh("  天下有道，\u00a0却走马以粪。\n\n\n\n    --《道德经》") == "天下有道， 却走马以粪。\n\n--《道德经》"


def test_corpus_weights_parse_blends():
    assert corpus_weights("poems") == [("poems", None)]
    assert corpus_weights("poems:0.25, zh:0.75") == [("poems", 0.25), ("zh", 0.75)]
    for bad, msg in (("poems:x", "non-negative number"), ("poems:0.5,zh", "every corpus a weight"),
                     ("poems,poems", "twice"), ("poem:1", "did you mean 'poems'"), ("poems:0,zh:0", "not all zero")):
        with pytest.raises(DataError, match=msg):
            corpus_weights(bad)


def test_python_corpus_is_the_standard_library():
    docs = load_corpus("python")
    assert len(docs) > 100 and any("def " in d for d in docs[:50])


def test_unknown_corpus_suggests_a_name():
    with pytest.raises(DataError, match="did you mean 'poems'"):
        load_corpus("poem")


def test_missing_package_names_setup_sh(tmp_path, monkeypatch):
    monkeypatch.setenv("MTNLG_FORTUNES_DIR", str(tmp_path))
    with pytest.raises(DataError, match="bash setup.sh") as e:
        load_corpus("poems")
    assert "\n" not in str(e.value)
    rows = {r.name: r for r in list_corpora()}
    assert not rows["poems"].available and not rows["zh"].available and rows["python"].available


def test_data_list_command(capsys):
    assert main(["data", "list", "--json"]) == 0
    import json

    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["corpora"]}
    assert set(rows) == {"poems", "zh", "python"}
    assert rows["poems"]["documents"] == len(load_corpus("poems"))
    assert rows["poems"]["characters"] == sum(map(len, load_corpus("poems")))
