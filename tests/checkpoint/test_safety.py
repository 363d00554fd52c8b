"""No pickle from a checkpoint is ever executed: a crafted ``.metadata``, a crafted non-tensor value
inside a ``.distcp`` shard and a crafted (legacy) trainer-state pickle must not run code, even when the
attacker also rewrites the manifest so that every checksum matches."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
import torch.distributed.checkpoint as dcp

from mtnlg import checkpoint as ckpt
from mtnlg.api import MegatronLmModel
from mtnlg.checkpoint.safe_read import dcp_load, read_metadata
from mtnlg.cli import main
from mtnlg.errors import CheckpointError

from .helpers import Evil, save_run, tiny_cfg, trained


def _reseal(path, step):
    ckpt.write_manifest(path, step, {"world_size": 1})  # the attacker ships matching hashes


def test_malicious_metadata_does_not_run(tmp_path, capsys):
    run = tmp_path / "run"
    path, _, _ = save_run(run, 3)
    marker = tmp_path / "pwned"
    md = read_metadata(path)  # legit metadata still reads
    assert "model.tok_embeddings.weight" in md.state_dict_metadata
    (path / ".metadata").write_bytes(pickle.dumps(Evil(marker)))
    _reseal(path, 3)
    with pytest.raises(CheckpointError, match="refusing to load pathlib.Path.touch|not valid checkpoint metadata"):
        MegatronLmModel.from_pretrained(run)
    cfg = tiny_cfg()
    model, opt = trained(cfg)
    with pytest.raises(CheckpointError, match=r"\.metadata"):
        ckpt.load_checkpoint(path, [model], [opt])
    rc = main(["convert", "--to", "hf", "--checkpoint", str(run), "--output", str(tmp_path / "hf")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and ".metadata" in err
    assert not marker.exists()
    # Metadata naming a storage file outside the checkpoint is refused as well.
    good, _, _ = save_run(tmp_path / "run2", 1)
    md = read_metadata(good)
    for info in md.storage_data.values():
        info.relative_path = "../../etc/passwd"
    (good / ".metadata").write_bytes(pickle.dumps(md))
    with pytest.raises(CheckpointError, match="outside the checkpoint"):
        read_metadata(good)


def test_malicious_value_in_a_shard_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    dcp.save({"optim": {"param_groups.w.lr": Evil(marker), "w": torch.ones(2)}}, checkpoint_id=str(tmp_path / "c"),
             no_dist=True)
    assert not marker.exists()
    state = {"optim": {"param_groups.w.lr": 0.0, "w": torch.zeros(2)}}
    with pytest.raises(CheckpointError, match="param_groups.w.lr.*not plain data"):
        dcp_load(state, tmp_path / "c", no_dist=True)
    assert not marker.exists()
    # plain values (what optimizers hold) still load
    dcp.save({"optim": {"param_groups.w.lr": 0.5, "param_groups.w.betas": (0.9, 0.95), "w": torch.ones(2)}},
             checkpoint_id=str(tmp_path / "ok"), no_dist=True)
    state = {"optim": {"param_groups.w.lr": 0.0, "param_groups.w.betas": (0.0, 0.0), "w": torch.zeros(2)}}
    dcp_load(state, tmp_path / "ok", no_dist=True)
    assert state["optim"]["param_groups.w.lr"] == 0.5 and torch.equal(state["optim"]["w"], torch.ones(2))


def test_trainer_state_is_json_and_a_legacy_pickle_is_never_loaded(tmp_path):
    run = tmp_path / "run"
    path, _, _ = save_run(run, 4)
    assert not list(path.glob("*.pt"))
    state = json.loads((path / "trainer_rank0.json").read_text())
    assert state["step"] == 4 and state["world_size"] == 1
    cfg = tiny_cfg()
    model, opt = trained(cfg, seed=9)
    assert ckpt.load_checkpoint(path, [model], [opt])["step"] == 4
    # An old-style (or planted) pickle instead of JSON: refused by name, never unpickled.
    marker = tmp_path / "pwned"
    (path / "trainer_rank0.json").unlink()
    torch.save({"step": Evil(marker)}, path / "trainer_rank0.pt")
    _reseal(path, 4)
    with pytest.raises(CheckpointError, match="trainer_rank0.json is missing.*pickle, which is never loaded"):
        ckpt.load_checkpoint(ckpt.find_checkpoint(run), [model], [opt])
    assert not marker.exists()
    # A crafted JSON with an unknown dtype is a clean error.
    (path / "trainer_rank0.json").write_text(json.dumps({"step": {"__tensor__": "", "dtype": "object", "shape": []}}))
    with pytest.raises(CheckpointError, match="not a valid trainer state"):
        ckpt.load_checkpoint(path, [model], [opt])
