"""Supervised fine-tuning: the loss mask, the conversation data, a tiny run that learns and loads like any run."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mtnlg.config import Config, ModelConfig, SftConfig
from mtnlg.data.tokenizer import END_OF_TURN, byte_tokenizer
from mtnlg.errors import ConfigError, DataError
from mtnlg.infer.poem_form import is_poem_form
from mtnlg.data.chat_template import ChatTemplate
from mtnlg.model.init import build_model, materialize
from mtnlg import checkpoint as ckpt
from mtnlg.train.optim import build_optimizer
from mtnlg.train.sft import (SftExample, collate, encode_examples, finetune, length_bucketed, masked_loss,
                             replay_examples, sft_stage)
from mtnlg.train.sft_data import load_conversations, parse_poem_document, poem_conversations, write_conversations

POEMS = ["《静夜思》\n作者：李白\n床前明月光，疑是地上霜。\n举头望明月，低头思故乡。",
         "《春晓》\n作者：孟浩然\n春眠不觉晓，处处闻啼鸟。\n夜来风雨声，花落知多少。",
         "《登鹳雀楼》\n作者：王之涣\n白日依山尽，黄河入海流。\n欲穷千里目，更上一层楼。",
         "《鹿柴》\n作者：王维\n空山不见人，但闻人语响。\n返景入深林，复照青苔上。"]


def _conversations(n_per_poem: int = 2):
    poems = [parse_poem_document(d) for d in POEMS]
    return poem_conversations(poems, per_poem=n_per_poem, seed=0)


def test_loss_mask_covers_exactly_the_assistant_replies_and_their_end():
    tok = byte_tokenizer()
    conv = [{"role": "system", "content": "你是诗人"}, {"role": "user", "content": "写一首关于月亮的诗"},
            {"role": "assistant", "content": "床前明月光，疑是地上霜。"}, {"role": "user", "content": "再来一首"},
            {"role": "assistant", "content": "春眠不觉晓，处处闻啼鸟。"}]
    short = [{"role": "user", "content": "嗨"}, {"role": "assistant", "content": "好"}]
    examples = encode_examples([conv, short], ChatTemplate(tok), max_len=512)
    x, y, m = collate(examples, tok.pad_id)
    end = tok.token_to_id(END_OF_TURN)
    learned = y[0][m[0]].tolist()
    first = tok.encode("床前明月光，疑是地上霜。") + [end]
    second = tok.encode("春眠不觉晓，处处闻啼鸟。") + [end]
    assert learned == first + second  # nothing of the system or user turns, no role marker
    assert y[1][m[1]].tolist() == tok.encode("好") + [end]
    assert not m[1][len(examples[1].ids) - 1:].any()  # the padding of the short row is never learned
    assert torch.equal(x[0, 1:], y[0, :-1])  # targets are the inputs shifted by one


def test_masked_loss_is_the_cross_entropy_of_assistant_positions_only(tiny_cfg):
    tok = byte_tokenizer()
    cfg = ModelConfig(**{**tiny_cfg.__dict__, "vocab_size": tok.vocab_size, "max_seq_len": 128})
    model = materialize(build_model(cfg), seed=0).eval()
    x, y, m = collate(encode_examples(_conversations(1)[:3], ChatTemplate(tok), 128), tok.pad_id)
    with torch.no_grad():
        got = masked_loss(model, x, y, m)
        per = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="none").view(y.shape)
    assert got.item() == pytest.approx(per[m].mean().item(), rel=1e-6)
    assert per[~m].mean().item() != pytest.approx(got.item(), rel=1e-3)  # the mask matters


def test_length_bucketed_batches_see_every_example_once_and_pad_less():
    import random

    rng = random.Random(0)
    examples = [SftExample([1] * n, [True] * n) for n in (rng.randint(5, 150) for _ in range(300))]
    order = length_bucketed(examples, 16, random.Random(1))
    assert sorted(order) == list(range(300))

    def padding(idx):
        return sum(max(len(examples[j].ids) for j in b) * len(b) - sum(len(examples[j].ids) for j in b)
                   for b in (idx[k:k + 16] for k in range(0, len(idx), 16)))

    plain = list(range(300))
    random.Random(1).shuffle(plain)
    assert padding(order) < 0.3 * padding(plain)


def test_built_in_conversations_answer_requests_with_whole_poems():
    doc = "《感遇・其一》\n作者：张九龄\n兰叶春葳蕤，桂华秋皎洁。\n欣欣此生意，自尔为佳节。"
    poem = parse_poem_document(doc)
    assert poem.title == "感遇" and poem.lines[0] == "兰叶春葳蕤，" and "春天" in poem.topics()
    assert parse_poem_document("兰叶春葳蕤，桂华秋皎洁。\n欣欣此生意，自尔为佳节。\n——张九龄《感遇・其一》") == poem
    assert parse_poem_document("《杂诗》\n作者：某\n长短不齐的句子，不是诗。") is None
    poems = [parse_poem_document(d) for d in POEMS]
    convs = poem_conversations(poems, per_poem=3, multi_turn=0.5, system=0.5, seed=0)
    assert len(convs) == 12 and any(len(c) > 3 for c in convs) and any(c[0]["role"] == "system" for c in convs)
    assert convs == poem_conversations(poems, per_poem=3, multi_turn=0.5, system=0.5, seed=0)  # deterministic
    for most in (1, 3):  # multi_turn=1: every conversation goes on, to exactly max_turns exchanges
        always = poem_conversations(poems, per_poem=2, multi_turn=1.0, system=0.0, seed=0, max_turns=most)
        assert {sum(m["role"] == "user" for m in c) for c in always} == {most}
    texts = [p.text() for p in poems]
    for conv in convs:
        roles = [m["role"] for m in conv if m["role"] != "system"]
        assert roles == ["user", "assistant"] * (len(roles) // 2)
        for m in conv:
            if m["role"] == "assistant":
                assert is_poem_form(m["content"]) and m["content"] in texts
    asks = [c[1 if c[0]["role"] == "system" else 0]["content"] for c in convs]
    assert any("写一首关于" in a for a in asks)


def test_corpus_conversations_are_regular_poems():
    pytest.importorskip("yaml")
    from mtnlg.data.corpora import fortunes_dir

    if fortunes_dir() is None:
        pytest.skip("fortunes-zh is not installed")
    convs = poem_conversations(seed=0)
    assert len(convs) > 500
    replies = [m["content"] for c in convs for m in c if m["role"] == "assistant"]
    assert all(is_poem_form(r) for r in replies)


def test_jsonl_round_trip_and_errors_name_the_line(tmp_path):
    convs = _conversations(1)
    path = write_conversations(convs, tmp_path / "c.jsonl")
    assert load_conversations(path) == convs
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": convs[0]}, ensure_ascii=False) + "\n{oops\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        load_conversations(bad)
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(DataError, match=r":1: the conversation has no assistant message"):
        load_conversations(bad)
    bad.write_text(json.dumps({"messages": [{"role": "robot", "content": "hi"}]}) + "\n")
    with pytest.raises(DataError, match=r":1: messages\[0\].role must be one of"):
        load_conversations(bad)
    with pytest.raises(DataError, match="no such file"):
        load_conversations(tmp_path / "missing.jsonl")
    with pytest.raises(ConfigError, match="sft.steps"):
        Config.load(overrides=["--sft.steps=0"])


def _source_run(root: Path) -> Path:
    """A 'trained' run as `mtnlg train` leaves it: config.yaml, tokenizer/, checkpoints/step_5."""
    tok = byte_tokenizer()
    cfg = Config.load(overrides=[f"--model.vocab_size={tok.vocab_size}", "--model.hidden_size=64", "--model.num_layers=2",
                                 "--model.num_heads=4", "--model.ffn_hidden_size=128", "--model.max_seq_len=192",
                                 "--train.seq_len=64", "--checkpoint.keep=1"])
    run = root / "run"
    run.mkdir()
    cfg.save(run / "config.yaml")
    tok.save(run / "tokenizer")
    model = materialize(build_model(cfg.model), seed=0)
    ckpt.save_checkpoint(run / "checkpoints", 5, [model], [build_optimizer([model], cfg.train)], {"step": 5},
                         keep=1, config=cfg, tokenizer_dir=run / "tokenizer")
    return run


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    run = _source_run(root)
    sft = SftConfig(steps=30, batch_size=8, lr=3e-3, warmup_steps=2, seq_len=160, replay=0.0)
    result = finetune(run, root / "chat", sft, conversations=_conversations(4))
    return run, root / "chat", result


def test_tiny_sft_lowers_the_assistant_loss_and_writes_a_loadable_run(tuned):
    from mtnlg.api import MegatronLmModel

    run, out, result = tuned
    assert result.loss_after < result.loss_before - 0.5, result
    assert result.checkpoint == out / "checkpoints" / "step_00000035"  # after the source's step 5
    assert (out / "config.yaml").is_file() and (out / "tokenizer").is_dir()
    record = json.loads((out / "sft.json").read_text())
    assert record["assistant_loss_after"] == result.loss_after and record["steps"] == 30
    lm = MegatronLmModel.from_pretrained(out)
    before = MegatronLmModel.from_pretrained(run)
    assert not torch.equal(lm.model.tok_embeddings.weight, before.model.tok_embeddings.weight)
    # the loaded model is the fine-tuned one: its assistant loss is the one finetune measured at the end
    from mtnlg.train.sft import assistant_loss

    examples = encode_examples(_conversations(4), ChatTemplate(lm.tokenizer), 161)
    assert assistant_loss(lm.model, examples, lm.tokenizer.pad_id, torch.device("cpu")) < result.loss_before - 0.5
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        finetune(run, out, SftConfig(steps=1), conversations=_conversations(1))
    # a fine-tuning that fails (bad data, too few conversations) leaves no output directory behind
    with pytest.raises(DataError, match="no such file"):
        finetune(run, out.parent / "bad", SftConfig(steps=1, data=str(out.parent / "missing.jsonl")))
    with pytest.raises(DataError, match="SFT needs at least 2"):
        finetune(run, out.parent / "bad", SftConfig(steps=1), conversations=_conversations(1)[:1])
    assert not (out.parent / "bad").exists()


def test_mtnlg_chat_answers_from_the_sft_run(tuned, monkeypatch, capsys):
    from mtnlg.cli import main

    _, out, _ = tuned
    monkeypatch.setattr(sys, "stdin", io.StringIO("写一首关于月亮的诗\n"))
    assert main(["chat", "--checkpoint", str(out), "--max-new-tokens", "8", "--seed", "0"]) == 0
    assert capsys.readouterr().out.strip()


def test_sft_cli_and_the_stage_in_the_same_run(tmp_path):
    from mtnlg.cli import main

    run = _source_run(tmp_path)
    data = write_conversations(_conversations(1), tmp_path / "c.jsonl")
    assert main(["sft", "--checkpoint", str(run), "--data", str(data), "--output", str(tmp_path / "out"),
                 "--sft.steps=2", "--sft.batch_size=2", "--device", "cpu"]) == 0
    assert ckpt.find_checkpoint(tmp_path / "out").name == "step_00000007"
    assert main(["sft", "--checkpoint", str(run)]) == 2  # no --output: one-line error
    # the stage of `mtnlg train`: into the run itself, newest checkpoint; a second call does nothing
    cfg = Config.load(run / "config.yaml", [f"--sft.data={data}", "--sft.steps=2", "--sft.batch_size=2"])
    first = sft_stage(cfg, run)
    assert first is not None and ckpt.find_checkpoint(run) == first.checkpoint == run / "checkpoints" / "step_00000007"
    assert sft_stage(cfg, run) is None
    # pretraining asked to go on resumes from the SFT model's pretraining source, not from the tuned weights
    from mtnlg.train.loop import pretraining_checkpoint

    root = run / "checkpoints"
    assert pretraining_checkpoint(root / "step_00000007", root, steps=5) == root / "step_00000007"  # done: the SFT model
    assert pretraining_checkpoint(root / "step_00000007", root, steps=10) == root / "step_00000005"
    assert pretraining_checkpoint(root / "step_00000005", root, steps=10) == root / "step_00000005"
    import shutil

    shutil.rmtree(root / "step_00000005")
    with pytest.raises(ConfigError, match="step_00000005 is not found"):
        pretraining_checkpoint(root / "step_00000007", root, steps=10)


def test_replay_rows_are_whole_pieces_of_the_runs_training_split_and_all_learned():
    pytest.importorskip("mtnlg.data.corpora").fortunes_dir() or pytest.skip("fortunes-zh is not installed")
    from mtnlg.data.datasets import corpus_splits

    tok = byte_tokenizer()
    cfg = Config.load(overrides=["--data.corpus=poems"])
    rows = replay_examples(cfg, tok, 65, seed=0)
    splits = corpus_splits("poems", cfg.data.split, cfg.data.seed)["poems"]
    train = "\x00".join(splits["train"]).encode()
    held = [d.encode() for d in splits["valid"] + splits["test"]]
    assert rows and all(1 < len(r.ids) <= 65 and all(r.mask) and len(r.mask) == len(r.ids) for r in rows)
    total = sum(len(tok.encode(d)) + 1 for d in splits["train"])  # every token once (a lone last token has
    assert 0 <= total - sum(len(r.ids) for r in rows) <= len(splits["train"])  # nothing to learn: dropped)
    for r in rows[:50]:
        piece = bytes(b for i in r.ids if i != tok.eod_id for b in tok.token_bytes(i))
        assert piece in train and not any(len(piece) > 20 and piece in h for h in held)
    assert replay_examples(Config.load(overrides=["--data.paths=['x']"]), tok, 65, seed=0) == []
