"""A layout that cannot work fails before any process starts: one line naming the field, exit 2."""

from __future__ import annotations

import pytest

from mtnlg.cli import main


@pytest.mark.parametrize("args, field", [
    (["--parallel.tp=3", "--model.num_heads=4"], "model.num_heads=4 is not divisible by parallel.tp=3"),
    (["--parallel.tp=3", "--model.num_heads=6", "--model.hidden_size=384", "--model.ffn_hidden_size=1536"],
     "train.seq_len=128 is not divisible by parallel.tp=3"),
    (["--parallel.tp=2"], "world size 3 is not divisible by parallel.dp_replicate*tp*pp"),
])
def test_bad_layout_is_one_line_before_launch(args, field, capsys, tmp_path):
    assert main(["train", "--nproc", "3", "--output", str(tmp_path / "run"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert field in err and "\n" not in err
    assert not (tmp_path / "run").exists()  # nothing was launched
