"""Read a checkpoint one tensor at a time (for loading straight into int8, :func:`mtnlg.model.quantize.load_quantized`).

A reader is ``read(name, shape) -> tensor | None``: the full tensor saved under the model parameter
``name`` (whatever layout wrote it), or None when the checkpoint does not hold it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mtnlg.checkpoint.safe_read import dcp_load, read_metadata
from mtnlg.errors import CheckpointError


def dcp_reader(checkpoint: Path):
    """``read(name, shape)`` over a sharded (DCP) training checkpoint: one full tensor per call, whatever
    the saving layout, without reading the others. The vocabulary rows are cut or zero-padded to
    ``shape`` (the checkpoint may hold a tensor-parallel padding). None for a name not saved."""
    meta = read_metadata(checkpoint).state_dict_metadata  # no pickle beyond DCP's metadata classes

    def read(name: str, shape: torch.Size) -> torch.Tensor | None:
        key = f"model.{name}"
        if key not in meta or not hasattr(meta[key], "size"):
            return None
        t = torch.empty(tuple(meta[key].size), dtype=meta[key].properties.dtype)
        try:
            dcp_load({"model": {name: t}}, checkpoint, no_dist=True)
        except CheckpointError as e:
            raise CheckpointError(f"{checkpoint}: cannot read {name} ({e})") from None
        if name.endswith("tok_embeddings.weight") and t.shape[0] != shape[0]:
            rows = min(t.shape[0], shape[0])
            out = torch.zeros(tuple(shape), dtype=t.dtype)
            out[:rows] = t[:rows]
            t = out
        return t

    return read
