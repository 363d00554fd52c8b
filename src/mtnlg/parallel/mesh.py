"""Build the 4-D DeviceMesh ``pp x dp_replicate x dp_shard x tp`` from the parallel config.

::

    world = pp * dp_replicate * dp_shard * tp          (dp_shard = -1 takes what is left)

    mesh dims (outermost first):  "pp"  "dp_replicate"  "dp_shard"  "tp"
    flattened:                    "dp" = dp_replicate x dp_shard   (ranks that read different data)

``tp`` is innermost so tensor-parallel peers are neighbours (same node on GPUs). The backend comes
from :func:`mtnlg.device.backend_for` (nccl on CUDA, gloo on CPU), the one place that decides it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from mtnlg.config import ParallelConfig
from mtnlg.device import backend_for
from mtnlg.errors import ConfigError

log = logging.getLogger(__name__)

DIMS = ("pp", "dp_replicate", "dp_shard", "tp")


def resolve_degrees(pcfg: ParallelConfig, world_size: int) -> ParallelConfig:
    """A copy of ``pcfg`` with ``dp_shard=-1`` filled from the world size (the one type for the
    layout's degrees: ``.pp .dp_replicate .dp_shard .tp .dp .world``); checks the product."""
    rest = pcfg.dp_replicate * pcfg.tp * pcfg.pp
    dp_shard = pcfg.dp_shard
    if dp_shard == -1:
        if world_size % rest:
            raise ConfigError(
                f"world size {world_size} is not divisible by parallel.dp_replicate*tp*pp = "
                f"{pcfg.dp_replicate}*{pcfg.tp}*{pcfg.pp} = {rest}; change the degrees or the number of processes")
        dp_shard = world_size // rest
    deg = dataclasses.replace(pcfg, dp_shard=dp_shard)
    if deg.world != world_size:
        raise ConfigError(
            f"parallel.dp_replicate*dp_shard*tp*pp = {pcfg.dp_replicate}*{dp_shard}*{pcfg.tp}*{pcfg.pp} = "
            f"{deg.world} but the world size is {world_size}; set parallel.dp_shard=-1 or launch {deg.world} processes")
    return deg


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Join the process group when launched by torchrun with WORLD_SIZE > 1; return ``(rank, world)``.

    A no-op (returns ``(0, 1)``) for a plain single process.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend_for(device))
    return dist.get_rank(), dist.get_world_size()


def build_mesh(pcfg: ParallelConfig, device: torch.device, world_size: int | None = None) -> DeviceMesh | None:
    """The 4-D mesh (plus the flattened ``"dp"`` dim), or None for a single process."""
    if world_size is None:
        world_size = dist.get_world_size() if dist.is_initialized() else 1
    deg = resolve_degrees(pcfg, world_size)
    if world_size == 1:
        return None
    mesh = init_device_mesh(device.type, tuple(getattr(deg, d) for d in DIMS), mesh_dim_names=DIMS)
    mesh["dp_replicate", "dp_shard"]._flatten("dp")  # mesh["dp"] then names this flattened dim
    log.info("device mesh %s", " x ".join(f"{d}={getattr(deg, d)}" for d in DIMS))
    return mesh


def sub(mesh: DeviceMesh, dim: str) -> DeviceMesh:
    """``mesh[dim]``, including the flattened ``"dp"`` (without torch's slicing deprecation warning)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return mesh[dim]
