"""Read a checkpoint one tensor at a time (for loading straight into int8, :func:`mtnlg.model.quantize.load_quantized`).

A reader is ``read(name, shape) -> tensor | None``: the full tensor saved under the model parameter
``name`` (whatever layout wrote it), or None when the checkpoint does not hold it.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader

from mtnlg.errors import CheckpointError


def dcp_reader(checkpoint: Path):
    """``read(name, shape)`` over a sharded (DCP) training checkpoint: one full tensor per call, whatever
    the saving layout, without reading the others. The vocabulary rows are cut or zero-padded to
    ``shape`` (the checkpoint may hold a tensor-parallel padding). None for a name not saved."""
    meta = FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata

    def read(name: str, shape: torch.Size) -> torch.Tensor | None:
        key = f"model.{name}"
        if key not in meta or not hasattr(meta[key], "size"):
            return None
        t = torch.empty(tuple(meta[key].size), dtype=meta[key].properties.dtype)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                dcp.load({"model": {name: t}}, checkpoint_id=str(checkpoint), no_dist=True)
        except (Exception, dcp.api.CheckpointException) as e:  # noqa: BLE001 - DCP's is a BaseException
            raise CheckpointError(f"{checkpoint}: cannot read {name} ({str(e).splitlines()[0][:200]})") from None
        if name.endswith("tok_embeddings.weight") and t.shape[0] != shape[0]:
            rows = min(t.shape[0], shape[0])
            out = torch.zeros(tuple(shape), dtype=t.dtype)
            out[:rows] = t[:rows]
            t = out
        return t

    return read
