"""GGUF export (``mtnlg convert --to gguf``) for llama.cpp's GPT-2 architecture.

The file is read back with ``gguf.GGUFReader``: the tensors (f32 exact, f16 the fp16 rounding of the
same values, q8_0 within half a quantisation step of each 32-element block), the metadata and the
vocabulary. The layout is checked against a second reader of llama.cpp's GPT-2 conventions,
``transformers``' GGUF loader (it undoes ``convert_hf_to_gguf``'s transposes): its logits equal mtnlg's.
When ``llama_cpp`` (llama-cpp-python) is importable, llama.cpp itself decodes greedily from the file.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mtnlg.api import MegatronLmModel, MegatronModelConfig
from mtnlg.cli import main
from mtnlg.data.tokenizer import EOD, PAD, train_bpe
from mtnlg.errors import ConfigError
from mtnlg.interop.gguf import export_gguf, gguf_tensors
from tests.interop.test_hf import perturbed

gguf = pytest.importorskip("gguf")

CORPUS = ["床前明月光，疑是地上霜。举头望明月，低头思故乡。",
          "Hello world, hello tokenizer! the theme then"] * 10
TEXTS = ["Hello world, hello tokenizer!  spaces\tand\nlines", "床前明月光，疑是地上霜。",
         f"special {EOD} and {PAD}", "emoji 🙂 and bytes \x00\x7f", " the theme"]
VOCAB = 320  # > the tokenizer's vocabulary: the padded rows get [PAD{i}] tokens


def tiny(activation: str = "gelu_tanh") -> MegatronLmModel:
    tok = train_bpe(CORPUS, vocab_size=300, min_frequency=1)
    cfg = MegatronModelConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=96, max_position_embeddings=48, layernorm_eps=1e-6,
                              activation_function=activation)
    return perturbed(MegatronLmModel(cfg, tokenizer=tok).materialize(seed=3))


@pytest.fixture(scope="module")
def model() -> MegatronLmModel:
    return tiny()


@pytest.fixture(scope="module")
def files(model, tmp_path_factory) -> dict[str, object]:
    d = tmp_path_factory.mktemp("gguf")
    model.save_pretrained(d / "mt")
    out = {}
    for kind in ("f32", "f16", "q8_0"):
        assert main(["convert", "--to", "gguf", "--checkpoint", str(d / "mt"), "--output", str(d / f"{kind}.gguf"),
                     "--gguf-type", kind]) == 0
        out[kind] = d / f"{kind}.gguf"
    return out


def field(reader, key):
    f = reader.fields[key]
    return f.contents()


def read_tensors(path) -> dict[str, tuple[str, np.ndarray]]:
    r = gguf.GGUFReader(str(path))
    out = {}
    for t in r.tensors:
        data = np.asarray(t.data)
        if t.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            data = gguf.quants.dequantize(data, t.tensor_type)
        shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists ne (innermost first)
        out[t.name] = (t.tensor_type.name, data.reshape(shape))
    return out


def test_tensor_names_are_llama_cpp_gpt2(files, model):
    names = set(read_tensors(files["f32"]))
    arch = gguf.MODEL_ARCH.GPT2
    allowed = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[arch]}
    expected = {"token_embd.weight", "position_embd.weight", "output_norm.weight", "output_norm.bias"}
    for i in range(model.config.num_hidden_layers):
        for part in ("attn_norm", "attn_qkv", "attn_output", "ffn_norm", "ffn_up", "ffn_down"):
            expected |= {f"blk.{i}.{part}.weight", f"blk.{i}.{part}.bias"}
    assert names == expected  # tied head: no output.weight (llama.cpp then reuses token_embd)
    for n in names:
        stem = n.rsplit(".", 1)[0]
        assert any(stem == a.format(bid=i) for a in allowed for i in range(2)), n


@pytest.mark.parametrize("kind", ["f32", "f16", "q8_0"])
def test_tensors_round_trip(files, model, kind):
    ref = gguf_tensors(model)
    got = read_tensors(files[kind])
    assert set(got) == set(ref)
    h, ffn = model.config.hidden_size, model.config.intermediate_size
    assert ref["blk.0.attn_qkv.weight"].shape == (3 * h, h) and ref["blk.0.ffn_up.weight"].shape == (ffn, h)
    for name, want in ref.items():
        ttype, data = got[name]
        assert data.shape == want.shape, name
        if want.ndim == 1 or name == "position_embd.weight" or kind == "f32":
            assert ttype == "F32", name
            np.testing.assert_array_equal(data, want, err_msg=name)
        elif kind == "f16":
            assert ttype == "F16", name
            np.testing.assert_array_equal(data, want.astype(np.float16), err_msg=name)
        else:
            assert ttype == "Q8_0", name
            blocks = want.reshape(-1, 32)
            # q8_0: round(x / d) * d with d = absmax / 127 per block, d stored in fp16 (relative error
            # <= 2**-11, times at most 127 steps): |error| <= d / 2 + 127 * d * 2**-11
            step = np.abs(blocks).max(axis=1, keepdims=True) / 127
            err = np.abs(data.reshape(-1, 32) - blocks)
            assert (err <= step * (0.5 + 127 / 2048) + 1e-7).all(), name
            assert err.max() > 0, name  # really quantised


def test_qkv_layout_matches_gpt2(model):
    """attn_qkv rows are q, then k, then v (GPT-2's order), not mtnlg's head-major grouping."""
    ref = gguf_tensors(model)
    qkv = model.model.layers["0"].attn.qkv.weight.detach().numpy()
    h, heads = model.config.hidden_size, model.config.num_attention_heads
    d = h // heads
    q_head1 = qkv.reshape(heads, 3, d, h)[1, 0]
    np.testing.assert_array_equal(ref["blk.0.attn_qkv.weight"][d:2 * d], q_head1)


def test_metadata(files, model):
    r = gguf.GGUFReader(str(files["q8_0"]))
    c, tok = model.config, model.tokenizer
    assert field(r, "general.architecture") == "gpt2"
    assert field(r, "gpt2.context_length") == c.max_position_embeddings
    assert field(r, "gpt2.embedding_length") == c.hidden_size
    assert field(r, "gpt2.feed_forward_length") == c.intermediate_size
    assert field(r, "gpt2.block_count") == c.num_hidden_layers
    assert field(r, "gpt2.attention.head_count") == c.num_attention_heads
    assert field(r, "gpt2.attention.layer_norm_epsilon") == pytest.approx(1e-6)
    assert field(r, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    assert field(r, "tokenizer.ggml.model") == "gpt2" and field(r, "tokenizer.ggml.pre") == "gpt-2"
    assert field(r, "tokenizer.ggml.bos_token_id") == field(r, "tokenizer.ggml.eos_token_id") == tok.eod_id
    assert field(r, "tokenizer.ggml.padding_token_id") == tok.pad_id


def test_vocabulary_and_merges(files, model):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    r = gguf.GGUFReader(str(files["f32"]))
    tok = model.tokenizer
    tokens, types = field(r, "tokenizer.ggml.tokens"), field(r, "tokenizer.ggml.token_type")
    merges = field(r, "tokenizer.ggml.merges")
    assert len(tokens) == len(types) == VOCAB
    n = tok.vocab_size
    assert tokens[:n] == [tok.id_to_token(i) for i in range(n)]
    assert tokens[n:] == [f"[PAD{i}]" for i in range(n, VOCAB)] and set(types[n:]) == {gguf.TokenType.UNUSED}
    specials = {tok.token_to_id(t) for t in (EOD, PAD)}
    assert all(types[i] == gguf.TokenType.CONTROL for i in specials)
    assert types[tok.token_to_id("Ġ")] == gguf.TokenType.NORMAL
    want = json.loads(tok.hf.to_str())["model"]["merges"]
    assert merges == [m if isinstance(m, str) else " ".join(m) for m in want] and len(merges) > 10
    # a byte-level BPE built from the file alone (as llama.cpp's "gpt-2" pre-tokenizer does) encodes like mtnlg
    bpe = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens[:n])}, [tuple(m.split(" ")) for m in merges]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    bpe.decoder = decoders.ByteLevel()
    bpe.add_special_tokens([tokens[i] for i in range(n) if types[i] == gguf.TokenType.CONTROL])
    for text in TEXTS:
        assert bpe.encode(text).ids == tok.encode(text), text


def _transformers_logits(path, ids: torch.Tensor) -> torch.Tensor:
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    meta = load_gguf_checkpoint(str(path))["config"]
    cfg = transformers.GPT2Config(**meta, n_positions=meta["n_ctx"], n_inner=meta["feed_forward_length"])
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    state = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=hf)["tensors"]
    missing, unexpected = hf.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()}, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected
    hf.tie_weights()
    with torch.no_grad():
        return hf(ids).logits


@pytest.mark.parametrize("kind,tol", [("f32", 1e-5), ("f16", 2e-3), ("q8_0", 2e-2)])
def test_logits_through_a_second_gguf_reader(files, model, kind, tol):
    ids = torch.randint(0, model.tokenizer.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(ids)[..., :VOCAB]
    theirs = _transformers_logits(files[kind], ids)
    assert (theirs - ours).abs().max().item() <= tol
    assert torch.equal(theirs.argmax(-1), ours.argmax(-1))


def test_refusals(tmp_path, model):
    relu = MegatronLmModel(MegatronModelConfig(vocab_size=300, hidden_size=32, num_hidden_layers=1,
                                               num_attention_heads=4, intermediate_size=48,
                                               max_position_embeddings=16, activation_function="relu"))
    with pytest.raises(ConfigError, match="relu"):
        export_gguf(relu.materialize(seed=0), tmp_path / "relu.gguf")
    with pytest.raises(ConfigError, match="directory"):
        export_gguf(model, tmp_path)
    with pytest.raises(ConfigError, match="gguf-type"):
        export_gguf(model, tmp_path / "x.gguf", "q4_0")
    assert not list(tmp_path.iterdir())  # nothing half-written
    export_gguf(model, tmp_path / "x.gguf")
    with pytest.raises(ConfigError, match="--force"):
        export_gguf(model, tmp_path / "x.gguf")
    export_gguf(model, tmp_path / "x.gguf", force=True)
    model.save_pretrained(tmp_path / "mt")
    with pytest.raises(ConfigError, match="inside the input"):
        export_gguf(model, tmp_path / "mt" / "x.gguf", source=tmp_path / "mt")


def test_cli_json_summary(files, tmp_path, capsys, model):
    model.save_pretrained(tmp_path / "mt")
    out = tmp_path / "sub" / "m.gguf"
    assert main(["convert", "--to", "gguf", "--checkpoint", str(tmp_path / "mt"), "--output", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["format"] == "gguf" and summary["gguf_type"] == "f32" and summary["bytes"] == out.stat().st_size
    assert out.read_bytes() == files["f32"].read_bytes()  # deterministic
    assert files["q8_0"].stat().st_size < 0.45 * files["f32"].stat().st_size


def greedy_mtnlg(model: MegatronLmModel, prompt: list[int], n: int, limit: int) -> tuple[list[int], torch.Tensor]:
    """mtnlg's greedy continuation over the first ``limit`` tokens and the logits that chose each token."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1, :limit].argmax()))
        logits = model(torch.tensor([ids[:-1]]))[0, len(prompt) - 1:, :limit]
    return ids[len(prompt):], logits


# llama.cpp on CPU evaluates GELU through an fp16 lookup table, so its logits are not bit-equal to
# mtnlg's even with the same (tanh) GELU: simulated here, that moves this model's logits by < 1e-3, and
# exact vs tanh GELU by another < 1e-3. Stated tolerance: logits within LOGIT_TOL; a step where mtnlg's
# top-2 logits are closer than MARGIN may pick either, every other step must pick mtnlg's token.
LOGIT_TOL = MARGIN = 5e-3


def _llama_logits(llm, ids: list[int], limit: int) -> torch.Tensor:
    llm.reset()
    llm.eval(ids)
    return torch.as_tensor(np.asarray(llm.scores[:len(ids)]))[:, :limit]


@pytest.mark.parametrize("activation", ["gelu_tanh", "gelu"])
def test_llama_cpp_greedy_tokens(tmp_path, activation):
    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed (it builds llama.cpp from source; not in setup.sh)")
    model = tiny(activation)
    with torch.no_grad():  # larger weights spread the logits, so that greedy choices are not coin flips
        for p in model.model.parameters():
            if p.ndim == 2:
                p.mul_(5)
    path = export_gguf(model, tmp_path / "m.gguf", "f32")
    limit = VOCAB  # the file's vocabulary (llama.cpp's n_vocab): the tokenizer's tokens and the [PAD] rows
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=48, logits_all=True, verbose=False,
                          type_k=0, type_v=0)  # GGML_TYPE_F32 KV cache: same precision as mtnlg's
    # every position of a random sequence: logits within LOGIT_TOL
    ids = torch.randint(0, limit, (48,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        want = model(torch.tensor([ids]))[0, :, :limit]
    assert (_llama_logits(llm, ids, limit) - want).abs().max().item() <= LOGIT_TOL
    # greedy, teacher-forced on mtnlg's sequence: if llama.cpp's argmax is mtnlg's token at every step,
    # its own free-running greedy decode is the same sequence
    prompt = model.tokenizer.encode("床前明月光，")
    n = 48 - len(prompt)
    ours, logits = greedy_mtnlg(model, prompt, n, limit)
    theirs = _llama_logits(llm, prompt + ours[:-1], limit)[len(prompt) - 1:]
    assert (theirs - logits).abs().max().item() <= LOGIT_TOL
    top2 = logits.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) >= MARGIN
    assert clear.float().mean() >= 0.8  # the model really decides most steps
    assert torch.equal(theirs.argmax(-1)[clear], torch.tensor(ours)[clear])
    if clear.all():
        llm.reset()
        got = []
        for tok in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            got.append(int(tok))
            if len(got) == n:
                break
        assert got == ours
