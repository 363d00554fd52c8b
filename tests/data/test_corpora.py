import pytest

from mtnlg.cli import main
from mtnlg.data.corpora import list_corpora, load_corpus, parse_fortunes
from mtnlg.errors import DataError


def test_parse_fortunes_strips_ansi_and_splits_on_percent():
    text = "\x1b[32m《静夜思》\x1b[m\n\x1b[33m作者：李白\x1b[m\n床前明月光，疑是地上霜。\n%\n\n%\n第二首\n"
    assert parse_fortunes(text) == ["《静夜思》\n作者：李白\n床前明月光，疑是地上霜。", "第二首"]


def test_poems_are_clean_documents_with_title_and_author():
    docs = load_corpus("poems")
    assert len(docs) > 350  # Tang 300 + Song 100 (a few entries hold several poems)
    assert not any("\x1b" in d or d.strip() == "%" for d in docs)
    assert docs[0].startswith("《") and "作者" in docs[0].splitlines()[1]
    assert all(d == d.strip() and d for d in docs)


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
