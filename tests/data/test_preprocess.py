import gzip
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mtnlg.cli import main
from mtnlg.data.corpora import load_corpus
from mtnlg.data.indexed import IndexedDataset
from mtnlg.data.preprocess import preprocess
from mtnlg.errors import DataError

POEMS = load_corpus("poems")


def _docs(ds, tok):
    out = []
    for i in range(len(ds)):
        ids = ds[i]
        assert ids[-1] == tok.eod_id  # every document ends in EOD
        out.append(tok.decode(ids[:-1].tolist()))
    return out


def test_txt_to_bin_decodes_to_the_input_chinese_included(tmp_path, poem_tok):
    texts = [POEMS[0] + "\n", "第二个文件：mixed ASCII and 中文\r\n  with trailing spaces  \n\n", POEMS[5]]
    files = []
    for i, t in enumerate(texts):
        f = tmp_path / f"{i}.txt"
        f.write_bytes(t.encode())
        files.append(str(f))
    stats = preprocess(files, poem_tok, tmp_path / "out")
    ds = IndexedDataset(tmp_path / "out")
    assert _docs(ds, poem_tok) == texts  # one document per file, byte-exact
    assert stats.documents == 3 and stats.tokens == ds.num_tokens and ds.eod_id == poem_tok.eod_id
    assert ds.dtype == np.uint16 and ds.vocab_size == poem_tok.vocab_size


def test_txt_separator_jsonl_and_gzip(tmp_path, poem_tok):
    (tmp_path / "s.txt").write_text("\n%\n".join(POEMS[:4]) + "\n%\n", encoding="utf-8")
    with open(tmp_path / "a.jsonl", "w", encoding="utf-8") as f:
        for d in POEMS[4:10]:
            f.write(json.dumps({"text": d, "id": 1}, ensure_ascii=False) + "\n")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        for d in POEMS[10:13]:
            f.write(json.dumps({"body": d}) + "\n")
    preprocess([str(tmp_path / "s.txt")], poem_tok, tmp_path / "s", separator="%")
    assert _docs(IndexedDataset(tmp_path / "s"), poem_tok) == POEMS[:4]
    preprocess([str(tmp_path / "a.jsonl")], poem_tok, tmp_path / "j")
    assert _docs(IndexedDataset(tmp_path / "j"), poem_tok) == POEMS[4:10]
    preprocess([str(tmp_path / "b.jsonl.gz")], poem_tok, tmp_path / "g", json_key="body")
    assert _docs(IndexedDataset(tmp_path / "g"), poem_tok) == POEMS[10:13]


def test_workers_give_identical_output(tmp_path, poem_tok, monkeypatch):
    monkeypatch.setattr("mtnlg.data.preprocess.CHUNK_BYTES", 4096)  # many work units from a small file
    with open(tmp_path / "p.jsonl", "w", encoding="utf-8") as f:
        for d in POEMS:
            f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
    seen = []
    one = preprocess([str(tmp_path / "p.jsonl")], poem_tok, tmp_path / "w1", workers=1)
    two = preprocess([str(tmp_path / "p.jsonl")], poem_tok, tmp_path / "w2", workers=2, progress=seen.append)
    assert (tmp_path / "w1.bin").read_bytes() == (tmp_path / "w2.bin").read_bytes()
    assert (tmp_path / "w1.idx").read_bytes() == (tmp_path / "w2.idx").read_bytes()
    assert one.documents == two.documents == len(POEMS)
    assert sum(seen) == (tmp_path / "p.jsonl").stat().st_size and len(seen) > 3
    # With another thread alive the workers are spawned instead of forked: same bytes again.
    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:
        preprocess([str(tmp_path / "p.jsonl")], poem_tok, tmp_path / "w3", workers=2)
    finally:
        stop.set()
        t.join()
    assert (tmp_path / "w1.bin").read_bytes() == (tmp_path / "w3.bin").read_bytes()


def _bad_jsonl(path):
    lines = [b'{"text": "ok 1"}', b'{"text": "ok 2"', b"", b'{"text": "\xff bad utf8"}', b'{"title": "no text"}',
             b'["not", "an", "object"]', b'{"text": "ok 3"}']
    path.write_bytes(b"\n".join(lines) + b"\n")


def test_bad_lines_are_reported_with_line_numbers(tmp_path, poem_tok):
    src = tmp_path / "bad.jsonl"
    _bad_jsonl(src)
    stats = preprocess([str(src)], poem_tok, tmp_path / "ok", on_error="skip")
    assert stats.documents == 2 and stats.bad_lines == 4
    assert [(e.path, e.line) for e in stats.errors] == [(str(src), 2), (str(src), 4), (str(src), 5), (str(src), 6)]
    assert "invalid JSON" in stats.errors[0].reason and "UTF-8" in stats.errors[1].reason
    assert str(stats.errors[2]) == f"{src}:5: no string field 'text'"
    assert _docs(IndexedDataset(tmp_path / "ok"), poem_tok) == ["ok 1", "ok 3"]

    with pytest.raises(DataError, match=f"{src}:2: invalid JSON"):
        preprocess([str(src)], poem_tok, tmp_path / "fail", on_error="fail")
    assert not list(tmp_path.glob("fail*")) and not list(tmp_path.glob(".fail*"))  # nothing half-written


def test_bad_utf8_in_txt_drops_only_that_line(tmp_path, poem_tok):
    src = tmp_path / "t.txt"
    src.write_bytes("第一行\n".encode() + b"\xc3\x28 broken\n" + "第三行\n".encode())
    stats = preprocess([str(src)], poem_tok, tmp_path / "t")
    assert [str(e) for e in stats.errors] == [f"{src}:2: invalid UTF-8 at byte 0 of the line"]
    assert _docs(IndexedDataset(tmp_path / "t"), poem_tok) == ["第一行\n第三行\n"]


def test_truncated_gzip_names_the_file(tmp_path, poem_tok):
    src = tmp_path / "t.jsonl.gz"
    with gzip.open(src, "wt", encoding="utf-8") as f:
        for d in POEMS:
            f.write(json.dumps({"text": d}) + "\n")
    src.write_bytes(src.read_bytes()[:-100])
    with pytest.raises(DataError, match=f"{src} is a corrupt or truncated gzip"):
        preprocess([str(src)], poem_tok, tmp_path / "t")
    assert not list(tmp_path.glob("t.bin")) and not list(tmp_path.glob(".t.*"))


def test_missing_input_and_empty_result(tmp_path, poem_tok):
    with pytest.raises(DataError, match="no such file"):
        preprocess([str(tmp_path / "nope.jsonl")], poem_tok, tmp_path / "x")
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="no documents"):
        preprocess([str(tmp_path / "e.jsonl")], poem_tok, tmp_path / "x")


def test_preprocess_and_inspect_commands(tmp_path, poem_tok, capsys):
    poem_tok.save(tmp_path / "tok")
    src = tmp_path / "bad.jsonl"
    _bad_jsonl(src)
    prefix = str(tmp_path / "cli")
    assert main(["preprocess", "--input", str(src), "corpus:poems", "--tokenizer", str(tmp_path / "tok"),
                 "--output", prefix, "--workers", "1", "--quiet"]) == 0
    out = capsys.readouterr()
    assert f"{src}:2:" in out.err and f"{src}:6:" in out.err and "skipped 4 bad line(s)" in out.err
    assert main(["data", "inspect", prefix, "--decode", "2", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["documents"] == 2 + len(POEMS) and info["dtype"] == "uint16" and info["vocab_size"] == 1000
    assert info["document"]["text"] == POEMS[0] and info["verified"]
    assert main(["data", "inspect", prefix, "--decode", "3"]) == 0
    text = capsys.readouterr().out
    assert "documents   411" in text and POEMS[1] in text
    assert main(["preprocess", "--input", str(src), "--tokenizer", str(tmp_path / "tok"), "--output", prefix + "2",
                 "--on-error", "fail", "--quiet", "--workers", "1"]) == 2
    assert f"{src}:2: invalid JSON" in capsys.readouterr().err
    assert main(["preprocess", "--input", str(src), "--tokenizer", str(tmp_path / "tok"), "--output", prefix + "3",
                 "--quiet", "--workers", "100000"]) == 2  # refused before a process starts
    assert "--workers 100000 is more than" in capsys.readouterr().err
    (tmp_path / "cli.idx").write_bytes(b"garbage")
    assert main(["data", "inspect", prefix]) == 2
    assert "cli.idx" in capsys.readouterr().err


def test_special_token_strings_in_data_stay_text(tmp_path, poem_tok):
    text = "用户说：<|user|> 你好 <|endoftext|> 再见"
    (tmp_path / "s.txt").write_text(text, encoding="utf-8")
    preprocess([str(tmp_path / "s.txt")], poem_tok, tmp_path / "s")
    ds = IndexedDataset(tmp_path / "s")
    ids = ds[0].tolist()
    assert ids.count(poem_tok.eod_id) == 1 and ids[-1] == poem_tok.eod_id  # only the real boundary
    assert poem_tok.token_to_id("<|user|>") not in ids
    assert poem_tok.decode(ids[:-1]) == text
    assert not poem_tok.hf.encode_special_tokens  # the caller's tokenizer is unchanged


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(docs=st.lists(st.text(min_size=1, max_size=40).filter(str.strip), min_size=1, max_size=4))
def test_any_unicode_round_trips_through_jsonl(tmp_path, poem_tok, docs):
    src = tmp_path / "h.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    preprocess([str(src)], poem_tok, tmp_path / "h")
    assert _docs(IndexedDataset(tmp_path / "h"), poem_tok) == docs


def test_cli_subprocess_shows_progress_with_throughput(tmp_path, poem_tok):
    poem_tok.save(tmp_path / "tok")
    with open(tmp_path / "p.jsonl", "w", encoding="utf-8") as f:
        for d in POEMS:
            f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
    r = subprocess.run([sys.executable, "-m", "mtnlg", "preprocess", "--input", str(tmp_path / "p.jsonl"),
                        "--tokenizer", str(tmp_path / "tok"), "--output", str(tmp_path / "o"), "--workers", "2"],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert "tokenizing" in r.stderr and "B/s" in r.stderr  # the bar reports bytes per second
    assert f"{len(POEMS)} documents" in r.stdout and "MB/s" in r.stdout
    assert len(IndexedDataset(tmp_path / "o")) == len(POEMS)


def test_hostile_inputs_give_one_line_errors_and_leave_nothing_behind(tmp_path, poem_tok, capsys):
    deep = tmp_path / "deep.jsonl"
    deep.write_text('{"text": "好"}\n' + "[" * 200_000 + "\n")
    stats = preprocess([str(deep)], poem_tok, tmp_path / "ok", on_error="skip")
    assert stats.documents == 1 and stats.bad_lines == 1 and "nested too deeply" in str(stats.errors[0])
    with pytest.raises(DataError, match="deep.jsonl:2: invalid JSON"):
        preprocess([str(deep)], poem_tok, tmp_path / "ok2", on_error="fail")
    (tmp_path / "d.bin").mkdir()
    with pytest.raises(DataError, match=r"d\.bin is a directory"):
        preprocess([str(deep)], poem_tok, tmp_path / "d")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(DataError, match="afile is a file"):
        preprocess([str(deep)], poem_tok, tmp_path / "afile" / "p")
    poem_tok.save(tmp_path / "tok")
    assert main(["tokenizer", "train", "--input", str(deep), "--vocab-size", "300", "--output",
                 str(tmp_path / "afile")]) == 2
    assert "afile is an existing file" in capsys.readouterr().err
    assert not [p for p in tmp_path.rglob("*.tmp")]  # no temporary files left behind


def test_huge_documents_are_encoded_in_pieces_exactly(tmp_path, poem_tok):
    from mtnlg.data.preprocess import split_document

    text = "\n".join(POEMS * 4) + " and some english words here" * 2000
    pieces = split_document(text, 1000)
    assert "".join(pieces) == text and len(pieces) > 100 and max(map(len, pieces)) <= 2000
    assert [t for p in pieces for t in poem_tok.encode(p)] == poem_tok.encode(text)  # the cuts change nothing
    assert split_document("春" * 5000, 1000) == ["春" * 1000] * 5  # no place to cut: cut anyway, bounded
    src = tmp_path / "big.jsonl"
    src.write_text(json.dumps({"text": text}, ensure_ascii=False) + "\n" + json.dumps({"text": "短"}) + "\n")
    preprocess([str(src)], poem_tok, tmp_path / "big")
    ds = IndexedDataset(tmp_path / "big")
    assert len(ds) == 2 and ds[0].tolist() == poem_tok.encode(text) + [poem_tok.eod_id]
