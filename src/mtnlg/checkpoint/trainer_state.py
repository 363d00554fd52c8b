"""Trainer state (step, data position, schedulers, RNG) as JSON: no pickle is ever written or read.

Values JSON cannot hold are tagged: tuples ``{"__tuple__": [...]}``, tensors and numpy arrays
``{"__tensor__": base64, "dtype": "uint8", "shape": [...]}`` and numpy
arrays ``{"__ndarray__": [...], "dtype": "uint32"}``. Decoding accepts only these tags and a
fixed list of dtypes, so a crafted file can at worst fail to load.
"""

from __future__ import annotations

import base64
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtnlg.errors import CheckpointError

DTYPES = {str(d).removeprefix("torch."): d for d in (torch.uint8, torch.int8, torch.int32, torch.int64,
                                                      torch.float32, torch.float64, torch.bool)}

NP_DTYPES = {n: getattr(np, n) for n in ("uint8", "uint32", "int32", "int64", "float32", "float64", "bool")}


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npy = state["numpy"]
    np.random.set_state((npy[0], np.asarray(npy[1], dtype=np.uint32), *npy[2:]))
    torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([torch.as_tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _encode(obj: Any) -> Any:
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            return {"__dict__": [[_encode(k), _encode(v)] for k, v in obj.items()]}
        return {k: _encode(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v) for v in obj]
    if isinstance(obj, np.ndarray):
        if obj.dtype.name not in NP_DTYPES:
            raise CheckpointError(f"trainer state holds a {obj.dtype} array, which cannot be saved as JSON")
        return {"__ndarray__": obj.tolist(), "dtype": obj.dtype.name}
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        name = str(t.dtype).removeprefix("torch.")
        if name not in DTYPES:
            raise CheckpointError(f"trainer state holds a {t.dtype} tensor, which cannot be saved as JSON")
        return {"__tensor__": base64.b64encode(t.numpy().tobytes()).decode(), "dtype": name, "shape": list(t.shape)}
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise CheckpointError(f"trainer state holds a {type(obj).__name__}, which cannot be saved as JSON")


def _decode(obj: Any) -> Any:
    if isinstance(obj, list):
        return [_decode(v) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tuple__" in obj:
        return tuple(_decode(v) for v in obj["__tuple__"])
    if "__dict__" in obj:
        return {_decode(k): _decode(v) for k, v in obj["__dict__"]}
    if "__ndarray__" in obj:
        return np.asarray(obj["__ndarray__"], dtype=NP_DTYPES[obj["dtype"]])
    if "__tensor__" in obj:
        dtype = DTYPES[obj["dtype"]]
        raw = bytearray(base64.b64decode(obj["__tensor__"], validate=True))
        t = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        return t.reshape([int(s) for s in obj["shape"]]).clone()
    return {k: _decode(v) for k, v in obj.items()}


def save_trainer_state(state: dict[str, Any], path: str | Path) -> None:
    Path(path).write_text(json.dumps(_encode(state)))


def load_trainer_state(path: str | Path) -> dict[str, Any]:
    try:
        state = _decode(json.loads(Path(path).read_text()))
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{path} is not a valid trainer state ({str(e).splitlines()[0][:200]})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a valid trainer state (not a JSON object)")
    return state
