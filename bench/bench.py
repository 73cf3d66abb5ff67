#!/usr/bin/env python3
"""keygate benchmark: what the filter costs inside Envoy, measured against
Envoy with no auth filter, an empty proxy-wasm filter and Envoy's native
api_key_auth + local_ratelimit filters.

Run through scripts/bench.sh (it installs wrk/h2load, Envoy, builds both wasm
modules and passes their paths in the environment). Standard library only.

Method (see bench/README.md for the reasoning):
  * the --concurrency 1 configurations run in one Envoy, a listener (and a
    VM) each, so that the offset a process keeps for its lifetime applies to
    all of them alike (--separate: one Envoy per configuration); the
    --concurrency 2 one runs in an Envoy of its own; Envoy is pinned to core
    0, the load generator (wrk / h2load) and the upstream to core 1;
  * one interleaved run: each measurement cell once per round, the order
    rotated every round, a warm-up right before each sample, medians reported;
  * in full mode, every round on freshly started Envoys, so that no
    configuration keeps one process's offset for the whole run;
  * Envoy CPU per request = utime+stime delta of the Envoy process over the
    sample / requests completed;
  * CPU used by other processes during a sample = busy time in /proc/stat minus
    the CPU of every process this script started; samples where that exceeds
    --busy-threshold % of one core are dropped (and counted).

Nothing here asserts timings: the figures are reported, never judged. It does
fail (exit 2) when a configuration does not behave as benchmarked (e.g. the
native filter not answering 401 without a key), because its figures would
then be meaningless.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Optional

REPO_ROOT = Path(__file__).resolve().parents[1]
CLK_TCK = os.sysconf("SC_CLK_TCK")

ENVOY_CORE = "0"
LOADGEN_CORE = "1"
UPSTREAM_CORE = "1"

# ---------------------------------------------------------------------------
# /proc helpers
# ---------------------------------------------------------------------------


def proc_cpu_ticks(pid: int) -> int:
    """utime + stime of a process (all its threads), in clock ticks; 0 if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return 0
    rest = data[data.rindex(b")") + 2 :].split()
    # rest[0] is field 3 (state); utime and stime are fields 14 and 15.
    return int(rest[11]) + int(rest[12])


def proc_rss_kb(pid: int) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def system_busy_ticks() -> int:
    """user + nice + system + irq + softirq of all CPUs (/proc/stat), in clock
    ticks. With tick-based accounting the softirq time of our own loopback
    traffic is booked both there and in the interrupted task's stime, so
    leaving it out would make other processes' load look negative; steal
    (time the hypervisor gave to someone else) is nobody's here."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields[1:8])
    return user + nice + system + irq + softirq


def steal_ticks() -> int:
    """Time the hypervisor ran someone else on our virtual CPUs (recorded,
    not used to drop samples: it is not another process of this machine)."""
    with open("/proc/stat") as f:
        return int(f.readline().split()[8])


def loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return "?"


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """`n` distinct ports free a moment ago (held at once while picking)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def sha256_hex(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()


def new_key() -> str:
    return secrets.token_urlsafe(24)


# ---------------------------------------------------------------------------
# Children: always stopped (finally, SIGTERM/SIGINT handlers, PDEATHSIG)
# ---------------------------------------------------------------------------

try:
    import ctypes

    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # pragma: no cover - non-Linux
    _PRCTL = None


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if _PRCTL is not None:
        _PRCTL(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG


_CHILDREN: "dict[int, subprocess.Popen]" = {}


def spawn(cmd: list[str], **kw: Any) -> subprocess.Popen:
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent, **kw)
    _CHILDREN[p.pid] = p
    return p


def stop_child(p: subprocess.Popen, grace: float = 5.0) -> None:
    if p.poll() is None:
        try:
            p.send_signal(signal.SIGTERM)
            p.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=5)
        except ProcessLookupError:
            pass
    _CHILDREN.pop(p.pid, None)


def stop_all_children() -> None:
    for p in list(_CHILDREN.values()):
        try:
            stop_child(p, grace=3.0)
        except Exception:  # noqa: BLE001 - best effort on the way out
            pass


def run_measured(cmd: list[str], timeout: float) -> tuple[str, int, float]:
    """Run a load generator; returns (stdout+stderr, its own CPU in clock
    ticks from wait4's rusage, wall seconds)."""
    t0 = time.monotonic()
    p = spawn(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert p.stdout is not None
        out = p.stdout.read().decode("utf-8", "replace")
        # wait4 gives the child's rusage; Popen must not reap it first.
        deadline = time.monotonic() + timeout
        while True:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                p.kill()
                pid, status, ru = os.wait4(p.pid, 0)
                break
            time.sleep(0.005)
        p.returncode = os.waitstatus_to_exitcode(status)
    finally:
        if p.stdout:
            p.stdout.close()
        _CHILDREN.pop(p.pid, None)
    ticks = round((ru.ru_utime + ru.ru_stime) * CLK_TCK)
    return out, ticks, time.monotonic() - t0


# ---------------------------------------------------------------------------
# Envoy configuration
# ---------------------------------------------------------------------------

ROUTER = {
    "name": "envoy.filters.http.router",
    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
}


def wasm_filter(name: str, root_id: str, wasm: Path, configuration: str) -> dict:
    """A proxy-wasm HTTP filter entry, with the same VM settings as keygate's
    deployment (tests/e2e/harness.py, envoy/envoy.yaml)."""
    return {
        "name": "envoy.filters.http.wasm",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": {
                "name": name,
                "root_id": root_id,
                "failure_policy": "FAIL_RELOAD",
                "allow_on_headers_stop_iteration": True,
                "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": configuration},
                "vm_config": {
                    "vm_id": name,
                    "runtime": "envoy.wasm.runtime.v8",
                    "code": {"local": {"filename": str(wasm)}},
                },
            },
        },
    }


def native_filters(keys: list[tuple[str, str]], limited: tuple[str, str]) -> list[dict]:
    """Envoy's own equivalent of keygate: api_key_auth (401 without a valid
    key) then local_ratelimit with one descriptor per key (429 when the key's
    bucket is empty). `keys` = [(id, key)]; `limited` gets a bucket of one
    token refilled once an hour, the others a bucket too large to ever run
    dry."""
    huge = {"max_tokens": 1_000_000_000, "tokens_per_fill": 1_000_000_000, "fill_interval": "1s"}
    descriptors = [
        {"entries": [{"key": "api_key", "value": key}], "token_bucket": huge} for _id, key in keys
    ]
    descriptors.append(
        {
            "entries": [{"key": "api_key", "value": limited[1]}],
            "token_bucket": {"max_tokens": 1, "tokens_per_fill": 1, "fill_interval": "3600s"},
        }
    )
    always = {"default_value": {"numerator": 100, "denominator": "HUNDRED"}, "runtime_key": "bench_lrl"}
    return [
        {
            "name": "envoy.filters.http.api_key_auth",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.api_key_auth.v3.ApiKeyAuth",
                "credentials": [{"key": key, "client": cid} for cid, key in keys + [limited]],
                "key_sources": [{"header": "x-api-key"}],
            },
        },
        {
            "name": "envoy.filters.http.local_ratelimit",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
                "stat_prefix": "bench_native",
                "token_bucket": huge,
                "filter_enabled": always,
                "filter_enforced": always,
                # Per-key buckets only: the default bucket is for requests
                # matching no descriptor.
                "always_consume_default_token_bucket": False,
                "descriptors": descriptors,
                # The descriptor comes from the filter's own rate_limits (the
                # route-level RouteAction.rate_limits does not exist on a
                # direct_response route).
                "rate_limits": [
                    {"actions": [{"request_headers": {"header_name": "x-api-key", "descriptor_key": "api_key"}}]}
                ],
            },
        },
    ]


def bootstrap(
    port: int,
    admin_port: int,
    http_filters: list[dict],
    upstream_port: Optional[int],
    listener_metadata: Optional[dict] = None,
) -> dict:
    """One listener on 127.0.0.1 with two routes: /direct answered by Envoy
    itself (direct_response) and /proxy forwarded to the upstream."""
    routes: list[dict] = [{"match": {"prefix": "/direct"}, "direct_response": {"status": 200, "body": {"inline_string": "ok\n"}}}]
    clusters = []
    if upstream_port is not None:
        routes.append({"match": {"prefix": "/proxy"}, "route": {"cluster": "upstream"}})
        clusters.append(
            {
                "name": "upstream",
                "type": "STATIC",
                "connect_timeout": "2s",
                "load_assignment": {
                    "cluster_name": "upstream",
                    "endpoints": [
                        {"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": upstream_port}}}}]}
                    ],
                },
            }
        )
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "ingress",
        "codec_type": "AUTO",
        "route_config": {"name": "local", "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}]},
        "http_filters": list(http_filters) + [ROUTER],
    }
    listener: dict[str, Any] = {
        "name": "main",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}],
    }
    if listener_metadata is not None:
        listener["metadata"] = listener_metadata
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {"listeners": [listener], "clusters": clusters},
    }


def upstream_bootstrap(port: int, admin_port: int) -> dict:
    """The trivial upstream: an Envoy answering 200 "ok" to everything."""
    cfg = bootstrap(port, admin_port, [], None)
    vh = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]["virtual_hosts"][0]
    vh["routes"] = [{"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "ok\n"}}}]
    return cfg


# ---------------------------------------------------------------------------
# Running Envoy
# ---------------------------------------------------------------------------


class EnvoyStartError(RuntimeError):
    pass


@dataclasses.dataclass
class Envoy:
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
        cmd = [
            "taskset", "-c", self.cpus,
            str(self.envoy_bin),
            "-c", str(cfg_path),
            "--concurrency", str(self.concurrency),
            "--disable-hot-restart",
            "-l", "warning",
            "--log-path", str(log),
        ]  # fmt: skip
        out = open(self.workdir / f"{self.name}.stdio", "wb")
        t0 = time.monotonic()
        try:
            self.proc = spawn(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=str(REPO_ROOT))
        finally:
            out.close()
        while True:
            if self.proc.poll() is not None:
                raise EnvoyStartError(f"envoy {self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self._ready():
                break
            if time.monotonic() - t0 > timeout:
                self.stop()
                raise EnvoyStartError(f"envoy {self.name} not ready after {timeout}s:\n{self.log_tail()}")
            time.sleep(0.02)
        self.ready_s = time.monotonic() - t0
        time.sleep(0.3)  # let the workers finish creating their VMs
        self.rss_start_kb = proc_rss_kb(self.pid)
        return self

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/ready", timeout=1) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

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


def shared_envoy(name: str, configs: list[tuple[str, list[dict]]], workdir: Path, envoy_bin: Path, upstream_port: Optional[int]) -> dict[str, Envoy]:
    """One Envoy serving each of `configs` (name, filters) on a listener of
    its own; started, and returned as one view of it per configuration, the
    views differing only in name and port. Envoy shares a VM (and its
    shared data) between filters with the same `vm_id`, so each
    configuration's wasm filter needs a name of its own (`wasm_filter` uses
    the name as the `vm_id`)."""
    ports = free_ports(len(configs) + 1)
    admin = ports[-1]
    cfg = bootstrap(ports[0], admin, configs[0][1], upstream_port)
    for i, (_, filters) in enumerate(configs[1:], 1):
        listener = bootstrap(ports[i], admin, filters, upstream_port)["static_resources"]["listeners"][0]
        listener["name"] = f"main{i}"
        cfg["static_resources"]["listeners"].append(listener)
    e = Envoy(name, cfg, workdir, envoy_bin, port=ports[0], admin_port=admin, shared_by=len(configs)).start()
    return {n: dataclasses.replace(e, name=n, port=ports[i]) for i, (n, _) in enumerate(configs)}


def new_envoy(name: str, filters: list[dict], workdir: Path, envoy_bin: Path, upstream_port: Optional[int], **kw: Any) -> Envoy:
    port, admin = free_ports(2)
    meta = kw.pop("listener_metadata", None)
    return Envoy(name, bootstrap(port, admin, filters, upstream_port, meta), workdir, envoy_bin, port=port, admin_port=admin, **kw)


# ---------------------------------------------------------------------------
# Plain HTTP checks
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# Load generators
# ---------------------------------------------------------------------------

_UNITS = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6, "h": 3600e6}


def _lat_us(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text.strip())
    if not m:
        raise ValueError(f"bad latency {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(out: str) -> dict:
    r: dict[str, Any] = {}
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+)", out)
    if not m:
        raise ValueError("cannot parse wrk output:\n" + out)
    r["requests"] = int(m.group(1))
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    r["rps"] = float(m.group(1)) if m else None
    for pct in ("50", "99"):
        m = re.search(rf"^\s+{pct}%\s+(\S+)", out, re.M)
        r[f"p{pct}_us"] = _lat_us(m.group(1)) if m else None
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    r["non2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    r["socket_errors"] = sum(int(x) for x in m.groups()) if m else 0
    return r


def parse_h2load(out: str) -> dict:
    r: dict[str, Any] = {}
    m = re.search(r"finished in ([\d.]+)(\w+), ([\d.]+) req/s", out)
    m2 = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored", out)
    if not (m and m2):
        raise ValueError("cannot parse h2load output:\n" + out)
    r["rps"] = float(m.group(3))
    r["requests"] = int(m2.group(3))
    r["socket_errors"] = int(m2.group(5)) + int(m2.group(6))
    m3 = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    r["non2xx"] = sum(int(x) for x in m3.groups()[1:]) if m3 else 0
    r["p50_us"] = r["p99_us"] = None
    return r


# ---------------------------------------------------------------------------
# The measurement matrix
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Cell:
    config: str  # Envoy under test
    route: str  # direct | proxy
    path: str  # allowed | 401 | 429
    kind: str  # h1 (wrk, many connections) | h2 (h2load) | c1 (wrk, one connection)

    @property
    def label(self) -> str:
        return f"{self.config}/{self.route}/{self.path}/{self.kind}"


@dataclasses.dataclass
class Settings:
    quick: bool
    rounds: int
    duration_s: int  # wrk/h2load main duration
    c1_duration_s: int
    warmup: str  # h2load -D value for warm-ups (h2load wants a unit: 200ms)
    connections: int
    h2_connections: int
    h2_streams: int
    busy_threshold_pct: float
    retries: int


class Bench:
    def __init__(self, s: Settings, envoys: dict[str, Envoy], upstream: Optional[Envoy], keys: dict[str, Optional[str]], wrk: str, h2load: str):
        self.s = s
        self.envoys = envoys
        self.upstream = upstream
        self.keys = keys  # path -> x-api-key value (None: no header)
        self.wrk = wrk
        self.h2load = h2load
        self.dropped = 0
        self.samples: dict[Cell, list[dict]] = {}
        self.extra_headers: list[tuple[str, str]] = []

    def our_ticks(self) -> int:
        # A set: with compare.py --shared-envoy, several builds are one process.
        pids = {e.pid for e in self.envoys.values()} | ({self.upstream.pid} if self.upstream else set())
        return sum(proc_cpu_ticks(p) for p in pids)

    def _headers(self, path: str) -> list[str]:
        key = self.keys[path]
        extra = [h for name, value in self.extra_headers for h in ("-H", f"{name}: {value}")]
        return (["-H", f"x-api-key: {key}"] if key is not None else []) + extra

    def warmup(self, cell: Cell, url: str) -> None:
        cmd = ["taskset", "-c", LOADGEN_CORE, self.h2load, "-t1", "-D", self.s.warmup]
        if cell.kind == "h2":
            cmd += ["-c", str(self.s.h2_connections), "-m", str(self.s.h2_streams)]
        else:
            cmd += ["--h1", "-c", "1" if cell.kind == "c1" else str(self.s.connections)]
        out, _, _ = run_measured(cmd + self._headers(cell.path) + [url], timeout=60)
        if "finished in" not in out:
            raise RuntimeError(f"warm-up failed for {cell.label}:\n{out[-2000:]}")

    def sample(self, cell: Cell) -> dict:
        env = self.envoys[cell.config]
        url = f"http://127.0.0.1:{env.port}/{cell.route}"
        self.warmup(cell, url)
        if cell.kind == "h2":
            cmd = [
                "taskset", "-c", LOADGEN_CORE, self.h2load, "-t1",
                "-c", str(self.s.h2_connections), "-m", str(self.s.h2_streams),
                "-D", str(self.s.duration_s),
            ]  # fmt: skip
            parse = parse_h2load
        else:
            c = 1 if cell.kind == "c1" else self.s.connections
            d = self.s.c1_duration_s if cell.kind == "c1" else self.s.duration_s
            cmd = ["taskset", "-c", LOADGEN_CORE, self.wrk, "-t1", f"-c{c}", f"-d{d}s", "--latency"]
            parse = parse_wrk
        cmd += self._headers(cell.path) + [url]
        st0 = env.stats(r"^http\.ingress\.downstream_(cx_total|rq_[245]xx)$")
        steal0, sys0, ours0, env0 = steal_ticks(), system_busy_ticks(), self.our_ticks(), proc_cpu_ticks(env.pid)
        out, lg_ticks, wall = run_measured(cmd, timeout=60 + 3 * self.s.duration_s)
        steal1, sys1, ours1, env1 = steal_ticks(), system_busy_ticks(), self.our_ticks(), proc_cpu_ticks(env.pid)
        st1 = env.stats(r"^http\.ingress\.downstream_(cx_total|rq_[245]xx)$")
        r = parse(out)
        env_ticks = env1 - env0
        other_ticks = (sys1 - sys0) - (ours1 - ours0) - lg_ticks
        r.update(
            wall_s=wall,
            envoy_cpu_pct=100.0 * env_ticks / CLK_TCK / wall,
            loadgen_cpu_pct=100.0 * lg_ticks / CLK_TCK / wall,
            other_cpu_pct=100.0 * max(other_ticks, 0) / CLK_TCK / wall,
            other_cpu_pct_signed=100.0 * other_ticks / CLK_TCK / wall,
            steal_pct=100.0 * (steal1 - steal0) / CLK_TCK / wall,
            us_per_req=(env_ticks / CLK_TCK * 1e6 / r["requests"]) if r["requests"] else None,
            new_connections=st1.get("http.ingress.downstream_cx_total", 0) - st0.get("http.ingress.downstream_cx_total", 0),
            rq_2xx=st1.get("http.ingress.downstream_rq_2xx", 0) - st0.get("http.ingress.downstream_rq_2xx", 0),
            rq_4xx=st1.get("http.ingress.downstream_rq_4xx", 0) - st0.get("http.ingress.downstream_rq_4xx", 0),
            rq_5xx=st1.get("http.ingress.downstream_rq_5xx", 0) - st0.get("http.ingress.downstream_rq_5xx", 0),
        )
        r["busy"] = r["other_cpu_pct"] > self.s.busy_threshold_pct
        return r

    def prime(self, duration: str) -> None:
        """Load every Envoy once before round 1 (V8 tier-up of the wasm
        code, upstream connection pools), so that the first sample of a
        configuration is not its first traffic."""
        for name, env in self.envoys.items():
            for route in ("direct", "proxy"):
                cmd = ["taskset", "-c", LOADGEN_CORE, self.h2load, "-t1", "--h1", "-c", str(self.s.connections), "-D", duration]
                out, _, _ = run_measured(cmd + self._headers("allowed") + [f"http://127.0.0.1:{env.port}/{route}"], timeout=60)
                if "finished in" not in out:
                    raise RuntimeError(f"priming {name} failed:\n{out[-2000:]}")

    def run(self, cells: list[Cell], first: int = 0, count: Optional[int] = None) -> None:
        """Rounds `first` to `first + count` (default: all of them) of the
        interleaved run; the order rotates by the round's number, so a run
        split into blocks (fresh Envoys for each) rotates as one would."""
        n = len(cells)
        step = max(1, n // self.s.rounds)
        t_start = time.monotonic()
        last = self.s.rounds if count is None else min(self.s.rounds, first + count)
        for rnd in range(first, last):
            order = cells[(rnd * step) % n :] + cells[: (rnd * step) % n]
            for i, cell in enumerate(order):
                for attempt in range(self.s.retries + 1):
                    r = self.sample(cell)
                    r["round"] = rnd
                    if r["busy"]:
                        self.dropped += 1
                    self.samples.setdefault(cell, []).append(r)
                    if not r["busy"]:
                        break
                    time.sleep(0.5)
                flag = " BUSY(dropped)" if r["busy"] else ""
                us = f"{r['us_per_req']:.1f}" if r["us_per_req"] is not None else "-"
                print(
                    f"  [{rnd + 1}/{self.s.rounds} {i + 1:2d}/{n}] {cell.label:38s} "
                    f"{r['rps']:9.0f} rps  {us:>6s} us/req  envoy {r['envoy_cpu_pct']:5.1f}%  "
                    f"loadgen {r['loadgen_cpu_pct']:5.1f}%  other {r['other_cpu_pct']:5.1f}%  steal {r['steal_pct']:4.1f}%{flag}",
                    flush=True,
                )
        print(f"  measured in {time.monotonic() - t_start:.0f}s, {self.dropped} sample(s) dropped as busy", flush=True)


def med(values: list[Optional[float]]) -> Optional[float]:
    v = [x for x in values if x is not None]
    return statistics.median(v) if v else None


def summarize(samples: dict[Cell, list[dict]]) -> dict[Cell, dict]:
    out: dict[Cell, dict] = {}
    for cell, rs in samples.items():
        clean = [r for r in rs if not r["busy"]]
        use = clean or rs  # if every sample was busy, report them anyway, flagged
        out[cell] = {
            "samples": len(rs),
            "dropped_busy": len(rs) - len(clean),
            "all_busy": not clean,
            "rps": med([r["rps"] for r in use]),
            "us_per_req": med([r["us_per_req"] for r in use]),
            "us_per_req_min": min((r["us_per_req"] for r in use if r["us_per_req"] is not None), default=None),
            "us_per_req_max": max((r["us_per_req"] for r in use if r["us_per_req"] is not None), default=None),
            "p50_us": med([r["p50_us"] for r in use]),
            "p99_us": med([r["p99_us"] for r in use]),
            "p99_us_min": min((r["p99_us"] for r in use if r["p99_us"] is not None), default=None),
            "p99_us_max": max((r["p99_us"] for r in use if r["p99_us"] is not None), default=None),
            "envoy_cpu_pct": med([r["envoy_cpu_pct"] for r in use]),
            "loadgen_cpu_pct": med([r["loadgen_cpu_pct"] for r in use]),
            "other_cpu_pct": med([r["other_cpu_pct"] for r in use]),
            "steal_pct": med([r["steal_pct"] for r in use]),
            "requests_total": sum(r["requests"] for r in use),
            "non2xx_total": sum(r["non2xx"] for r in use),
            "socket_errors_total": sum(r["socket_errors"] for r in use),
            "new_connections_total": sum(r["new_connections"] for r in use),
            "rq_2xx_total": sum(r["rq_2xx"] for r in use),
            "rq_4xx_total": sum(r["rq_4xx"] for r in use),
            "rq_5xx_total": sum(r["rq_5xx"] for r in use),
            "raw": rs,
        }
    return out


# ---------------------------------------------------------------------------
# Startup: time to ready and RSS with large key lists
# ---------------------------------------------------------------------------


def key_list(n: int, extra: list[dict]) -> list[dict]:
    """`n` keys in total: `extra` first, then random ones (only their digests
    exist: nobody knows those keys)."""
    out = list(extra)
    for i in range(n - len(extra)):
        out.append({"id": f"k{i:07d}", "sha256": hashlib.sha256(secrets.token_bytes(24)).hexdigest()})
    return out


def keygate_config(keys: list[dict]) -> str:
    return json.dumps({"keys": keys, "rate_limit": {"requests_per_second": 1000000, "burst": 1000000}}, separators=(",", ":"))


def startup_probe(name: str, filters: list[dict], workdir: Path, envoy_bin: Path, concurrency: int, meta: Optional[dict] = None) -> dict:
    e = new_envoy(name, filters, workdir, envoy_bin, None, concurrency=concurrency, listener_metadata=meta)
    try:
        e.start(timeout=600)
        return probe_row(e)
    finally:
        e.stop()
        try:
            (workdir / f"{name}.json").unlink()
        except OSError:
            pass


def cp_probe(n: int, concurrency: int, workdir: Path, envoy_bin: Path, keygate_cli: Path, wasm: Path) -> dict:
    """`n` keys served by `keygate serve` (default paging) to an Envoy whose
    keygate has no static keys: time from /ready to the first 200 for the
    key listed last (first fetch, every page, compile, publication, adoption
    by the worker's VM), and VmRSS once it is in use."""
    key = new_key()
    entries = key_list(n - 1, []) + [{"id": "bench-last", "sha256": sha256_hex(key)}]
    keys_file = workdir / f"cp-{n}.json"
    keys_file.write_text(json.dumps({"version": 1, "keys": entries}, separators=(",", ":")))
    del entries
    cp_port = free_port()
    log = open(workdir / f"cp-{n}.log", "wb")
    serve = spawn(
        ["taskset", "-c", UPSTREAM_CORE, str(keygate_cli), "serve", "--keys", str(keys_file), "--listen", f"127.0.0.1:{cp_port}"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    e: Optional[Envoy] = None
    try:
        deadline = time.monotonic() + 300
        while status_or_zero(cp_port, "/healthz", None) != 200:
            if serve.poll() is not None or time.monotonic() > deadline:
                raise EnvoyStartError(f"keygate serve did not start: {(workdir / f'cp-{n}.log').read_text()[-2000:]}")
            time.sleep(0.1)
        cfg = json.dumps({"control_plane": {"cluster": "keygate_cp", "authority": "keygate-cp", "poll_interval": "1s", "timeout": "10s"}})
        e = new_envoy(f"cp-{n}-c{concurrency}", [wasm_filter("keygate", "keygate", wasm, cfg)], workdir, envoy_bin, None, concurrency=concurrency)
        e.config["static_resources"]["clusters"].append(
            {
                "name": "keygate_cp",
                "type": "STATIC",
                "connect_timeout": "2s",
                "load_assignment": {
                    "cluster_name": "keygate_cp",
                    "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": cp_port}}}}]}],
                },
            }
        )
        e.start(timeout=600)
        t_ready = time.monotonic()
        first_use = None
        while time.monotonic() - t_ready < 120:
            if status_or_zero(e.port, "/direct", key) == 200:
                first_use = time.monotonic() - t_ready
                break
            time.sleep(0.02)
        time.sleep(0.3)
        return {
            "envoy": e.name,
            "concurrency": concurrency,
            "ready_s": e.ready_s,
            "first_use_s": first_use,
            "rss_kb": proc_rss_kb(e.pid),
            "rss_ready_kb": e.rss_start_kb,
            "list_file_bytes": keys_file.stat().st_size,
        }
    finally:
        if e is not None:
            e.stop()
        stop_child(serve)
        try:
            keys_file.unlink()
        except OSError:
            pass


def startup_probes(
    args: argparse.Namespace,
    envoys: dict[str, Envoy],
    workdir: Path,
    envoy_bin: Path,
    keygate_wasm: Path,
    empty_wasm: Path,
    keygate_cli: Path,
    extra_keys: list[dict],
    kg10: str,
    kg100k: str,
) -> tuple[list[dict], list[dict]]:
    """Time to ready and RSS (0.3 s after ready) with 10, 100k and (full
    mode) 1M keys in the plugin configuration (1M: the lowest RSS of five
    starts), at --concurrency 1 and 2, next to the same JSON given to Envoy
    without keygate: in listener metadata (no wasm at all) and as the
    configuration of the empty wasm filter (Envoy's whole wasm path, nothing
    parsed). Then the same lists through the control
    plane. Envoys of the matrix that are still running are reused."""
    print("startup probes (time to ready, VmRSS) ...", flush=True)
    probes: list[dict] = []
    big = not args.quick and not args.no_1m

    def add(keys: str, what: str, row: dict, cfg_bytes: int) -> None:
        row.update(keys=keys, what=what, plugin_config_bytes=cfg_bytes)
        probes.append(row)
        samples = row.get("rss_kb_samples", [])
        each = f"  lowest of {len(samples)} starts: " + ", ".join(f"{kb / 1024:.0f}" for kb in samples) + " MiB" if len(samples) > 1 else ""
        print(
            f"  {keys:6s} {what:22s} ready {row['ready_s']:6.2f}s  VmRSS {row['rss_kb'] / 1024:8.1f} MiB  "
            f"(plugin config {cfg_bytes / 1e6:.1f} MB){each}",
            flush=True,
        )

    def kg(cfg: str) -> list[dict]:
        return [wasm_filter("keygate", "keygate", keygate_wasm, cfg)]

    def row(name: str, filters: list[dict], conc: int, meta: Optional[dict] = None) -> dict:
        if name in envoys and meta is None:
            return probe_row(envoys[name])
        return startup_probe(f"probe-{name}", filters, workdir, envoy_bin, conc, meta=meta)

    def started(name: str, filters: list[dict], conc: int, starts: int) -> dict:
        """`row` over `starts` fresh starts: the lowest RSS, the median time to
        ready, and every sample. With a 94 MB configuration, Envoy's RSS after
        start holds one more copy of it in some starts and not in others, at c1
        and at c2 alike, so a single start per concurrency (or a median of a
        few) can pair a low c1 with a high c2; the lowest start of each is the
        one without that copy. Three starts per concurrency were not always
        enough to see one without it (run H: 1028, 1031, 1029 MiB at c1, 1075,
        1078, 989 at c2), so 1M keys get five; the medians are kept as a
        cross-check."""
        rows = [row(name, filters, conc) for _ in range(starts)]
        out = dict(rows[0])
        out.update(
            rss_kb=min(r["rss_kb"] for r in rows),
            rss_kb_median=statistics.median(r["rss_kb"] for r in rows),
            ready_s=statistics.median(r["ready_s"] for r in rows),
            rss_kb_samples=[r["rss_kb"] for r in rows],
            ready_s_samples=[r["ready_s"] for r in rows],
        )
        return out

    add("0", "envoy, no filter", row("baseline", [], 1), 0)
    add("0", "empty wasm filter", row("empty-wasm", [wasm_filter("empty", "empty", empty_wasm, "")], 1), 0)
    lists = [("10", kg10), ("100k", kg100k)]
    if big:
        lists.append(("1M", keygate_config(key_list(1_000_000, extra_keys))))
    for label, cfg in lists:
        name = {"10": "keygate-10", "100k": "keygate-100k"}.get(label, "")
        starts = 5 if label == "1M" else 1
        add(label, "keygate c1", started(name or "kg-1m", kg(cfg), 1, starts), len(cfg))
        add(label, "keygate c2", started("keygate-10-c2" if label == "10" else "kg2", kg(cfg), 2, starts), len(cfg))
        add(label, "same JSON, no wasm", row("blob", [], 1, meta=blob_metadata(cfg)), len(cfg))
        if label != "10":
            add(label, "same JSON, empty wasm", row("empty-cfg", [wasm_filter("empty", "empty", empty_wasm, cfg)], 1), len(cfg))
    del lists

    print("control-plane probes (keygate serve, paged; time from /ready to the first 200 for the last key) ...", flush=True)
    cp_rows: list[dict] = []
    for n, label in [(10, "10"), (100_000, "100k")] + ([(1_000_000, "1M")] if big else []):
        for conc in (1,) if args.quick else (1, 2):
            r = cp_probe(n, conc, workdir, envoy_bin, keygate_cli, keygate_wasm)
            r["keys"] = label
            cp_rows.append(r)
            print(
                f"  {label:6s} c{conc}: ready {r['ready_s']:6.2f}s, first use {fmt(r['first_use_s'], '.2f')}s after ready, "
                f"VmRSS {r['rss_kb'] / 1024:8.1f} MiB (list {r['list_file_bytes'] / 1e6:.1f} MB)",
                flush=True,
            )
    return probes, cp_rows


HOST_CALLS = ["header_pairs", "shared_get", "shared_set", "clock", "replace_header", "remove_header", "metric", "filter_state"]
CALLS_PER_REQUEST = 10


# Configurations without an auth filter: measured on the allowed path only.
NO_AUTH = ("baseline", "empty-wasm", "empty-trimmed")


def host_call_costs(s: Settings, workdir: Path, envoy_bin: Path, probe_wasm: Path, wrk: str, h2load: str) -> dict:
    """Envoy CPU per call of each host function keygate uses on the request
    path: the probe filter makes 10 calls of one kind per request; the cost
    of a call is (probe - probe making no call) / 10, median over rounds of
    the per-round difference. Same method as the matrix (pinning,
    interleaving, busy samples dropped)."""
    print("host-call probes (10 calls of one kind per request) ...", flush=True)
    kinds = ["nothing"] + HOST_CALLS
    envoys: dict[str, Envoy] = {}
    # Bench counts the CPU of an upstream; this one only idles.
    up_port, up_admin = free_ports(2)
    upstream = Envoy("probe-upstream", upstream_bootstrap(up_port, up_admin), workdir, envoy_bin, cpus=UPSTREAM_CORE, port=up_port, admin_port=up_admin)
    try:
        upstream.start()
        for kind in kinds:
            n = 0 if kind == "nothing" else CALLS_PER_REQUEST
            e = new_envoy(f"probe-{kind}", [wasm_filter("probe", "probe", probe_wasm, f"{kind}:{n}")], workdir, envoy_bin, None)
            e.start()
            envoys[kind] = e
        # A smoke run needs the figures to exist, not to be steady.
        settings = dataclasses.replace(s, rounds=1) if s.quick else s
        bench = Bench(settings, envoys, upstream, {"allowed": None}, wrk, h2load)
        bench.extra_headers = [(f"x-probe-{i}", "v") for i in range(CALLS_PER_REQUEST)]
        cells = [Cell(k, "direct", "allowed", "h1") for k in kinds]
        bench.run(cells)
        per_round = {c.config: by_round(rs, "us_per_req") for c, rs in bench.samples.items()}
        out: dict[str, Any] = {"floor_us_per_req": med(list(per_round["nothing"].values())), "per_call_us": {}}
        for kind in HOST_CALLS:
            diffs = [(per_round[kind][r] - per_round["nothing"][r]) / CALLS_PER_REQUEST for r in per_round[kind] if r in per_round["nothing"]]
            out["per_call_us"][kind] = med(diffs)
        return out
    finally:
        for e in envoys.values():
            e.stop()
        upstream.stop()


def print_host_calls(hc: dict) -> None:
    print()
    print("== host calls: Envoy CPU per call (10 calls per request, minus the probe making none) ==")
    print(f"  probe filter making no call: {fmt(hc['floor_us_per_req'])} us/req")
    for kind, us in hc["per_call_us"].items():
        print(f"  {kind:16s} {fmt(us, '.2f'):>6s} us")


def per_vm_cp(rows: list[dict]) -> dict[str, float]:
    """VmRSS(c2) - VmRSS(c1) with the list in use, per list size, in KiB."""
    by = {(r["keys"], r["concurrency"]): r["rss_kb"] for r in rows}
    return {k: by[(k, 2)] - by[(k, 1)] for k in ("10", "100k", "1M") if (k, 1) in by and (k, 2) in by}


def print_startup(sm: dict, header: bool = True) -> None:
    if header:
        print()
        print("== memory and startup ==")
    probes = sm["startup"]
    plain = next((p["rss_kb"] for p in probes if p["what"] == "envoy, no filter"), None)
    print(f"  {'keys':6s} {'what':22s} {'ready':>8s} {'VmRSS MiB':>10s} {'+MiB/plain':>10s} {'plugin MB':>10s}")
    for p in probes:
        extra = (p["rss_kb"] - plain) / 1024 if plain else None
        print(f"  {p['keys']:6s} {p['what']:22s} {p['ready_s']:7.2f}s {p['rss_kb'] / 1024:10.1f} {fmt(extra, '+.1f'):>10s} {p['plugin_config_bytes'] / 1e6:10.1f}")
    medians = {(p["keys"], p["what"]): p["rss_kb_median"] for p in probes if "rss_kb_median" in p}
    for k, v in sm["per_vm_rss_kb"].items():
        c1, c2 = medians.get((k, "keygate c1")), medians.get((k, "keygate c2"))
        also = f" (medians of the starts: {(c2 - c1) / 1024:+.1f} MiB)" if c1 is not None and c2 is not None else ""
        print(f"  one more worker (and its keygate VM) with {k} keys in the plugin configuration: VmRSS c2 - c1 = {v / 1024:.1f} MiB{also}")
    print("  control plane (keygate serve, default paging):")
    for r in sm.get("control_plane", []):
        print(
            f"    {r['keys']:6s} c{r['concurrency']}: first use {fmt(r['first_use_s'], '.2f')}s after /ready, "
            f"VmRSS {r['rss_kb'] / 1024:.1f} MiB (at ready {r['rss_ready_kb'] / 1024:.1f})"
        )
    for k, v in sm.get("per_vm_rss_kb_control_plane", {}).items():
        print(f"    one more worker with {k} keys from the control plane: VmRSS c2 - c1 = {v / 1024:.1f} MiB")
    w = sm["wasm_bytes"]
    trimmed = f" ({w['empty_trimmed']} with its exports trimmed)" if "empty_trimmed" in w else ""
    print(f"  keygate.wasm (release): {w['keygate']} bytes; empty filter: {w['empty']} bytes{trimmed}")


def probe_row(e: Envoy) -> dict:
    return {"envoy": e.name, "concurrency": e.concurrency, "ready_s": e.ready_s, "rss_kb": e.rss_start_kb, "bootstrap_bytes": e.config_bytes}


def blob_metadata(value: str) -> dict:
    """The same JSON text in a StringValue inside listener metadata: Envoy
    parses and keeps it but nothing interprets it (no wasm)."""
    return {"typed_filter_metadata": {"bench.blob": {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": value}}}


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


def fmt(v: Optional[float], spec: str = ".1f", scale: float = 1.0) -> str:
    return "-" if v is None else format(v * scale, spec)


def fmt_lat(us: Optional[float]) -> str:
    if us is None:
        return "-"
    return f"{us:.0f}us" if us < 1000 else f"{us / 1000:.2f}ms"


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if (a is not None and b) else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 rounds of short samples, no 1M-key probe (< 3 min)")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--duration", type=int, help="seconds per sample")
    ap.add_argument("--busy-threshold", type=float, default=20.0, help="%% of one core used by others above which a sample is dropped")
    ap.add_argument("--out", default=str(REPO_ROOT / "target" / "bench"))
    ap.add_argument("--no-1m", action="store_true", help="skip the 1M-key startup probes in full mode")
    ap.add_argument("--host-calls", action="store_true", help="only the host-call probes (writes host_calls.json)")
    ap.add_argument("--startup-only", action="store_true", help="only the start-up, memory and control-plane probes (writes startup.json)")
    ap.add_argument(
        "--latency-only",
        action="store_true",
        help="only the one-connection latency of the allowed path, --concurrency 1 configurations, 11 rounds unless --rounds (writes latency.json)",
    )
    ap.add_argument("--separate", action="store_true", help="one Envoy per configuration instead of one for all the --concurrency 1 ones")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (bootstraps, logs)")
    ap.add_argument("--render", metavar="SUMMARY_JSON", help="only print the tables of an earlier run's summary.json")
    args = ap.parse_args()
    if args.render:
        return render(Path(args.render))

    envoy_bin = Path(os.environ["BENCH_ENVOY"])
    keygate_wasm = Path(os.environ["BENCH_KEYGATE_WASM"])
    empty_wasm = Path(os.environ["BENCH_EMPTY_WASM"])
    # Optional: the empty filter exporting only what keygate exports.
    empty_trimmed = Path(os.environ["BENCH_EMPTY_TRIMMED_WASM"]) if os.environ.get("BENCH_EMPTY_TRIMMED_WASM") else None
    keygate_cli = Path(os.environ["BENCH_KEYGATE_CLI"])
    probe_wasm = Path(os.environ["BENCH_PROBE_WASM"])
    wrk = os.environ.get("BENCH_WRK", "wrk")
    h2load = os.environ.get("BENCH_H2LOAD", "h2load")

    q = args.quick
    s = Settings(
        quick=q,
        rounds=args.rounds or (2 if q else 11 if args.latency_only else 5),
        duration_s=args.duration or (1 if q else 5),
        c1_duration_s=1 if q else 3,
        warmup="200ms" if q else "1000ms",
        connections=32,
        h2_connections=8,
        h2_streams=16,
        busy_threshold_pct=args.busy_threshold,
        retries=0 if q else 1,
    )
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="run-", dir=out_dir))
    t_begin = time.monotonic()
    load_start = loadavg()
    print(f"mode: {'quick' if q else 'full'}, {s.rounds} rounds, {s.duration_s}s samples; loadavg {load_start}", flush=True)

    envoys: dict[str, Envoy] = {}
    upstream: Optional[Envoy] = None
    try:
        # -- keys ---------------------------------------------------------
        allowed_key, limited_key = new_key(), new_key()
        base_keys = [{"id": "bench-allowed", "sha256": sha256_hex(allowed_key)}]
        limited_entry = {"id": "bench-limited", "sha256": sha256_hex(limited_key), "rate_limit": {"requests_per_second": 0.001, "burst": 1}}
        kg10 = keygate_config(key_list(10, base_keys + [limited_entry]))
        kg100k = keygate_config(key_list(100_000, base_keys + [limited_entry]))
        native_keys = [("bench-allowed", allowed_key)] + [(f"k{i}", new_key()) for i in range(8)]

        if args.host_calls:
            hc = host_call_costs(s, workdir, envoy_bin, probe_wasm, wrk, h2load)
            print_host_calls(hc)
            path = out_dir / "host_calls.json"
            path.write_text(json.dumps(hc, indent=2))
            print(f"  summary: {path}")
            return 0

        if args.startup_only:
            probes, cp_rows = startup_probes(
                args, {}, workdir, envoy_bin, keygate_wasm, empty_wasm, keygate_cli, base_keys + [limited_entry], kg10, kg100k
            )
            sm = {
                "mode": "startup-only",
                "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "cpu_model": cpu_model()},
                "wasm_bytes": {"keygate": keygate_wasm.stat().st_size, "empty": empty_wasm.stat().st_size},
                "startup": probes,
                "per_vm_rss_kb": per_vm_estimates(probes),
                "control_plane": cp_rows,
                "per_vm_rss_kb_control_plane": per_vm_cp(cp_rows),
            }
            print_startup(sm)
            path = out_dir / "startup.json"
            path.write_text(json.dumps(sm, indent=2))
            print(f"  summary: {path}")
            return 0

        # -- Envoys ---------------------------------------------------------
        print("starting envoys ...", flush=True)
        up_port, up_admin = free_ports(2)
        upstream = Envoy("upstream", upstream_bootstrap(up_port, up_admin), workdir, envoy_bin, cpus=UPSTREAM_CORE, port=up_port, admin_port=up_admin)
        upstream.start()
        # Each wasm filter has a vm_id of its own (its name), so that the
        # configurations can share one Envoy without sharing a VM.
        defs: list[tuple[str, list[dict], int]] = [
            ("baseline", [], 1),
            ("empty-wasm", [wasm_filter("empty", "empty", empty_wasm, "")], 1),
        ]
        if empty_trimmed is not None:
            defs.append(("empty-trimmed", [wasm_filter("empty-trimmed", "empty", empty_trimmed, "")], 1))
        defs += [
            ("native", native_filters(native_keys, ("bench-limited", limited_key)), 1),
            ("keygate-10", [wasm_filter("keygate", "keygate", keygate_wasm, kg10)], 1),
            ("keygate-100k", [wasm_filter("keygate-100k", "keygate", keygate_wasm, kg100k)], 1),
            ("keygate-10-c2", [wasm_filter("keygate", "keygate", keygate_wasm, kg10)], 2),
        ]

        if args.latency_only:
            # One connection sees every configuration's latency through the
            # same scheduler noise; more rounds of the c1 cells alone, paired
            # per round against the baseline, separate the two.
            defs = [d for d in defs if d[2] == 1]

        def start_envoys(report: bool) -> list[str]:
            """The Envoys (one for the --concurrency 1 configurations unless
            --separate), each configuration checked on its routes and paths
            (which spends the limited key's token); the problems found."""
            shared = [(name, filters) for name, filters, conc in defs if conc == 1 and not args.separate]
            if shared:
                envoys.update(shared_envoy("shared-c1", shared, workdir, envoy_bin, up_port))
            for name, filters, conc in defs:
                if name not in envoys:
                    envoys[name] = new_envoy(name, filters, workdir, envoy_bin, up_port, concurrency=conc).start()
            for name, e in envoys.items():
                if report:
                    where = f", one process for {e.shared_by}" if e.shared_by > 1 else ""
                    print(f"  {name:14s} ready in {e.ready_s:.2f}s, VmRSS {e.rss_start_kb / 1024:.1f} MiB (port {e.port}{where})", flush=True)
            problems = []
            for name, e in envoys.items():
                auth = name not in NO_AUTH
                for route in ("direct", "proxy"):
                    got = http_status(e.port, f"/{route}", allowed_key)
                    if got != 200:
                        problems.append(f"{name} /{route} with a valid key: {got}, expected 200")
                got = http_status(e.port, "/direct", None)
                if got != (401 if auth else 200):
                    problems.append(f"{name}: no key gave {got}, expected {401 if auth else 200}")
                if auth:
                    first = http_status(e.port, "/direct", limited_key)
                    second = http_status(e.port, "/direct", limited_key)
                    if (first, second) != (200, 429):
                        problems.append(f"{name}: limited key gave {first} then {second}, expected 200 then 429")
            for p in problems:
                print("CHECK FAILED: " + p, file=sys.stderr)
            return problems

        def restart_envoys() -> list[str]:
            stop_envoys(envoys)
            envoys.clear()
            return start_envoys(report=False)

        if start_envoys(report=True):
            return 2
        print("  checks: valid key 200, no key 401, limited key 200 then 429 (auth configs) - ok", flush=True)

        # -- matrix -------------------------------------------------------
        cells: list[Cell] = []
        for name in envoys:
            auth = name not in NO_AUTH
            for route in ("direct", "proxy"):
                if args.latency_only:
                    cells.append(Cell(name, route, "allowed", "c1"))
                    continue
                cells += [Cell(name, route, "allowed", "h1"), Cell(name, route, "allowed", "h2"), Cell(name, route, "allowed", "c1")]
            if auth and not args.latency_only:  # denials never reach the upstream: the direct route suffices
                cells += [Cell(name, "direct", "401", "h1"), Cell(name, "direct", "429", "h1")]
        print(f"measuring {len(cells)} cells x {s.rounds} rounds ...", flush=True)
        bench = Bench(s, envoys, upstream, {"allowed": allowed_key, "401": None, "429": limited_key}, wrk, h2load)
        bench.prime("300ms" if q else "2000ms")
        # Every round runs on freshly started Envoys: one Envoy process is
        # not like another (one module measured 31.5 and 37.9 us in two
        # Envoys over the same 9 rounds), so a configuration kept in one
        # process for the whole run would carry that process's offset; with
        # the configurations sharing a process, the offset is common to them
        # within a round, and a new one each round. The quick mode, a smoke
        # check, keeps its Envoys to stay under 3 minutes.
        for rnd in range(s.rounds):
            if rnd > 0 and not q:
                if restart_envoys():
                    return 2
                bench.prime("500ms")
            bench.run(cells, rnd, 1)
        summary_cells = summarize(bench.samples)
        rss_end = {name: proc_rss_kb(e.pid) for name, e in envoys.items()}
        stop_envoys(envoys)
        upstream.stop()
        if args.latency_only:
            lat = latency_summary(s, summary_cells, list(envoys), bench.dropped, time.monotonic() - t_begin)
            print_latency(lat)
            path = out_dir / "latency.json"
            path.write_text(json.dumps(lat, indent=2))
            print(f"  summary: {path}")
            return 0

        hc = host_call_costs(s, workdir, envoy_bin, probe_wasm, wrk, h2load)

        # -- startup probes -------------------------------------------------
        # A shared process says nothing about one configuration's start-up.
        own = {name: e for name, e in envoys.items() if e.shared_by == 1}
        probes, cp_rows = startup_probes(
            args, own, workdir, envoy_bin, keygate_wasm, empty_wasm, keygate_cli, base_keys + [limited_entry], kg10, kg100k
        )
        del kg100k

        # -- report -------------------------------------------------------
        sm = build_summary(
            s, envoys, summary_cells, bench.dropped, probes, rss_end, keygate_wasm, empty_wasm, envoy_bin, load_start, time.monotonic() - t_begin
        )
        if empty_trimmed is not None:
            sm["wasm_bytes"]["empty_trimmed"] = empty_trimmed.stat().st_size
        sm["control_plane"] = cp_rows
        sm["host_calls"] = hc
        sm["per_vm_rss_kb_control_plane"] = per_vm_cp(cp_rows)
        print_report(sm)
        path = out_dir / "summary.json"
        path.write_text(json.dumps(sm, indent=2))
        print(f"  summary: {path}")
        return 0
    finally:
        stop_envoys(envoys)
        if upstream is not None:
            upstream.stop()
        stop_all_children()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def by_round(raw: list[dict], field: str) -> dict[int, float]:
    """The clean samples' `field`, by round."""
    return {r["round"]: r[field] for r in raw if not r["busy"] and r.get(field) is not None}


def paired_ratio(raw: list[dict], ref_raw: list[dict], field: str = "us_per_req") -> Optional[float]:
    """Median over rounds of (this cell's sample / the reference's sample of
    the same round), clean samples only: slow drift of the machine between
    rounds cancels out."""
    a, b = by_round(raw, field), by_round(ref_raw, field)
    ratios = [a[k] / b[k] for k in a if k in b and b[k]]
    return statistics.median(ratios) if ratios else None


def paired_difference(raw: list[dict], ref_raw: list[dict], field: str = "us_per_req") -> Optional[float]:
    """Median over rounds of (this cell's sample - the reference's sample of
    the same round), clean samples only: what the cell adds to the reference,
    with the machine's drift between rounds taken out."""
    a, b = by_round(raw, field), by_round(ref_raw, field)
    diffs = [a[k] - b[k] for k in a if k in b]
    return statistics.median(diffs) if diffs else None


def result_rows(cells: dict[Cell, dict], order: list[str]) -> list[dict]:
    """One row per (config, route, path, h1|h2), with the c1 latencies and
    the ratios to baseline, empty-wasm and native."""

    def get(config: str, route: str, path: str, kind: str) -> Optional[dict]:
        return cells.get(Cell(config, route, path, kind))

    def pr(c: dict, ref: Optional[dict]) -> Optional[float]:
        if ref is None:
            return None
        return paired_ratio(c["raw"], ref["raw"]) or ratio(c["us_per_req"], ref["us_per_req"])

    rows = []
    for route in ("direct", "proxy"):
        for kind in ("h1", "h2"):
            for path in ("allowed", "401", "429"):
                for config in order:
                    c = get(config, route, path, kind)
                    if c is None:
                        continue
                    base = get("baseline", route, "allowed", kind)
                    empty = get("empty-wasm", route, "allowed", kind)
                    native = get("native", route, path, kind)
                    c1 = get(config, route, path, "c1") if kind == "h1" else None
                    base_c1 = get("baseline", route, "allowed", "c1") if kind == "h1" else None
                    us = c["us_per_req"]
                    rows.append(
                        {
                            "config": config,
                            "route": route,
                            "path": path,
                            "proto": "h2" if kind == "h2" else "http/1.1",
                            **{k: v for k, v in c.items() if k != "raw"},
                            "c1_p50_us": c1["p50_us"] if c1 else None,
                            "c1_p99_us": c1["p99_us"] if c1 else None,
                            "c1_rps": c1["rps"] if c1 else None,
                            # median over rounds of (this c1 p99 - the same
                            # round's baseline c1 p99): the latency one
                            # connection sees added, drift between rounds out
                            "c1_p99_added_over_baseline_paired": paired_difference(c1["raw"], base_c1["raw"], "p99_us")
                            if (c1 and base_c1)
                            else None,
                            "rps_vs_baseline": ratio(c["rps"], base and base["rps"]),
                            # ratios of the medians
                            "us_vs_baseline": ratio(us, base and base["us_per_req"]),
                            "us_vs_empty_wasm": ratio(us, empty and empty["us_per_req"]),
                            "us_vs_native": ratio(us, native and native["us_per_req"]),
                            # medians of the per-round ratios (printed)
                            "us_vs_baseline_paired": pr(c, base),
                            "us_vs_empty_wasm_paired": pr(c, empty),
                            "us_vs_native_paired": pr(c, native),
                            "us_added_over_baseline": (us - base["us_per_req"])
                            if (us is not None and base and base["us_per_req"] is not None)
                            else None,
                            # median of the per-round differences (printed)
                            "us_added_over_empty_wasm_paired": paired_difference(c["raw"], empty["raw"])
                            if empty
                            else None,
                        }
                    )
    return rows


def build_summary(
    s: Settings,
    envoys: dict[str, Envoy],
    cells: dict[Cell, dict],
    dropped: int,
    probes: list[dict],
    rss_end: dict[str, Optional[int]],
    keygate_wasm: Path,
    empty_wasm: Path,
    envoy_bin: Path,
    load_start: str,
    elapsed: float,
) -> dict:
    version = ""
    try:
        version = subprocess.run([str(envoy_bin), "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "mode": "quick" if s.quick else "full",
        "settings": dataclasses.asdict(s),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "cpu_model": cpu_model(), "loadavg_start": load_start, "loadavg_end": loadavg()},
        "envoy_version": version,
        "pinning": {"envoy_under_test": ENVOY_CORE, "load_generator": LOADGEN_CORE, "upstream": UPSTREAM_CORE},
        "wasm_bytes": {"keygate": keygate_wasm.stat().st_size, "empty": empty_wasm.stat().st_size},
        "results": result_rows(cells, list(envoys)),
        "envoys": {
            name: {"concurrency": e.concurrency, "ready_s": e.ready_s, "rss_start_kb": e.rss_start_kb, "rss_end_kb": rss_end.get(name), "bootstrap_bytes": e.config_bytes, "shared_by": e.shared_by}
            for name, e in envoys.items()
        },
        "startup": probes,
        "per_vm_rss_kb": per_vm_estimates(probes),
        "dropped_busy_samples": dropped,
        "cells_without_clean_sample": sum(1 for c in cells.values() if c["all_busy"]),
        "elapsed_s": elapsed,
        "raw_samples": {c.label: v["raw"] for c, v in cells.items()},
    }


def latency_summary(s: Settings, cells: dict[Cell, dict], order: list[str], dropped: int, elapsed: float) -> dict:
    """The --latency-only figures: per configuration and route, the medians
    of the one-connection p50 and p99, their spread over the rounds, and the
    median over rounds of the difference from the same round's baseline."""
    rows = []
    for route in ("direct", "proxy"):
        base = cells.get(Cell("baseline", route, "allowed", "c1"))
        for config in order:
            c = cells.get(Cell(config, route, "allowed", "c1"))
            if c is None:
                continue
            rows.append(
                {
                    "config": config,
                    "route": route,
                    "samples": c["samples"],
                    "dropped_busy": c["dropped_busy"],
                    "rps": c["rps"],
                    "p50_us": c["p50_us"],
                    "p99_us": c["p99_us"],
                    "p99_us_min": c["p99_us_min"],
                    "p99_us_max": c["p99_us_max"],
                    "p50_added_over_baseline_paired": paired_difference(c["raw"], base["raw"], "p50_us") if base else None,
                    "p99_added_over_baseline_paired": paired_difference(c["raw"], base["raw"], "p99_us") if base else None,
                }
            )
    return {
        "mode": "latency-only",
        "settings": dataclasses.asdict(s),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "cpu_model": cpu_model(), "loadavg_end": loadavg()},
        "results": rows,
        "dropped_busy_samples": dropped,
        "elapsed_s": elapsed,
        "raw_samples": {c.label: v["raw"] for c, v in cells.items()},
    }


def print_latency(lat: dict) -> None:
    s = lat["settings"]
    print()
    print(f"== one-connection latency, allowed path ({s['rounds']} rounds x {s['c1_duration_s']}s, wrk -c1 -t1, medians) ==")
    print("   +p50/+p99 = median over rounds of this configuration's figure minus the same round's baseline.")
    hdr = f"{'config':14s} {'route':6s} {'RPS':>7s} {'p50':>8s} {'+p50':>6s} {'p99':>8s} {'+p99':>6s} {'p99 min':>8s} {'p99 max':>8s} {'n/drop':>6s}"
    print(hdr)
    print("-" * len(hdr))
    for r in lat["results"]:
        print(
            f"{r['config']:14s} {r['route']:6s} {fmt(r['rps'], '.0f'):>7s} {fmt_lat(r['p50_us']):>8s} "
            f"{fmt(r['p50_added_over_baseline_paired'], '+.0f'):>6s} {fmt_lat(r['p99_us']):>8s} "
            f"{fmt(r['p99_added_over_baseline_paired'], '+.0f'):>6s} {fmt_lat(r['p99_us_min']):>8s} {fmt_lat(r['p99_us_max']):>8s} "
            f"{r['samples']:>3d}/{r['dropped_busy']:<2d}"
        )
    print(f"  samples dropped as busy: {lat['dropped_busy_samples']}; total {lat['elapsed_s']:.0f}s")


def print_report(sm: dict) -> None:
    s = sm["settings"]
    print()
    print(f"== keygate benchmark ({sm['mode']}: {s['rounds']} rounds x {s['duration_s']}s samples, medians; "
          f"Envoy --concurrency 1 on core 0 unless -c2; wrk/h2load and upstream on core 1) ==")
    print("   us/req = median Envoy CPU (utime+stime) per request; +us/b = us/req minus baseline's.")
    print("   x-ratios = median over rounds of us/req divided by the same round's reference: xbase/xempty = baseline/")
    print("   empty-wasm allowed path, xnative = native's same path. p50/p99: wrk -c32 (load) and -c1 -t1 (c1).")
    print("   env% = Envoy CPU in % of one core during the sample; n/drop = samples taken / dropped as busy; * = no clean sample.")
    print("   +us/e = median over rounds of us/req minus the same round's empty-wasm allowed path (the floor every wasm filter pays).")
    print("   +c1p99 = median over rounds of c1 p99 minus the same round's baseline c1 p99 (µs; --latency-only measures it with more rounds).")
    hdr = f"{'config':14s} {'route':6s} {'path':7s} {'proto':5s} {'RPS':>8s} {'rps/b':>5s} {'us/req':>7s} {'+us/b':>6s} {'+us/e':>6s} {'xbase':>5s} {'xempty':>6s} {'xnativ':>6s} {'p50':>8s} {'p99':>8s} {'c1 p50':>8s} {'c1 p99':>8s} {'+c1p99':>6s} {'env%':>4s} {'n/drop':>6s}"
    print(hdr)
    print("-" * len(hdr))
    last = None
    for r in sm["results"]:
        group = (r["route"], r["proto"])
        if last is not None and group != last:
            print()
        last = group
        flag = "*" if r["all_busy"] else ""
        print(
            f"{r['config']:14s} {r['route']:6s} {r['path']:7s} {('h2' if r['proto'] == 'h2' else 'h1'):5s} "
            f"{fmt(r['rps'], '.0f'):>8s} {fmt(r['rps_vs_baseline'], '.2f'):>5s} {fmt(r['us_per_req']) + flag:>7s} "
            f"{fmt(r['us_added_over_baseline'], '+.1f'):>6s} {fmt(r.get('us_added_over_empty_wasm_paired'), '+.1f'):>6s} "
            f"{fmt(r['us_vs_baseline_paired'], '.2f'):>5s} "
            f"{fmt(r['us_vs_empty_wasm_paired'], '.2f'):>6s} {fmt(r['us_vs_native_paired'], '.2f'):>6s} "
            f"{fmt_lat(r['p50_us']):>8s} {fmt_lat(r['p99_us']):>8s} {fmt_lat(r['c1_p50_us']):>8s} {fmt_lat(r['c1_p99_us']):>8s} "
            f"{fmt(r.get('c1_p99_added_over_baseline_paired'), '+.0f'):>6s} {fmt(r['envoy_cpu_pct'], '.0f'):>4s} {r['samples']:>3d}/{r['dropped_busy']:<2d}"
        )
    print()
    print("== memory and startup ==")
    for name, e in sm["envoys"].items():
        print(
            f"  {name:14s} VmRSS after start {e['rss_start_kb'] / 1024:7.1f} MiB, after the run "
            f"{fmt((e['rss_end_kb'] or 0) / 1024):>7s} MiB, ready in {e['ready_s']:.2f}s"
            + (f" (one process for {e['shared_by']} configurations)" if e.get("shared_by", 1) > 1 else "")
        )
    print_startup(sm, header=False)
    if "host_calls" in sm:
        print_host_calls(sm["host_calls"])
    print(
        f"  samples dropped as busy (others > {s['busy_threshold_pct']:.0f}% of a core): {sm['dropped_busy_samples']}; "
        f"cells with no clean sample (marked *): {sm['cells_without_clean_sample']}"
    )
    m = sm["machine"]
    print(f"  loadavg at start {m['loadavg_start']}, at end {m['loadavg_end']}; total {sm['elapsed_s']:.0f}s")


def render(path: Path) -> int:
    """Print the tables of an earlier run again, recomputing the derived
    figures from its raw samples (and writing them back)."""
    sm = json.loads(path.read_text())
    samples = {Cell(*label.split("/")): rs for label, rs in sm["raw_samples"].items()}
    cells = summarize(samples)
    order = list(sm["envoys"])
    sm["results"] = result_rows(cells, order)
    sm["cells_without_clean_sample"] = sum(1 for c in cells.values() if c["all_busy"])
    print_report(sm)
    path.write_text(json.dumps(sm, indent=2))
    print(f"  summary: {path}")
    return 0


def per_vm_estimates(probes: list[dict]) -> dict[str, float]:
    """VmRSS(c2) - VmRSS(c1) per list size, in KiB: what one more worker
    thread with its own keygate VM costs."""
    by = {(p["keys"], p["what"]): p["rss_kb"] for p in probes}
    out = {}
    for keys in ("10", "100k", "1M"):
        if (keys, "keygate c1") in by and (keys, "keygate c2") in by:
            out[keys] = by[(keys, "keygate c2")] - by[(keys, "keygate c1")]
    return out


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


def _on_term(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGHUP, _on_term)
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        stop_all_children()
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
