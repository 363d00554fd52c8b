"""``mtnlg train`` end to end on examples/tiny.yaml: run dir, metrics, plots, exact resume after a
signal or a crash, checkpoint corruption, the NaN guard and loading a run for inference.

One uninterrupted 20-step run (module fixture) is the reference every other run is compared to.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

from mtnlg.cli import main
from mtnlg.config import Config
from mtnlg.errors import MtnlgError
from mtnlg.train.metrics import read_metrics

TINY = Path(__file__).resolve().parents[2] / "examples" / "tiny.yaml"
FAST = ["--log.peak_tflops=1.0"]  # skip the matmul microbenchmark


def _train(out: Path, *extra: str) -> int:
    return main(["train", "--config", str(TINY), "--output", str(out), "--no-progress", *FAST, *extra])


def _curve(run: Path, split: str = "train") -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if r["split"] == split}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("train") / "full"
    assert _train(run) == 0
    return run


def test_run_directory_metrics_and_plots(full_run, tmp_path, capsys):
    assert Config.load(full_run / "config.yaml").train.steps == 20
    assert (full_run / "tokenizer" / "tokenizer.json").is_file()
    assert sorted(p.name for p in (full_run / "checkpoints").iterdir()) == ["step_00000010", "step_00000020"]
    records = read_metrics(full_run / "metrics.jsonl")
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 21))
    for r in train:
        for key in ("loss", "ppl", "lr", "grad_norm", "tokens_per_s", "tflops", "mfu", "mem_mb"):
            assert isinstance(r[key], float) and r[key] > 0, key
        assert isinstance(r["comm_bytes"], dict) and r["skipped"] is False
    assert train[-1]["loss"] < train[0]["loss"] - 0.5  # it learns
    # every 10th step trains on sequences of model.max_seq_len (128): 4 of them, the same 512 tokens as 8 of 64
    assert [(r["seq_len"], r["batch_size"]) for r in train] == ([(64, 8)] * 9 + [(128, 4)]) * 2
    assert [r["tokens"] for r in train] == [512 * s for s in range(1, 21)]
    assert [r["step"] for r in records if r["split"] == "valid"] == [10, 20]
    (test,) = [r for r in records if r["split"] == "test"]
    assert test["step"] == 20 and test["ppl"] == pytest.approx(2.718281828 ** test["loss"], rel=1e-6)
    # TensorBoard events hold the same scalars.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(full_run / "tb"))
    acc.Reload()
    tb = [e.value for e in acc.Scalars("train/loss")]
    assert tb == pytest.approx([r["loss"] for r in train], rel=1e-6)
    assert "valid/loss" in acc.Tags()["scalars"]
    # Plots: written by the run, and again by `mtnlg plot`.
    assert (full_run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plot", str(full_run), "--output", str(tmp_path)]) == 0
    for name in ("loss.png", "throughput.png"):
        assert (tmp_path / name).stat().st_size > 1000


def test_train_and_eval_report_the_same_test_loss(full_run, capsys):
    """The loop's final test loss and `mtnlg eval --split test` score the same tokens of the same checkpoint."""
    (test,) = [r for r in read_metrics(full_run / "metrics.jsonl") if r["split"] == "test"]
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(full_run), "--split", "test", "--json"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert got["tokens"] == test["tokens"]
    assert got["loss"] == pytest.approx(test["loss"], rel=1e-5)


def test_quality_report_scores_the_test_split_as_eval_does(full_run, capsys):
    """benchmarks/quality.py's model figures: disjoint windows = `mtnlg eval --split test`, with context =
    `mtnlg eval --context seq_len/2`; the n-gram and unigram on the same documents."""
    from mtnlg.eval.quality import quality_report

    report = quality_report(full_run, num_poems=2, orders=(2,))
    row = report["bits_per_char"]["all"]
    context = report["eval_context"]
    assert context == 32
    capsys.readouterr()
    for flag, key in (([], "model_disjoint"), (["--context", str(context)], "model")):
        assert main(["eval", "--checkpoint", str(full_run), "--split", "test", "--json", *flag]) == 0
        got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert row[key] == pytest.approx(got["bits_per_char"], rel=1e-6)
    assert row["model"] != pytest.approx(row["model_disjoint"], rel=1e-6)
    assert row["unigram"] > row["ngram"] > 0 and report["poems"]["n"] == 2


def test_resume_after_sigterm_is_bit_exact(full_run, tmp_path):
    """SIGTERM at step 7 saves a checkpoint and stops; resuming gives exactly the uninterrupted curve."""
    from mtnlg.train.loop import Trainer

    run = tmp_path / "run"
    cfg = Config.load(TINY, FAST)

    def kill_at_7(record):
        if record["split"] == "train" and record["step"] == 7:
            os.kill(os.getpid(), signal.SIGTERM)

    result = Trainer(cfg, run, on_record=kill_at_7).fit()
    assert result.status == "interrupted" and result.step == 7
    assert (run / "checkpoints" / "step_00000007" / "manifest.json").is_file()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handler restored
    assert _train(run) == 0  # checkpoint.resume=auto
    assert _curve(run) == _curve(full_run)  # exactly equal floats, every step
    assert _curve(run, "valid") == _curve(full_run, "valid")
    assert _curve(run, "test") == _curve(full_run, "test")


def test_resume_after_crash_from_last_interval_checkpoint(full_run, tmp_path):
    """A run killed hard after step 14 (newest checkpoint: step 10, a half-written temp dir left
    behind) resumes from step 10, drops the orphaned metrics and reproduces steps 11-20 exactly."""
    run = tmp_path / "crashed"
    shutil.copytree(full_run, run)
    shutil.rmtree(run / "checkpoints" / "step_00000020")
    (run / "checkpoints" / ".step_00000020.tmp-dead").mkdir()
    lines = (run / "metrics.jsonl").read_text().splitlines()
    kept = [x for x in lines if json.loads(x)["step"] <= 14 and json.loads(x)["split"] == "train"]
    (run / "metrics.jsonl").write_text("\n".join(kept) + '\n{"step": 15, "spl')  # torn last line
    assert _train(run) == 0
    assert _curve(run) == _curve(full_run)
    assert not list((run / "checkpoints").glob(".*"))


def test_corrupt_checkpoint_is_named_and_fallback_is_opt_in(full_run, tmp_path, capsys):
    run = tmp_path / "corrupt"
    shutil.copytree(full_run, run)
    shard = next((run / "checkpoints" / "step_00000020").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated
    assert _train(run, "--train.steps=21") == 2
    err = capsys.readouterr().err
    assert "truncated" in err and shard.name in err and "checkpoint.fallback" in err
    assert _train(run, "--train.steps=21", "--checkpoint.fallback=true") == 0  # resumes from step 10
    assert max(_curve(run)) == 21


def test_nan_guard_skips_then_aborts(tmp_path):
    from mtnlg.train.loop import Trainer

    cfg = Config.load(TINY, FAST + ["--train.steps=6", "--train.max_bad_steps=3"])
    trainer = Trainer(cfg, tmp_path / "skip")
    p = dict(trainer.model_parts[0].named_parameters())["layers.0.mlp.fc1.weight"]
    p.register_hook(lambda g: g * float("nan") if trainer.step == 2 else g)  # poison step 3's gradients
    before = {}

    def snapshot(record):
        if record["split"] == "train" and record["step"] == 2:
            before.update({n: q.detach().clone() for n, q in trainer.model_parts[0].named_parameters()})
        if record["split"] == "train" and record["step"] == 3:
            for n, q in trainer.model_parts[0].named_parameters():
                assert torch.equal(q, before[n]), f"{n} changed on a skipped step"

    trainer.on_record = snapshot
    result = trainer.fit()
    assert result.status == "finished" and result.skipped_steps == 1
    recs = {r["step"]: r for r in read_metrics(tmp_path / "skip" / "metrics.jsonl") if r["split"] == "train"}
    assert recs[3]["skipped"] is True and recs[4]["skipped"] is False and recs[6]["skipped_steps"] == 1
    assert all(torch.isfinite(q).all() for q in trainer.model_parts[0].parameters())

    trainer = Trainer(cfg, tmp_path / "abort")
    p = dict(trainer.model_parts[0].named_parameters())["layers.0.mlp.fc1.weight"]
    p.register_hook(lambda g: g * float("nan"))
    with pytest.raises(MtnlgError, match="3 steps in a row.*max_bad_steps=3"):
        trainer.fit()
    assert not (tmp_path / "abort" / "checkpoints").exists() or not any((tmp_path / "abort" / "checkpoints").iterdir())


def test_from_pretrained_loads_the_run(full_run):
    from mtnlg.api import MegatronLmModel
    from mtnlg.checkpoint import load_for_inference

    model = MegatronLmModel.from_pretrained(full_run)
    _, state, tok = load_for_inference(full_run / "checkpoints" / "step_00000020")
    ids = tok.encode("床前明月光")
    logits = model(ids)
    assert logits.shape == (1, len(ids), tok.vocab_size) and torch.isfinite(logits).all()
    assert torch.equal(model.model.layers["1"].mlp.fc2.weight, state["layers.1.mlp.fc2.weight"])
    text = model.generate("床前", max_new_tokens=5, seed=0)
    assert text.startswith("床前")


def test_bad_override_is_one_line_error(capsys):
    assert main(["train", "--train.stepz=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "train.steps" in err and "\n" not in err


def test_a_run_refused_before_its_first_step_leaves_no_directory(tmp_path, capsys):
    assert _train(tmp_path / "bad", "--train.global_batch_size=7") == 2  # 7 is not a multiple of the micro-batch
    assert "global_batch_size=7" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert _train(tmp_path / "new" / "run", "--train.global_batch_size=7") == 2  # runs/<time> with runs/ new
    assert not (tmp_path / "new").exists()
    (tmp_path / "kept").mkdir()  # a directory that was there before is the user's: left as it was
    assert _train(tmp_path / "kept", "--train.global_batch_size=7") == 2 and (tmp_path / "kept").is_dir()


@pytest.mark.slow
@pytest.mark.distributed
def test_resume_tp2_checkpoint_in_one_process(full_run, tmp_path):
    """10 steps with 2 gloo ranks in tensor parallelism (``--nproc 2``), then 10 more in one process:
    the whole curve matches the single-process run within 1e-5 relative."""
    run = tmp_path / "tp2"
    schedule = "--train.lr_decay_steps=20"  # the 20-step run's schedule, stopped after 10 steps
    assert _train(run, "--nproc", "2", "--parallel.tp=2", "--train.steps=10", schedule) == 0
    manifest = json.loads((run / "checkpoints" / "step_00000010" / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    assert _train(run, schedule) == 0
    got, want = _curve(run), _curve(full_run)
    assert sorted(got) == sorted(want)
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5), step
    for split in ("valid", "test"):
        for step, loss in _curve(full_run, split).items():
            assert _curve(run, split)[step] == pytest.approx(loss, rel=1e-5)


def test_batch_ramp_in_the_loop(tmp_path):
    """4 -> 8 sequences after 1024 tokens (16 samples of 64): four steps of 4, then 8."""
    ramp = ["--train.steps=6", "--train.rampup_batch_start=4", "--train.rampup_batch_increment=4",
            "--train.rampup_tokens=1024", "--log.tensorboard=false"]
    assert _train(tmp_path / "ramp", *ramp) == 0
    train = [r for r in read_metrics(tmp_path / "ramp" / "metrics.jsonl") if r["split"] == "train"]
    assert [r["batch_size"] for r in train] == [4, 4, 4, 4, 8, 8]
    assert [r["tokens"] for r in train] == [256, 512, 768, 1024, 1536, 2048]


def test_a_long_step_that_cannot_keep_the_tokens_reads_one_sequence(tmp_path):
    """One sequence of 64 a step, every 2nd step one of 128 (twice the tokens: a long step packs at least
    one sequence); the token count and the sampler follow what was read."""
    args = ["--train.steps=4", "--train.global_batch_size=1", "--train.micro_batch_size=1",
            "--train.long_seq_every=2", "--log.tensorboard=false", "--checkpoint.interval=0"]
    assert _train(tmp_path / "one", *args) == 0
    train = [r for r in read_metrics(tmp_path / "one" / "metrics.jsonl") if r["split"] == "train"]
    assert [(r["seq_len"], r["batch_size"]) for r in train] == [(64, 1), (128, 1)] * 2
    assert [r["tokens"] for r in train] == [64, 192, 256, 384]
