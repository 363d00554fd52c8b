"""``parallel_output`` under tensor parallelism (2 gloo ranks): vocab-parallel logits or gathered ones."""

from __future__ import annotations

import dataclasses

import torch

from tests.parallel.harness import spawn, tiny_config


def _head_outputs() -> dict[str, object]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    from mtnlg.infer.tp import gather_logits
    from mtnlg.model.init import build_model, materialize
    from mtnlg.parallel.tensor import apply_tensor_parallel

    base = tiny_config().model
    ids = torch.arange(12).view(2, 6) % base.vocab_size
    ref = materialize(build_model(base), seed=3)(ids)
    mesh = init_device_mesh("cpu", (2,))
    seen = {}
    for po in (True, False):
        model = materialize(build_model(dataclasses.replace(base, parallel_output=po)), seed=3)
        apply_tensor_parallel(model, mesh, sequence_parallel=True)  # loss_parallel follows parallel_output
        out = model(ids)
        if po:
            assert isinstance(out, DTensor) and out.placements == (Shard(2),)
            assert out.to_local().shape[-1] == base.vocab_size // 2  # this rank's vocabulary half only
            torch.testing.assert_close(out.full_tensor(), ref, rtol=1e-5, atol=1e-6)
            model.output.register_forward_hook(gather_logits)  # what TP inference does with parallel_output=True
            out = model(ids)
        assert not isinstance(out, DTensor) and out.shape[-1] == base.vocab_size
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        seen[str(po)] = True
    return seen


def test_parallel_output_decides_vocab_parallel_or_gathered_logits():
    results = spawn(2, _head_outputs)
    assert all(r == {"True": True, "False": True} for r in results.values())
