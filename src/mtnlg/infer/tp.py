"""Tensor-parallel inference: shard a loaded model over the torchrun ranks."""

from __future__ import annotations


def shard_for_inference(lm, pcfg, device) -> int:
    """Tensor-parallel inference: shard ``lm.model`` over all torchrun ranks (``parallel.tp`` of them)
    with Megatron's split (``mtnlg.parallel.tensor``), replicated activations and logits. Returns the rank."""
    import atexit

    import torch.distributed as dist

    from mtnlg.errors import ConfigError
    from mtnlg.parallel.mesh import build_mesh, init_distributed, sub
    from mtnlg.parallel.tensor import apply_tensor_parallel, check_tp

    rank, world = init_distributed(device)
    if world != pcfg.tp or pcfg.pp != 1:
        raise ConfigError(f"inference with parallel.tp={pcfg.tp} needs exactly {pcfg.tp} processes (got {world}) "
                          f"and parallel.pp=1; launch with `torchrun --nproc-per-node {pcfg.tp} -m mtnlg generate ...`")
    check_tp(lm.model.cfg, pcfg.tp)
    if lm.model.padded_vocab_size % pcfg.tp:
        raise ConfigError(f"the checkpoint's vocabulary ({lm.model.padded_vocab_size} rows) does not split over "
                          f"parallel.tp={pcfg.tp}; use a tp that divides it")
    mesh = build_mesh(pcfg, device, world)
    # parallel_output=True keeps the head's logits vocab-parallel (Shard(-1)); the decode loop
    # samples from whole rows, so the head's output is gathered right after it (gather_logits)
    apply_tensor_parallel(lm.model, sub(mesh, "tp"), sequence_parallel=False)
    if lm.model.cfg.parallel_output:
        lm.model.output.register_forward_hook(gather_logits)
    atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    return rank


def gather_logits(_module, _inputs, out):
    """Forward hook: vocab-parallel logits (a DTensor) -> the full local tensor every rank samples from."""
    return out.full_tensor() if hasattr(out, "full_tensor") else out
