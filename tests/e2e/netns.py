"""Two network namespaces joined by a veth pair: two "nodes" on one box for multi-node torchrun tests.

Only the documentation range 192.0.2.0/24 (TEST-NET-1, never routed) is used, inside namespaces this
test creates itself; nothing else is reachable from them. Everything is removed on exit, even on failure.

Torchrun's c10d rendezvous decides who hosts the store by hostname, and both namespaces share the
box's hostname, so node 0 is told explicitly (``--rdzv-conf is_host=1``) and each node gives its own
address (``--local-addr``); gloo is pinned to the veth (``GLOO_SOCKET_IFNAME``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

SUBNET = "192.0.2.{}/24"


@dataclass
class Node:
    ns: str
    ifname: str
    addr: str

    def torchrun(self, nnodes: int, nproc: int, endpoint: str, is_host: bool, rdzv_id: str,
                 extra: list[str] | None = None) -> list[str]:
        """argv running torchrun inside this namespace (append ``-m mtnlg ...`` or a script)."""
        return ["ip", "netns", "exec", self.ns, "env", f"GLOO_SOCKET_IFNAME={self.ifname}", "OMP_NUM_THREADS=1",
                sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--nproc-per-node", str(nproc),
                "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", rdzv_id,
                "--rdzv-conf", f"is_host={int(is_host)}", "--local-addr", self.addr, *(extra or [])]


def can_create_namespaces() -> str | None:
    """None when namespaces can be made here, else the reason they cannot."""
    if shutil.which("ip") is None:
        return "the 'ip' command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    probe = f"mtnlg-probe-{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"'ip netns add' failed: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True)


@contextlib.contextmanager
def two_nodes() -> Iterator[tuple[Node, Node]]:
    """Create namespaces A and B joined by a veth pair (192.0.2.1 <-> 192.0.2.2); always clean up."""
    tag = f"{os.getpid() % 100000}"
    a = Node(f"mtnlg-a-{tag}", f"mtva{tag}", "192.0.2.1")
    b = Node(f"mtnlg-b-{tag}", f"mtvb{tag}", "192.0.2.2")
    created: list[str] = []
    try:
        for n in (a, b):
            _run("ip", "netns", "add", n.ns)
            created.append(n.ns)
        _run("ip", "link", "add", a.ifname, "type", "veth", "peer", "name", b.ifname)
        for i, n in enumerate((a, b), start=1):
            _run("ip", "link", "set", n.ifname, "netns", n.ns)
            _run("ip", "-n", n.ns, "addr", "add", SUBNET.format(i), "dev", n.ifname)
            _run("ip", "-n", n.ns, "link", "set", n.ifname, "up")
            _run("ip", "-n", n.ns, "link", "set", "lo", "up")
        yield a, b
    finally:
        for ns in created:
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), 9)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        # Deleting a namespace deletes the veth ends inside it; remove a stray one left in the root namespace.
        subprocess.run(["ip", "link", "del", a.ifname], capture_output=True)
