"""Control-plane key lists in real Envoy: cold start, updates, ETag, every
fetch fault against a running Envoy, a static/list clash, and a 100k-key list.

The control plane here is a small fault-injecting server owned by the test;
`test_cli_control_plane.py` runs the real `keygate serve` and CLI."""

from __future__ import annotations

import hashlib
import http.server
import json
import socket
import threading
import time
from pathlib import Path
from typing import Any, Optional

import pytest

import harness
from conftest import report

# Fractional seconds on purpose: durations are parsed as decimals.
POLL = "0.25s"


class FakeControlPlane:
    """Serves GET /v1/keys with a strong ETag and 304s, or misbehaves on demand.

    Modes: ok, http500, slow (answers after the filter's timeout), garbage,
    truncated (announces more body than it sends), wrong_schema, older
    (a version below the current one), reset (closes without answering),
    oversized (a body over max_list_bytes), endless_pages (every page names
    a next one)."""

    def __init__(self, port: int = 0):
        self.keys: list[dict] = []
        # Lists served at other paths (any other path serves `keys`).
        self.keys_at: dict[str, list[dict]] = {}
        self.version = 1
        self.mode = "ok"
        self.hits = 0
        self._lock = threading.Lock()
        self._port = port
        self._server: Optional[http.server.ThreadingHTTPServer] = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.server_address[1]

    def body(self, path: str = "/v1/keys") -> bytes:
        keys = self.keys_at.get(path, self.keys)
        return json.dumps({"version": self.version, "keys": keys}).encode()

    def set_keys(self, keys: list[dict]) -> None:
        with self._lock:
            self.keys = keys
            self.version += 1

    def start(self) -> "FakeControlPlane":
        cp = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                cp.hits += 1
                mode = cp.mode
                if mode == "reset":
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                if mode == "slow":
                    time.sleep(1.5)
                if mode == "http500":
                    return self._send(500, b'{"error":"boom"}')
                if mode == "garbage":
                    return self._send(200, b"<html>not json</html>")
                if mode == "wrong_schema":
                    return self._send(200, b'{"version": 999, "entries": []}')
                if mode == "older":
                    return self._send(200, json.dumps({"version": 0, "keys": []}).encode())
                if mode == "endless_pages":
                    page = {"version": cp.version, "keys": [], "next": f"/v1/keys?page={cp.hits + 1}"}
                    return self._send(200, json.dumps(page).encode())
                if mode == "oversized":
                    return self._send(200, b" " * 5000 + cp.body())
                body = cp.body(self.path)
                if mode == "truncated":
                    self.send_response(200)
                    self.send_header("content-length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                etag = '"' + hashlib.sha256(body).hexdigest() + '"'
                if self.headers.get("if-none-match") == etag:
                    self.send_response(304)
                    self.send_header("etag", etag)
                    self.send_header("content-length", "0")
                    self.end_headers()
                    return
                self._send(200, body, etag)

            def _send(self, status: int, body: bytes, etag: Optional[str] = None) -> None:
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                if etag:
                    self.send_header("etag", etag)
                self.end_headers()
                self.wfile.write(body)

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self._port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        # Kept-alive connections outlive the listener: make them hang up too.
        self.mode = "reset"
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class EnvoyWithControlPlane(harness.Envoy):
    """harness.Envoy plus a STATIC cluster `keygate_cp` for the callouts.

    `cp_transport_socket`, if given, is the cluster's `transport_socket` (e.g.
    the UpstreamTlsContext of envoy/control-plane-tls.yaml); plain HTTP without."""

    def __init__(
        self, backend_port: int, plugin_config: Any, cp_port: int, cp_transport_socket: Optional[dict] = None, **kw: Any
    ):
        super().__init__(backend_port, plugin_config, **kw)
        self.cp_port = cp_port
        self.cp_transport_socket = cp_transport_socket

    def _write_config(self) -> Path:
        path = super()._write_config()
        cfg = json.loads(path.read_text())
        cfg["static_resources"]["clusters"].append(
            {
                "name": "keygate_cp",
                "type": "STATIC",
                "connect_timeout": "0.5s",
                "load_assignment": {
                    "cluster_name": "keygate_cp",
                    "endpoints": [
                        {
                            "lb_endpoints": [
                                {
                                    "endpoint": {
                                        "address": {
                                            "socket_address": {"address": "127.0.0.1", "port_value": self.cp_port}
                                        }
                                    }
                                }
                            ]
                        }
                    ],
                },
                **({"transport_socket": self.cp_transport_socket} if self.cp_transport_socket else {}),
            }
        )
        path.write_text(json.dumps(cfg, indent=2))
        return path


def cp_config(extra: Optional[dict] = None, **cp: Any) -> dict:
    control = {"cluster": "keygate_cp", "authority": "control-plane.local", "poll_interval": POLL, "timeout": "500ms"}
    control.update(cp)
    cfg: dict[str, Any] = {"control_plane": control}
    cfg.update(extra or {})
    return cfg


@pytest.fixture
def start_envoy(request: pytest.FixtureRequest, backend: harness.Backend, wasm: Path):
    made: list[harness.Envoy] = []

    def make(plugin_config: Any, cp_port: int, **kw: Any) -> harness.Envoy:
        e = EnvoyWithControlPlane(backend.port, plugin_config, cp_port, **kw)
        made.append(e)
        e.start()
        return e

    yield make
    for e in made:
        e.stop()
        e.cleanup()


def get(envoy: harness.Envoy, key: Optional[str]) -> harness.Response:
    headers = [harness.xkey(key)] if key else []
    return envoy.request("GET", harness.unique_path("cp"), headers)


def wait_status(envoy: harness.Envoy, key: str, status: int, timeout: float = 5.0) -> bool:
    return harness.wait_until(lambda: get(envoy, key).status == status, timeout=timeout, interval=0.05)


def vm_reloads(envoy: harness.Envoy) -> int:
    return sum(int(v) for k, v in envoy.stats().items() if "vm_reload" in k and v.isdigit())


def test_cold_start_is_503_until_the_first_list(start_envoy, backend: harness.Backend) -> None:
    port = harness.free_port()
    envoy = start_envoy(cp_config(), port, concurrency=2)
    key = harness.new_key("cp_")
    path = harness.unique_path("cold")
    r = envoy.request("GET", path, [harness.xkey(key)])
    assert r.status == 503, r
    assert r.json()["error"] == "key_list_unavailable"
    assert int(r.header("retry-after") or "0") >= 1
    assert not backend.saw(path)
    # While the control plane is down, failed fetches are counted, and still 503.
    assert harness.wait_until(lambda: envoy.counter("keygate.control_plane.fetch_failed") >= 2, timeout=5)
    assert get(envoy, key).status == 503
    cp = FakeControlPlane(port)
    cp.keys = [harness.key_entry("k1", key)]
    cp.start()
    try:
        t0 = time.monotonic()
        assert wait_status(envoy, key, 200, timeout=5), "list never applied"
        report(f"control plane: cold start → first 200 {time.monotonic() - t0:.2f}s after the control plane came up")
        assert envoy.counter("keygate.control_plane.fetch_ok") >= 1
    finally:
        cp.stop()


def test_updates_etag_and_every_fault_keep_the_last_good_list(start_envoy) -> None:
    cp = FakeControlPlane().start()
    good, revoked, added = harness.new_key("g_"), harness.new_key("r_"), harness.new_key("a_")
    cp.keys = [harness.key_entry("good", good), {**harness.key_entry("revoked", revoked), "disabled": True}]
    try:
        envoy = start_envoy(cp_config(max_list_bytes=4096), cp.port, concurrency=2)
        assert wait_status(envoy, good, 200)
        # Each worker adopts the first list on its own: one may still answer
        # 503 for a moment, but none may ever let the revoked key through.
        seen = []
        assert harness.wait_until(lambda: seen.append(get(envoy, revoked).status) or seen[-1] == 401,
                                  timeout=5, interval=0.05), seen
        assert set(seen) <= {503, 401}, seen
        # An unchanged list costs a 304.
        nm = envoy.counter("keygate.control_plane.fetch_not_modified")
        assert harness.wait_until(lambda: envoy.counter("keygate.control_plane.fetch_not_modified") > nm, timeout=3)
        # An update is applied on every worker.
        cp.set_keys(cp.keys + [harness.key_entry("added", added)])
        assert wait_status(envoy, added, 200, timeout=3)
        results = []
        for mode in ["http500", "slow", "garbage", "truncated", "wrong_schema", "older", "reset", "oversized", "endless_pages", "stopped"]:
            failed = envoy.counter("keygate.control_plane.fetch_failed")
            if mode == "stopped":
                cp.stop()
            else:
                cp.mode = mode
            risen = harness.wait_until(
                lambda: envoy.counter("keygate.control_plane.fetch_failed") > failed, timeout=4
            )
            statuses = {get(envoy, good).status for _ in range(6)} | {get(envoy, added).status for _ in range(6)}
            revoked_statuses = {get(envoy, revoked).status for _ in range(6)}
            results.append(f"{mode}: valid={sorted(statuses)} revoked={sorted(revoked_statuses)} failed_metric_rose={risen}")
            assert risen, mode
            assert statuses == {200}, (mode, statuses)
            assert revoked_statuses == {401}, (mode, revoked_statuses)
            if mode != "stopped":
                cp.mode = "ok"
        assert vm_reloads(envoy) == 0
        assert "panic" not in envoy.log_text()
        report("control plane fault matrix: " + "; ".join(results))
        assert int(envoy.stats().get("wasmcustom.keygate.control_plane.list_version", "0")) == cp.version
    finally:
        cp.stop()


def test_a_list_that_clashes_with_static_keys_is_refused(start_envoy) -> None:
    cp = FakeControlPlane().start()
    static, dyn = harness.new_key("s_"), harness.new_key("d_")
    cp.keys = [harness.key_entry("dyn", dyn)]
    try:
        envoy = start_envoy(cp_config({"keys": [harness.key_entry("static", static)]}), cp.port)
        # Static keys serve before the first fetch, then the list joins them.
        assert get(envoy, static).status == 200
        assert wait_status(envoy, dyn, 200)
        failed = envoy.counter("keygate.control_plane.fetch_failed")
        cp.set_keys([harness.key_entry("static", harness.new_key())])
        assert harness.wait_until(lambda: envoy.counter("keygate.control_plane.fetch_failed") > failed, timeout=4)
        assert harness.wait_until(lambda: "clashes with a static key" in envoy.log_text(), timeout=15)
        assert get(envoy, dyn).status == 200
        assert get(envoy, static).status == 200
    finally:
        cp.stop()


def test_stale_list_fails_closed_when_configured(start_envoy) -> None:
    cp = FakeControlPlane().start()
    key = harness.new_key("st_")
    cp.keys = [harness.key_entry("k", key)]
    try:
        envoy = start_envoy(cp_config(max_staleness="1s", stale_policy="fail_closed"), cp.port)
        assert wait_status(envoy, key, 200)
        cp.mode = "http500"
        assert wait_status(envoy, key, 503, timeout=5)
        assert get(envoy, key).json()["error"] == "key_list_unavailable"
        cp.mode = "ok"
        assert wait_status(envoy, key, 200, timeout=5)
    finally:
        cp.stop()


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def test_a_100k_key_list_applies(start_envoy) -> None:
    cp = FakeControlPlane().start()
    n = 100_000
    probe = harness.new_key("p_")
    keys = [{"id": f"k{i}", "sha256": hashlib.sha256(f"bulk-{i}".encode()).hexdigest()} for i in range(n - 1)]
    keys.append(harness.key_entry("probe", probe))
    try:
        small = harness.new_key("sm_")
        cp.keys = [harness.key_entry("small", small)]
        envoy = start_envoy(cp_config(max_list_bytes=64 << 20, timeout="5s"), cp.port, concurrency=2)
        assert wait_status(envoy, small, 200)
        assert envoy.proc is not None
        before = _rss_kib(envoy.proc.pid)
        cp.set_keys(keys)
        t0 = time.monotonic()
        assert wait_status(envoy, probe, 200, timeout=60), "100k list never applied"
        elapsed = time.monotonic() - t0
        after = _rss_kib(envoy.proc.pid)
        report(
            f"control plane 100k keys: {len(cp.body()) / 1e6:.1f} MB list, first use {elapsed:.2f}s after publish, "
            f"Envoy RSS {before / 1024:.0f} MiB -> {after / 1024:.0f} MiB (--concurrency 2)"
        )
        assert get(envoy, small).status == 401
        assert get(envoy, "bulk-77").status == 200
    finally:
        cp.stop()


def test_two_filters_in_one_vm_keep_their_own_control_plane_lists(start_envoy) -> None:
    """Two keygate filters in the same VM, polling two lists: each has its
    own fetcher lease and published list in shared data, so neither filter
    ever applies the other's list."""
    cp = FakeControlPlane().start()
    only_a, only_b, both = harness.new_key("cpa_"), harness.new_key("cpb_"), harness.new_key("cpab_")
    cp.keys_at = {
        "/v1/a": [harness.key_entry("a-only", only_a), harness.key_entry("both", both)],
        "/v1/b": [harness.key_entry("b-only", only_b), harness.key_entry("both", both)],
    }
    try:
        # The first filter leaves the key in place for the second.
        envoy = start_envoy(
            cp_config({"strip_credentials": False}, path="/v1/a"),
            cp.port,
            more_plugin_configs=[cp_config(path="/v1/b")],
            concurrency=2,
        )
        assert wait_status(envoy, both, 200), "lists never applied"
        deadline = time.monotonic() + 1.5  # several polls on every worker
        while time.monotonic() < deadline:
            assert get(envoy, both).status == 200
            assert get(envoy, only_a).status == 401  # refused by the second filter
            assert get(envoy, only_b).status == 401  # refused by the first filter
        assert vm_reloads(envoy) == 0
    finally:
        cp.stop()


def test_a_reload_that_changes_only_timings_keeps_serving_the_list(start_envoy) -> None:
    """The published list is named after its cluster, authority and path, so a
    new configuration with other timings finds it at once: no cold start,
    even with the control plane down."""
    cp = FakeControlPlane().start()
    key = harness.new_key("cp_")
    cp.keys = [harness.key_entry("k1", key)]
    try:
        envoy = start_envoy(cp_config(), cp.port, dynamic_listener=True)
        assert wait_status(envoy, key, 200), "list never applied"
        cp.mode = "http500"
        envoy.reconfigure(cp_config(poll_interval="300ms", max_staleness="10m"))
        assert get(envoy, key).status == 200
        assert get(envoy, harness.new_key("cp_")).status == 401
    finally:
        cp.stop()
