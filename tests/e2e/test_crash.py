"""A keygate VM that crashes, in real Envoy: what the crashing request gets,
what Envoy's failure policy does next, and what survives the new VM.

The crash comes from the crash-test module (`cargo build --profile crash-test
--features crash-test`, built by scripts/test.sh into
target/wasm32-wasip1/crash-test/keygate.wasm): it is the shipped module plus
one panic on a request carrying `x-keygate-crash-test` (src/crash_test.rs).
A panic aborts the VM on that worker (a Wasm trap), as any bug would.

What Envoy 1.40 does (one worker here, so "the worker" is every request):
- the crashing request gets 503 with details `wasm_fail_stream`, and never
  reaches the backend;
- FAIL_RELOAD (keygate's shipped policy): the next request on that worker
  starts a new VM (`wasm.<plugin>.vm_reload_success` + 1), which loads the
  configuration again and adopts what shared data holds: rate-limit buckets
  and the control-plane list survive. A crash within the reload backoff
  (about a second) of the last reload answers 503 until the backoff is over
  (`wasm.<plugin>.vm_reload_backoff` + 1 per such request);
- FAIL_CLOSED: no new VM, ever: every later request on that worker gets 503
  `wasm_fail_stream`, with a key or without, and the reload counters stay 0.

The last test checks the other side: the shipped module has no such path.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

import harness
from conftest import report
from harness import key_entry, new_key, unique_path, wait_until, xkey
from test_control_plane import EnvoyWithControlPlane, FakeControlPlane, cp_config

MARKER = "x-keygate-crash-test"
CRASH = (MARKER, "1")
CRASH_WASM = Path(
    os.environ.get("KEYGATE_CRASH_WASM", harness.REPO_ROOT / "target" / "wasm32-wasip1" / "crash-test" / "keygate.wasm")
).resolve()

# The wasm filter's own counters, per plugin name (the harness names it `keygate`).
RELOAD_STATS = ("vm_reload_success", "vm_reload_backoff", "vm_reload_failure")
VMS_CREATED = "wasm.envoy.wasm.runtime.v8.created"

LIMITED = new_key("lim_")
FREE = new_key("free_")
SLOW = {"requests_per_second": 0.01, "burst": 2}  # 2 at once, then one per 100 s
CONFIG = {"keys": [key_entry("limited", LIMITED, SLOW), key_entry("free", FREE)]}


@pytest.fixture(scope="module")
def crash_wasm() -> Path:
    if CRASH_WASM.exists():
        return CRASH_WASM
    msg = f"{CRASH_WASM} not built (bash -c 'source scripts/test.sh; ensure_binaryen; build_crash_test_wasm')"
    if os.environ.get("KEYGATE_REQUIRE_WASM") == "1":
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture
def crashy(envoy_fn: Callable[..., harness.Envoy], crash_wasm: Path) -> Callable[..., harness.Envoy]:
    """make(failure_policy) -> a started Envoy with CONFIG (one worker, access log) running the crash-test module."""

    def make(failure_policy: str) -> harness.Envoy:
        return envoy_fn(CONFIG, wasm=crash_wasm, failure_policy=failure_policy, access_log=True)

    return make


def reload_stats(envoy: harness.Envoy) -> dict[str, int]:
    """The plugin's reload counters and the number of V8 VMs created so far."""
    stats = envoy.stats()
    out = {name: int(stats[f"wasm.keygate.{name}"]) for name in RELOAD_STATS}
    out["created"] = int(stats[VMS_CREATED])
    return out


def send(envoy: harness.Envoy, *headers: tuple[str, str]) -> tuple[str, harness.Response]:
    path = unique_path("crash")
    return path, envoy.request("GET", path, list(headers))


def crash(envoy: harness.Envoy, backend: harness.Backend, key: str = FREE) -> None:
    """Sends the crashing request, with a valid key: 503 from Envoy, nothing forwarded."""
    path, r = send(envoy, xkey(key), CRASH)
    assert r.status == 503, r
    assert not backend.saw(path), "the crashing request reached the backend"
    assert envoy.access_log_entry(path)["details"] == "wasm_fail_stream"


def until_reloaded(
    envoy: harness.Envoy, backend: harness.Backend, reloads: int, key: str = FREE, timeout: float = 15.0
) -> list[int]:
    """Sends requests, without a key and with `key` in turn, until the VM has
    been reloaded `reloads` times in all; returns their statuses. Until the
    new VM, each is refused with 503; after it, authenticated (401 without a
    key, 200 with one). Only a 200 reaches the backend."""
    seen: list[int] = []

    def reloaded() -> bool:
        with_key = len(seen) % 2 == 1
        path, r = send(envoy, xkey(key)) if with_key else send(envoy)
        seen.append(r.status)
        assert r.status in ((503, 200) if with_key else (503, 401)), (seen, r)
        assert backend.saw(path) == (r.status == 200), r
        if r.status == 503:
            assert envoy.access_log_entry(path)["details"] == "wasm_fail_stream"
        return reload_stats(envoy)["vm_reload_success"] == reloads

    assert wait_until(reloaded, timeout=timeout, interval=0.05), (seen, reload_stats(envoy))
    return seen


def test_fail_reload_answers_503_then_a_new_vm_authenticates_with_the_buckets_kept(crashy, backend) -> None:
    envoy = crashy("FAIL_RELOAD")
    assert [send(envoy, xkey(LIMITED))[1].status for _ in range(2)] == [200, 200]  # the burst, used up
    before = reload_stats(envoy)
    assert before["vm_reload_success"] == before["vm_reload_backoff"] == before["vm_reload_failure"] == 0

    crash(envoy, backend)
    # A crash within the backoff of the VM's start (about a second) is
    # refused until it is over; then the next request starts a new VM.
    seen = until_reloaded(envoy, backend, 1)
    after = reload_stats(envoy)
    assert after["created"] == before["created"] + 1, (before, after)
    assert after["vm_reload_backoff"] == seen.count(503), (seen, after)
    assert after["vm_reload_failure"] == 0, after

    # The new VM authenticates as the old one did.
    path, r = send(envoy)
    assert r.status == 401 and r.json()["error"] == "missing_api_key", r
    assert not backend.saw(path)
    path, r = send(envoy, xkey(FREE))
    assert r.status == 200 and backend.saw(path), r
    # The bucket lives in shared data, which outlives the VM: still empty.
    r = send(envoy, xkey(LIMITED))[1]
    assert r.status == 429, f"the bucket was reset by the reload: {r}"
    assert int(r.header("retry-after") or "0") > 60, r
    assert reload_stats(envoy) == after, "one crash, one reload"
    envoy.stop()  # flushes the log
    assert "panic: panicked at src/crash_test.rs" in envoy.log_text()
    report(f"FAIL_RELOAD: after the crash {seen} until the new VM; stats {after} (before {before})")


def test_fail_reload_backs_off_a_crash_loop_and_never_lets_a_request_through(crashy, backend) -> None:
    envoy = crashy("FAIL_RELOAD")
    crash(envoy, backend)
    until_reloaded(envoy, backend, 1)
    t_reload = time.monotonic()
    crash(envoy, backend)
    path, r = send(envoy)
    within_backoff = time.monotonic() - t_reload < 0.9  # Envoy's backoff is at least 1 s
    stats = reload_stats(envoy)
    if within_backoff:
        # Too soon after the last reload: the failed VM stays, the request is refused.
        assert r.status == 503, r
        assert envoy.access_log_entry(path)["details"] == "wasm_fail_stream"
        assert stats["vm_reload_backoff"] >= 1 and stats["vm_reload_success"] == 1, stats
    else:  # a slow machine: the backoff was over before the request came
        assert r.status == 401, r
    t0 = time.monotonic()
    seen = until_reloaded(envoy, backend, 2)
    assert send(envoy)[1].status == 401
    assert reload_stats(envoy)["vm_reload_failure"] == 0
    report(
        f"crash loop (FAIL_RELOAD): second crash {'within' if within_backoff else 'after'} the backoff; "
        f"answers until the new VM: {seen} ({time.monotonic() - t0:.2f}s), stats {reload_stats(envoy)}"
    )


@pytest.fixture
def start_cp_envoy(backend: harness.Backend, crash_wasm: Path):
    made: list[harness.Envoy] = []

    def make(plugin_config: Any, cp_port: int) -> harness.Envoy:
        e = EnvoyWithControlPlane(
            backend.port, plugin_config, cp_port, wasm=crash_wasm, failure_policy="FAIL_RELOAD", access_log=True
        )
        made.append(e)
        return e.start()

    yield make
    for e in made:
        e.stop()
        e.cleanup()


def test_fail_reload_keeps_the_control_plane_list(start_cp_envoy, backend) -> None:
    """The new VM serves the list it finds in shared data: the control plane
    is down by then, so the list cannot have come from a new fetch."""
    listed = new_key("cp_")
    cp = FakeControlPlane().start()
    cp.keys = [key_entry("listed", listed)]
    try:
        envoy = start_cp_envoy(cp_config(), cp.port)
        assert wait_until(lambda: send(envoy, xkey(listed))[1].status == 200, timeout=5, interval=0.05)
    finally:
        cp.stop()
    before = reload_stats(envoy)
    crash(envoy, backend, key=listed)
    until_reloaded(envoy, backend, 1, key=listed)
    path, r = send(envoy, xkey(listed))
    assert r.status == 200 and backend.saw(path), r
    after = reload_stats(envoy)
    assert after["vm_reload_success"] == 1 and after["created"] == before["created"] + 1, (before, after)
    assert send(envoy, xkey(new_key("cp_")))[1].status == 401


def test_fail_closed_refuses_every_later_request_on_that_worker(crashy, backend) -> None:
    envoy = crashy("FAIL_CLOSED")
    assert send(envoy, xkey(FREE))[1].status == 200
    before = reload_stats(envoy)
    crash(envoy, backend)
    # No new VM, past any backoff: every request is refused, with a key or without.
    deadline = time.monotonic() + 2.5
    statuses = []
    while time.monotonic() < deadline:
        for headers in [(), (xkey(FREE),), (xkey(LIMITED),)]:
            path, r = send(envoy, *headers)
            statuses.append(r.status)
            assert r.status == 503, r
            assert not backend.saw(path), "a request reached the backend through a dead filter"
            assert envoy.access_log_entry(path)["details"] == "wasm_fail_stream"
        time.sleep(0.25)
    after = reload_stats(envoy)
    assert after == before, (before, after)
    report(f"FAIL_CLOSED: {len(statuses)} requests over 2.5 s after the crash, all 503 wasm_fail_stream; stats {after}")


# -- the shipped module -------------------------------------------------------


def objdump(path: Path, *args: str) -> Optional[str]:
    """What wabt's wasm-objdump prints about the module, or None without it."""
    tool = shutil.which("wasm-objdump")
    if tool is None:
        return None
    return subprocess.run([tool, *args, str(path)], capture_output=True, text=True, check=True).stdout


def test_the_shipped_module_has_no_crash_path(wasm: Path, crash_wasm: Path) -> None:
    shipped, crashing = wasm.read_bytes(), crash_wasm.read_bytes()
    marker = MARKER.encode()
    # The scan finds the marker where it is: the crash-test module carries it.
    assert marker in crashing, "the crash-test module has no marker: is this scan looking at the right bytes?"
    assert marker not in shipped, f"{wasm} carries {MARKER}: built with the crash-test feature?"
    assert b"crash test" not in shipped and b"crash_test" not in shipped
    # Both are trimmed to the same exports: the crash path adds no entry point.
    exports = harness.wasm_exports(shipped)
    assert exports and exports == harness.wasm_exports(crashing), (exports, harness.wasm_exports(crashing))
    assert not [e for e in exports if "crash" in e], exports
    # With wabt: the same exports, and no section detail (names included) mentions it.
    listed = objdump(wasm, "-x", "-j", "Export")
    if listed is not None:
        assert re.findall(r'-> "([^"]+)"', listed) == exports, listed
        assert "crash" in (objdump(crash_wasm, "-x") or "").lower(), "the dump shows no data: nothing to look for"
        details = objdump(wasm, "-x") or ""
        assert MARKER not in details and "crash" not in details.lower()
