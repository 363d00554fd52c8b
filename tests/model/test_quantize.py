"""int8 weight-only quantization: error bounds, logits cosine >= 0.999, streaming materialization."""

from __future__ import annotations

import pytest
import torch

from mtnlg.api import MegatronLmModel, MegatronModelConfig
from mtnlg.config import ModelConfig
from mtnlg.errors import ConfigError
from mtnlg.infer.generate import SamplingParams, generate
from mtnlg.model import int8_gemv
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


@pytest.mark.parametrize("in_f,out_f", [(64, 48), (200, 301), (4103, 9)])
def test_decode_kernel_matches_dequantized_fp32(in_f, out_f):
    """mtnlg's int8 gemv (fp32 activations) equals the dequantized fp32 product up to summation order,
    for widths that are no multiple of its vector length, 1-16 rows, with and without a bias."""
    if not int8_gemv.available():
        pytest.skip("no C compiler to build the int8 kernel")
    torch.manual_seed(0)
    for bias in (None, torch.randn(out_f)):
        q = Int8Linear.from_weight(torch.randn(out_f, in_f) * 0.05, bias)
        for rows in (1, 5, int8_gemv.MAX_ROWS):
            x = torch.randn(rows, in_f)
            ref = torch.nn.functional.linear(x.double(), q.dequantize().double(), None if bias is None else
                                             bias.double()).float()
            out = int8_gemv.int8_gemv(x, q.qweight, q.scales, q.bias)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
            assert int8_gemv.applies(x, rows) and not int8_gemv.applies(x, int8_gemv.MAX_ROWS + 1)
            torch.testing.assert_close(q(x.view(1, rows, in_f)), ref.view(1, rows, out_f), rtol=1e-5, atol=1e-5)


def test_int8_linear_right_at_widths_pytorchs_kernel_gets_wrong():
    """``_weight_int8pack_mm`` returned sums off by 15-25% for input widths of 8 mod 16 (PyTorch 2.13,
    AVX-512): a 200-wide model with ``quantize=True`` decoded from wrong logits. Such widths dequantize."""
    torch.manual_seed(0)
    q = Int8Linear.from_weight(torch.randn(96, 200) * 0.05, None)
    old = int8_gemv.set_enabled(False)  # a prefill longer than the decode kernel's rows takes this path
    try:
        x = torch.randn(40, 200)
        torch.testing.assert_close(q(x), torch.nn.functional.linear(x, q.dequantize()), rtol=1e-4, atol=1e-4)
    finally:
        int8_gemv.set_enabled(old)


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
