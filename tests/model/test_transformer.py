import math
import os
from pathlib import Path

import pytest
import torch

from mtnlg.config import ModelConfig
from mtnlg.errors import ConfigError
from mtnlg.model import KVCache, build_model, count_parameters, materialize
from mtnlg.model.init import init_value


def test_causality(tiny_model):
    """Changing future tokens leaves the logits of earlier positions unchanged."""
    torch.manual_seed(0)
    a = torch.randint(0, 97, (2, 16))
    b = a.clone()
    b[:, 10:] = torch.randint(0, 97, (2, 6))
    la, lb = tiny_model(a), tiny_model(b)
    assert torch.equal(la[:, :10], lb[:, :10])
    assert not torch.allclose(la[:, 10:], lb[:, 10:])


def test_tied_head_and_shapes(tiny_model, tiny_cfg):
    assert tiny_model.output.weight is tiny_model.tok_embeddings.weight
    out = tiny_model(torch.zeros(3, 7, dtype=torch.long))
    assert out.shape == (3, 7, tiny_cfg.vocab_size)


def test_kv_cache_matches_full_forward(tiny_model):
    ids = torch.randint(0, 97, (2, 20))
    full = tiny_model(ids)
    cache = KVCache(2, 32)
    parts = [tiny_model(ids[:, :11], cache=cache)] + [tiny_model(ids[:, i:i + 1], cache=cache) for i in range(11, 15)]
    parts.append(tiny_model(ids[:, 15:], cache=cache))
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)


def test_logits_only_where_asked(tiny_model):
    ids = torch.randint(0, 97, (3, 9))
    full = tiny_model(ids)
    torch.testing.assert_close(tiny_model(ids, logits_at=-1), full[:, -1], rtol=1e-5, atol=1e-5)
    at = torch.tensor([0, 4, 8])
    torch.testing.assert_close(tiny_model(ids, logits_at=at), full[torch.arange(3), at], rtol=1e-5, atol=1e-5)
    wt = tiny_model.output.weight.detach().t().contiguous()
    torch.testing.assert_close(tiny_model(ids, logits_at=-1, head=lambda h: h @ wt), full[:, -1], rtol=1e-5, atol=1e-5)


def test_slot_cache_chunks_equal_the_full_forward(tiny_model):
    """Two sequences in slots 2 and 0, written in chunks of different sizes (right-padded), then a decode
    step: the logits equal a plain forward of each whole sequence."""
    from mtnlg.model.kv_cache import SlotKVCache

    torch.manual_seed(1)
    seqs = [torch.randint(0, 97, (12,)), torch.randint(0, 97, (7,))]
    c = tiny_model.cfg
    cache = SlotKVCache(c.num_layers, 3, c.num_heads, 16, c.head_dim, torch.float32, torch.device("cpu"))
    slots, done = [2, 0], [0, 0]
    for chunk in ([5, 3], [7, 4]):
        span = cache.select(slots, done, chunk)
        T = max(chunk)
        ids = torch.zeros(2, T, dtype=torch.long)
        for i, n in enumerate(chunk):
            ids[i, :n] = seqs[i][done[i]:done[i] + n]
        pos = (torch.tensor(done)[:, None] + torch.arange(T)[None]).clamp(max=15)
        mask = (torch.arange(span)[None, None, :] <= pos[:, :, None])[:, None]
        out = tiny_model(ids, positions=pos, cache=cache, attn_mask=mask, logits_at=torch.tensor(chunk) - 1)
        done = [d + n for d, n in zip(done, chunk)]
    for i, s in enumerate(seqs):
        torch.testing.assert_close(out[i], tiny_model(s[None])[0, -1], rtol=1e-4, atol=1e-4)


def test_init_statistics():
    cfg = ModelConfig(vocab_size=512, hidden_size=256, num_layers=8, num_heads=4, ffn_hidden_size=1024, max_seq_len=128)
    m = materialize(build_model(cfg), seed=3)
    std = cfg.init_std
    scaled = std / math.sqrt(2 * cfg.num_layers)
    for name, p in m.named_parameters():
        if name.endswith("bias"):
            assert torch.count_nonzero(p) == 0, name
        elif ".ln_" in name or name.startswith("norm."):
            assert torch.all(p == 1), name
        elif name.endswith(("attn.proj.weight", "mlp.fc2.weight")):
            assert abs(p.std().item() - scaled) / scaled < 0.05, name
            assert abs(p.mean().item()) < scaled / 10
        else:
            assert abs(p.std().item() - std) / std < 0.05, name


@pytest.mark.parametrize("rule,expect", [("normal", 0.02), ("zeros", 0.0)])
def test_output_layer_init_rules(rule, expect):
    cfg = ModelConfig(vocab_size=64, hidden_size=64, num_layers=2, num_heads=2, ffn_hidden_size=128, max_seq_len=16,
                      output_layer_init=rule)
    m = materialize(build_model(cfg), seed=0)
    w = m.layers["1"].mlp.fc2.weight
    assert abs(w.std().item() - expect) < 0.003


def test_init_is_deterministic_and_layout_independent(tiny_cfg):
    a = materialize(build_model(tiny_cfg), seed=7)
    b = materialize(build_model(tiny_cfg), seed=7)
    c = materialize(build_model(tiny_cfg), seed=8)
    for (n, p), (_, q), (_, r) in zip(a.named_parameters(), b.named_parameters(), c.named_parameters()):
        assert torch.equal(p, q), n
        if p.std() > 0:
            assert not torch.equal(p, r), n
    # A parameter's value depends only on its name and seed, not on the module around it.
    w = init_value("layers.1.attn.qkv.weight", a.layers["1"].attn.qkv.weight.shape, tiny_cfg, 7)
    assert torch.equal(w, a.layers["1"].attn.qkv.weight)


@pytest.mark.parametrize("v,h,l,heads,f,s", [(97, 32, 2, 4, 64, 64), (50257, 768, 12, 12, 3072, 1024),
                                              (1000, 128, 3, 8, 300, 17), (30522, 256, 1, 16, 1024, 512)])
def test_closed_form_parameter_count(v, h, l, heads, f, s):
    cfg = ModelConfig(vocab_size=v, hidden_size=h, num_layers=l, num_heads=heads, ffn_hidden_size=f, max_seq_len=s)
    m = build_model(cfg)
    assert count_parameters(cfg) == sum(p.numel() for p in m.parameters())


def _rss_bytes() -> int | None:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def test_spec_6b_config_builds_on_meta_without_memory():
    """The spec's 6B config (24 GB of fp32 weights) costs no weight memory until materialized."""
    cfg = ModelConfig(vocab_size=30522, hidden_size=4096, num_layers=30, num_heads=16, ffn_hidden_size=15360,
                      max_seq_len=512)
    build_model(ModelConfig(num_layers=1, vocab_size=97))  # warm any first-call import
    before = _rss_bytes()
    m = build_model(cfg)
    after = _rss_bytes()
    assert all(p.is_meta for p in m.parameters())
    assert sum(p.numel() for p in m.parameters()) == 5_916_829_696 == count_parameters(cfg)
    if before is not None and after is not None:  # Linux: resident memory grew by module objects only
        assert after - before < 100 << 20, (after - before) >> 20


def test_activations_differ(tiny_cfg):
    ids = torch.randint(0, 97, (1, 8))
    outs = {}
    for act in ("gelu", "gelu_tanh", "relu"):
        tiny_cfg.activation = act
        outs[act] = materialize(build_model(tiny_cfg), seed=0)(ids)
    assert not torch.allclose(outs["gelu"], outs["relu"])
    assert 0 < (outs["gelu"] - outs["gelu_tanh"]).abs().max() < 1e-2


def test_too_long_input_is_a_clear_error(tiny_model):
    with pytest.raises(ConfigError, match="max_seq_len"):
        tiny_model(torch.zeros(1, 65, dtype=torch.long))


def test_inference_attention_leaves_out_cudnn_on_cuda_only():
    """Decoding changes the key length every step; cuDNN's SDPA plans each new shape (~40 ms on an H200),
    so inference on CUDA runs flash / memory-efficient attention, and CPU keeps torch's own choice."""
    import contextlib

    from mtnlg.device import inference_attention

    before = (torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled())
    assert isinstance(inference_attention(torch.device("cpu")), contextlib.nullcontext)
    with inference_attention(torch.device("cuda")):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    assert (torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled()) == before


def test_gelu_runs_small_cpu_tensors_off_onednn_and_leaves_it_on():
    """oneDNN's GELU costs ~10 us a call to set up (4x ATen's kernel on a decode step's FFN row) but is faster
    on training-size tensors: mtnlg.device.gelu switches oneDNN off for small CPU tensors only, for the one
    call, and gives the same values as F.gelu."""
    import torch.nn.functional as F
    from torch.utils._python_dispatch import TorchDispatchMode

    from mtnlg.device import ONEDNN_GELU_MIN_ELEMENTS, gelu

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.onednn: list[bool] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.gelu.default:
                self.onednn.append(torch.backends.mkldnn.enabled)
            return func(*args, **(kwargs or {}))

    small, large = torch.randn(1, 1, 1152), torch.randn(ONEDNN_GELU_MIN_ELEMENTS)
    with Seen() as seen:
        out_small, out_large = gelu(small), gelu(large)
    assert seen.onednn == [False, True]
    assert torch.backends.mkldnn.enabled
    torch.testing.assert_close(out_small, F.gelu(small), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_large, F.gelu(large), rtol=1e-5, atol=1e-6)
    torch.backends.mkldnn.enabled = False  # a user's own choice is kept
    try:
        gelu(small)
        assert not torch.backends.mkldnn.enabled
    finally:
        torch.backends.mkldnn.enabled = True
