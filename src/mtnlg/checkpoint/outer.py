"""Local SGD's state in training checkpoints (``parallel.sync_every > 1``, sync or ``outer_async``).

What an exact resume needs besides the model and its optimizer, and where it goes:

* ``outer_anchor.<param>``, ``outer_momentum.<param>``, ``outer_pending.<param>`` (DCP): the outer
  optimizer's global model, its Nesterov momentum and the replica-averaged delta of an asynchronous
  round still in flight (waited for at save time: its value is what the next sync point would apply,
  so the delayed update is reproduced bit for bit). Equal on every replica, each saved like (sharded
  as, vocabulary unpadded as) the parameter it shadows, so any layout reshards them.
* ``replica_model.*``, ``replica_optim.*``, ``replica_start.*`` (DCP, only when ``dp_replicate > 1``):
  between outer steps each replica has its own weights, AdamW moments and (async) round start. Each
  such tensor is stacked over the replicas, ``[dp_replicate, *shape]``, sharded ``Shard(0)`` over the
  mesh's ``dp_replicate`` dimension (and like the parameter over the others); ``model.*`` keeps
  replica 0's copy for inference.
* ``trainer_rank*.json`` ``"outer"``: ``every``, ``overlap``, ``replicas`` and which of the above exist.

Nothing here imports :mod:`mtnlg.parallel`: the engine's ``OuterSync`` is used through its
``params``, ``mesh``, ``replicas``, ``replica``, ``every``, ``overlap``, ``state_dict`` and ``load_state_dict``.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.placement_types import _StridedShard

log = logging.getLogger(__name__)

SHARED = ("anchor", "momentum", "pending")  # equal on every replica
PER_REPLICA = ("model", "optim", "start")


def param_names(model_parts: Sequence[nn.Module], params: Sequence[nn.Parameter]) -> list[str]:
    """The state-dict name of each of ``params`` (the first name of a tied parameter)."""
    names: dict[int, str] = {}
    for part in model_parts:
        for name, p in part.named_parameters():
            names.setdefault(id(p), name)
    return [names[id(p)] for p in params]


def _like(param: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``t`` (a local shard of ``param``'s shape) as a tensor sharded like ``param``."""
    if isinstance(param, DTensor):
        return DTensor.from_local(t.reshape(param.to_local().shape), param.device_mesh, param.placements,
                                  shape=param.shape, stride=param.stride(), run_check=False)
    return t.reshape(param.shape)


def _split(outer: Any, flat: torch.Tensor) -> list[torch.Tensor]:
    sizes = [(p.to_local() if isinstance(p, DTensor) else p).numel() for p in outer.params]
    return list(torch.split(flat, sizes))


def outer_groups(outer: Any, names: list[str]) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """(``{group: {param name: tensor}}`` for DCP, the JSON summary) of ``outer``'s state right now."""
    st = outer.state_dict()
    lists: dict[str, list[torch.Tensor]] = {"anchor": st["anchors"]}
    if all(m is not None for m in st["momentum"]):
        lists["momentum"] = st["momentum"]
    if st.get("pending") is not None:
        lists["pending"] = _split(outer, st["pending"])
    if outer.overlap:
        lists["start"] = st["starts"]
    groups = {f"outer_{kind}": {n: _like(p, t) for n, p, t in zip(names, outer.params, ts, strict=True)}
              for kind, ts in lists.items()}
    info = {"every": outer.every, "overlap": outer.overlap, "replicas": outer.replicas,
            "has": sorted(k for k in lists if k != "start" or outer.replicas == 1)}
    return groups, info


def templates(outer: Any, names: list[str], kinds: list[str]) -> dict[str, dict[str, Any]]:
    """Empty ``outer_<kind>`` groups shaped and sharded like the parameters, for DCP to load into."""
    return {f"outer_{kind}": {n: _like(p, torch.empty_like(p.to_local() if isinstance(p, DTensor) else p))
                              for n, p in zip(names, outer.params, strict=True)} for kind in kinds}


def _replica_mesh(outer: Any, t: torch.Tensor):
    names = t.device_mesh.mesh_dim_names if isinstance(t, DTensor) else ()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return outer.mesh[("dp_replicate", *names)] if names else outer.mesh["dp_replicate"]


def _shifted(placement: Any) -> Any:
    """``placement`` one tensor dimension further (the replica dimension goes first)."""
    if isinstance(placement, _StridedShard):
        return _StridedShard(placement.dim + 1, split_factor=placement.split_factor)
    if isinstance(placement, Shard):
        return Shard(placement.dim + 1)
    return placement


def stack(outer: Any, t: torch.Tensor, fresh: bool = False) -> DTensor:
    """This replica's ``t`` as its row of a ``[replicas, *shape]`` tensor sharded over ``dp_replicate``
    (``fresh``: an empty one of that layout to load into, not sharing ``t``'s storage)."""
    local = (t.to_local() if isinstance(t, DTensor) else t).unsqueeze(0)
    if fresh:
        local = torch.empty_like(local)
    placements = [Shard(0)] + ([_shifted(p) for p in t.placements] if isinstance(t, DTensor) else [])
    shape = torch.Size((outer.replicas, *t.shape))
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, _replica_mesh(outer, t), placements, shape=shape, stride=stride,
                              run_check=False)


def unstack(template: torch.Tensor, loaded: DTensor) -> torch.Tensor:
    """The inverse of :func:`stack` for this replica: its row, sharded like ``template``."""
    row = loaded.to_local()[0]
    if isinstance(template, DTensor):
        return DTensor.from_local(row, template.device_mesh, template.placements, shape=template.shape,
                                  stride=template.stride(), run_check=False)
    return row


REPLICA_OF = {"replica_model": "model", "replica_optim": "optim", "replica_start": "outer_start"}


def replica_groups(outer: Any, state: dict[str, dict[str, Any]], fresh: bool = False) -> dict[str, dict[str, Any]]:
    """Per-replica stacks of the model, inner optimizer and (async) round-start tensors in ``state``
    (``fresh``: empty ones to load into)."""
    if outer is None or outer.replicas == 1 or outer.mesh is None:
        return {}
    sources = {"model": state.get("model", {}), "optim": state.get("optim", {}), "start": state.get("outer_start", {})}
    return {f"replica_{kind}": {k: stack(outer, v, fresh) for k, v in src.items()
                                if isinstance(v, torch.Tensor) and v.dim() >= 1}
            for kind, src in sources.items() if src}


def apply_replicas(state: dict[str, dict[str, Any]], stacks: dict[str, dict[str, Any]]) -> None:
    """Put this replica's loaded rows back into ``state`` (in place of the templates they came from)."""
    for group, values in stacks.items():
        target = state[REPLICA_OF[group]]
        for key, loaded in values.items():
            target[key] = unstack(target[key], loaded)


def load_into(outer: Any, names: list[str], state: dict[str, dict[str, Any]]) -> None:
    """Give ``outer`` the loaded groups (absent ones start fresh from the loaded parameters)."""
    def local_list(kind: str) -> list[torch.Tensor] | None:
        group = state.get(f"outer_{kind}")
        if not group:
            return None
        return [(group[n].to_local() if isinstance(group[n], DTensor) else group[n]).reshape(
            (p.to_local() if isinstance(p, DTensor) else p).shape) for n, p in zip(names, outer.params)]

    pending = local_list("pending")
    outer.load_state_dict({
        "anchors": local_list("anchor"),
        "momentum": local_list("momentum"),
        "starts": local_list("start"),
        "pending": torch.cat([t.flatten() for t in pending]) if pending else None,
    })


def expected(outer: Any, saved: dict[str, Any] | None) -> tuple[list[str], bool]:
    """(the ``outer_*`` groups to load, whether the per-replica stacks can be loaded) for ``outer``
    given the checkpoint's JSON summary (None: saved without local SGD)."""
    if outer is None or saved is None:
        if outer is not None:
            log.warning("the checkpoint has no local-SGD state: the outer optimizer starts afresh at its weights")
        return [], False
    kinds = [k for k in saved.get("has", []) if k in SHARED]
    if kinds and "pending" in kinds and not outer.overlap:
        log.warning("the checkpoint's asynchronous outer round in flight is dropped (parallel.outer_async=false)")
        kinds.remove("pending")
    same_replicas = saved.get("replicas") == outer.replicas
    if saved.get("replicas", 1) > 1 and not same_replicas:
        log.warning("the checkpoint has %s local-SGD replicas, this run %s: every replica resumes from replica "
                    "0's weights (not an exact resume)", saved.get("replicas"), outer.replicas)
    if outer.overlap and saved.get("overlap") and same_replicas and outer.replicas == 1:
        kinds.append("start")
    return kinds, same_replicas and outer.replicas > 1
