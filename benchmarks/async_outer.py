"""Communication hidden by the asynchronous local-SGD outer step (``parallel.outer_async``), 2 gloo ranks.

Each rank holds ``--params`` fp32 parameters and runs inner steps of fixed compute (``--inner-ms`` of
matmuls, standing in for forward + backward); every ``--every`` steps :class:`mtnlg.parallel.data.OuterSync`
averages the deltas over both ranks. Synchronous: the all-reduce blocks the step. Asynchronous: it
travels during the next inner steps and is waited for one round later. Reported per mode: wall time,
seconds blocked in the outer all-reduce, and the fraction of the synchronous blocked time hidden.

    python benchmarks/async_outer.py [--params 8000000 --every 2 --rounds 6 --inner-ms 150] [--inner matmul] [--json]

Both modes move the same bytes (the asynchronous mode's last average is waited for at the end).
With ``--inner matmul`` on a loaded 2-core machine the all-reduce competes with the compute for the
same cores, so little can be hidden there.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _inner_compute(ms: float, a: torch.Tensor, kind: str) -> None:
    if kind == "sleep":  # compute that does not occupy this CPU (an accelerator's kernels)
        time.sleep(ms / 1000)
        return
    end = time.perf_counter() + ms / 1000
    while time.perf_counter() < end:
        a @ a


def _worker(rank: int, port: int, args, q) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from mtnlg.parallel.data import OuterSync

    out = {}
    a = torch.randn(128, 128)
    for overlap in (False, True):
        p = torch.nn.Parameter(torch.zeros(args.params))
        outer = OuterSync([p], dist.group.WORLD, args.every, 0.7, 0.9, overlap=overlap)
        dist.barrier()
        t0 = time.perf_counter()
        for step in range(1, args.every * args.rounds + 1):
            _inner_compute(args.inner_ms, a, args.inner)
            with torch.no_grad():
                p.add_(0.01 * (rank + 1))
            outer.maybe_sync(step)
        if overlap and outer._pending is not None:  # the last average, so both modes move the same bytes
            outer._finish_average(outer._pending)
        dist.barrier()
        out["async" if overlap else "sync"] = {"wall_s": time.perf_counter() - t0, "blocked_s": outer.wait_seconds}
    q.put((rank, out))
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=int, default=8_000_000)
    ap.add_argument("--every", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--inner-ms", type=float, default=150.0)
    ap.add_argument("--inner", choices=["sleep", "matmul"], default="sleep",
                    help="stand-in for the inner step: CPU-free (sleep, as accelerator kernels) or CPU matmuls")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, port, args, q)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(q.get(timeout=1800) for _ in procs)
    for p in procs:
        p.join()
    r0 = results[0]
    hidden = 1.0 - r0["async"]["blocked_s"] / r0["sync"]["blocked_s"] if r0["sync"]["blocked_s"] > 0 else 0.0
    print(f"{args.params / 1e6:.0f}M fp32 parameters, outer step every {args.every} inner steps of "
          f"{args.inner_ms:.0f} ms ({args.inner}), {args.rounds} rounds, 2 gloo ranks")
    print(f"{'mode':<8}{'wall s':>9}{'blocked in outer all-reduce s':>32}")
    for mode in ("sync", "async"):
        print(f"{mode:<8}{r0[mode]['wall_s']:>9.2f}{r0[mode]['blocked_s']:>32.3f}")
    print(f"communication hidden: {100 * hidden:.0f}% of the synchronous blocked time; wall time ratio "
          f"async/sync {r0['async']['wall_s'] / r0['sync']['wall_s']:.2f}")
    result = {"args": vars(args), "rank0": r0, "hidden_fraction": hidden}
    (Path(__file__).parent / "results" / f"async_outer_{args.inner}.json").write_text(json.dumps(result, indent=2))
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
