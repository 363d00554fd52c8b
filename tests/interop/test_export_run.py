"""Export real training runs (``mtnlg train`` on examples/tiny.yaml), also one saved by 4 ranks under TP x FSDP.

The checkpoint is read only through ``MegatronLmModel.from_pretrained`` (DCP reshards a TP/FSDP
checkpoint into one process), so the exported model must match what mtnlg itself loads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from mtnlg.api import MegatronLmModel
from mtnlg.cli import main

transformers = pytest.importorskip("transformers")

TINY = Path(__file__).resolve().parents[2] / "examples" / "tiny.yaml"
TOL = 1e-4


def _train(out: Path, *extra: str) -> None:
    assert main(["train", "--config", str(TINY), "--output", str(out), "--no-progress", "--log.peak_tflops=1.0",
                 *extra]) == 0


def _export_and_compare(run: Path, out: Path) -> MegatronLmModel:
    assert main(["convert", "--to", "hf", "--checkpoint", str(run), "--output", str(out)]) == 0
    ours = MegatronLmModel.from_pretrained(run)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "床前明月光，疑是地上霜。\n举头望明月，低头思故乡。"
    ids = ours.tokenizer.encode(text)
    assert tok(text)["input_ids"] == ids
    x = torch.tensor([ids, ids[::-1]])
    with torch.no_grad():
        diff = (ours(x) - hf(x).logits).abs().max().item()
    assert diff <= TOL
    return ours


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("run") / "run"
    _train(run, "--train.steps=2")
    return run


def test_export_from_a_training_run(run_dir, tmp_path, capsys):
    ours = _export_and_compare(run_dir, tmp_path / "hf")
    (ckpt,) = (run_dir / "checkpoints").iterdir()
    assert main(["convert", "--to", "hf", "--checkpoint", str(ckpt), "--output", str(tmp_path / "hf2")]) == 0
    a = (tmp_path / "hf" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "hf2" / "model.safetensors").read_bytes()  # RUN dir == its newest checkpoint
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["vocab_size"] == ours.config.vocab_size == 512 and cfg["n_positions"] == 128


def test_eval_of_a_run_uses_its_config(run_dir, capsys):
    """`mtnlg eval --checkpoint RUN` reads RUN/config.yaml (seq_len 64 here) and reports exp(loss)."""
    assert main(["eval", "--checkpoint", str(run_dir), "--json"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert got["split"] == "test" and got["seq_len"] == 64
    assert got["perplexity"] == pytest.approx(2.718281828459045 ** got["loss"], rel=1e-9)
    assert 0 < got["bits_per_byte"] < 16


@pytest.mark.slow
@pytest.mark.distributed
def test_export_from_a_tp_fsdp_checkpoint(tmp_path):
    """4 gloo ranks: tensor parallel 2 x FSDP 2; each rank saves only its shards, the export is whole."""
    run = tmp_path / "tp2fsdp2"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _train(run, "--train.steps=1", "--nproc", "4", "--parallel.tp=2", "--parallel.dp_shard=2")
    (ckpt,) = (run / "checkpoints").iterdir()
    assert json.loads((ckpt / "manifest.json").read_text())["world_size"] == 4
    assert len(list(ckpt.glob("*.distcp"))) == 4
    _export_and_compare(run, tmp_path / "hf")
