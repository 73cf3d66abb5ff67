"""The real control plane: `keygate serve` in front of a keys.json managed with
the `keygate keys` CLI, polled by Envoy. (Revocation latency: test_revocation.py.)"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

import harness
import revocation
from conftest import report
from test_control_plane import cp_config, start_envoy  # noqa: F401 (fixture)


def keygate_bin() -> Path:
    path = revocation.keygate_bin()
    if not path.exists():
        msg = f"{path} not built (cargo build -p keygate-cli)"
        if os.environ.get("KEYGATE_REQUIRE_WASM") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def cli(*args: str) -> str:
    out = subprocess.run([str(keygate_bin()), *args], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, (args, out.stderr)
    return out.stdout


@pytest.fixture
def served(tmp_path: Path):
    """keygate serve on a fresh keys.json; yields (keys_file, port, seed key)."""
    yield from _serve(tmp_path)


@pytest.fixture
def served_in_pages(tmp_path: Path):
    """The same, serving two keys per page."""
    yield from _serve(tmp_path, "--page-size", "2")


def _serve(tmp_path: Path, *extra: str):
    keys = tmp_path / "keys.json"
    first = cli("keys", "create", "--id", "seed", "--file", str(keys)).strip()
    with revocation.keygate_serve(keys, *extra) as port:
        yield keys, port, first


def test_a_list_served_in_pages_is_assembled_and_updated(served_in_pages, start_envoy) -> None:
    keys, port, seed = served_in_pages
    created = {f"p-{i}": cli("keys", "create", "--id", f"p-{i}", "--file", str(keys)).strip() for i in range(6)}
    envoy = start_envoy(cp_config(poll_interval="500ms", timeout="1s"), port, concurrency=2)
    every = [seed, *created.values()]

    def status_of_all() -> list[int]:
        return [envoy.request("GET", "/", [harness.xkey(k)]).status for k in every]

    # Seven keys in four pages: every page's keys work, on both workers.
    assert harness.wait_until(lambda: status_of_all() == [200] * 7, timeout=10), status_of_all()
    assert harness.wait_until(lambda: "published (7 keys)" in envoy.log_text(), timeout=15)
    # A change lands in the third page: the next poll fetches every page again.
    cli("keys", "revoke", "p-3", "--file", str(keys))
    assert harness.wait_until(lambda: envoy.request("GET", "/", [harness.xkey(created["p-3"])]).status == 401, timeout=5)
    # The other worker switches at its next tick (a quarter of the poll interval).
    expected = [200, 200, 200, 200, 401, 200, 200]
    assert harness.wait_until(lambda: status_of_all() == expected, timeout=2), status_of_all()
    report("paged control-plane list (2 keys per page, 4 pages): assembled, and a revocation on page 3 applied")


def test_a_key_rotated_under_traffic_never_fails_a_request(served, start_envoy, backend) -> None:
    """`keys rotate --overlap 4s` under traffic: the client moves to the new
    key once it has it, and not one request fails; both keys reach the backend
    as the same consumer; after the overlap the old key is expired."""
    keys, port, _seed = served
    old = cli("keys", "create", "--id", "acme-2026", "--scopes", "read", "--file", str(keys)).strip()
    envoy = start_envoy(cp_config(poll_interval="500ms", timeout="1s"), port, concurrency=2)
    # Both workers must hold the first list before traffic starts: the second
    # adopts it at its next tick (a quarter of the poll interval) and answers
    # 503 key_list_unavailable until then. Eight fresh connections reach both.
    assert harness.wait_until(
        lambda: all(envoy.request("GET", "/", [harness.xkey(old)]).status == 200 for _ in range(8)), timeout=10
    )

    current = [old]
    statuses: list[int] = []
    stop = threading.Event()
    path = harness.unique_path("rotate")

    def traffic() -> None:
        conn = harness.RawConnection(envoy.port)
        try:
            deadline = time.monotonic() + 20
            while not stop.is_set() and time.monotonic() < deadline:
                statuses.append(conn.request("GET", path, [harness.xkey(current[0])]).status)
                time.sleep(0.01)
        finally:
            conn.close()

    t = threading.Thread(target=traffic)
    t.start()
    try:
        time.sleep(0.5)
        rotated_at = time.monotonic()
        new = cli("keys", "rotate", "acme-2026", "--overlap", "4s", "--new-id", "acme-next", "--file", str(keys)).strip()
        assert new != old and new.startswith("sk_")
        # The client deploys the new key a little later (a list poll or two).
        time.sleep(1.5)
        current[0] = new
        time.sleep(1.0)
    finally:
        stop.set()
        t.join()
    assert len(statuses) > 50 and set(statuses) == {200}, sorted(set(statuses))
    seen = backend.find(path)
    identities = {r.value("x-api-key-id") for r in seen}
    key_ids = {r.value("x-api-key-key-id") for r in seen}
    assert identities == {b"acme-2026"}, identities
    assert key_ids >= {b"acme-2026", b"acme-next"}, key_ids
    # After the overlap the old key is expired; the new one goes on.
    time.sleep(max(0.0, rotated_at + 4.5 - time.monotonic()))
    r = envoy.request("GET", "/", [harness.xkey(old)])
    assert r.status == 401 and r.json()["error"] == "expired_api_key", r
    assert envoy.request("GET", "/", [harness.xkey(new)]).status == 200
    listing = cli("keys", "list", "--file", str(keys))
    assert old not in listing and new not in listing and new not in keys.read_text()
    report(f"rotation under traffic: {len(statuses)} requests, all 200; old key expired after the overlap")
