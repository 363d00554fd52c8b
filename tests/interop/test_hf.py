"""Hugging Face export / import: logits parity in fp32 (<= 1e-4; in practice exactly 0) and tokenizer equality.

Nothing is downloaded: the GPT-2 models are built locally with random weights by ``transformers``.
"""

from __future__ import annotations

import json

import pytest
import torch

from mtnlg.api import MegatronLmModel, MegatronModelConfig
from mtnlg.cli import main
from mtnlg.config import ModelConfig
from mtnlg.data.tokenizer import EOD, PAD, Tokenizer, byte_tokenizer, train_bpe
from mtnlg.errors import CheckpointError
from mtnlg.model.init import build_model, materialize

transformers = pytest.importorskip("transformers")

TOL = 1e-4  # fp32; the mapping is a pure permutation/transposition, so the difference is ~0
TEXTS = ["床前明月光，疑是地上霜。举头望明月，低头思故乡。", "Hello world, hello tokenizer!  spaces\tand\nlines",
         f"special {EOD} and {PAD} <|user|>hi<|end|>", "", "  leading spaces", "emoji 🙂 and bytes \x00\x7f"]


def tiny_config(activation: str = "gelu", vocab_size: int = 300) -> MegatronModelConfig:
    return MegatronModelConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=48, max_position_embeddings=40, layernorm_eps=1e-6,
                               activation_function=activation)


def perturbed(model: MegatronLmModel, seed: int = 0) -> MegatronLmModel:
    """Random biases and LayerNorm affines too (the init leaves them 0/1, which would hide layout bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.model.named_parameters():
            if name.endswith("bias") or ".ln_" in name or name.startswith("norm."):
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def hf_logits(directory, ids: torch.Tensor) -> torch.Tensor:
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(ids).logits


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu"])
def test_export_logits_parity(tmp_path, activation):
    model = perturbed(MegatronLmModel(tiny_config(activation)).materialize(seed=3))
    model.save_pretrained(tmp_path / "mt")
    assert main(["convert", "--to", "hf", "--checkpoint", str(tmp_path / "mt"), "--output", str(tmp_path / "hf")]) == 0
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json"):
        assert (tmp_path / "hf" / name).is_file(), name
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["model_type"] == "gpt2" and cfg["n_inner"] == 48 and cfg["n_positions"] == 40
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    ours = MegatronLmModel.from_pretrained(tmp_path / "mt")(ids)
    theirs = hf_logits(tmp_path / "hf", ids)
    assert theirs.shape == ours.shape == (2, 40, 300)
    assert (ours - theirs).abs().max().item() <= TOL


def test_export_drops_vocab_padding(tmp_path):
    """A padded embedding table (make_vocab_size_divisible_by / TP) exports only the real rows."""
    model = MegatronLmModel(tiny_config(vocab_size=270))
    model.model = materialize(build_model(ModelConfig(
        vocab_size=270, hidden_size=32, num_layers=2, num_heads=4, ffn_hidden_size=48, max_seq_len=40,
        layernorm_eps=1e-6, make_vocab_size_divisible_by=128)), seed=5)
    assert model.model.tok_embeddings.weight.shape[0] == 384
    from mtnlg.interop.hf import export_hf

    export_hf(model, tmp_path / "hf")
    ids = torch.randint(0, 270, (1, 17), generator=torch.Generator().manual_seed(1))
    theirs = hf_logits(tmp_path / "hf", ids)
    assert theirs.shape[-1] == 270
    assert (model(ids) - theirs).abs().max().item() <= TOL


def test_exported_tokenizer_encodes_identically(tmp_path):
    corpus = [t * 3 for t in TEXTS] + ["明月几时有，把酒问青天。不知天上宫阙，今夕是何年。"] * 5
    tok = train_bpe(corpus, vocab_size=320, min_frequency=1)
    assert tok.vocab_size > 263  # real merges were learned
    model = MegatronLmModel(tiny_config(vocab_size=tok.vocab_size), tokenizer=tok).materialize()
    model.save_pretrained(tmp_path / "mt")
    assert main(["convert", "--to", "hf", "--checkpoint", str(tmp_path / "mt"), "--output", str(tmp_path / "hf")]) == 0
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert auto.eos_token == EOD and auto.eos_token_id == tok.eod_id and auto.pad_token_id == tok.pad_id
    for text in TEXTS:
        ids = auto(text)["input_ids"]
        assert ids == tok.encode(text), text
        assert auto.decode(ids) == tok.decode(ids) == text
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok.eod_id


def random_gpt2(tmp_path, activation="gelu_new", n_inner=None, tokenizer: Tokenizer | None = None,
                vocab_size=300, shard=False):
    """A random GPT2LMHeadModel saved as safetensors (optionally sharded) with our tokenizer files."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=vocab_size, n_positions=40, n_embd=32, n_layer=2, n_head=4,
                                  n_inner=n_inner, activation_function=activation, layer_norm_epsilon=1e-5,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(tmp_path / "gpt2", **({"max_shard_size": "40KB"} if shard else {}))
    if tokenizer is not None:
        tokenizer.hf.save(str(tmp_path / "gpt2" / "tokenizer.json"))
    return hf


@pytest.mark.parametrize("activation,n_inner,shard", [("gelu_new", None, False), ("gelu", 48, True),
                                                      ("relu", 24, False)])
def test_import_logits_parity(tmp_path, activation, n_inner, shard):
    hf = random_gpt2(tmp_path, activation, n_inner, tokenizer=byte_tokenizer(), shard=shard)
    if shard:
        assert (tmp_path / "gpt2" / "model.safetensors.index.json").is_file()
    out = tmp_path / "imported"
    assert main(["convert", "--from", "hf", "--input", str(tmp_path / "gpt2"), "--output", str(out)]) == 0
    model = MegatronLmModel.from_pretrained(out)
    assert model.tokenizer.encode("月光") == byte_tokenizer().encode("月光")
    ids = torch.randint(0, 300, (2, 33), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs = hf(ids).logits
    assert (model(ids) - theirs).abs().max().item() <= TOL


ARCH_KEYS = ("model_type", "architectures", "vocab_size", "n_positions", "n_embd", "n_layer", "n_head",
             "activation_function", "layer_norm_epsilon", "initializer_range", "tie_word_embeddings",
             "scale_attn_weights", "scale_attn_by_inverse_layer_idx", "add_cross_attention", "pad_token_id")


def test_hf_roundtrip_without_pad_token_keeps_config_and_tensors(tmp_path):
    """GPT-2's own tokenizer has <|endoftext|> but no pad token: HF -> mtnlg -> HF returns the same
    config and the same tensors; the vocabulary never grows (padding reuses <|endoftext|>)."""
    from safetensors.torch import load_file
    from tokenizers import Tokenizer as HFTokenizer

    hf_tok = HFTokenizer.from_str(byte_tokenizer().hf.to_str())
    raw = json.loads(hf_tok.to_str())
    raw["added_tokens"] = [t for t in raw["added_tokens"] if t["content"] == EOD]
    hf_tok = HFTokenizer.from_str(json.dumps(raw))
    assert hf_tok.token_to_id(PAD) is None
    hf = random_gpt2(tmp_path, vocab_size=257)
    hf_tok.save(str(tmp_path / "gpt2" / "tokenizer.json"))
    assert main(["convert", "--from", "hf", "--input", str(tmp_path / "gpt2"), "--output", str(tmp_path / "mt")]) == 0
    model = MegatronLmModel.from_pretrained(tmp_path / "mt")
    assert model.config.vocab_size == 257 and model.tokenizer.vocab_size == 257
    assert model.tokenizer.pad_id == model.tokenizer.eod_id == 256
    ids = torch.randint(0, 257, (1, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        theirs = hf(ids).logits
    assert (model(ids) - theirs).abs().max().item() <= TOL
    assert main(["convert", "--to", "hf", "--checkpoint", str(tmp_path / "mt"), "--output", str(tmp_path / "back")]) == 0
    a = json.loads((tmp_path / "gpt2" / "config.json").read_text())
    b = json.loads((tmp_path / "back" / "config.json").read_text())
    a.setdefault("pad_token_id", None)
    assert {k: a.get(k) for k in ARCH_KEYS} == {k: b.get(k) for k in ARCH_KEYS}
    assert (a.get("n_inner") or 4 * a["n_embd"]) == b["n_inner"]
    sa, sb = load_file(str(tmp_path / "gpt2" / "model.safetensors")), load_file(str(tmp_path / "back" / "model.safetensors"))
    sa = {k.removeprefix("transformer."): v for k, v in sa.items() if k != "lm_head.weight"}
    sb = {k.removeprefix("transformer."): v for k, v in sb.items()}
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "back")
    assert auto.pad_token is None and auto.eos_token == EOD and len(auto) == 257


def test_import_refuses_a_tokenizer_larger_than_the_model(tmp_path, capsys):
    random_gpt2(tmp_path, vocab_size=200, tokenizer=byte_tokenizer())  # 262 tokens > 200 rows
    capsys.readouterr()
    rc = main(["convert", "--from", "hf", "--input", str(tmp_path / "gpt2"), "--output", str(tmp_path / "mt")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "does not grow the vocabulary" in err
    assert not (tmp_path / "mt").exists()


def test_roundtrip_export_import_is_exact(tmp_path):
    model = perturbed(MegatronLmModel(tiny_config("gelu_tanh")).materialize(seed=7))
    from mtnlg.interop.hf import export_hf, import_hf

    export_hf(model, tmp_path / "hf")
    back = import_hf(tmp_path / "hf")
    assert back.config.activation_function == "gelu_tanh"
    for (name, a), (_, b) in zip(model.model.state_dict().items(), back.model.state_dict().items()):
        assert torch.equal(a, b), name


def test_unsupported_architecture_is_one_line_error(tmp_path, capsys):
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps(
        {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    rc = main(["convert", "--from", "hf", "--input", str(tmp_path / "llama"), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err
    assert "LlamaForCausalLM" in err and "supported: GPT2LMHeadModel" in err
    assert not (tmp_path / "out").exists()


def test_missing_checkpoint_is_one_line_error(tmp_path, capsys):
    rc = main(["convert", "--to", "hf", "--checkpoint", str(tmp_path / "nope"), "--output", str(tmp_path / "hf")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "nope" in err


def test_import_gpt2_vocab_and_merges_files(tmp_path):
    """GPT-2's original tokenizer files (vocab.json + merges.txt, no tokenizer.json) import too."""
    corpus = ["low lower lowest newer newest wider widest"] * 20
    tok = train_bpe(corpus, vocab_size=280, min_frequency=1)
    raw = json.loads(tok.hf.to_str())
    random_gpt2(tmp_path, vocab_size=300)
    vocab = {k: v for k, v in raw["model"]["vocab"].items()}
    (tmp_path / "gpt2" / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    merges = [" ".join(m) if isinstance(m, list) else m for m in raw["model"]["merges"]]
    (tmp_path / "gpt2" / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    from mtnlg.interop.hf import import_hf

    model = import_hf(tmp_path / "gpt2")
    for text in ["the lowest and the newest", "床前明月光", "wider  widest"]:
        assert model.tokenizer.encode(text) == tok.encode(text), text
    assert model.tokenizer.eod_id == tok.eod_id


def test_export_bfloat16(tmp_path):
    model = MegatronLmModel(tiny_config()).materialize(seed=2)
    model.save_pretrained(tmp_path / "mt")
    assert main(["convert", "--to", "hf", "--checkpoint", str(tmp_path / "mt"), "--output", str(tmp_path / "hf"),
                 "--dtype", "bfloat16"]) == 0
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert {v.dtype for v in state.values()} == {torch.bfloat16}
    want = model.model.tok_embeddings.weight.detach().to(torch.bfloat16)
    assert torch.equal(state["transformer.wte.weight"], want)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"


@pytest.mark.parametrize("argv, message", [
    (["--to", "gguf", "--output", "m.gguf", "--dtype", "float16"],
     "--dtype goes with --to hf only, not --to gguf; pick the tensor type with --gguf-type"),
    (["--to", "hf", "--output", "out", "--gguf-type", "q8_0"], "--gguf-type goes with --to gguf only, not --to hf"),
    (["--from", "hf", "--input", "mt", "--output", "out", "--dtype", "bfloat16"],
     "--dtype goes with --to hf only, not --from hf"),
    (["--from", "hf", "--input", "mt", "--output", "out", "--gguf-type", "f16"], "--gguf-type goes with --to gguf"),
    (["--to", "hf", "--input", "mt", "--output", "out"], "--input goes with --from hf, not --to hf"),
    (["--from", "hf", "--checkpoint", "mt", "--input", "mt", "--output", "out"], "--checkpoint goes with --to")])
def test_convert_refuses_an_option_of_another_direction(tmp_path, monkeypatch, capsys, argv, message):
    """An option that does not apply (e.g. --dtype with --to gguf, which wrote f32) is an error, not ignored."""
    MegatronLmModel(tiny_config()).materialize(seed=0).save_pretrained(tmp_path / "mt")
    monkeypatch.chdir(tmp_path)
    if "--to" in argv and "--input" not in argv:
        argv = [*argv, "--checkpoint", "mt"]
    rc = main(["convert", *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and message in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "m.gguf").exists()


def test_convert_help_mentions_gguf_and_its_file_output():
    import subprocess
    import sys

    def help_of(*args: str) -> str:
        return subprocess.run([sys.executable, "-m", "mtnlg", *args], capture_output=True, text=True,
                              timeout=120, check=True).stdout

    top = next(line for line in help_of("--help").splitlines() if line.strip().startswith("convert"))
    assert "GGUF" in top and "Hugging Face" in top
    text = " ".join(help_of("convert", "--help").split())
    assert "GGUF" in text and "(--to gguf) the .gguf file to write" in text


def test_a_hugging_face_export_given_as_a_checkpoint_says_to_import_it(tmp_path, capsys):
    MegatronLmModel(tiny_config()).materialize(seed=0).save_pretrained(tmp_path / "mt")
    assert main(["convert", "--to", "hf", "--checkpoint", str(tmp_path / "mt"), "--output", str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    for argv in (["generate", "--checkpoint", str(tmp_path / "hf"), "--prompt", "春眠"],
                 ["eval", "--checkpoint", str(tmp_path / "hf")]):
        rc = main(argv)
        err = capsys.readouterr().err.strip()
        assert rc == 2 and "\n" not in err and "unknown keyword" not in err
        assert "is a Hugging Face model" in err
        assert f"mtnlg convert --from hf --input {tmp_path / 'hf'} --output OUT" in err
    with pytest.raises(CheckpointError, match="Hugging Face model"):
        MegatronLmModel.from_pretrained(tmp_path / "hf")
    # the import is then loadable
    assert main(["convert", "--from", "hf", "--input", str(tmp_path / "hf"), "--output", str(tmp_path / "back")]) == 0
    assert MegatronLmModel.from_pretrained(tmp_path / "back").config.vocab_size == 300
