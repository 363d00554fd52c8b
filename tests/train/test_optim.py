"""AdamW and Muon groups, the LR schedule and the MT-NLG batch ramp at chosen steps; activation checkpointing parity."""

from __future__ import annotations

import math

import pytest
import torch

from mtnlg.config import TrainConfig
from mtnlg.errors import ConfigError
from mtnlg.parallel.parallelize import apply_activation_checkpointing
from mtnlg.train.muon import MuonAdamW, orthogonalize
from mtnlg.train.optim import BatchRamp, build_optimizer, build_scheduler, lr_at


def test_adamw_hyperparameters_and_no_decay_groups(tiny_model):
    opt = build_optimizer([tiny_model], TrainConfig(optimizer="adamw"))
    decay, plain = opt.param_groups
    assert decay["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert decay["betas"] == (0.9, 0.95) and decay["eps"] == 1e-8
    names = {id(p): n for n, p in tiny_model.named_parameters()}
    assert all(names[id(p)].endswith("weight") and p.dim() == 2 for p in decay["params"])
    plain_names = {names[id(p)] for p in plain["params"]}
    assert "layers.0.ln_1.weight" in plain_names and "layers.0.attn.qkv.bias" in plain_names
    assert "norm.weight" in plain_names
    # The tied LM head is one parameter, optimized once.
    n_params = len({id(p) for p in tiny_model.parameters()})
    assert len(decay["params"]) + len(plain["params"]) == n_params


def test_muon_takes_the_block_matrices_adamw_the_rest(tiny_model):
    opt = build_optimizer([tiny_model], TrainConfig())  # the default
    assert isinstance(opt, MuonAdamW) and TrainConfig().optimizer == "muon"
    assert opt.param_groups[0]["lr"] == 4 * opt.param_groups[-1]["lr"] == 4 * TrainConfig().lr  # muon_lr unset
    names = {id(p): n for n, p in tiny_model.named_parameters()}
    muon, decay, plain = opt.param_groups
    assert muon["muon"] and not decay["muon"] and not plain["muon"]
    assert sorted(names[id(p)].split(".", 2)[2] for p in muon["params"] if ".0." in names[id(p)]) == [
        "attn.proj.weight", "attn.qkv.weight", "mlp.fc1.weight", "mlp.fc2.weight"]
    assert {names[id(p)] for p in decay["params"]} >= {"tok_embeddings.weight"}  # the tied head stays AdamW
    assert len(muon["params"]) + len(decay["params"]) + len(plain["params"]) == len({id(p) for p in
                                                                                     tiny_model.parameters()})
    with pytest.raises(ConfigError, match="train.optimizer must be muon or adamw"):
        TrainConfig(optimizer="sgd").validate()
    with pytest.raises(ConfigError, match="train.muon_lr must be a number > 0"):
        TrainConfig(muon_lr=0.0).validate()
    cfg = TrainConfig(lr=1e-3, muon_lr=4e-3, warmup_steps=0, steps=10)
    opt = build_optimizer([tiny_model], cfg)
    sched = build_scheduler(opt, cfg)
    for _ in range(5):
        opt.step()
        sched.step()
    muon_lr, adam_lr = opt.param_groups[0]["lr"], opt.param_groups[-1]["lr"]
    assert muon_lr == pytest.approx(4 * adam_lr) and adam_lr == pytest.approx(lr_at(5, cfg))


def test_muon_step_is_torch_muons_in_fp32():
    """One step on a matrix equals ``torch.optim.Muon`` (Moonshot's RMS rule) up to its bf16 orthogonalization,
    and the orthogonalized update has singular values in the quintic iteration's band around 1."""
    torch.manual_seed(0)
    w, g = torch.randn(48, 96), torch.randn(48, 96)
    assert bool(((s := torch.linalg.svdvals(orthogonalize(g))) > 0.6).all() and (s < 1.2).all())
    ref = torch.nn.Parameter(w.clone())
    ref.grad = g.clone()
    torch.optim.Muon([ref], lr=0.01, weight_decay=0.1, adjust_lr_fn="match_rms_adamw").step()
    p, b = torch.nn.Parameter(w.clone()), torch.nn.Parameter(torch.zeros(3))
    p.grad, b.grad = g.clone(), torch.ones(3)
    opt = MuonAdamW([p], [{"params": [b], "weight_decay": 0.0}], lr=0.01, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8,
                    muon_lr=0.01)
    opt.step()
    step, ours = (ref.detach() - w), (p.detach() - w)
    assert float((step - ours).norm() / step.norm()) < 0.03
    torch.testing.assert_close(b.detach(), torch.full((3,), -0.01))  # AdamW's first step: -lr * sign(g)
    again = MuonAdamW([p], [{"params": [b], "weight_decay": 0.0}], lr=0.01, weight_decay=0.1, betas=(0.9, 0.95),
                      eps=1e-8)
    again.load_state_dict(opt.state_dict())  # the inner AdamW reads the loaded state, not a stale copy
    assert again._adamw.state is again.state and again.state[b]["step"] == 1


def test_lr_warmup_cosine_values():
    cfg = TrainConfig(lr=1e-3, min_lr_ratio=0.1, warmup_steps=10, steps=110)
    assert lr_at(0, cfg) == pytest.approx(1e-4)  # (0 + 1) / 10 of the peak
    assert lr_at(4, cfg) == pytest.approx(5e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(10, cfg) == pytest.approx(1e-3)  # cosine starts at the peak
    assert lr_at(60, cfg) == pytest.approx(1e-4 + 0.9e-3 * 0.5)  # half way: the mean of peak and floor
    assert lr_at(110, cfg) == pytest.approx(1e-4)
    assert lr_at(500, cfg) == pytest.approx(1e-4)  # flat after lr_decay_steps
    cfg2 = TrainConfig(lr=2e-3, min_lr_ratio=0.0, warmup_steps=0, steps=100, lr_decay_steps=50)
    assert lr_at(25, cfg2) == pytest.approx(2e-3 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(75, cfg2) == 0.0


def test_scheduler_follows_lr_at(tiny_model):
    cfg = TrainConfig(lr=1e-3, warmup_steps=3, steps=20)
    opt = build_optimizer([tiny_model], cfg)
    sched = build_scheduler(opt, cfg)
    for step in range(20):
        assert opt.param_groups[-1]["lr"] == pytest.approx(lr_at(step, cfg))  # AdamW's
        assert opt.param_groups[0]["lr"] == pytest.approx(4 * lr_at(step, cfg))  # Muon's
        opt.step()
        sched.step()


def test_batch_ramp_values():
    # 32 -> 128 by 32 over 3 increments; 96_000 tokens / seq 64 = 1500 samples, 500 per increment.
    cfg = TrainConfig(global_batch_size=128, micro_batch_size=8, seq_len=64, rampup_batch_start=32,
                      rampup_batch_increment=32, rampup_tokens=96_000)
    ramp = BatchRamp(cfg, dp_size=2)
    assert [ramp.batch_size(c) for c in (0, 499, 500, 999, 1000, 1499, 1500, 10**6)] == \
        [32, 32, 64, 64, 96, 96, 128, 128]
    assert ramp.num_micro_batches(0) == 2 and ramp.num_micro_batches(2000) == 8
    # Walking it as the loop does: consumed grows by the batch size of each step.
    consumed, sizes = 0, []
    while consumed < 1700:
        sizes.append(ramp.batch_size(consumed))
        consumed += sizes[-1]
    assert sizes[:16] == [32] * 16  # 16 * 32 = 512 >= 500
    assert sizes[16] == 64
    assert BatchRamp(TrainConfig(global_batch_size=16, micro_batch_size=4)).batch_size(0) == 16  # no ramp


def test_batch_ramp_rejects_uneven_sizes():
    with pytest.raises(ConfigError, match="rampup_batch_increment"):
        BatchRamp(TrainConfig(global_batch_size=100, micro_batch_size=4, rampup_batch_start=32,
                              rampup_batch_increment=24, rampup_tokens=1000))
    with pytest.raises(ConfigError, match="micro_batch_size"):
        BatchRamp(TrainConfig(global_batch_size=16, micro_batch_size=6))


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_same_gradients(tiny_cfg, mode):
    from mtnlg.model.init import build_model, materialize

    tokens = torch.randint(0, tiny_cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    grads = []
    for m in ("none", mode):
        model = materialize(build_model(tiny_cfg), seed=0).train()
        assert apply_activation_checkpointing([model], m) == (0 if m == "none" else tiny_cfg.num_layers)
        model(tokens).logsumexp(-1).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        assert "layers.0.attn.qkv.weight" in dict(model.named_parameters())  # names unchanged
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-6)


def test_example_configs_are_valid():
    from pathlib import Path

    from mtnlg.config import Config

    examples = Path(__file__).resolve().parents[2] / "examples"
    tiny = Config.load(examples / "tiny.yaml")
    poems = Config.load(examples / "poems.yaml")
    assert tiny.model.dropout == 0.0  # exact-resume and reshard tests rely on it
    default = Config()
    assert poems.data.corpus.startswith("poems")
    # the longer run: a larger model, and more training compute (block parameters x tokens) than the default job
    assert poems.model.hidden_size > default.model.hidden_size

    def compute(c):
        return 12 * c.model.hidden_size ** 2 * c.model.num_layers * c.train.steps * c.train.global_batch_size

    assert compute(poems) > 4 * compute(default)
