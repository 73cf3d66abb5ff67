"""The fleet's network: one Linux network namespace per Envoy, each joined by
a veth pair to a bridge in the host namespace, where the control plane and
the measuring client live.

    host netns:  bridge <run>br  10.231.X.1/24 (the clients), 10.231.X.2 (keygate serve)
                   |-- veth <run>e1 <-> eth0 in netns <run>-e1  10.231.X.11
                   |-- veth <run>e2 <-> eth0 in netns <run>-e2  10.231.X.12
                   `-- ...

Traffic only ever goes between a namespace and the bridge's own address, so
it is delivered locally in the host namespace and never forwarded: the
host's FORWARD policy (Docker sets it to DROP) does not matter. A partition
is a blackhole route to the control plane's address (.2) inside one
namespace: its packets vanish, as across a cut link, while the clients (.1)
still reach that Envoy.

Everything is named after a run id, so that a teardown removes exactly what
its run made, also from another process after a crash (`teardown(run_id)`).
iproute2 only (`ip`), as root.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass


def ip(*args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = ["ip"] + (["-n", netns] if netns else []) + list(args)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    if check and out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {out.stderr.strip()}")
    return out


@dataclass(frozen=True)
class Node:
    name: str  # e1, e2, ...
    netns: str
    address: str


class Topology:
    def __init__(self, run_id: str, nodes: int):
        if not (run_id.isalnum() and len(run_id) <= 6):
            raise ValueError("run id: at most 6 letters or digits")
        self.run_id = run_id
        # A /24 of its own per run id, so that two runs do not share routes.
        self.subnet = 10 + int(run_id, 16) % 200 if all(c in "0123456789abcdef" for c in run_id) else 77
        self.bridge = f"kgf{run_id}br"
        # The clients' address (the bridge's primary one, so the source of
        # whatever the host sends), and the control plane's, the one a
        # partition cuts.
        self.host_address = f"10.231.{self.subnet}.1"
        self.cp_address = f"10.231.{self.subnet}.2"
        self.nodes = [
            Node(f"e{i}", f"kgf{run_id}-e{i}", f"10.231.{self.subnet}.{10 + i}") for i in range(1, nodes + 1)
        ]

    def up(self) -> None:
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{self.host_address}/24", "dev", self.bridge)
        ip("addr", "add", f"{self.cp_address}/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        for n in self.nodes:
            host_end = f"kgf{self.run_id}{n.name}"
            ip("netns", "add", n.netns)
            ip("link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", n.netns)
            ip("link", "set", host_end, "master", self.bridge)
            ip("link", "set", host_end, "up")
            ip("link", "set", "lo", "up", netns=n.netns)
            ip("addr", "add", f"{n.address}/24", "dev", "eth0", netns=n.netns)
            ip("link", "set", "eth0", "up", netns=n.netns)

    def cut(self, node: Node) -> None:
        """Packets from `node` to the control plane's address are dropped."""
        ip("route", "add", "blackhole", f"{self.cp_address}/32", netns=node.netns)

    def reconnect(self, node: Node) -> None:
        ip("route", "del", "blackhole", f"{self.cp_address}/32", netns=node.netns)

    def down(self) -> list[str]:
        return teardown(self.run_id)


def teardown(run_id: str) -> list[str]:
    """Removes every namespace and link of the run `run_id` (their veths go
    with the namespaces). Idempotent; returns what it removed."""
    removed = []
    prefix = f"kgf{run_id}-"
    for line in ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if name.startswith(prefix):
            ip("netns", "del", name, check=False)
            removed.append(name)
    bridge = f"kgf{run_id}br"
    if ip("link", "show", bridge, check=False).returncode == 0:
        ip("link", "del", bridge, check=False)
        removed.append(bridge)
    return removed
