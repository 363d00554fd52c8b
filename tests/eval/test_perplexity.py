"""``mtnlg eval``: perplexity = exp(mean token loss) and bits per byte, checked against an independent loop."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from mtnlg.api import MegatronLmModel, MegatronModelConfig
from mtnlg.cli import main
from mtnlg.config import Config
from mtnlg.data.tokenizer import byte_tokenizer

DOCS = ["the quick brown fox jumps over the lazy dog", "pack my box with five dozen liquor jugs",
        "how vexingly quick daft zebras jump", "sphinx of black quartz, judge my vow"] * 3


@pytest.fixture
def model_dir(tmp_path):
    cfg = MegatronModelConfig(vocab_size=263, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=64, max_position_embeddings=64)
    MegatronLmModel(cfg).materialize(seed=11).save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def independent_loss(model: MegatronLmModel, stream: list[int], seq_len: int) -> tuple[list[float], list[int]]:
    """Per-token NLLs and target ids of every token after the first (the last window may be shorter),
    window by window, through the public API's forward."""
    losses, targets = [], []
    for k in range(0, len(stream) - 1, seq_len):
        x = torch.tensor(stream[k:k + seq_len + 1])
        with torch.no_grad():
            logp = F.log_softmax(model(x[:-1])[0], dim=-1)
        for pos, t in enumerate(x[1:].tolist()):
            losses.append(-float(logp[pos, t]))
            targets.append(t)
    return losses, targets


def test_perplexity_of_a_prefix_equals_exp_mean_loss(tmp_path, model_dir, capsys):
    from mtnlg.data.preprocess import preprocess

    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    tok = byte_tokenizer()
    preprocess([str(tmp_path / "docs.jsonl")], tok, tmp_path / "tokens")
    seq_len = 16
    rc = main(["eval", "--checkpoint", str(model_dir), "--data", str(tmp_path / "tokens"), "--json",
               "--batch-size", "3", f"--train.seq_len={seq_len}"])
    assert rc == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    stream = [t for d in DOCS for t in [*tok.encode(d), tok.eod_id]]  # documents back to back, each + EOD
    losses, targets = independent_loss(MegatronLmModel.from_pretrained(model_dir), stream, seq_len)
    mean = sum(losses) / len(losses)
    assert got["tokens"] == len(losses)
    assert got["loss"] == pytest.approx(mean, rel=1e-6)
    assert got["perplexity"] == pytest.approx(math.exp(mean), rel=1e-6)
    # ASCII text, byte tokenizer: every target is one byte except the EOD separators (0 bytes)
    text_bytes = sum(1 for t in targets if t != tok.eod_id)
    assert got["bytes"] == text_bytes
    assert got["bits_per_byte"] == pytest.approx(sum(losses) / math.log(2) / text_bytes, rel=1e-6)


def test_overlapping_eval_scores_every_token_once_with_its_context(tmp_path, model_dir, capsys):
    """--context C: windows of seq_len advance by seq_len - C; each target is scored once, in the window
    where it has the most text before it (at least C tokens, but for the first C targets)."""
    from mtnlg.data.preprocess import preprocess

    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    tok = byte_tokenizer()
    preprocess([str(tmp_path / "docs.jsonl")], tok, tmp_path / "tokens")
    seq_len, context = 16, 6
    args = ["eval", "--checkpoint", str(model_dir), "--data", str(tmp_path / "tokens"), "--json", "--batch-size", "3",
            f"--train.seq_len={seq_len}"]
    assert main([*args, "--context", str(context)]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    model = MegatronLmModel.from_pretrained(model_dir)
    stream = [t for d in DOCS for t in [*tok.encode(d), tok.eod_id]]
    losses = []
    for i in range(1, len(stream)):  # target i, predicted from the window that gives it the most context
        k = ((i - 1) // (seq_len - context)) * (seq_len - context)  # first target index (0-based) of its window
        start = max(0, k - context)
        assert i - 1 - start >= min(context, i - 1) and i - start <= seq_len
        x = torch.tensor(stream[start:i + 1])
        with torch.no_grad():
            logp = F.log_softmax(model(x[:-1])[0], dim=-1)
        losses.append(-float(logp[-1, stream[i]]))
    assert got["tokens"] == len(stream) - 1 and got["context"] == context
    assert got["loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-6)
    assert main([*args]) == 0
    disjoint = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert disjoint["tokens"] == got["tokens"] and disjoint["loss"] != pytest.approx(got["loss"], rel=1e-6)
    assert main([*args, "--context", str(seq_len)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--context must be in [0, 16)" in err


def test_split_eval_scores_every_token_of_the_split_once(tmp_path, model_dir, monkeypatch, capsys):
    """--split valid evaluates build_datasets(cfg)[split] whole: each target token exactly once."""
    monkeypatch.setenv("MTNLG_CACHE", str(tmp_path / "cache"))
    from mtnlg.data.datasets import build_datasets

    seq_len, over = 48, ["--train.seq_len=48", "--data.corpus=poems"]
    rc = main(["eval", "--checkpoint", str(model_dir), "--split", "valid", "--json", *over])
    assert rc == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    model = MegatronLmModel.from_pretrained(model_dir)
    valid = build_datasets(Config.load(None, over), model.tokenizer)["valid"]
    stream = valid.stream().tolist()
    losses, targets = independent_loss(model, stream, seq_len)
    assert got["split"] == "valid" and got["tokens"] == len(stream) - 1 == len(losses)
    assert got["loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-6)
    # the characters of the split's text, less the first one (its first byte is no target)
    chars = len(model.tokenizer.decode([t for t in stream if t != model.tokenizer.eod_id])) - 1
    assert got["chars"] == chars and got["bits_per_char"] == pytest.approx(sum(losses) / math.log(2) / chars, rel=1e-6)


def test_eval_errors_are_one_line(tmp_path, model_dir, capsys):
    rc = main(["eval", "--checkpoint", str(model_dir), "--data", str(tmp_path / "missing")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "missing" in err
    assert main(["eval"]) == 2
    assert "--checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "-1"])
def test_max_samples_below_one_is_a_one_line_error(model_dir, capsys, value):
    rc = main(["eval", "--checkpoint", str(model_dir), "--max-samples", value])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "Traceback" not in err
    assert f"--max-samples must be >= 1, got {value}" in err and "data.split" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_a_gpu_names_the_option_typed(model_dir, capsys):
    rc = main(["eval", "--checkpoint", str(model_dir), "--device", "cuda"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err
    assert "--device cuda but no CUDA device is visible; use --device cpu" in err and "train.device" not in err
