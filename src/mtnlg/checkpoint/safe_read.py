"""Read a distributed checkpoint (DCP) without ever unpickling arbitrary objects.

``torch.distributed.checkpoint`` stores its index (``.metadata``) as a pickle and loads non-tensor
values (optimizer hyper-parameters) with ``torch.load(weights_only=False)``: a crafted checkpoint
would run code on load. torch 2.13 offers no safe reader, so this module provides one:

* :class:`SafeReader` reads ``.metadata`` with :class:`MetadataUnpickler`, which admits only DCP's
  own metadata classes (plus ``torch.Size``, dtypes, layouts and ``pathlib`` paths) and checks that
  every storage entry names a plain file inside the checkpoint directory;
* :class:`SafeLoadPlanner` loads the non-tensor values with ``torch.load(weights_only=True)``
  (tensors already are).
"""

from __future__ import annotations

import io
import pathlib
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import filesystem as _fs
from torch.distributed.checkpoint import metadata as _md
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.planner import ReadItem

from mtnlg.errors import CheckpointError

_MD = "torch.distributed.checkpoint.metadata"
ALLOWED: dict[tuple[str, str], Any] = {
    (_MD, name): getattr(_md, name)
    for name in ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
                 "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")
}
ALLOWED[("torch.distributed.checkpoint.filesystem", "_StorageInfo")] = _fs._StorageInfo
ALLOWED[("torch", "Size")] = torch.Size
ALLOWED[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
ALLOWED[("pathlib", "PosixPath")] = pathlib.PurePosixPath  # pure: no file system access on load
ALLOWED[("pathlib", "WindowsPath")] = pathlib.PureWindowsPath
ALLOWED[("pathlib", "Path")] = pathlib.PurePath
ALLOWED[("pathlib", "PurePosixPath")] = pathlib.PurePosixPath
ALLOWED[("pathlib", "PureWindowsPath")] = pathlib.PureWindowsPath
ALLOWED[("collections", "OrderedDict")] = dict


class MetadataUnpickler(pickle.Unpickler):
    """An unpickler that constructs only DCP metadata objects; anything else is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED:
            return ALLOWED[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only checkpoint metadata classes are "
                                     "allowed)")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not allowed in checkpoint metadata")


def read_metadata(path: str | Path) -> _md.Metadata:
    """The DCP index of checkpoint directory ``path``, read safely (CheckpointError naming the file)."""
    file = Path(path) / ".metadata"
    try:
        with open(file, "rb") as f:
            md = MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise CheckpointError(f"{file} is missing: not a distributed checkpoint") from None
    except Exception as e:  # UnpicklingError, EOFError, bad opcodes, wrong constructor args ...
        raise CheckpointError(f"{file} is not valid checkpoint metadata ({str(e).splitlines()[0][:200]}); "
                              "it was not loaded") from None
    if not isinstance(md, _md.Metadata) or not isinstance(md.state_dict_metadata, dict):
        raise CheckpointError(f"{file} is not valid checkpoint metadata (unexpected content)")
    for item in (md.storage_data or {}).values():
        rel = getattr(item, "relative_path", None)
        if not isinstance(item, _fs._StorageInfo) or not isinstance(rel, str) or "/" in rel or "\\" in rel \
                or rel in ("", ".", "..") or not isinstance(item.offset, int) or not isinstance(item.length, int):
            raise CheckpointError(f"{file} names a storage file outside the checkpoint ({rel!r}); it was not loaded")
    return md


class SafeReader(FileSystemReader):
    """``FileSystemReader`` whose ``.metadata`` goes through :class:`MetadataUnpickler`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> _md.Metadata:
        if kwargs.get("rank") is not None:
            raise CheckpointError(f"{self.path}: per-rank metadata files are not supported")
        md = read_metadata(self.path)
        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = _md.StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md


class SafeLoadPlanner(DefaultLoadPlanner):
    """``DefaultLoadPlanner`` that reads non-tensor values with ``torch.load(weights_only=True)``."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except Exception as e:
            raise CheckpointError(f"value {read_item.dest_index.fqn!r} in the checkpoint is not plain data "
                                  f"({str(e).splitlines()[0][:200]}); it was not loaded") from None
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._nested_dict import set_element

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def dcp_load(state: dict[str, Any], path: str | Path, no_dist: bool) -> None:
    """``dcp.load`` through the safe reader and planner; any failure becomes a one-line CheckpointError
    (DCP's ``CheckpointException`` is a ``BaseException``, so ``except Exception`` would miss it)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, storage_reader=SafeReader(str(path)), planner=SafeLoadPlanner(), no_dist=no_dist)
    except CheckpointError:
        raise
    except CheckpointException as e:
        inner = [p[0] if isinstance(p, tuple) else p for p in e.failures.values()]
        own = next((x for x in inner if isinstance(x, CheckpointError)), None)
        if own is not None:
            raise CheckpointError(str(own)) from None
        raise CheckpointError(f"{path}: cannot load ({_first_line(e)})") from None
    except Exception as e:
        raise CheckpointError(f"{path}: cannot load ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    """The most specific line of a (possibly per-rank wrapped) DCP error."""
    if isinstance(e, CheckpointException):
        for rank, pair in sorted(e.failures.items()):
            inner = pair[0] if isinstance(pair, tuple) else pair
            if isinstance(inner, CheckpointError):
                return str(inner)
            return f"rank {rank}: {_first_line(inner)}"
    text = [line for line in str(e).strip().splitlines() if line.strip()]
    return (f"{type(e).__name__}: {text[0]}" if text else type(e).__name__)[:300]
