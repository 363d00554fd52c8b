"""``mtnlg plan --calibrate``: measure this machine into a :class:`~mtnlg.plan.profile.Profile`.

* matmuls: ``torch.mm`` at the shapes the layouts produce (forward, input-gradient and weight-gradient
  shapes of QKV, proj, fc1, fc2 and the logit layer, from :func:`mtnlg.plan.timemodel.lookup_shapes`)
  plus a sweep of cubes for everything else; each call on operands out of cache, the median of several
  (what a step pays: its matmuls ran 20-30% below the best isolated call here); every other timing
  below is a median as well;
* fused attention: ``scaled_dot_product_attention`` forward + backward (causal) at (s, head_dim);
* element-wise bandwidth: an out-of-cache ``add`` (2 reads + 1 write);
* per-op overhead: a training step of a 2-layer, 16-wide GPT (its arithmetic negligible) over the
  number of ops the time model counts for it;
* collectives: all-reduce, all-gather, reduce-scatter and send/recv between 2 gloo ranks spawned with
  ``torch.multiprocessing``, at several message sizes, each the mean of back-to-back calls (a step
  pays every call's latency, and on a shared CPU a wake-up often takes several times the best one);
  latency and bus bandwidth fitted by least squares to t = latency + bytes x ring factor / busbw (used
  outside the measured sizes; inside, the measured points are interpolated). Both link kinds get these
  figures (one host);
* shared speed (:func:`measure_shared_speed`): the slower of those 2 ranks' matmul speed while both
  multiply, against one alone;
* framework overhead (:func:`measure_framework`, in the first of those ranks on a 1-rank group, so no
  wait for a peer is in it): the host time FSDP2 adds per sharded unit and DTensor tensor parallelism
  adds per block, each a forward + backward of a 16-wide GPT with 1 and 3 blocks against the plain one;
  and (:func:`measure_tp_peers`) what a TP block's collectives cost inside such a step over both ranks
  beyond their back-to-back time: the wait per synchronising collective for a peer that drifted behind.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import statistics
import time
from collections.abc import Callable, Iterable

import torch

from mtnlg.plan.profile import COLLECTIVES, LinkOp, Profile, ring_factor

CUBES = (64, 128, 256, 512, 1024)
ATTENTION = ((8, 128, 64), (8, 256, 64))  # (batch x heads, s, head_dim)
MESSAGE_BYTES = (4 * 2**10, 32 * 2**10, 256 * 2**10, 2**20, 8 * 2**20)


def _typical(fn: Callable[[], object], repeats: int, budget_s: float = 0.5) -> float:
    """Median seconds of ``fn`` over up to ``repeats`` calls (at least 5) within about ``budget_s``: what a
    step pays per call. The best call is the rare undisturbed one; on a shared CPU a training step runs at
    the typical speed (matmuls inside a step measured 20-30% below their best isolated call here)."""
    fn()  # warm-up
    times, t_end = [], time.perf_counter() + budget_s
    for i in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if i >= 4 and time.perf_counter() > t_end:
            break
    return statistics.median(times)


COLD_BYTES = 8 << 20  # operands cycled per matmul shape: more than this CPU's L2, as a step's other work evicts them


def _cold_mm(m: int, n: int, k: int, dtype: torch.dtype = torch.float32) -> tuple[Callable[[], object], int]:
    """A ``[m, k] @ [k, n]`` call that takes the next of several operand sets (together ``COLD_BYTES``)
    each time, so that, as in a training step, its operands do not sit in cache from the last call; and
    how many sets it cycles."""
    size = (m * k + k * n + m * n) * torch.tensor([], dtype=dtype).element_size()
    sets = [(torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype), torch.empty(m, n, dtype=dtype))
            for _ in range(max(1, min(16, COLD_BYTES // max(size, 1))))]
    turn = itertools.cycle(sets)

    def call():
        a, b, out = next(turn)
        torch.mm(a, b, out=out)

    return call, len(sets)


def measure_gemm(m: int, n: int, k: int, repeats: int = 20, dtype: torch.dtype = torch.float32) -> float:
    """Achieved FLOP/s of ``[m, k] @ [k, n]`` on operands out of cache (:func:`_cold_mm`)."""
    call, sets = _cold_mm(m, n, k, dtype)
    return 2.0 * m * n * k / _typical(call, max(repeats, 2 * sets))


def measure_attention(batch_heads: int, s: int, d: int, repeats: int = 5) -> float:
    """Achieved FLOP/s (the planner's count: 3 x 4·s²·d per head, forward + backward) of causal SDPA."""
    q, k, v = (torch.randn(1, batch_heads, s, d, requires_grad=True) for _ in range(3))
    g = torch.randn(1, batch_heads, s, d)

    def step():
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        y.backward(g)

    return 3 * 4.0 * batch_heads * s * s * d / _typical(step, repeats)


def measure_elementwise(numel: int = 1 << 22, repeats: int = 10) -> float:
    """Bytes/s of an out-of-cache element-wise op (``a + b -> c``: 2 reads, 1 write, fp32)."""
    a, b, c = torch.randn(numel), torch.randn(numel), torch.empty(numel)
    return 3 * 4 * numel / _typical(lambda: torch.add(a, b, out=c), repeats)


def measure_op_overhead(repeats: int = 20) -> float:
    """Seconds per op of a training step of a GPT so small its arithmetic is negligible: the step's time
    (forward, loss, backward, clipping, foreach AdamW) over the ops the time model counts for it."""
    import torch.nn.functional as F

    from mtnlg.model import materialize
    from mtnlg.plan.timemodel import Shape, stage_parts, step_ops
    from mtnlg.plan.profile import Profile as _P

    model = materialize(_tiny_gpt(2), seed=0).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    tokens = torch.randint(0, TINY_VOCAB, (1, TINY_SEQ + 1))

    def step():
        loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    seconds = _typical(step, repeats)
    sh = Shape(layers=2, hidden=TINY_HIDDEN, ffn=4 * TINY_HIDDEN, heads=2, vocab=TINY_VOCAB, seq=TINY_SEQ,
               micro_batch=1, microbatches=1)
    unit = _P("ops", 1.0, [(1, 1, 1, 1.0)], 1.0, 1.0, {})  # op overhead 1 s: stage_parts' overhead = op count
    ops = stage_parts(unit, sh, True, True)["overhead"] + step_ops(sh)
    return seconds / ops


# -- collectives -------------------------------------------------------------------------------------
def _op(name: str, nbytes: int, rank: int, dist) -> Callable[[], None]:
    n = max(2, nbytes // 4 // 2 * 2)
    x = torch.ones(n)
    if name == "all_reduce":
        return lambda: dist.all_reduce(x)
    if name == "all_gather":  # the buffer (the gathered output) is n elements
        fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        shard, out = torch.ones(n // 2), torch.empty(n)
        return lambda: fn(out, shard)
    if name == "reduce_scatter":
        fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        out = torch.empty(n // 2)
        return lambda: fn(out, x)
    peer = 1 - rank

    def ping():  # one message each way, so each rank measures one send + one receive
        if rank == 0:
            dist.send(x, peer)
            dist.recv(x, peer)
        else:
            dist.recv(x, peer)
            dist.send(x, peer)

    return ping


def _collective_worker(rank: int, port: int, sizes: tuple[int, ...], repeats: int, queue) -> None:
    import warnings

    import torch.distributed as dist

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        rows = []
        for name in COLLECTIVES:
            for nbytes in sizes:
                fn = _op(name, nbytes, rank, dist)
                for _ in range(2):
                    fn()
                dist.barrier()
                times = []
                for _ in range(repeats):  # back to back, as a step issues them: the mean is what it pays
                    t0 = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - t0)
                t = statistics.fmean(times)
                if name == "send_recv":
                    t /= 2  # a round trip is two messages
                rows.append({"op": name, "bytes": nbytes, "ranks": 2, "seconds": t})
        shared = measure_shared_speed(rank, dist)
        solos = [dist.new_group([0]), dist.new_group([1])]
        peers = measure_tp_peers(dist, solos[rank])
        if rank == 0:
            queue.put((rows, measure_framework(solos[0]) | {"shared_speed": shared, "tp_block_peers_s": peers}))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _matmul_loop(seconds: float) -> float:
    """Median seconds of a 512-cubed matmul on operands out of cache, over about ``seconds``."""
    return _typical(_cold_mm(512, 512, 512)[0], repeats=1 << 30, budget_s=seconds)


def measure_shared_speed(rank: int, dist, seconds: float = 0.7, rounds: int = 3) -> float:
    """Speed of the slower of 2 ranks multiplying at once, as a fraction of rank 0 multiplying alone (rank
    1 sleeping): cores that share caches, memory bandwidth and power (or a core's hyper-thread sibling)
    slow each other down, and a synchronous step waits for the slowest rank. The median of ``rounds``
    alternations, since a shared host's neighbours change the answer from second to second."""
    ratios = []
    for _ in range(rounds):
        dist.barrier()
        if rank == 0:
            alone = _matmul_loop(seconds)
        else:
            alone = 0.0
            time.sleep(seconds * 1.2)
        dist.barrier()
        together = _matmul_loop(seconds)
        got: list = [None, None]
        dist.all_gather_object(got, (alone, together))
        ratios.append(got[0][0] / max(t for _, t in got))
    return min(1.0, statistics.median(ratios))


TINY_VOCAB, TINY_HIDDEN, TINY_SEQ = 64, 16, 8  # the GPT the host-overhead measurements step


def _tiny_gpt(layers: int):
    from mtnlg.config import ModelConfig
    from mtnlg.model import build_model

    return build_model(ModelConfig(vocab_size=TINY_VOCAB, hidden_size=TINY_HIDDEN, num_layers=layers, num_heads=2,
                                   ffn_hidden_size=4 * TINY_HIDDEN, max_seq_len=TINY_SEQ,
                                   make_vocab_size_divisible_by=1))


def _step_seconds(layers: int, kind: str, mesh, repeats: int = 30) -> float:
    """Median seconds of a forward + backward of a 16-wide GPT with ``layers`` blocks: ``plain``, under
    ``fsdp`` (``fully_shard`` over ``mesh``) or ``tp`` (DTensor tensor + sequence parallel over ``mesh``)."""
    return _typical(_step_fn(layers, kind, mesh), repeats, budget_s=float("inf"))  # its own warm-up makes the third


def _step_fn(layers: int, kind: str, mesh) -> Callable[[], None]:
    """:func:`_step_seconds`'s step, built and run twice (warm-up)."""
    from torch.distributed.tensor.parallel import loss_parallel

    from mtnlg.model import materialize
    from mtnlg.parallel.data import apply_fsdp, local
    from mtnlg.parallel.tensor import apply_tensor_parallel
    from mtnlg.train.loss import cross_entropy_sum

    gen = torch.Generator().manual_seed(0)  # the same tokens on every rank (TP ranks see one batch)
    tokens = torch.randint(0, TINY_VOCAB, (1, TINY_SEQ + 1), generator=gen)
    x, y = tokens[:, :-1], tokens[:, 1:]
    model = _tiny_gpt(layers)
    if kind == "tp":
        apply_tensor_parallel(model, mesh, sequence_parallel=True)
    materialize(model, "cpu", init=False)
    with torch.no_grad():
        for p in model.parameters():
            local(p).normal_(0.0, 0.02)
    if kind == "fsdp":
        apply_fsdp(model, mesh)
    ctx = loss_parallel if kind == "tp" and model.cfg.parallel_output else contextlib.nullcontext

    def step():
        with ctx():
            cross_entropy_sum(model(x), y).backward()
        for p in model.parameters():
            p.grad = None

    for _ in range(2):
        step()
    return step


def _interleaved_medians(fns: list[Callable[[], object]], repeats: int) -> list[float]:
    """Median seconds of each of ``fns``, called in turn (a, b, c, a, b, c ...) so that a slow spell of
    the machine falls on all alike: differences between them are then what the calls cost, not when
    they ran."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def _mesh(group):
    from torch.distributed.device_mesh import DeviceMesh

    return DeviceMesh.from_group(group, "cpu", mesh_dim_names=("x",))


def measure_framework(group, repeats: int = 30) -> dict[str, float]:
    """Host seconds that FSDP2 adds per unit (``fully_shard`` of a block or the root) and DTensor tensor
    parallelism (sequence parallel) adds per block, per micro-batch forward + backward, on ``group`` (one
    rank: the hooks, copies and dispatch without a peer to wait for; the collectives are priced apart).
    Each is the slope over 1 and 3 blocks of a 16-wide GPT's step time against the plain model's, the six
    steps timed in turn (a slope is a difference of differences: measured one after the other, the
    machine's drift could make it zero)."""
    mesh = _mesh(group)
    kinds = ("plain", "fsdp", "tp")
    t = dict(zip([(k, n) for k in kinds for n in (1, 3)],
                 _interleaved_medians([_step_fn(n, k, mesh) for k in kinds for n in (1, 3)], repeats)))
    slope = {k: ((t[k, 3] - t["plain", 3]) - (t[k, 1] - t["plain", 1])) / 2 for k in ("fsdp", "tp")}
    return {"fsdp_unit_s": max(0.0, slope["fsdp"]), "tp_layer_s": max(0.0, slope["tp"])}


def measure_tp_peers(dist, solo, repeats: int = 30) -> float:
    """Seconds a tensor-parallel block's collectives cost inside a step, per micro-batch forward +
    backward: the slope over 1 and 3 blocks of the 16-wide GPT under TP over both ranks, less the same on
    each rank's own 1-rank group, both ranks busy in both (so that only the peer's collectives differ)."""
    world, own = _mesh(dist.group.WORLD), _mesh(solo)
    dist.barrier()
    apart = [_step_seconds(n, "tp", own, repeats) for n in (1, 3)]
    dist.barrier()
    joint = [_step_seconds(n, "tp", world, repeats) for n in (1, 3)]
    return max(0.0, ((joint[1] - joint[0]) - (apart[1] - apart[0])) / 2)


def measure_collectives(sizes: Iterable[int] = MESSAGE_BYTES, repeats: int = 30) -> tuple[list[dict], dict[str, float]]:
    """Seconds of each collective between 2 gloo ranks (spawned processes) at each message size, and the
    framework overheads of :func:`measure_framework` (measured in the first rank)."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_collective_worker, args=(r, port, tuple(sizes), repeats, queue)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        rows = queue.get(timeout=300)
    finally:
        for p in procs:
            p.join(timeout=60)
    return rows


def fit_link(rows: list[dict], op: str) -> LinkOp:
    """Least-squares latency and bus bandwidth of ``op`` from its measured rows (t = a + bytes·factor / busbw)."""
    pts = [(r["bytes"] * ring_factor(op, r["ranks"]), r["seconds"]) for r in rows if r["op"] == op]
    n = len(pts)
    mx, my = sum(x for x, _ in pts) / n, sum(y for _, y in pts) / n
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    slope = sum((x - mx) * (y - my) for x, y in pts) / sxx if sxx > 0 else 0.0
    if slope <= 0:  # no size dependence measured: all latency
        return LinkOp(my, 1e15)
    latency = max(0.0, my - slope * mx)
    return LinkOp(latency, 1.0 / slope)


def calibrate(gemm_shapes: Iterable[tuple[int, int, int]] = (), attention_shapes: Iterable[tuple[int, int, int]] = (),
              *, threads: int = 1, name: str | None = None,
              progress: Callable[[str], None] | None = None) -> Profile:
    """Measure this machine (``threads`` torch threads per rank, as the runs to plan will use)."""
    say = progress or (lambda _msg: None)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        shapes = sorted(set(gemm_shapes) | {(c, c, c) for c in CUBES})
        say(f"matmuls: {len(shapes)} shapes")
        gemm = [(m, n, k, measure_gemm(m, n, k)) for m, n, k in shapes]
        att = []
        for bh, s, d in sorted(set(attention_shapes) | set(ATTENTION)):
            say(f"attention: {bh} heads x s={s} x d={d}")
            att.append((s, s, d, measure_attention(bh, s, d)))
        say("element-wise bandwidth and op overhead")
        bw = measure_elementwise()
        overhead = measure_op_overhead()
    finally:
        torch.set_num_threads(previous)
    say("collectives: 2 gloo ranks; FSDP2 and tensor-parallel overhead")
    rows, framework = measure_collectives()
    link = {op: fit_link(rows, op) for op in COLLECTIVES}
    link = {op: LinkOp(lo.latency_s, lo.busbw, tuple(sorted((r["bytes"] * ring_factor(op, r["ranks"]), r["seconds"])
                                                          for r in rows if r["op"] == op)))
            for op, lo in link.items()}
    # a TP block's 8 collectives (SP: all-gather + reduce-scatter of the tiny GPT's fp32 activation, twice
    # forward and twice backward) cost this much more inside a step than back to back: the wait for a peer
    # that drifted behind between them
    act = TINY_SEQ * TINY_HIDDEN * 4
    isolated = 4 * sum(link[op].time(op, act, 2) for op in ("all_gather", "reduce_scatter"))
    wait = max(0.0, (framework["tp_block_peers_s"] - isolated) / 8)
    cores = os.cpu_count() or 1
    where = f"measured by `mtnlg plan --calibrate` on this host ({cores} cores, {threads} thread(s) per rank, " \
            f"torch {torch.__version__}) on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    sources = {"gemm": f"torch.mm fp32, operands cycled out of cache, median of up to 20 calls; {where}",
               "attention": f"scaled_dot_product_attention causal forward + backward; {where}",
               "elementwise": f"fp32 add of 4M elements (2 reads + 1 write); {where}",
               "op_overhead": f"a training step of a 2-layer 16-wide GPT over the ops the time model counts; {where}",
               "links": f"gloo, 2 ranks on this host, mean of 30 back-to-back calls at {len(MESSAGE_BYTES)} sizes "
                        f"per op, least-squares fit; "
                        f"intra and inter are the same host link; {where}",
               "framework": f"forward + backward of a 16-wide GPT with 1 and 3 blocks, fully_shard / tensor "
                            f"parallel (SP) on a 1-rank gloo group against the plain model, median of 30; "
                            f"collective_wait_s: the same TP model over 2 ranks against each on its own 1-rank "
                            f"group, less its 8 collectives per block back to back, per collective; {where}",
               "overlap": "0: gloo runs on the same CPU cores as the computation it would overlap with (assumed)",
               "concurrency": f"{cores} cores / {threads} thread(s) per rank; shared_speed: a 512-cubed matmul's "
                              f"median in the slower of 2 ranks running at once, against one running alone, "
                              f"median of 3 alternations of 0.7 s; {where}"}
    return Profile(name=name or f"cpu-{cores}core-{threads}thread", peak_flops=max(r for *_, r in gemm), gemm=gemm,
                   elementwise_bw=bw, op_overhead_s=overhead, fsdp_unit_s=framework["fsdp_unit_s"],
                   tp_layer_s=framework["tp_layer_s"], collective_wait_s=wait,
                   links={"intra": link, "inter": dict(link)},
                   attention_kind="fused", attention=att, overlap=0.0,
                   concurrency=max(1, cores // threads), shared_speed=framework["shared_speed"], source=where,
                   sources=sources,
                   link_points={"intra": rows, "inter": rows})
