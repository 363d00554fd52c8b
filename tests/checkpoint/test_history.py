"""Which checkpoint wins: after continuing from an older step the abandoned newer checkpoints are
moved aside (kept), so resume=auto and from_pretrained(run) pick the new history and pruning keeps
the new run's checkpoints; a missing path says it does not exist."""

from __future__ import annotations

import pytest
import torch

from mtnlg import checkpoint as ckpt
from mtnlg.api import MegatronLmModel
from mtnlg.config import CheckpointConfig
from mtnlg.errors import CheckpointError

from .helpers import save_run


def test_continuing_from_an_older_step_abandons_the_newer_ones(tmp_path):
    run = tmp_path / "run"
    root = run / "checkpoints"
    for step in (10, 20, 30):
        save_run(run, step, seed=step)
    # The user continues from step 10 (what Trainer.resume does after loading it) ...
    assert ckpt.resolve_resume(CheckpointConfig(resume=str(root / "step_00000010")), root).name == "step_00000010"
    moved = ckpt.abandon_after(root, 10)
    assert sorted(p.name for p in moved) == ["step_00000020", "step_00000030"]
    assert all((p / "manifest.json").is_file() for p in moved)  # kept, not deleted
    # ... and the new history saves 11, 12 with keep=2: its checkpoints are the ones kept and picked.
    _, m12, _ = save_run(run, 11, keep=2, seed=11)
    _, m12, _ = save_run(run, 12, keep=2, seed=12)
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [12, 11]
    assert ckpt.resolve_resume(CheckpointConfig(resume="auto"), root).name == "step_00000012"
    x = torch.tensor([[1, 2, 3]])
    loaded = MegatronLmModel.from_pretrained(run)
    assert torch.equal(loaded(x), m12(x)[..., : loaded.config.vocab_size])


def test_saving_an_older_step_also_moves_newer_ones_aside(tmp_path):
    run = tmp_path / "run"
    for step in (5, 9):
        save_run(run, step)
    save_run(run, 6)  # a run that resumed from 5 (e.g. before this fix) and saves 6
    assert [s for s, _ in ckpt.list_checkpoints(run / "checkpoints")] == [6, 5]
    assert len(list((run / "checkpoints" / "abandoned").glob("*/step_00000009"))) == 1


def test_missing_and_wrong_paths_say_what_is_wrong(tmp_path):
    for fn in (ckpt.resolve_checkpoint, ckpt.find_checkpoint, MegatronLmModel.from_pretrained):
        with pytest.raises(CheckpointError, match=r"nope does not exist$"):
            fn(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="is not a saved model"):
        ckpt.resolve_checkpoint(tmp_path / "empty")
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        ckpt.resolve_checkpoint(tmp_path / "f.txt")
    # inference errors do not suggest a training flag that inference ignores
    run = tmp_path / "run"
    path, _, _ = save_run(run, 1)
    (path / "trainer_rank0.json").write_text("{}")
    with pytest.raises(CheckpointError) as err:
        MegatronLmModel.from_pretrained(run)
    assert "fallback" not in str(err.value) and "step_N" in str(err.value)
    with pytest.raises(CheckpointError, match="checkpoint.fallback=true"):
        ckpt.resolve_resume(CheckpointConfig(resume="auto"), run / "checkpoints")


def test_api_does_not_import_the_training_package(tmp_path):
    import subprocess
    import sys

    run = tmp_path / "run"
    save_run(run, 2)
    code = ("import sys; from mtnlg.api import MegatronLmModel; MegatronLmModel.from_pretrained(sys.argv[1]); "
            "bad = [m for m in sys.modules if m.startswith('mtnlg.train')]; assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code, str(run)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
