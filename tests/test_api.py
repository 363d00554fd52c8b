"""The spec's public API, run as the spec writes it (sizes shrunk)."""

import json
import os
import stat

import pytest
import torch

from mtnlg import MegatronLmModel, MegatronModelConfig
from mtnlg.data.tokenizer import train_bpe
from mtnlg.errors import CheckpointError, ConfigError

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256)


def test_spec_snippet_verbatim_with_sizes_shrunk():
    config = MegatronModelConfig(
        vocab_size=30522,  # 假设使用30522个词的词汇表大小
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=512,
        use_cache=True,
        layernorm_eps=1e-5,
        init_method_std=0.02,
        output_layer_init_method=None,
        parallel_output=True,
        activation_function="gelu",
        pre_process_first=False,
        post_process_last=False,
        quantize=False,
        quantize_config=None,
        enable_input_require_grads=False,
        prompt_tuning=False,
        prompt_tuning_num_tokens=0,
        prompt_tuning_init_text="",
        prompt_tuning_update_every_n_steps=1,
        prompt_tuning_lr_multiplier=1.0,
        prompt_tuning_max_seq_length=512,
        prompt_tuning_vocab_size=30522,
        prompt_tuning_prompt_style="prepend",
        prompt_tuning_prompt_style_args={},
        prompt_tuning_prompt_style_args_type="dict",
        prompt_tuning_prompt_style_args_keys=["prefix", "suffix"],
        prompt_tuning_prompt_style_args_values=["hello world", "goodbye"],
    )

    model = MegatronLmModel(config)

    input_text = "秋天的夜晚，星光闪烁，"
    output = model.generate(input_text, max_length=50)
    print(output)
    assert isinstance(output, str) and output.startswith(input_text)
    assert len(output) > len(input_text)


def test_defaults_are_the_spec_values():
    c = MegatronModelConfig()
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size,
            c.max_position_embeddings) == (30522, 4096, 30, 16, 15360, 512)
    assert c.prompt_tuning_prompt_style_args_keys == ["prefix", "suffix"]
    assert c.prompt_style_args == {"prefix": "hello world", "suffix": "goodbye"}
    m = MegatronLmModel(c)  # the full 6B config, on the meta device
    assert m.num_parameters() == 5_916_829_696 and not m.is_materialized


@pytest.mark.parametrize("kw,pattern", [
    (dict(hiden_size=8), r"unknown keyword 'hiden_size'; did you mean 'hidden_size'"),
    (dict(hidden_size=100, num_attention_heads=16), r"divisible by num_attention_heads"),
    (dict(vocab_size=0), r"vocab_size must be a positive integer"),
    (dict(activation_function="swish"), r"activation_function='swish'"),
    (dict(prompt_tuning_prompt_style="middle"), r"prompt_tuning_prompt_style='middle'"),
    (dict(prompt_tuning_prompt_style_args_keys=["a"]), r"equal lengths"),
    (dict(prompt_tuning=True), r"prompt_tuning_num_tokens > 0"),
    (dict(num_hidden_layers="3"), r"num_hidden_layers: expected int"),
    (dict(output_layer_init_method="xavier"), r"output_layer_init_method"),
    (dict(quantize=True, quantize_config={"bits": 4}), r"bits=4"),
    (dict(quantize_config={"bits": 8}), r"quantize_config is set but quantize=False"),
    (dict(quantize=True, quantize_config={"symmetric": False}), r"symmetric=False"),
    (dict(quantize=True, quantize_config={"group_size": 0}), r"group_size"),
    (dict(quantize=True, quantize_config={"zero_point": 1}), r"unknown keys \['zero_point'\]"),
    (dict(prompt_tuning_prompt_style_args_keys=["prefix", "sufix"], prompt_tuning_prompt_style_args_values=["a", "b"]),
     r"prompt style argument 'sufix' is unknown.*did you mean 'suffix'"),
    (dict(prompt_tuning_prompt_style_args={"prefix": "x"}), r"contradicts"),
    (dict(prompt_tuning_prompt_style_args_type="list", prompt_tuning_prompt_style_args={"prefix": "x"}),
     r"not read with prompt_tuning_prompt_style_args_type='list'"),
    (dict(prompt_tuning_prompt_style_args_type="list", prompt_tuning_prompt_style_args_values=["a", "b", "c"]),
     r"at most 2 positional"),
    (dict(prompt_tuning=True, prompt_tuning_num_tokens=64, max_position_embeddings=64), r"leaves no room"),
    (dict(layernorm_eps=0.0), r"layernorm_eps"),
    (dict(prompt_tuning_lr_multiplier=0.0), r"prompt_tuning_lr_multiplier"),
])
def test_config_errors(kw, pattern):
    with pytest.raises(ConfigError, match=pattern):
        MegatronModelConfig(**{**TINY, **kw})


def test_tokenizer_larger_than_vocab_is_rejected():
    tok = train_bpe(["床前明月光，疑是地上霜。"] * 20, 300)
    with pytest.raises(ConfigError, match="raise vocab_size"):
        MegatronLmModel(MegatronModelConfig(**TINY, vocab_size=280), tokenizer=tok)


def test_call_returns_logits_and_validates_ids():
    m = MegatronLmModel(MegatronModelConfig(**TINY, vocab_size=300)).materialize(seed=1)
    logits = m(torch.tensor([[1, 2, 3]]))
    assert logits.shape == (1, 3, 300)
    assert m([5, 6]).shape == (1, 2, 300)
    with pytest.raises(ConfigError, match=r"input_ids must be in \[0, 300\)"):
        m(torch.tensor([[300]]))


def test_generate_options():
    m = MegatronLmModel(MegatronModelConfig(**TINY, vocab_size=300)).materialize(seed=1)
    cont = m.generate("床前", max_new_tokens=5, return_full_text=False, temperature=0.9, seed=3)
    assert cont == m.generate("床前", max_new_tokens=5, return_full_text=False, temperature=0.9, seed=3)
    assert not m.generate("床前", max_length=20).startswith("x")
    with pytest.raises(ConfigError, match="unknown sampling option 'tempreature'"):
        m.generate("x", tempreature=1.0)
    with pytest.raises(ConfigError, match="max_length=2 leaves no room"):
        m.generate("床前明月光", max_length=2)


def test_use_cache_false_gives_same_greedy_text():
    a = MegatronLmModel(MegatronModelConfig(**TINY, vocab_size=300)).materialize(seed=2)
    b = MegatronLmModel(MegatronModelConfig(**TINY, vocab_size=300, use_cache=False)).materialize(seed=2)
    assert a.generate("春眠不觉晓", max_new_tokens=12) == b.generate("春眠不觉晓", max_new_tokens=12)


def test_save_load_round_trip_bit_exact(tmp_path):
    tok = train_bpe(["床前明月光，疑是地上霜。举头望明月，低头思故乡。"] * 20, 300)
    m = MegatronLmModel(MegatronModelConfig(**TINY, vocab_size=300), tokenizer=tok).materialize(seed=5)
    out = m.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "manifest.json", "model.safetensors", "tokenizer.json"]
    assert json.loads((out / "config.json").read_text())["hidden_size"] == 64
    m2 = MegatronLmModel.from_pretrained(out)
    for (n, p), (_, q) in zip(m.model.state_dict().items(), m2.model.state_dict().items()):
        assert torch.equal(p, q), n
    assert m2.model.output.weight is m2.model.tok_embeddings.weight
    assert m2.tokenizer.encode("明月") == tok.encode("明月")
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(m(ids), m2(ids))
    # Saving again over the same directory replaces it atomically; no temp dirs are left behind.
    m2.save_pretrained(out)
    assert [p.name for p in tmp_path.iterdir()] == ["m"]
    # Shared like any download: 0755 directory, 0644 files (the temp dir was 0700, safetensors writes 0600).
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755 & ~umask
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o644 & ~umask}


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(CheckpointError, match="is not a saved model"):
        MegatronLmModel.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="nope does not exist"):
        MegatronLmModel.from_pretrained(tmp_path / "nope")
    m = MegatronLmModel(MegatronModelConfig(**TINY, vocab_size=300)).materialize()
    out = m.save_pretrained(tmp_path / "m")
    data = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        MegatronLmModel.from_pretrained(out)


def test_enable_input_require_grads():
    m = MegatronLmModel(MegatronModelConfig(**TINY, vocab_size=300, enable_input_require_grads=True)).materialize()
    captured = {}
    m.model.tok_embeddings.register_forward_hook(lambda mod, i, o: captured.setdefault("out", o))
    for p in m.model.tok_embeddings.parameters():
        p.requires_grad_(False)
    m(torch.tensor([[1, 2]]))
    assert captured["out"].requires_grad


# -- every field real (#18.1) -------------------------------------------------------------------------------

SPEC_FULL = dict(  # the spec's example, every field as the spec writes it; only the sizes shrunk
    vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
    max_position_embeddings=512, use_cache=True, layernorm_eps=1e-5, init_method_std=0.02,
    output_layer_init_method=None, parallel_output=True, activation_function="gelu", pre_process_first=False,
    post_process_last=False, quantize=False, quantize_config=None, enable_input_require_grads=False,
    prompt_tuning=False, prompt_tuning_num_tokens=0, prompt_tuning_init_text="",
    prompt_tuning_update_every_n_steps=1, prompt_tuning_lr_multiplier=1.0, prompt_tuning_max_seq_length=512,
    prompt_tuning_vocab_size=30522, prompt_tuning_prompt_style="prepend", prompt_tuning_prompt_style_args={},
    prompt_tuning_prompt_style_args_type="dict", prompt_tuning_prompt_style_args_keys=["prefix", "suffix"],
    prompt_tuning_prompt_style_args_values=["hello world", "goodbye"])


def test_model_fields_reach_the_internal_config():
    c = MegatronModelConfig(**{**SPEC_FULL, "parallel_output": False, "pre_process_first": True,
                               "post_process_last": True})
    m = c.to_model_config()
    assert (m.parallel_output, m.pre_process_first, m.post_process_last) == (False, True, True)
    back = MegatronModelConfig.from_model_config(m)
    assert (back.parallel_output, back.pre_process_first, back.post_process_last) == (False, True, True)


def test_prompt_style_args_type_selects_where_args_are_read():
    kw = dict(prompt_tuning_prompt_style_args_keys=["suffix", "prefix"],
              prompt_tuning_prompt_style_args_values=["S", "P"])
    as_dict = MegatronModelConfig(**TINY, **kw)
    as_list = MegatronModelConfig(**TINY, **kw, prompt_tuning_prompt_style_args_type="list")
    assert as_dict.prompt_style_args == {"prefix": "P", "suffix": "S"}  # keyword: keys name the values
    assert as_list.prompt_style_args == {"prefix": "S", "suffix": "P"}  # positional: (prefix, suffix)
    only_dict = MegatronModelConfig(**TINY, prompt_tuning_prompt_style_args={"prefix": "X"},
                                    prompt_tuning_prompt_style_args_keys=[], prompt_tuning_prompt_style_args_values=[])
    assert only_dict.prompt_style_args == {"prefix": "X"}


def _spec_prompt_tuned(**kw):
    tok = train_bpe(["床前明月光，疑是地上霜。hello world goodbye"] * 20, 300)
    cfg = MegatronModelConfig(**{**SPEC_FULL, "vocab_size": 300, "prompt_tuning_vocab_size": 300,
                                 "prompt_tuning": True, "prompt_tuning_num_tokens": 3,
                                 "prompt_tuning_init_text": "明月", "init_method_std": 0.3, **kw})
    return MegatronLmModel(cfg, tokenizer=tok).materialize(seed=3)


def test_prepend_uses_the_spec_prefix_and_suffix():
    lm = _spec_prompt_tuned()
    tok = lm.tokenizer
    ids, soft = lm.encode_prompt("床前")
    # prepend: the soft tokens first, then the prefix text, the input and the suffix text
    assert ids == [tok.pad_id] * 3 + tok.encode("hello world") + tok.encode("床前") + tok.encode("goodbye")
    assert soft.offsets == [0]
    lm2 = _spec_prompt_tuned(prompt_tuning_prompt_style="prefix_suffix")
    ids2, soft2 = lm2.encode_prompt("床前")
    assert ids2 == tok.encode("hello world") + [tok.pad_id] * 3 + tok.encode("床前") + tok.encode("goodbye")
    assert soft2.offsets == [len(tok.encode("hello world"))]
    # the texts change what the model sees: without them the continuation's logits differ
    lm3 = _spec_prompt_tuned(prompt_tuning_prompt_style_args_values=["", ""])
    assert lm3.encode_prompt("床前")[0] == [tok.pad_id] * 3 + tok.encode("床前")


def test_prompt_tuning_max_seq_length_bounds_generation():
    lm = _spec_prompt_tuned(prompt_tuning_max_seq_length=20, prompt_tuning_prompt_style_args_values=["", ""])
    prompt_len = len(lm.encode_prompt("床前")[0])
    assert lm.soft_prompt.new_token_budget(prompt_len, 20 - prompt_len) == 20 - prompt_len
    # over the limit is an error naming the numbers, never a silent clamp (the one over-long rule)
    with pytest.raises(ConfigError, match=f"prompt_tuning_max_seq_length=20; ask for at most {20 - prompt_len}"):
        lm.generate("床前", max_new_tokens=100, return_full_text=False, stop_token_ids=[])
    bounded = lm.generate("床前", max_new_tokens=20 - prompt_len, return_full_text=False, stop_token_ids=[])
    wide = _spec_prompt_tuned(prompt_tuning_max_seq_length=512, prompt_tuning_prompt_style_args_values=["", ""])
    wide.soft_prompt.embeds.data.copy_(lm.soft_prompt.embeds.data)
    exact = wide.generate("床前", max_new_tokens=20 - prompt_len, return_full_text=False, stop_token_ids=[])
    longer = wide.generate("床前", max_new_tokens=40, return_full_text=False, stop_token_ids=[])
    assert bounded == exact and len(longer) > len(bounded)
    with pytest.raises(ConfigError, match="prompt_tuning_max_seq_length=20"):
        lm.generate("床前明月光，疑是地上霜。" * 3, max_new_tokens=2)


def test_spec_full_example_builds_generates_and_round_trips(tmp_path):
    tok = train_bpe(["秋天的夜晚，星光闪烁，"] * 20, 300)
    lm = MegatronLmModel(MegatronModelConfig(**SPEC_FULL), tokenizer=tok).materialize(seed=4)
    text = lm.generate("秋天的夜晚，星光闪烁，", max_length=50)
    assert text.startswith("秋天的夜晚，星光闪烁，")
    back = MegatronLmModel.from_pretrained(lm.save_pretrained(tmp_path / "spec"))
    assert back.config.to_dict() == lm.config.to_dict()
    assert back.generate("秋天的夜晚，星光闪烁，", max_length=50) == text


# -- round trips (#18.2) ------------------------------------------------------------------------------------

@pytest.mark.parametrize("qc", [None, {"group_size": 16}, {"per_channel": False}])
def test_quantized_model_round_trips_token_for_token(tmp_path, qc):
    tok = train_bpe(["床前明月光，疑是地上霜。举头望明月，低头思故乡。"] * 20, 300)
    cfg = MegatronModelConfig(**TINY, vocab_size=300, init_method_std=0.2, quantize=True, quantize_config=qc)
    lm = MegatronLmModel(cfg, tokenizer=tok).materialize(seed=6)
    text = lm.generate("床前", max_new_tokens=16, stop_token_ids=[])
    out = lm.save_pretrained(tmp_path / "q")
    back = MegatronLmModel.from_pretrained(out)
    assert type(back.model.layers["0"].attn.qkv).__name__ == "Int8Linear"
    for k, v in lm.model.state_dict().items():
        assert torch.equal(v, back.model.state_dict()[k]), k
    assert back.generate("床前", max_new_tokens=16, stop_token_ids=[]) == text
    with pytest.raises(CheckpointError, match="quantize=True"):
        MegatronLmModel.from_pretrained(out, quantize=False)


def test_fp32_save_loads_quantized_as_quantize_after_load(tmp_path):
    lm = MegatronLmModel(MegatronModelConfig(**TINY, vocab_size=300, init_method_std=0.2)).materialize(seed=7)
    out = lm.save_pretrained(tmp_path / "fp32")
    streamed = MegatronLmModel.from_pretrained(out, quantize=True)  # quantized Linear by Linear while reading
    after = MegatronLmModel.from_pretrained(out).quantize()
    assert streamed.config.quantize and streamed.model.output is not streamed.model.tok_embeddings
    for k, v in after.model.state_dict().items():
        assert torch.equal(v, streamed.model.state_dict()[k]), k


def test_prompt_tuned_model_round_trips_with_its_soft_prompt(tmp_path):
    from mtnlg.model.prompt_tuning import tune_prompt

    lm = _spec_prompt_tuned()
    tune_prompt(lm, [("床前", "明月光")], steps=3, lr=0.5, batch_size=1)
    text = lm.generate("床前", max_new_tokens=8, stop_token_ids=[])
    out = lm.save_pretrained(tmp_path / "pt")
    assert (out / "soft_prompt.safetensors").is_file()
    back = MegatronLmModel.from_pretrained(out)
    assert torch.equal(back.soft_prompt.embeds, lm.soft_prompt.embeds)
    assert (back.soft_prompt.prefix, back.soft_prompt.suffix) == ("hello world", "goodbye")
    assert back.generate("床前", max_new_tokens=8, stop_token_ids=[]) == text
    fresh = _spec_prompt_tuned()  # a re-initialised soft prompt would generate differently
    assert not torch.equal(fresh.soft_prompt.embeds, lm.soft_prompt.embeds)


def _training_run(tmp_path, **model):
    """A run directory as training writes it (sharded DCP checkpoint + config.yaml + tokenizer/)."""
    from mtnlg.config import Config
    from mtnlg.model.init import build_model, materialize
    from mtnlg.checkpoint import save_checkpoint

    cfg = Config()
    for k, v in dict(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, ffn_hidden_size=128, **model).items():
        setattr(cfg.model, k, v)
    cfg.validate()
    tok = train_bpe(["床前明月光，疑是地上霜。"] * 20, 300)
    tok.save(tmp_path / "tok")
    gpt = materialize(build_model(cfg.model), seed=11)
    opt = torch.optim.SGD(gpt.parameters(), lr=0.1)
    save_checkpoint(tmp_path / "run" / "checkpoints", 1, [gpt], [opt], {"step": 1}, keep=1, config=cfg,
                    tokenizer_dir=tmp_path / "tok")
    return tmp_path / "run"


def test_training_run_loads_straight_into_int8(tmp_path):
    run = _training_run(tmp_path, make_vocab_size_divisible_by=64)
    streamed = MegatronLmModel.from_pretrained(run, quantize=True)  # Linear by Linear from the sharded files
    after = MegatronLmModel.from_pretrained(run).quantize()  # the fp32 model first, then quantized
    assert type(streamed.model.layers["1"].mlp.fc2).__name__ == "Int8Linear"
    sa, sb = streamed.model.state_dict(), after.model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:  # the padded vocabulary rows (never used) are not loaded: the model pads to its own size
        assert torch.equal(sa[k], sb[k][: sa[k].shape[0]]), k
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    assert torch.equal(streamed(ids), after(ids)[..., :300])
    assert streamed.generate("床前", max_new_tokens=8) == after.generate("床前", max_new_tokens=8)
