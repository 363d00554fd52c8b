"""Prompt tuning: the loss of a tiny task falls while every base weight stays bit-identical."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from mtnlg.api import MegatronLmModel, MegatronModelConfig
from mtnlg.data.tokenizer import byte_tokenizer
from mtnlg.infer.generate import SamplingParams, generate
from mtnlg.model.prompt_tuning import SoftPrompt, load_soft_prompt, tune_prompt


def make(**kw):
    tok = byte_tokenizer()
    cfg = MegatronModelConfig(**{**dict(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                                        prompt_tuning=True, prompt_tuning_num_tokens=4, prompt_tuning_init_text="poem",
                                        init_method_std=0.3), **kw})
    return MegatronLmModel(cfg, tok).materialize(seed=0)


def test_tuning_lowers_loss_and_freezes_the_base(tmp_path):
    lm = make(prompt_tuning_lr_multiplier=2.0, prompt_tuning_update_every_n_steps=2)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    soft = SoftPrompt.from_config(lm)
    init = lm.model.tok_embeddings.weight[torch.tensor(lm.tokenizer.encode("poempoem")[:4])]
    assert torch.equal(soft.embeds.detach(), init)  # initialised from the init text's embeddings
    examples = [("", "abcabc"), ("", "abcab")]
    soft, losses = tune_prompt(lm, examples, steps=16, lr=0.05, batch_size=2, soft=soft)
    assert sum(losses[-2:]) / 2 < 0.8 * sum(losses[:2]) / 2
    for k, v in lm.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(not p.requires_grad for p in lm.model.parameters())
    path = soft.save(tmp_path / "sp.safetensors")
    assert path.stat().st_size < 10_000
    fresh = make()
    load_soft_prompt(fresh, path)
    a = fresh.generate("", max_new_tokens=6, return_full_text=False)
    b = lm.generate("", max_new_tokens=6, return_full_text=False)
    assert a == b


def test_update_every_n_steps_skips_updates():
    lm = make(prompt_tuning_update_every_n_steps=5)
    soft = SoftPrompt.from_config(lm)
    start = soft.embeds.detach().clone()
    tune_prompt(lm, [("", "xyz")], steps=4, lr=0.1, soft=soft)
    assert torch.equal(soft.embeds.detach(), start)  # 4 micro-batches < 5: no optimizer step yet
    tune_prompt(lm, [("", "xyz")], steps=5, lr=0.1, soft=soft)
    assert not torch.equal(soft.embeds.detach(), start)


def test_prefix_suffix_layout_and_generation_splice():
    lm = make(prompt_tuning_prompt_style="prefix_suffix", prompt_tuning_prompt_style_args_keys=["prefix", "suffix"],
              prompt_tuning_prompt_style_args_values=["Q:", "A:"])
    soft = SoftPrompt.from_config(lm)
    tok = lm.tokenizer
    ids, off, start = soft.layout(tok, tok.encode("hi"), tok.encode("yo"))
    assert ids == tok.encode("Q:") + [tok.pad_id] * 4 + tok.encode("hi") + tok.encode("A:") + tok.encode("yo")
    assert off == 2 and start == len(ids) - 2
    lm.soft_prompt = soft
    prompt, splice = lm.encode_prompt("hi")
    # generating with the splice == running the model on the spliced embeddings by hand
    out = generate(lm.model, [prompt], SamplingParams(max_new_tokens=1, logprobs=0), soft_prompt=splice)[0]
    with torch.no_grad():
        emb = lm.model.tok_embeddings(torch.tensor([prompt]))
        emb[0, off:off + 4] = soft.embeds
        ref = lm.model(torch.tensor([prompt]), token_embeds=emb)[0, -1, : lm.model.vocab_size]
    assert out.token_ids == [int(ref.argmax())]


def _saved(tmp_path):
    lm = make(prompt_tuning=False, prompt_tuning_num_tokens=0)
    return lm, lm.save_pretrained(tmp_path / "base")


def test_tune_prompt_command_honours_quantize_and_prompt_tuning(tmp_path, capsys):
    from mtnlg.cli import main

    _, base = _saved(tmp_path)
    data = tmp_path / "pairs.txt"
    data.write_text("ab\tcdcd\nab\tcdc\n")
    common = ["tune-prompt", "--checkpoint", str(base), "--data", str(data), "--steps", "4", "--num-tokens", "3",
              "--no-progress", "--lr", "0.1", "--style", "prepend", "--prefix", "P:", "--suffix", "S:"]
    first = tmp_path / "a.safetensors"
    assert main(common + ["--output", str(first), "--quantize"]) == 0
    a = SoftPrompt.load(first)
    assert (a.style, a.prefix, a.suffix, a.num_tokens) == ("prepend", "P:", "S:", 3)
    # --quantize really tuned over the int8 model: the same run in fp32 gives a different prompt
    fp = tmp_path / "fp.safetensors"
    assert main(common + ["--output", str(fp)]) == 0
    assert not torch.equal(SoftPrompt.load(fp).embeds, a.embeds)
    # --prompt-tuning continues from the saved prompt instead of a fresh init
    second = tmp_path / "b.safetensors"
    assert main(common + ["--output", str(second), "--quantize", "--prompt-tuning", str(first), "--steps", "1"]) == 0
    b = SoftPrompt.load(second)
    fresh_one_step = tmp_path / "c.safetensors"
    assert main(common + ["--output", str(fresh_one_step), "--quantize", "--steps", "1"]) == 0
    assert (b.embeds - a.embeds).abs().max() < (SoftPrompt.load(fresh_one_step).embeds - a.embeds).abs().max()


def test_chat_command_honours_the_soft_prompt(tmp_path, monkeypatch, capsys):
    import io

    from mtnlg.cli import main

    lm, base = _saved(tmp_path)
    soft = SoftPrompt(torch.randn(4, 32) * 3.0, "prepend", "P:", "")
    path = soft.save(tmp_path / "sp.safetensors")
    argv = ["chat", "--checkpoint", str(base), "--temperature", "0", "--max-new-tokens", "8"]

    def chat(extra):
        monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))
        assert main(argv + extra) == 0
        return capsys.readouterr().out

    plain, tuned = chat([]), chat(["--prompt-tuning", str(path)])
    assert plain != tuned
    # the chat reply is what generation with the soft prompt spliced in gives for the same conversation
    from mtnlg.data.chat_template import Conversation

    load_soft_prompt(lm, path)
    conv = Conversation(lm.tokenizer, None)
    conv.add("user", "hello")
    ids, splice = lm.with_soft_prompt(conv.prompt_ids(lm.context_budget(8)))
    assert splice is not None and ids[:4] == [lm.tokenizer.pad_id] * 4


@pytest.mark.parametrize("extra, option", [
    (["--batch-size", "0"], "--batch-size"), (["--batch-size", "-1"], "--batch-size"),
    (["--steps", "0"], "--steps"), (["--steps", "-2"], "--steps"),
    (["--num-tokens", "0"], "--num-tokens"), (["--num-tokens", "-3"], "--num-tokens"),
    (["--lr", "0"], "--lr"), (["--lr", "-0.1"], "--lr"), (["--lr", "nan"], "--lr"), (["--lr", "inf"], "--lr"),
    (["--lr-multiplier", "0"], "--lr-multiplier"), (["--update-every", "0"], "--update-every")])
def test_tune_prompt_rejects_bad_numbers_in_one_line(tmp_path, capsys, extra, option):
    from mtnlg.cli import main

    _, base = _saved(tmp_path)
    data = tmp_path / "pairs.txt"
    data.write_text("ab\tcd\n")
    out = tmp_path / "s.safetensors"
    rc = main(["tune-prompt", "--checkpoint", str(base), "--data", str(data), "--output", str(out), "--steps", "2",
               "--no-progress", *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "Traceback" not in err
    assert f"error: {option} must be" in err
    assert not out.exists()


def test_tune_prompt_uses_num_tokens_as_given(tmp_path, capsys):
    from mtnlg.cli import main

    _, base = _saved(tmp_path)
    data = tmp_path / "pairs.txt"
    data.write_text("ab\tcd\n")
    out = tmp_path / "s.safetensors"
    argv = ["tune-prompt", "--checkpoint", str(base), "--data", str(data), "--steps", "1", "--no-progress"]
    assert main(argv + ["--output", str(out), "--num-tokens", "1"]) == 0
    assert SoftPrompt.load(out).num_tokens == 1
    assert "saved 1 soft tokens" in capsys.readouterr().out
    # continuing a saved prompt with another --num-tokens is refused, not silently ignored
    rc = main(argv + ["--output", str(tmp_path / "t.safetensors"), "--prompt-tuning", str(out), "--num-tokens", "2"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "--num-tokens 2" in err


def test_tune_prompt_help_describes_the_data_formats():
    r = subprocess.run([sys.executable, "-m", "mtnlg", "tune-prompt", "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0
    assert "see above" not in r.stdout
    assert "input<TAB>target" in r.stdout and "plain line" in r.stdout and '{"input": ..., "target": ...}' in r.stdout
