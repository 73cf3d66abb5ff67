"""Key usage in real Envoy: two Envoys polling one `keygate serve` report the
requests each key made; `keygate keys list` shows the sums, the last use, and
`never` for an unused key. Reports that fail wait in shared data for the
next one."""

from __future__ import annotations

import calendar
import json
import subprocess
import time
from pathlib import Path

import harness
from revocation import _healthy
from test_cli_control_plane import cli, keygate_bin, served  # noqa: F401 (fixture)
from test_control_plane import cp_config, start_envoy  # noqa: F401 (fixture)

# Refused requests do not count: /admin is denied to every key.
RULES = {"rules": [{"name": "admin", "match": {"path_prefix": "/admin"}, "action": "deny"}]}


def usage_config(interval: str = "1s") -> dict:
    return cp_config(RULES, poll_interval="0.5s", timeout="1s", usage_report_interval=interval)


def listing(keys: Path) -> dict[str, dict]:
    return {k["id"]: k for k in json.loads(cli("keys", "list", "--json", "--file", str(keys)))["keys"]}


def send(envoy: harness.Envoy, key: str, n: int, prefix: str = "/usage", status: int = 200) -> None:
    conn = harness.RawConnection(envoy.port)
    try:
        for i in range(n):
            r = conn.request("GET", f"{prefix}/{i}", [harness.xkey(key)])
            assert r.status == status, r
    finally:
        conn.close()


def ready(envoy: harness.Envoy, key: str, allowed: list[int]) -> None:
    """Waits for the first list; counts the requests let through meanwhile."""

    def ok() -> bool:
        if envoy.request("GET", "/", [harness.xkey(key)]).status == 200:
            allowed.append(1)
            return True
        return False

    assert harness.wait_until(ok, timeout=10)


def test_two_envoys_report_usage_and_keys_list_sums_it(served, start_envoy) -> None:
    keys, port, seed = served
    busy = cli("keys", "create", "--id", "busy", "--file", str(keys)).strip()
    cli("keys", "create", "--id", "idle", "--file", str(keys))
    refused = cli("keys", "create", "--id", "refused", "--file", str(keys)).strip()
    envoys = [start_envoy(usage_config(), port, concurrency=2) for _ in range(2)]
    allowed: list[int] = []
    for e in envoys:
        ready(e, busy, allowed)
    started = time.time()
    send(envoys[0], busy, 30)
    send(envoys[1], busy, 20)
    send(envoys[1], seed, 5)
    send(envoys[0], refused, 10, prefix="/admin", status=403)
    expected = {"busy": len(allowed) + 50}

    def arrived() -> bool:
        got = listing(keys)
        return got["busy"]["requests_24h"] >= expected["busy"] and got["seed"]["requests_24h"] >= 5

    assert harness.wait_until(arrived, timeout=15, interval=0.25), listing(keys)
    time.sleep(2.5)  # anything still in flight would show up now
    got = listing(keys)
    # The count is the count, not more: each Envoy reported its own requests once.
    assert got["busy"]["requests_24h"] == expected["busy"], got
    assert got["seed"]["requests_24h"] == 5, got
    assert got["idle"]["requests_24h"] == 0 and got["idle"]["last_used"] is None, got
    assert got["refused"]["requests_24h"] == 0 and got["refused"]["last_used"] is None, got
    last = calendar.timegm(time.strptime(got["busy"]["last_used"], "%Y-%m-%dT%H:%M:%SZ"))
    assert started - 2 <= last <= time.time() + 1, got["busy"]["last_used"]
    # Each Envoy sent its own reports; the table says what JSON says.
    for e in envoys:
        assert e.counter("keygate.usage.reports_ok") >= 1
        assert e.counter("keygate.usage.reports_failed") == 0
    table = cli("keys", "list", "--file", str(keys))
    header, *rows = table.splitlines()
    assert "LAST USED" in header and "24H" in header, table
    row = {r.split()[0]: r for r in rows}
    assert f"{got['busy']['last_used']}  {expected['busy']} " in row["busy"], table
    assert " never " in row["idle"] and " never " in row["refused"], table
    assert busy not in table and refused not in table


def start_serve(keys: Path, port: int, log: Path) -> subprocess.Popen:
    out = open(log, "a")
    proc = subprocess.Popen(
        [str(keygate_bin()), "serve", "--keys", str(keys), "--listen", f"127.0.0.1:{port}"],
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    out.close()
    assert harness.wait_until(lambda: _healthy(port), timeout=10), log.read_text()
    return proc


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_counts_wait_while_the_control_plane_is_down(tmp_path: Path, start_envoy) -> None:
    keys = tmp_path / "keys.json"
    key = cli("keys", "create", "--id", "k", "--file", str(keys)).strip()
    port = harness.free_port()
    serve = start_serve(keys, port, tmp_path / "serve.log")
    try:
        envoy = start_envoy(usage_config(), port, concurrency=2)
        ready(envoy, key, [])
        assert harness.wait_until(lambda: listing(keys)["k"]["requests_24h"] >= 1, timeout=10)
        base = listing(keys)["k"]["requests_24h"]
        stop(serve)
        # Requests go on (the last good list serves); reports fail and are kept.
        send(envoy, key, 40)
        assert harness.wait_until(lambda: envoy.counter("keygate.usage.reports_failed") >= 2, timeout=10)
        assert listing(keys)["k"]["requests_24h"] == base
        serve = start_serve(keys, port, tmp_path / "serve.log")
        assert harness.wait_until(lambda: listing(keys)["k"]["requests_24h"] >= base + 40, timeout=10), listing(keys)
        time.sleep(2.5)
        assert listing(keys)["k"]["requests_24h"] == base + 40
    finally:
        stop(serve)
