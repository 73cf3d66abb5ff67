"""The Envoys under test: started pinned through the harness's launcher, their stats, and plain HTTP checks."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Optional

import harness

from .children import ENVOY_CORE, spawn, stop_child
from .configs import bootstrap
from .procfs import proc_rss_kb


@dataclasses.dataclass
class Envoy:
    """One Envoy under test (or a view of a shared one: `shared_envoy`), pinned to `cpus`."""

    name: str
    config: dict
    workdir: Path
    envoy_bin: Path
    concurrency: int = 1
    cpus: str = ENVOY_CORE
    port: int = 0
    admin_port: int = 0
    proc: Optional[subprocess.Popen] = None
    ready_s: Optional[float] = None
    rss_start_kb: Optional[int] = None
    config_bytes: int = 0
    # Configurations served by this process (see `shared_envoy`).
    shared_by: int = 1

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 120.0) -> "Envoy":
        cfg_path = self.workdir / f"{self.name}.json"
        text = json.dumps(self.config)
        cfg_path.write_text(text)
        self.config_bytes = len(text)
        log = self.workdir / f"{self.name}.log"
        envoy = harness.envoy_command(
            self.envoy_bin, cfg_path, concurrency=self.concurrency, log_level="warning", log_path=log, extra=["--disable-hot-restart"]
        )
        out = open(self.workdir / f"{self.name}.stdio", "wb")
        t0 = time.monotonic()
        try:
            self.proc = spawn(["taskset", "-c", self.cpus, *envoy], stdout=out, stderr=subprocess.STDOUT, cwd=str(harness.REPO_ROOT))
        finally:
            out.close()
        outcome = harness.wait_ready(self.proc, self.admin_port, timeout, interval=0.02)
        if outcome == "exited":
            raise harness.EnvoyStartError(f"envoy {self.name} exited with {self.proc.returncode}", self.log_tail(), self.proc.returncode)
        if outcome == "timeout":
            self.stop()
            raise harness.EnvoyStartError(f"envoy {self.name} not ready after {timeout}s", self.log_tail(), None)
        self.ready_s = time.monotonic() - t0
        time.sleep(0.3)  # let the workers finish creating their VMs
        self.rss_start_kb = proc_rss_kb(self.pid)
        return self

    def log_tail(self) -> str:
        parts = []
        for suffix in (".log", ".stdio"):
            try:
                parts.append((self.workdir / f"{self.name}{suffix}").read_text(errors="replace")[-3000:])
            except OSError:
                pass
        return "\n".join(parts)

    def stats(self, regex: str) -> dict[str, int]:
        q = urllib.request.quote(regex)
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/stats?filter={q}", timeout=5) as r:
            out: dict[str, int] = {}
            for line in r.read().decode().splitlines():
                k, _, v = line.partition(": ")
                if v.strip().isdigit():
                    out[k.strip()] = int(v)
            return out

    def stop(self) -> None:
        if self.proc is not None:
            stop_child(self.proc)


def stop_envoys(envoys: dict[str, Envoy]) -> None:
    """Stops every process behind `envoys` once: the views `shared_envoy`
    returns are one process."""
    for e in {e.proc.pid: e for e in envoys.values() if e.proc is not None}.values():
        e.stop()


def shared_envoy(
    name: str, configs: list[tuple[str, list[dict]]], workdir: Path, envoy_bin: Path, upstream_port: Optional[int], clusters: Optional[list[dict]] = None
) -> dict[str, Envoy]:
    """One Envoy serving each of `configs` (name, filters) on a listener of
    its own; started, and returned as one view of it per configuration, the
    views differing only in name and port. Envoy shares a VM (and its
    shared data) between filters with the same `vm_id`, so each
    configuration's wasm filter needs a name of its own (`wasm_filter` uses
    the name as the `vm_id`)."""
    ports = harness.free_ports(len(configs) + 1)
    admin = ports[-1]
    cfg = bootstrap(ports[0], admin, configs[0][1], upstream_port, clusters=clusters)
    for i, (_, filters) in enumerate(configs[1:], 1):
        listener = bootstrap(ports[i], admin, filters, upstream_port)["static_resources"]["listeners"][0]
        listener["name"] = f"main{i}"
        cfg["static_resources"]["listeners"].append(listener)
    e = Envoy(name, cfg, workdir, envoy_bin, port=ports[0], admin_port=admin, shared_by=len(configs)).start()
    return {n: dataclasses.replace(e, name=n, port=ports[i]) for i, (n, _) in enumerate(configs)}


def new_envoy(name: str, filters: list[dict], workdir: Path, envoy_bin: Path, upstream_port: Optional[int], **kw: Any) -> Envoy:
    port, admin = harness.free_ports(2)
    meta = kw.pop("listener_metadata", None)
    clusters = kw.pop("clusters", None)
    return Envoy(name, bootstrap(port, admin, filters, upstream_port, meta, clusters), workdir, envoy_bin, port=port, admin_port=admin, **kw)


def status_or_zero(port: int, path: str, key: Optional[str]) -> int:
    """`http_status`, or 0 while nothing listens or the request fails."""
    try:
        return http_status(port, path, key)
    except (urllib.error.URLError, OSError):
        return 0


def http_status(port: int, path: str, key: Optional[str]) -> int:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if key is not None:
        req.add_header("x-api-key", key)
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
