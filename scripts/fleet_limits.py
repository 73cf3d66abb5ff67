#!/usr/bin/env python3
"""Fleet-wide limits, measured: three Envoys (two workers each) with keygate
and Envoy's rate-limit filter, behind one keygate-ratelimit and one
redis-server. One key is hammered through all three for a fixed time; the
admitted total is compared with the bound limitador's fixed windows give.
Then the same run without the rate-limit filter (keygate's local buckets
only), which admits about three times as much.

Prints ONE JSON line on stdout (progress goes to stderr):
  fleet_admitted, fleet_bound, local_admitted, local_bound, seconds, ...

    .venv/bin/python scripts/fleet_limits.py            # 10 s per mode
    .venv/bin/python scripts/fleet_limits.py --quick    # 3 s per mode

Needs the release keygate.wasm (scripts/test.sh), redis-server and
keygate-ratelimit (`KEYGATE_RLS`, else target/release, else target/debug;
built in release with scripts/ratelimit.sh when none exists). Traffic stays on 127.0.0.1; every load
loop is bounded in time and in requests.

Callable from another script: `measure(seconds, rate, ...)` returns the dict.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "e2e"))

import harness  # noqa: E402
from harness.ratelimit_service import FleetEnvoy, RateLimitService, Redis, rls_binary  # noqa: E402

ENVOYS = 3
WORKERS = 2
CONNECTIONS_PER_ENVOY = 2
MAX_REQUESTS_PER_CONNECTION = 200_000


def log(msg: str) -> None:
    print(f"fleet_limits: {msg}", file=sys.stderr, flush=True)


def hammer(ports: list[int], key: str, seconds: float) -> tuple[dict[int, int], float]:
    """Keep-alive GETs with `key` to every port from CONNECTIONS_PER_ENVOY
    threads each, until `seconds` have passed (or each thread's request cap).
    Returns the count per status and the time from the first request sent to
    the last answer read."""
    counts: dict[int, int] = {}
    lock = threading.Lock()
    start = time.monotonic()
    deadline = start + seconds
    ends: list[float] = []

    def run(port: int) -> None:
        mine: dict[int, int] = {}
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            for i in range(MAX_REQUESTS_PER_CONNECTION):
                if time.monotonic() >= deadline:
                    break
                try:
                    conn.request("GET", f"/fleet/{i}", headers={"x-api-key": key})
                    resp = conn.getresponse()
                    resp.read()
                    mine[resp.status] = mine.get(resp.status, 0) + 1
                except (OSError, http.client.HTTPException):
                    mine[0] = mine.get(0, 0) + 1
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        finally:
            conn.close()
        with lock:
            for status, n in mine.items():
                counts[status] = counts.get(status, 0) + n
            ends.append(time.monotonic())

    threads = [threading.Thread(target=run, args=(p,)) for p in ports for _ in range(CONNECTIONS_PER_ENVOY)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return counts, (max(ends) if ends else time.monotonic()) - start


def fleet_window(rate: float, burst: int) -> tuple[int, int]:
    """limitador's window for `rate`/s with `burst` (ratelimit/src/table.rs):
    (requests per window, window seconds)."""
    interval_ns = round(1e9 / rate)
    seconds = max(1, math.ceil(interval_ns * burst / 1e9))
    return max(1, seconds * 1_000_000_000 // interval_ns), seconds


def run_mode(backend: harness.Backend, cfg: dict, key: str, seconds: float, rls_port: Optional[int]) -> dict:
    envoys = [FleetEnvoy(backend.port, cfg, rls_port, concurrency=WORKERS) for _ in range(ENVOYS)]
    try:
        for e in envoys:
            e.start()
        counts, elapsed = hammer([e.port for e in envoys], key, seconds)
        rls_failures = sum(e.counter("ratelimit.failure_mode_allowed") for e in envoys) if rls_port else 0
        rls_errors = sum(e.counter("ratelimit.error") for e in envoys) if rls_port else 0
    finally:
        for e in envoys:
            e.stop()
            e.cleanup()
    return {
        "admitted": counts.get(200, 0),
        "refused": counts.get(429, 0),
        "other": sum(n for s, n in counts.items() if s not in (200, 429)),
        "elapsed": elapsed,
        "rls_errors": rls_errors,
        "rls_failure_mode_allowed": rls_failures,
    }


def ensure_rls(quick: bool) -> Path:
    path = rls_binary()
    if not path.exists():
        profile = [] if quick else ["--release"]
        log(f"building keygate-ratelimit ({'debug' if quick else 'release'})")
        subprocess.run(["bash", str(ROOT / "scripts" / "ratelimit.sh"), "build", "-q", *profile], cwd=ROOT, check=True)
        path = rls_binary()
    return path


def measure(seconds: float = 10.0, rate: float = 50.0, burst: Optional[int] = None, quick: bool = False) -> dict:
    """Both runs; the figures as one dict."""
    burst = burst or max(1, round(rate))
    rls = ensure_rls(quick)
    if not harness.wasm_path().exists():
        raise SystemExit(f"{harness.wasm_path()} missing: build it with scripts/test.sh (build_wasm)")
    key = harness.new_key("fleet_")
    limit = {"requests_per_second": rate, "burst": burst}
    cfg = {"keys": [harness.key_entry("hammered", key, limit)]}
    per_window, window = fleet_window(rate, burst)
    with harness.Backend() as backend, Redis() as redis, RateLimitService(cfg, redis.url) as service:
        log(f"fleet: {ENVOYS} Envoys x {WORKERS} workers, {rls.name} on {service.port}, redis {redis.port}, {seconds} s")
        fleet = run_mode(backend, cfg, key, seconds, service.port)
    log(f"local only: {ENVOYS} Envoys x {WORKERS} workers, {seconds} s")
    with harness.Backend() as backend:
        local = run_mode(backend, cfg, key, seconds, None)
    # limitador: at most `per_window` per window; a span of T seconds meets
    # at most ceil(T / window) + 1 windows. keygate's GCRA per Envoy: burst +
    # rate x T, on each Envoy.
    fleet_bound = per_window * (math.ceil(fleet["elapsed"] / window) + 1)
    local_bound = ENVOYS * (burst + math.floor(rate * local["elapsed"]))
    return {
        "fleet_admitted": fleet["admitted"],
        "fleet_bound": fleet_bound,
        "local_admitted": local["admitted"],
        "local_bound": local_bound,
        "seconds": round(max(fleet["elapsed"], local["elapsed"]), 2),
        "fleet_seconds": round(fleet["elapsed"], 2),
        "local_seconds": round(local["elapsed"], 2),
        "limit": {"requests_per_second": rate, "burst": burst},
        "fleet_window": {"requests": per_window, "seconds": window},
        "fleet_refused": fleet["refused"],
        "local_refused": local["refused"],
        "fleet_other": fleet["other"],
        "local_other": local["other"],
        "fleet_rls_errors": fleet["rls_errors"],
        "fleet_failure_mode_allowed": fleet["rls_failure_mode_allowed"],
        "envoys": ENVOYS,
        "workers": WORKERS,
        "connections": ENVOYS * CONNECTIONS_PER_ENVOY,
        "rls": str(rls.relative_to(ROOT)) if rls.is_relative_to(ROOT) else str(rls),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 s per mode instead of 10")
    ap.add_argument("--seconds", type=float, help="seconds per mode (overrides --quick)")
    ap.add_argument("--rate", type=float, default=50.0, help="the key's requests per second (default 50)")
    ap.add_argument("--burst", type=int, help="the key's burst (default: one second's worth)")
    args = ap.parse_args()
    seconds = args.seconds or (3.0 if args.quick else 10.0)
    if not 0.5 <= seconds <= 120:
        ap.error("--seconds must be from 0.5 to 120")
    print(json.dumps(measure(seconds, args.rate, args.burst, args.quick)), flush=True)


if __name__ == "__main__":
    main()
