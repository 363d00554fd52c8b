"""Machine profiles: what one device and its links achieve, as the time model (:mod:`mtnlg.plan.timemodel`) needs it.

A profile is a small JSON file (format ``mtnlg-plan-profile/1``)::

    {"format": "mtnlg-plan-profile/1", "name": "a100-80gb", "source": "...",
     "peak_flops": 312e12,
     "gemm": {"points": [{"m": 2048, "n": 2048, "k": 2048, "flops_per_s": 2.2e14}, ...], "source": "..."},
     "attention": {"kind": "unfused" | "fused", "points": [...same as gemm, shape (s, s, head_dim)...], "source": "..."},
     "elementwise": {"bytes_per_s": 1.6e12, "source": "..."},
     "op_overhead": {"seconds": 5e-6, "source": "..."},
     "framework": {"fsdp_unit_s": 6e-4, "tp_layer_s": 2e-3, "collective_wait_s": 3e-4, "source": "..."},  (optional)
     "links": {"intra": {"all_reduce": {"latency_s": 2e-5, "busbw": 2.3e11}, "all_gather": {...},
                         "reduce_scatter": {...}, "send_recv": {...}, "points": [...]},
               "inter": {...}, "source": "..."},
     "overlap": {"fraction": 1.0, "source": "..."},
     "concurrency": {"devices": 8, "shared_speed": 1.0, "source": "..."}}

* ``gemm``: achieved FLOP/s of ``[m, k] x [k, n]`` matmuls. A shape in the table is used as measured;
  any other is interpolated linearly in log(FLOPs) between the table's points (clamped at the ends).
* ``attention``: ``unfused`` prices the attention core as two batched GEMMs per head plus the softmax
  and dropout bytes (Megatron 2021); ``fused`` (``scaled_dot_product_attention``) uses its own table
  of achieved FLOP/s for forward + backward at (s, s, head_dim).
* ``links``: per collective, time(S) = latency + S · factor / busbw with S the buffer size and the
  ring factor of nccl-tests' bus bandwidth: 2(n-1)/n for all-reduce, (n-1)/n for all-gather and
  reduce-scatter, 1 for send/recv. ``intra`` joins devices of one node, ``inter`` crosses nodes over
  one device's network link (a group with several devices on each node uses as many links at once).
* ``framework`` (optional, 0 when absent): host time per micro-batch forward + backward that FSDP2
  adds per sharded unit and DTensor tensor parallelism adds per block, beyond the ops and collectives
  priced elsewhere; and ``collective_wait_s``, what each synchronising tensor-parallel collective costs
  inside a step beyond its back-to-back time (the wait for a peer that drifted behind). On a CPU this
  host time runs between the kernels; a GPU's asynchronous launches hide it (the shipped GPU profiles
  set 0).
* ``overlap``: the share of the data-parallel reduction that can hide behind backward compute (1 on
  GPUs, where NCCL runs on its own streams; ~0 on a CPU, where gloo competes for the same cores).
* ``concurrency``: how many devices of one host run at once (CPU: cores / threads per rank), and
  ``shared_speed`` (optional, 1 when absent): the compute speed of the slowest of them while all run,
  as a fraction of one running alone (CPU cores share caches, memory and power; GPUs do not).

Every section carries a ``source`` string saying where its numbers come from.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from mtnlg.errors import ConfigError

FORMAT = "mtnlg-plan-profile/1"
COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "send_recv")
SHIPPED = ("a100-80gb", "h100-80gb")


def ring_factor(op: str, ranks: int) -> float:
    """Bytes on the busiest link per byte of buffer, as nccl-tests counts bus bandwidth."""
    if ranks <= 1 and op != "send_recv":
        return 0.0
    if op == "all_reduce":
        return 2 * (ranks - 1) / ranks
    if op in ("all_gather", "reduce_scatter"):
        return (ranks - 1) / ranks
    if op == "send_recv":
        return 1.0
    raise ConfigError(f"unknown collective '{op}'; use one of {list(COLLECTIVES)}")


@dataclass(frozen=True)
class LinkOp:
    """One collective on one kind of link: fixed latency plus bytes over bus bandwidth, or, where the
    profile has measured points, their piecewise-linear interpolation (in bytes on the busiest link)."""

    latency_s: float
    busbw: float  # bytes/s
    points: tuple[tuple[float, float], ...] = ()  # (buffer bytes x ring factor, seconds), sorted

    def time(self, op: str, nbytes: float, ranks: int) -> float:
        if nbytes <= 0 or (ranks <= 1 and op != "send_recv"):
            return 0.0
        wire = nbytes * ring_factor(op, ranks)
        pts = self.points
        if len(pts) >= 2 and pts[0][0] <= wire <= pts[-1][0]:
            for (x0, t0), (x1, t1) in zip(pts, pts[1:]):
                if x0 <= wire <= x1:
                    return t0 if x1 == x0 else t0 + (t1 - t0) * (wire - x0) / (x1 - x0)
        return self.latency_s + wire / self.busbw


@dataclass
class Profile:
    """A device and its links (see the module docstring for the JSON form)."""

    name: str
    peak_flops: float
    gemm: list[tuple[int, int, int, float]]  # (m, n, k, achieved FLOP/s)
    elementwise_bw: float  # bytes/s
    op_overhead_s: float
    links: dict[str, dict[str, LinkOp]]  # "intra" / "inter" -> collective -> LinkOp
    fsdp_unit_s: float = 0.0  # host seconds per FSDP2 unit per micro-batch (forward + backward)
    tp_layer_s: float = 0.0  # host seconds per tensor-parallel block per micro-batch (forward + backward)
    collective_wait_s: float = 0.0  # in-step wait per synchronising TP collective beyond its isolated time
    attention_kind: str = "unfused"
    attention: list[tuple[int, int, int, float]] = field(default_factory=list)
    overlap: float = 1.0
    concurrency: int = 8
    shared_speed: float = 1.0  # compute speed of the slowest device while all of a host's run, vs alone
    source: str = ""
    sources: dict[str, str] = field(default_factory=dict)
    link_points: dict[str, list[dict]] = field(default_factory=dict)

    # -- lookups ---------------------------------------------------------------------------------
    def gemm_rate(self, m: int, n: int, k: int) -> float:
        """Achieved FLOP/s of an ``[m, k] x [k, n]`` matmul."""
        return _rate(self.gemm, m, n, k)

    def gemm_time(self, m: int, n: int, k: int, count: int = 1, elem_bytes: int = 0) -> float:
        """Seconds of ``count`` matmuls of this shape. A shape the table does not hold is interpolated by
        FLOPs alone, which knows nothing of a thin one: with ``elem_bytes`` it also takes at least the time
        to move its operands and result (elem_bytes·(mk + kn + mn)) at the element-wise bandwidth."""
        if m <= 0 or n <= 0 or k <= 0:
            return 0.0
        return count * self._gemm_seconds(1, m, n, k, elem_bytes)

    def batched_gemm_time(self, batch: int, m: int, n: int, k: int, elem_bytes: int = 0) -> float:
        """Seconds of one batched call of ``batch`` matmuls of this shape, at the rate of its total FLOPs
        (and, with ``elem_bytes``, no faster than its bytes at the element-wise bandwidth)."""
        if batch <= 0 or m <= 0 or n <= 0 or k <= 0:
            return 0.0
        return self._gemm_seconds(batch, m, n, k, elem_bytes)

    def _gemm_seconds(self, batch: int, m: int, n: int, k: int, elem_bytes: int) -> float:
        rows = batch * m
        compute = batch * 2.0 * m * n * k / self.gemm_rate(rows, n, k)
        if not elem_bytes or any((tm, tn, tk) == (rows, n, k) for tm, tn, tk, _ in self.gemm):
            return compute  # a measured shape already includes its memory traffic
        return max(compute, batch * elem_bytes * (m * k + k * n + m * n) / self.elementwise_bw)

    def attention_rate(self, s: int, d: int) -> float:
        """Achieved FLOP/s of fused attention forward + backward at sequence ``s``, head dim ``d``."""
        return _rate(self.attention, s, s, d)

    def collective_time(self, op: str, nbytes: float, ranks: int, span: int, gpus_per_node: int,
                        lanes: int = 1) -> float:
        """Seconds of one collective of ``nbytes`` over ``ranks`` devices spread over ``span`` ranks of the world.
        Across nodes, ``lanes`` is how many of the group's devices share each node: each brings its own
        network link (one NIC per GPU in DGX/HGX nodes), and NCCL spreads its rings over them, so the
        node-to-node traffic moves ``lanes`` times as fast as over the one link ``inter`` describes."""
        if span <= gpus_per_node:
            return self.links["intra"][op].time(op, nbytes, ranks)
        return self.links["inter"][op].time(op, nbytes / max(1, lanes), ranks)

    # -- JSON --------------------------------------------------------------------------------------
    def as_dict(self) -> dict:
        src = self.sources

        def pts(rows):
            return [{"m": m, "n": n, "k": k, "flops_per_s": r} for m, n, k, r in rows]

        links: dict = {}
        for name, ops in self.links.items():
            links[name] = {op: {"latency_s": lo.latency_s, "busbw": lo.busbw} for op, lo in ops.items()}
            if self.link_points.get(name):
                links[name]["points"] = self.link_points[name]
        links["source"] = src.get("links", "")
        return {"format": FORMAT, "name": self.name, "source": self.source, "peak_flops": self.peak_flops,
                "gemm": {"points": pts(self.gemm), "source": src.get("gemm", "")},
                "attention": {"kind": self.attention_kind, "points": pts(self.attention),
                              "source": src.get("attention", "")},
                "elementwise": {"bytes_per_s": self.elementwise_bw, "source": src.get("elementwise", "")},
                "op_overhead": {"seconds": self.op_overhead_s, "source": src.get("op_overhead", "")},
                "framework": {"fsdp_unit_s": self.fsdp_unit_s, "tp_layer_s": self.tp_layer_s,
                              "collective_wait_s": self.collective_wait_s, "source": src.get("framework", "")},
                "links": links,
                "overlap": {"fraction": self.overlap, "source": src.get("overlap", "")},
                "concurrency": {"devices": self.concurrency, "shared_speed": self.shared_speed,
                                "source": src.get("concurrency", "")}}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.as_dict(), indent=1) + "\n")
        return path


def _rate(table: list[tuple[int, int, int, float]], m: int, n: int, k: int) -> float:
    """The table's rate for this shape, else interpolated in log(FLOPs) between the mean rates of the
    table's FLOP counts (clamped at both ends)."""
    for tm, tn, tk, r in table:
        if (tm, tn, tk) == (m, n, k):
            return r
    by_flops: dict[float, list[float]] = {}
    for tm, tn, tk, r in table:
        by_flops.setdefault(math.log(2.0 * tm * tn * tk), []).append(r)
    pts = sorted((x, sum(rs) / len(rs)) for x, rs in by_flops.items())
    x = math.log(2.0 * m * n * k)
    if x <= pts[0][0]:
        return pts[0][1]
    if x >= pts[-1][0]:
        return pts[-1][1]
    for (x0, r0), (x1, r1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return r0 + (r1 - r0) * (x - x0) / (x1 - x0)
    return pts[-1][1]  # unreachable


# -- parsing ---------------------------------------------------------------------------------------
def _num(where: str, value, positive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"profile {where} must be a number, got {value!r}")
    if positive and not value > 0:
        raise ConfigError(f"profile {where} must be > 0, got {value!r}")
    return float(value)


def _section(d: dict, key: str) -> dict:
    sec = d.get(key)
    if not isinstance(sec, dict):
        raise ConfigError(f"profile is missing the '{key}' section (an object); see docs/plan.md for the format")
    return sec


def _points(where: str, rows) -> list[tuple[int, int, int, float]]:
    if not isinstance(rows, list):
        raise ConfigError(f"profile {where}.points must be a list of {{m, n, k, flops_per_s}}")
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not {"m", "n", "k", "flops_per_s"} <= set(row):
            raise ConfigError(f"profile {where}.points[{i}] needs m, n, k and flops_per_s")
        m, n, k = (int(_num(f"{where}.points[{i}].{c}", row[c])) for c in "mnk")
        out.append((m, n, k, _num(f"{where}.points[{i}].flops_per_s", row["flops_per_s"])))
    return out


def profile_from_dict(d) -> Profile:
    """Validate and build a :class:`Profile`; every problem is one :class:`ConfigError` line."""
    if not isinstance(d, dict):
        raise ConfigError("profile must be a JSON object; see docs/plan.md for the format")
    if d.get("format") != FORMAT:
        raise ConfigError(f"profile 'format' must be '{FORMAT}', got {d.get('format')!r}")
    gemm = _points("gemm", _section(d, "gemm").get("points"))
    if not gemm:
        raise ConfigError("profile gemm.points is empty; it needs at least one measured matmul")
    att = _section(d, "attention")
    kind = att.get("kind", "unfused")
    if kind not in ("unfused", "fused"):
        raise ConfigError(f"profile attention.kind must be 'unfused' or 'fused', got {kind!r}")
    att_points = _points("attention", att.get("points", []))
    if kind == "fused" and not att_points:
        raise ConfigError("profile attention.kind 'fused' needs attention.points (measured fused attention)")
    links_sec = _section(d, "links")
    links: dict[str, dict[str, LinkOp]] = {}
    link_points: dict[str, list[dict]] = {}
    for name in ("intra", "inter"):
        sec = links_sec.get(name)
        if not isinstance(sec, dict):
            raise ConfigError(f"profile links.{name} is missing; give {list(COLLECTIVES)} with latency_s and busbw")
        links[name] = {}
        for op in COLLECTIVES:
            o = sec.get(op)
            if not isinstance(o, dict):
                raise ConfigError(f"profile links.{name}.{op} is missing (an object with latency_s and busbw)")
            links[name][op] = LinkOp(_num(f"links.{name}.{op}.latency_s", o.get("latency_s"), positive=False),
                                     _num(f"links.{name}.{op}.busbw", o.get("busbw")))
        rows = sec.get("points", [])
        if not isinstance(rows, list) or not all(isinstance(r, dict) and {"op", "bytes", "ranks", "seconds"} <= set(r)
                                                 for r in rows):
            raise ConfigError(f"profile links.{name}.points must be a list of {{op, bytes, ranks, seconds}}")
        for op in COLLECTIVES:
            pts = sorted((_num(f"links.{name}.points.bytes", r["bytes"]) * ring_factor(op, int(r["ranks"])),
                          _num(f"links.{name}.points.seconds", r["seconds"])) for r in rows if r["op"] == op)
            if pts:
                links[name][op] = LinkOp(links[name][op].latency_s, links[name][op].busbw, tuple(pts))
        if rows:
            link_points[name] = rows
    overlap = _num("overlap.fraction", _section(d, "overlap").get("fraction"), positive=False)
    if not 0 <= overlap <= 1:
        raise ConfigError(f"profile overlap.fraction must be in [0, 1], got {overlap}")
    framework = d.get("framework", {})
    if not isinstance(framework, dict):
        raise ConfigError("profile 'framework' must be an object with fsdp_unit_s, tp_layer_s and "
                          "collective_wait_s (seconds)")
    fw = {key: _num(f"framework.{key}", framework.get(key, 0.0), positive=False)
          for key in ("fsdp_unit_s", "tp_layer_s", "collective_wait_s")}
    if any(v < 0 for v in fw.values()):
        raise ConfigError(f"profile framework seconds must be >= 0, got {fw}")
    sources = {key: str(d[key].get("source", "")) for key in ("gemm", "attention", "elementwise", "op_overhead",
                                                               "framework", "overlap", "concurrency")
               if isinstance(d.get(key), dict)}
    sources["links"] = str(links_sec.get("source", ""))
    return Profile(
        name=str(d.get("name", "profile")), peak_flops=_num("peak_flops", d.get("peak_flops")), gemm=gemm,
        elementwise_bw=_num("elementwise.bytes_per_s", _section(d, "elementwise").get("bytes_per_s")),
        op_overhead_s=_num("op_overhead.seconds", _section(d, "op_overhead").get("seconds"), positive=False),
        fsdp_unit_s=fw["fsdp_unit_s"], tp_layer_s=fw["tp_layer_s"], collective_wait_s=fw["collective_wait_s"],
        links=links, attention_kind=kind, attention=att_points, overlap=overlap,
        concurrency=int(_num("concurrency.devices", _section(d, "concurrency").get("devices"))),
        shared_speed=_shared_speed(_section(d, "concurrency").get("shared_speed", 1.0)),
        source=str(d.get("source", "")), sources=sources, link_points=link_points)


def _shared_speed(value) -> float:
    v = _num("concurrency.shared_speed", value)
    if v > 1:
        raise ConfigError(f"profile concurrency.shared_speed must be in (0, 1], got {v}")
    return v


def load_profile(path: str | Path) -> Profile:
    """Read a profile JSON (``--profile``); a missing or malformed file is one :class:`ConfigError` line."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--profile {path}: no such file; write one with `mtnlg plan --calibrate --output {path}` "
                          f"or use a shipped one ({', '.join(SHIPPED)})")
    try:
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"--profile {path}: not valid JSON ({e})") from None
    try:
        return profile_from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"--profile {path}: {e}") from None


def shipped_profile(name: str) -> Profile:
    """A profile shipped with mtnlg (``src/mtnlg/plan/profiles/NAME.json``)."""
    if name not in SHIPPED:
        raise ConfigError(f"no shipped profile '{name}'; shipped: {list(SHIPPED)}, or pass --profile FILE.json")
    text = resources.files("mtnlg.plan").joinpath("profiles", f"{name}.json").read_text()
    return profile_from_dict(json.loads(text))


def resolve_profile(spec: str | None, gpu_name: str) -> Profile | None:
    """``--profile``: a path or a shipped name; without it the shipped profile of ``gpu_name`` if there is one."""
    if spec:
        return shipped_profile(spec) if spec in SHIPPED and not Path(spec).is_file() else load_profile(spec)
    if gpu_name in SHIPPED:
        return shipped_profile(gpu_name)
    if gpu_name == "a100-40gb":
        return shipped_profile("a100-80gb")  # same chip and links; only HBM size and bandwidth differ
    if gpu_name == "h200":
        return shipped_profile("h100-80gb")  # same chip; the H200's faster HBM makes this conservative
    return None


def nominal_profile(name: str, peak_flops: float, mem_bw: float, intra_bw: float, inter_bw: float) -> Profile:
    """A stand-in for an accelerator without a profile (``--gpu cpu``): every matmul at the data-sheet peak,
    links at their data-sheet bandwidth. Calibrate (``mtnlg plan --calibrate``) for real estimates."""
    note = "no measurement: the --gpu table's data-sheet figures (calibrate for real numbers)"

    def link(bw: float) -> dict[str, LinkOp]:
        return {op: LinkOp(0.0, bw) for op in COLLECTIVES}

    return Profile(name=f"{name} (nominal)", peak_flops=peak_flops, gemm=[(1024, 1024, 1024, peak_flops)],
                   elementwise_bw=mem_bw, op_overhead_s=0.0, links={"intra": link(intra_bw),
                                                                             "inter": link(inter_bw)},
                   overlap=0.0, concurrency=1 << 30, source=note,
                   sources={k: note for k in ("gemm", "attention", "elementwise", "op_overhead", "links", "overlap",
                                              "concurrency")})
