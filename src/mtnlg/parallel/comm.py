"""Communication accounting: bytes moved per mesh dimension, counted at the collective calls.

A ``TorchDispatchMode`` sees every collective that reaches the dispatcher: DTensor's redistributions
(functional collectives, desugared first by returning ``NotImplemented`` for DTensor ops, as
``CommDebugMode`` does), FSDP2's all-gathers / reduce-scatters and the pipeline's point-to-point
sends. Each is charged to the mesh dimension whose process group it runs on ("world" for the
default group).

Convention (Megatron's message sizes): an all-reduce counts its tensor, an all-gather its gathered
output, a reduce-scatter its full input, a send its tensor (receives are not counted, so a
transfer counts once, on the sender). Per rank, per call of :meth:`CommCounter.take`.

The mode sees every op, not only the collectives, and costs tens of microseconds of Python per op:
more than a small model's kernels. :meth:`CommCounter.scope` therefore counts a forward/backward
whose traffic is set by a key (its micro-batch shapes) only the first ``times`` times that key is seen
(2 for a pipeline schedule, whose first step also sends its shape-inference messages) and adds the
last count on later runs with the same key, without the mode.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Hashable, Iterator

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.utils._python_dispatch import TorchDispatchMode

_c10d = torch.ops.c10d
_fc = torch.ops._c10d_functional


def _nbytes(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(t) for t in x)
    return 0


def _group_name(x) -> str | None:
    """The name of a process group given as a name, a ProcessGroup or its TorchScript box."""
    if isinstance(x, str):
        return x
    if isinstance(x, torch.ScriptObject):
        try:
            if "ProcessGroup" not in str(x._type()):
                return None
            import torch.distributed as dist

            return dist.ProcessGroup.unbox(x).group_name
        except (AttributeError, RuntimeError):
            return None
    name = getattr(x, "group_name", None)
    return name if isinstance(name, str) else None


# op packet -> (index of the counted tensor argument, multiply by group size?)
_FUNCOL = {
    "all_reduce": 0, "all_reduce_coalesced": 0, "reduce_scatter_tensor": 0, "reduce_scatter_tensor_coalesced": 0,
    "all_to_all_single": 0, "broadcast": 0,
}
_C10D_IN = {  # name -> index of the counted tensor(s)
    "allreduce_": 0, "allreduce_coalesced_": 0, "broadcast_": 0, "send": 0,
    "_allgather_base_": 0, "allgather_": 0, "allgather_into_tensor_coalesced_": 0, "allgather_coalesced_": 0,
    "_reduce_scatter_base_": 1, "reduce_scatter_": 1, "reduce_scatter_tensor_coalesced_": 1,
    "alltoall_base_": 1, "alltoall_": 1,
}


class CommCounter(TorchDispatchMode):
    """Re-entrant context manager that adds up collective bytes per mesh dimension."""

    def __init__(self, mesh: DeviceMesh | None):
        super().__init__()
        self.names: dict[str, str] = {}
        self.bytes: dict[str, int] = defaultdict(int)
        self.enabled = mesh is not None
        self._depth = 0
        self._seen: dict[Hashable, tuple[int, dict[str, int]]] = {}  # key -> (times counted, bytes)
        if mesh is not None:
            for dim in mesh.mesh_dim_names or ():
                self.names.setdefault(mesh[dim].get_group().group_name, dim)
            from mtnlg.parallel.mesh import sub

            self.names.setdefault(sub(mesh, "dp").get_group().group_name, "dp")
            import torch.distributed as dist

            self.names.setdefault(dist.group.WORLD.group_name, "world")
            # groups created elsewhere over the same ranks (e.g. by a stage's mesh cache) map by ranks
            self.by_ranks: dict[frozenset[int], str] = {}
            for dim in [*(mesh.mesh_dim_names or ()), "dp"]:
                group = sub(mesh, dim).get_group()
                self.by_ranks.setdefault(frozenset(dist.get_process_group_ranks(group)), dim)

    def register(self, group, dim: str) -> None:
        """Charge traffic on ``group`` (an extra process group) to ``dim``."""
        self.names[group.group_name] = dim

    def take(self) -> dict[str, int]:
        """Bytes per dimension since the last call (and reset)."""
        out = dict(self.bytes)
        self.bytes.clear()
        return out

    def __enter__(self):
        if not self.enabled:
            return self
        self._depth += 1
        if self._depth == 1:
            return super().__enter__()
        return self

    def __exit__(self, *exc):
        if not self.enabled:
            return False
        self._depth -= 1
        if self._depth == 0:
            return super().__exit__(*exc)
        return False

    @contextlib.contextmanager
    def scope(self, key: Hashable, times: int = 1) -> Iterator[None]:
        """Count the collectives of a block whose traffic depends only on ``key``: with the mode the
        first ``times`` times, then by adding the last count (see the module doc)."""
        if not self.enabled:
            yield
            return
        counted, known = self._seen.get(key, (0, {}))
        if counted >= times:
            self._depth += 1  # nested ``with counter:`` blocks stay inactive: their bytes are in ``known``
            try:
                yield
            finally:
                self._depth -= 1
            for dim, n in known.items():
                self.bytes[dim] += n
            return
        before = dict(self.bytes)
        with self:
            yield
        self._seen[key] = (counted + 1, {dim: n - before.get(dim, 0) for dim, n in self.bytes.items()
                                         if n != before.get(dim, 0)})

    def _charge(self, group, nbytes: int) -> None:
        name = _group_name(group)
        if name is not None and name not in self.names:
            self.names[name] = self._resolve(name)
        self.bytes[self.names.get(name, "other")] += nbytes

    def _resolve(self, name: str) -> str:
        import torch.distributed as dist
        from torch.distributed.distributed_c10d import _resolve_process_group

        try:
            ranks = frozenset(dist.get_process_group_ranks(_resolve_process_group(name)))
        except (RuntimeError, ValueError, KeyError):
            return "other"
        return self.by_ranks.get(ranks, "other")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if isinstance(func, torch._ops.HigherOrderOperator):
            return func(*args, **kwargs)
        from torch.distributed.tensor import DTensor

        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented  # let DTensor desugar into local ops + collectives, seen next
        ns = func.namespace
        name = func._overloadpacket.__name__
        if ns == "_c10d_functional":
            if name in _FUNCOL:
                self._charge(args[-1], _nbytes(args[0]))
            elif name in ("all_gather_into_tensor", "all_gather_into_tensor_coalesced"):
                self._charge(args[-1], _nbytes(args[0]) * int(args[1]))
        elif ns == "c10d" and name in _C10D_IN:
            pg = next((a for a in args if not isinstance(a, str) and _group_name(a) is not None), None)
            self._charge(pg, _nbytes(args[_C10D_IN[name]]))
        return func(*args, **kwargs)
