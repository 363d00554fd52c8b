"""int8 weight-only quantization: error bounds, logits cosine >= 0.999, streaming materialization."""

from __future__ import annotations

import pytest
import torch

from mtnlg.api import MegatronLmModel, MegatronModelConfig
from mtnlg.config import ModelConfig
from mtnlg.errors import ConfigError
from mtnlg.infer.generate import SamplingParams, generate
from mtnlg.model.init import build_model, materialize
from mtnlg.model.quantize import Int8Linear, QuantConfig, materialize_quantized, quantize_model, quantize_weight

CFG = ModelConfig(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, ffn_hidden_size=256, max_seq_len=64,
                  init_std=0.1)


def test_weight_error_within_half_a_step():
    w = torch.randn(48, 64)
    for gs in (None, 16):
        q, s = quantize_weight(w, gs)
        assert q.dtype == torch.int8 and int(q.abs().max()) == 127
        lin = Int8Linear(q, s, None)
        step = s.unsqueeze(1) if gs is None else s.repeat_interleave(gs, dim=1)
        assert bool(((lin.dequantize() - w).abs() <= step / 2 + 1e-7).all())
    with pytest.raises(ConfigError, match="group_size"):
        quantize_weight(w, 5)


def test_int8_linear_matches_dequantized_linear():
    lin = torch.nn.Linear(64, 48)
    q = Int8Linear.from_linear(lin)
    x = torch.randn(3, 7, 64)
    ref = torch.nn.functional.linear(x, q.dequantize(), lin.bias)
    torch.testing.assert_close(q(x), ref, atol=0.05, rtol=0.02)  # bf16 activations on the int8 kernel
    assert torch.nn.functional.cosine_similarity(q(x).flatten(), lin(x).flatten(), dim=0) > 0.999


@pytest.mark.parametrize("qcfg", [None, {"group_size": 32}])
def test_quantized_logits_cosine_and_greedy(qcfg):
    x = torch.randint(0, 300, (2, 24))
    fp = materialize(build_model(CFG), seed=0).eval()
    q = quantize_model(materialize(build_model(CFG), seed=0).eval(), qcfg)
    assert all(isinstance(q.get_submodule(f"layers.0.{n}"), Int8Linear) for n in ("attn.qkv", "mlp.fc2"))
    with torch.no_grad():
        a, b = fp(x)[..., :300].reshape(-1, 300), q(x)[..., :300].reshape(-1, 300)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    assert float(cos.min()) >= 0.999
    # streaming materialization equals quantizing the fp32 model
    s = materialize_quantized(build_model(CFG), qcfg, seed=0).eval()
    with torch.no_grad():
        assert torch.equal(s(x)[..., :300].reshape(-1, 300), b)
    assert len(generate(q, [[1, 2, 3]], SamplingParams(max_new_tokens=5))[0].token_ids) == 5


def test_api_honours_quantize(tmp_path):
    kw = dict(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
              max_position_embeddings=64)
    m = MegatronLmModel(MegatronModelConfig(quantize=True, **kw)).materialize()
    assert isinstance(m.model.layers["1"].mlp.fc1, Int8Linear)
    assert isinstance(m.generate("hi", max_new_tokens=4), str)
    MegatronLmModel(MegatronModelConfig(**kw)).materialize().save_pretrained(tmp_path / "m")
    loaded = MegatronLmModel.from_pretrained(tmp_path / "m").quantize({"group_size": 16})
    assert isinstance(loaded.model.output, Int8Linear) and loaded.model.output.grouped
    with pytest.raises(ConfigError):
        QuantConfig.from_dict({"bits": 4})
