"""The processes of the fleet: `keygate serve` (the control plane) in the host
namespace, and one Envoy with keygate in each node's namespace, answering
200 itself (a direct_response route) for every request keygate lets through.

Built from the e2e harness's pieces (`tests/e2e/harness`): its filter,
listener and bootstrap builders, its process start that dies with its parent
(PR_SET_PDEATHSIG), and its raw HTTP/1.1 client.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import tempfile
import urllib.request
from pathlib import Path
from typing import Optional

import harness
from topology import Node

CP_CLUSTER = "keygate_control_plane"
CP_AUTHORITY = "keys.internal"


def wait(cond, timeout: float, interval: float = 0.05) -> bool:
    return harness.wait_until(cond, timeout=timeout, interval=interval)


class ControlPlane:
    """`keygate serve --keys FILE --listen ADDRESS:PORT`, restartable on the same port."""

    def __init__(self, binary: Path, keys: Path, address: str, port: int, workdir: Path, extra: tuple[str, ...] = ()):
        self.binary, self.keys, self.address, self.port = binary, keys, address, port
        self.log_path = workdir / f"serve-{port}.log"
        self.extra = extra
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> "ControlPlane":
        log = open(self.log_path, "ab")
        cmd = [str(self.binary), "serve", "--keys", str(self.keys), "--listen", f"{self.address}:{self.port}", *self.extra]
        self.proc = harness.spawn(cmd, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        if not wait(self.healthy, timeout=30):
            raise RuntimeError(f"keygate serve did not start:\n{self.log_path.read_text()[-2000:]}")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            harness.stop_process(self.proc)
            self.proc = None

    def healthy(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"keygate serve exited:\n{self.log_path.read_text()[-2000:]}")
        try:
            return harness.RawConnection(self.port, host=self.address, timeout=1).request("GET", "/healthz", []).status == 200
        except OSError:
            return False

    def cpu_seconds(self) -> float:
        """User + system CPU time of the process so far (/proc/PID/stat)."""
        assert self.proc is not None
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def plugin_config(stale_policy: str, poll: str, timeout: str, max_staleness: str) -> dict:
    return {
        "credential_sources": [{"type": "header", "name": "x-api-key"}],
        "control_plane": {
            "cluster": CP_CLUSTER,
            "authority": CP_AUTHORITY,
            "poll_interval": poll,
            "timeout": timeout,
            "max_staleness": max_staleness,
            "stale_policy": stale_policy,
        },
    }


def _at(socket_holder: dict, address: str) -> None:
    socket_holder["address"]["socket_address"]["address"] = address


class FleetEnvoy:
    """One Envoy in `node`'s namespace: listener and admin on the node's address."""

    LISTEN_PORT = 10000
    ADMIN_PORT = 9901

    def __init__(self, node: Node, envoy_bin: Path, wasm: Path, config: dict, cp_address: str, cp_port: int, workdir: Path, concurrency: int):
        self.node = node
        self.config = config
        self.dir = workdir / node.name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.envoy_bin, self.wasm, self.concurrency = envoy_bin, wasm, concurrency
        self.cp_address, self.cp_port = cp_address, cp_port
        self.proc: Optional[subprocess.Popen] = None

    @property
    def address(self) -> str:
        return self.node.address

    def bootstrap(self) -> dict:
        ok = [{"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "ok\n"}}}]
        lst = harness.listener(self.LISTEN_PORT, [harness.wasm_filter(self.config, self.wasm)], routes=ok)
        _at(lst, self.address)
        cp = harness.static_cluster(CP_CLUSTER, self.cp_port)
        cp["connect_timeout"] = "0.5s"
        _at(cp["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"], self.cp_address)
        cfg = harness.static_bootstrap(self.ADMIN_PORT, [lst], [cp])
        _at(cfg["admin"], self.address)
        return cfg

    def start(self) -> "FleetEnvoy":
        path = self.dir / "envoy.json"
        path.write_text(json.dumps(self.bootstrap(), indent=2))
        cmd = harness.envoy_command(
            self.envoy_bin,
            path,
            concurrency=self.concurrency,
            log_level="info",
            log_path=self.dir / "envoy.log",
            # Shared memory is not per network namespace: a base id of its own.
            extra=["--base-id", str(random.randint(10_000, 2_000_000_000))],
        )
        out = open(self.dir / "stdout.log", "wb")
        self.proc = harness.spawn(["ip", "netns", "exec", self.node.netns, *cmd], stdout=out, stderr=subprocess.STDOUT)
        out.close()
        if not wait(self._ready, timeout=60, interval=0.1):
            raise RuntimeError(f"Envoy {self.node.name} not ready:\n{self.log_tail()}")
        return self

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"Envoy {self.node.name} exited:\n{self.log_tail()}")
        try:
            with urllib.request.urlopen(f"http://{self.address}:{self.ADMIN_PORT}/ready", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def log_tail(self) -> str:
        p = self.dir / "envoy.log"
        return p.read_text(errors="replace")[-3000:] if p.exists() else ""

    def stop(self) -> None:
        if self.proc is not None:
            harness.stop_process(self.proc)
            self.proc = None

    def stats(self) -> dict[str, str]:
        with urllib.request.urlopen(f"http://{self.address}:{self.ADMIN_PORT}/stats", timeout=5) as r:
            text = r.read().decode()
        out = {}
        for line in text.splitlines():
            name, sep, value = line.partition(": ")
            if sep:
                out[name.strip()] = value.strip()
        return out

    def stat(self, name: str) -> int:
        """A counter or gauge by its full name or its ending (0 if absent)."""
        for k, v in self.stats().items():
            if (k == name or k.endswith("." + name)) and v.lstrip("-").isdigit():
                return int(v)
        return 0

    def connect(self) -> harness.RawConnection:
        return harness.RawConnection(self.LISTEN_PORT, host=self.address, timeout=5)

    def status(self, key: str) -> int:
        conn = self.connect()
        try:
            return conn.request("GET", harness.unique_path("fleet"), [harness.xkey(key)]).status
        finally:
            conn.close()


def write_list(path: Path, n: int, prefix: str) -> None:
    """A key list of `n` made-up keys (digests of random bytes: no key exists)."""
    keys = [{"id": f"{prefix}-{i}", "sha256": hashlib.sha256(os.urandom(16)).hexdigest()} for i in range(n)]
    path.write_text(json.dumps({"version": 1, "keys": keys}))


def new_workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="keygate-fleet-"))
