"""Single-process tests of the parallel building blocks: degrees, splits, errors, the 1-process
engine against a hand-written step, local-SGD arithmetic and FSDP memory on the meta device."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.parallel.harness import micro_batches, tiny_config
from mtnlg.config import ModelConfig, ParallelConfig
from mtnlg.errors import ConfigError
from mtnlg.model import build_model, count_parameters, materialize
from mtnlg.parallel import pipeline as pipe
from mtnlg.parallel.mesh import init_distributed
from mtnlg.train.step import build_train_step as build_engine
from mtnlg.parallel.mesh import resolve_degrees
from mtnlg.parallel.tensor import check_tp, tp_model_config


def test_degrees_fill_and_errors():
    d = resolve_degrees(ParallelConfig(tp=2, pp=2), 8)
    assert (d.pp, d.dp_replicate, d.dp_shard, d.tp, d.dp) == (2, 1, 2, 2, 2)
    with pytest.raises(ConfigError, match="world size is 4"):
        resolve_degrees(ParallelConfig(tp=2, dp_shard=4), 4)
    with pytest.raises(ConfigError, match="not divisible by parallel.dp_replicate"):
        resolve_degrees(ParallelConfig(tp=3), 4)


def test_tensor_parallel_checks_and_vocab_padding():
    cfg = ModelConfig(vocab_size=95, hidden_size=32, num_heads=4, ffn_hidden_size=64)
    with pytest.raises(ConfigError, match="model.num_heads=4 is not divisible by parallel.tp=3"):
        check_tp(cfg, 3)
    padded = tp_model_config(cfg, 2)
    assert padded.padded_vocab_size() == 96 and cfg.padded_vocab_size() == 95
    assert tp_model_config(cfg, 1) is cfg


def test_pipeline_splits():
    assert pipe.uniform_split(10, 4) == [2, 2, 3, 3]
    cfg = tiny_config(pp=2)
    assert pipe.stage_layer_counts(cfg.model, cfg.parallel, 16) == [2, 2]
    # auto: with a heavy head the last stage gets fewer layers; the embedding weighs on the first
    assert pipe.balance([1.0] * 8, 2, 0.0, 4.0) == [6, 2]
    assert pipe.balance([1.0] * 8, 2, 2.0, 0.0) == [3, 5]
    assert pipe.balance([1.0] * 9, 3) == [3, 3, 3]
    big = ModelConfig(vocab_size=50257, hidden_size=256, num_layers=12, num_heads=4, ffn_hidden_size=1024)
    counts = pipe.stage_layer_counts(big, ParallelConfig(pp=4, pp_balance="auto"), 128)
    assert sum(counts) == 12 and counts[-1] < counts[1]
    with pytest.raises(ConfigError, match="parallel.pp_layers"):
        pipe.stage_layer_counts(cfg.model, ParallelConfig(pp=2, pp_layers=[1, 2]), 16)
    with pytest.raises(ConfigError, match="cannot fill"):
        pipe.stage_layer_counts(cfg.model, ParallelConfig(pp=4, vpp=2), 16)
    assert pipe.stage_ids(0, 2, 2, "interleaved") == [0, 2]
    assert pipe.stage_ids(0, 2, 2, "zb") == [0, 3]


def test_split_stage_keeps_names():
    model = build_model(tiny_config().model)
    first, last = (pipe.split_stage(model, [1, 3], s) for s in (0, 1))
    assert list(first.layers) == ["0"] and first.output is None and first.tok_embeddings is not None
    assert list(last.layers) == ["1", "2", "3"] and last.tok_embeddings is None
    assert last.output.weight is not model.tok_embeddings.weight  # its own copy of the tied weight


def test_one_process_engine_is_plain_training():
    """The engine's step equals a hand-written token-mean cross entropy step on the plain model."""
    assert init_distributed(torch.device("cpu")) == (0, 1)
    cfg = tiny_config(grad_sync="token_weighted")
    eng = build_engine(cfg, torch.device("cpu"))
    ref = materialize(build_model(cfg.model), seed=cfg.train.seed)
    for (n1, p1), (n2, p2) in zip(eng.model_parts[0].named_parameters(), ref.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)
    mbs = micro_batches(0, 0, 1)
    out = eng.train_step(mbs)
    x = torch.cat([b[0] for b in mbs])
    y = torch.cat([b[1] for b in mbs])
    loss = F.cross_entropy(ref(x).flatten(0, 1), y.flatten(), ignore_index=-100)
    loss.backward()
    assert out.tokens == int((y != -100).sum())
    assert out.loss == pytest.approx(loss.item(), rel=1e-6)
    for p1, p2 in zip(eng.model_parts[0].parameters(), ref.parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-5, atol=1e-7)
    want = torch.nn.utils.clip_grad_norm_(list(ref.parameters()), 0.1).item()
    assert eng.clip_grad_norm_(0.1) == pytest.approx(want, rel=1e-6)
    for p1, p2 in zip(eng.model_parts[0].parameters(), ref.parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-5, atol=1e-7)
    assert eng.grads_finite()
    eng.model_parts[0].layers["0"].mlp.fc1.weight.grad[0, 0] = float("nan")
    assert not eng.grads_finite()
    total, tokens = eng.eval_loss(mbs)
    assert tokens == out.tokens and total / tokens == pytest.approx(out.loss, rel=1e-6)
    assert eng.comm_bytes() == {}


def test_padded_vocabulary_does_not_change_the_loss():
    cfg = tiny_config()
    cfg.model.vocab_size, cfg.model.make_vocab_size_divisible_by = 90, 32  # padded to 96
    eng = build_engine(cfg, torch.device("cpu"))
    ref = materialize(build_model(cfg.model), seed=cfg.train.seed)
    x, y = micro_batches(0, 0, 1, micro=8)[0]
    x, y = x % 90, y.masked_fill(y >= 90, -100)
    out = eng.train_step([(x, y)])
    want = F.cross_entropy(ref(x)[..., :90].flatten(0, 1), y.flatten(), ignore_index=-100)
    assert out.loss == pytest.approx(want.item(), rel=1e-6)


def test_outer_step_arithmetic():
    """One replica, outer SGD without momentum: lr 1 keeps the inner result, lr 0.5 goes halfway."""
    from mtnlg.parallel.data import OuterSync

    for lr, want in ((1.0, 3.0), (0.5, 2.0)):
        p = torch.nn.Parameter(torch.tensor([1.0]))
        sync = OuterSync([p], None, every=2, lr=lr, momentum=0.0)
        with torch.no_grad():
            p.add_(2.0)
        assert not sync.maybe_sync(1)
        assert sync.maybe_sync(2)
        assert p.item() == pytest.approx(want)


@pytest.mark.slow
def test_fsdp_6b_per_rank_parameter_bytes_on_meta():
    """The spec's 6B model under FSDP over 4 ranks (fake process group, meta device): each rank
    stores total/4 parameter bytes (within 1%)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from mtnlg.parallel.data import apply_fsdp, local_param_bytes

    cfg = ModelConfig(vocab_size=30522, hidden_size=4096, num_layers=30, num_heads=16, ffn_hidden_size=15360,
                      max_seq_len=512, make_vocab_size_divisible_by=128)
    total = count_parameters(cfg) * 4
    assert 5.5e9 < total / 4 < 6.5e9  # parameters (4 bytes each)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=4)
    try:
        mesh = init_device_mesh("cpu", (4,), mesh_dim_names=("dp_shard",))
        model = apply_fsdp(build_model(cfg), mesh)
        per_rank = local_param_bytes([model])
        print(f"6B FSDP over 4 ranks: {per_rank / 2**30:.3f} GiB per rank, total/4 = {total / 4 / 2**30:.3f} GiB")
        assert abs(per_rank - total / 4) <= 0.01 * total / 4
    finally:
        dist.destroy_process_group()


def test_comm_counter_scope_counts_twice_then_replays():
    """A keyed block runs under the dispatch mode the first ``times`` times, then adds the last count
    without it (the per-op Python dispatch costs more than a small model's kernels)."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    from mtnlg.parallel.comm import CommCounter

    c = CommCounter(None)
    c.enabled = True
    seen_mode = []

    def block(nbytes: int):
        seen_mode.append(_get_current_dispatch_mode() is c)
        c.bytes["dp"] += nbytes  # what the mode charges for a collective
        with c:  # a nested block (an explicit collective) inside the keyed one
            pass

    for nbytes in (7, 5, 999, 999):
        with c.scope(("train", (2, 64)), times=2):
            block(nbytes if seen_mode.count(True) < 2 else 0)
    assert seen_mode == [True, True, False, False]
    assert c.take() == {"dp": 7 + 5 + 5 + 5}
    with c.scope(("train", (1, 64))):  # another shape is counted afresh, once by default
        block(3)
    assert seen_mode[-1] is True and c.take() == {"dp": 3}
    with c.scope(("train", (1, 64))):
        block(0)
    assert seen_mode[-1] is False and c.take() == {"dp": 3}
