"""Soak: many plugin-configuration updates to one running Envoy, under traffic.

Each update is a changed key list (one key revoked, one added, the list's size
kept), delivered as Istio delivers a WasmPlugin: through ECDS (an extension
configuration discovered from a file, here replaced by an atomic move in its
watched directory). Meanwhile bounded traffic flows on keep-alive connections:
a key present in every list (expects 200), and a key whose bucket was drained
before the first update (expects 429: a 200 would mean an update reset its
bucket). After every update the added key must reach 200 and the revoked one
401. Envoy's resident memory (RSS, from /proc) and its heap (admin /memory)
are sampled every `report_every` updates.

Run as a script (scripts/soak.sh) it prints the figures and exits non-zero
when the goal is missed (RSS after warm-up within ±10 % of the warm-up
sample, no 5xx, the drained bucket never admits); tests/e2e/test_soak.py runs
a short variant with a looser RSS bound.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Optional

if __package__ in (None, ""):  # run as a script: import the harness next to it
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402

PLUGIN = "keygate"  # the plugin name every update keeps: buckets are scoped by it
WASM_TYPE = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"
# The drained key: a burst of 2, then one request per 12 hours.
DRAINED_LIMIT = {"requests": 2, "per": "1d"}
ECDS_STAT = f"extension_config_discovery.http_filter.{PLUGIN}."


@dataclasses.dataclass
class Sample:
    updates: int
    rss_kib: int
    heap_bytes: int
    requests: int


@dataclasses.dataclass
class SoakResult:
    updates: int
    samples: list[Sample]
    statuses: collections.Counter
    errors: list[str]
    drained_admitted: int
    drained_refused: int
    update_ms: list[float]
    seconds: float

    @property
    def five_xx(self) -> int:
        return sum(n for s, n in self.statuses.items() if s >= 500)

    def rss_drift(self, warmup: int) -> tuple[int, float, float]:
        """(reference RSS in KiB, lowest and highest later sample as a
        fraction of it): the reference is the first sample at or after
        `warmup` updates."""
        after = [s for s in self.samples if s.updates >= warmup]
        ref = after[0].rss_kib
        later = after[1:] or after
        return ref, min(s.rss_kib for s in later) / ref - 1, max(s.rss_kib for s in later) / ref - 1


class KeyRing:
    """The rotating part of the key list: `size` keys; each update revokes
    the oldest (drops it from the list) and adds a new one."""

    def __init__(self, size: int):
        self.serial = 0
        self.keys: collections.deque[tuple[str, str]] = collections.deque()
        for _ in range(size):
            self.keys.append(self._new())

    def _new(self) -> tuple[str, str]:
        self.serial += 1
        return f"rot-{self.serial}", harness.new_key()

    def rotate(self) -> tuple[tuple[str, str], tuple[str, str]]:
        """(revoked, added)."""
        revoked = self.keys.popleft()
        added = self._new()
        self.keys.append(added)
        return revoked, added


class EcdsEnvoy(harness.Envoy):
    """The suite's Envoy, its keygate filter discovered through ECDS from
    `ecds_path` (a DiscoveryResponse file, watched in its directory)."""

    def __init__(self, ecds_path: Path, backend_port: int, **kw):
        super().__init__(backend_port, **kw)
        self.ecds_path = ecds_path

    def _write_config(self) -> Path:
        assert self.workdir is not None
        ecds_filter = {
            "name": PLUGIN,
            "config_discovery": {
                "config_source": {
                    "resource_api_version": "V3",
                    "path_config_source": {
                        "path": str(self.ecds_path),
                        "watched_directory": {"path": str(self.ecds_path.parent)},
                    },
                },
                "type_urls": [WASM_TYPE],
            },
        }
        cfg = harness.bootstrap(self.port, self.admin_port, self.backend_port, [ecds_filter])
        cfg["node"] = {"id": "keygate-soak", "cluster": "keygate-soak"}  # required by xDS
        path = self.workdir / "envoy.json"
        path.write_text(json.dumps(cfg, indent=2))
        return path


class Soak:
    """One Envoy whose keygate filter comes from ECDS, and the traffic."""

    def __init__(self, backend_port: int, ring_size: int = 200, concurrency: int = 2, keep_s: Optional[int] = None):
        # The VMs' shared compiled configuration is kept for this long after
        # an update (None: as shipped, 60 s).
        self.vm_env = {"KEYGATE_SHARE_KEEP_S": str(keep_s)} if keep_s is not None else None
        self.steady = harness.new_key()
        self.drained = harness.new_key()
        self.ring = KeyRing(ring_size)
        self.version = 0
        self.ecds_dir = Path(tempfile.mkdtemp(prefix="keygate-soak-ecds-"))
        self.ecds_path = self.ecds_dir / "keygate.json"
        self._write_ecds()
        self.envoy = EcdsEnvoy(self.ecds_path, backend_port, concurrency=concurrency)

    # -- configuration ---------------------------------------------------------

    def plugin_config(self) -> dict:
        keys = [
            harness.key_entry("steady", self.steady),
            harness.key_entry("drained", self.drained, DRAINED_LIMIT),
        ] + [harness.key_entry(i, k) for i, k in self.ring.keys]
        return {"keys": keys}

    def _write_ecds(self) -> None:
        self.version += 1
        wasm = harness.wasm_filter(self.plugin_config(), harness.wasm_path(), PLUGIN, self.vm_env)["typed_config"]
        doc = {
            "version_info": str(self.version),
            "resources": [
                {
                    "@type": "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig",
                    "name": PLUGIN,
                    "typed_config": wasm,
                }
            ],
        }
        tmp = self.ecds_dir / f".keygate.{self.version}.tmp"
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, self.ecds_path)  # Envoy reacts to the atomic move

    def ecds_counter(self, name: str) -> int:
        text = self.envoy.admin_get(f"/stats?filter=^{ECDS_STAT.replace('.', '[.]')}{name}$")
        for line in text.splitlines():
            stat, _, value = line.partition(": ")
            if stat.strip() == ECDS_STAT + name:
                return int(value)
        return 0

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        self.envoy.start()
        ok = harness.wait_until(lambda: self.status(self.steady) == 200, timeout=15)
        assert ok, "the first ECDS configuration never served:\n" + self.envoy.log_text()[-4000:]

    def stop(self) -> None:
        self.envoy.stop()
        if os.environ.get("KEYGATE_E2E_KEEP") != "1":
            self.envoy.cleanup()
        shutil.rmtree(self.ecds_dir, ignore_errors=True)

    def status(self, key: str) -> int:
        return self.envoy.request("GET", harness.unique_path("soak"), [harness.xkey(key)]).status

    def drain(self) -> None:
        """Use up the drained key's burst: 200, 200, then 429."""
        got = [self.status(self.drained) for _ in range(3)]
        assert got == [200, 200, 429], f"the drained key's burst: {got}"

    def rss_kib(self) -> int:
        assert self.envoy.proc is not None
        for line in Path(f"/proc/{self.envoy.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def heap_bytes(self) -> int:
        return int(json.loads(self.envoy.admin_get("/memory"))["allocated"])

    def ecds_counter(self, name: str) -> int:
        text = self.envoy.admin_get("/stats?filter=^extension_config_discovery[.]")
        for line in text.splitlines():
            stat, _, value = line.partition(": ")
            if stat.strip() == ECDS_STAT + name:
                return int(value)
        return 0

    def update(self, timeout: float = 15.0) -> float:
        """One changed key list through ECDS. Returns the milliseconds from the
        move to Envoy's count of the reload; then the added key must be
        served and the revoked one refused (fresh connections, any worker)."""
        before_ok = self.ecds_counter("config_reload")
        before_fail = self.ecds_counter("config_fail")
        revoked, added = self.ring.rotate()
        t0 = time.monotonic()
        self._write_ecds()

        def applied() -> bool:
            if self.ecds_counter("config_fail") > before_fail:
                raise RuntimeError("ECDS update refused:\n" + self.envoy.log_text()[-4000:])
            return self.ecds_counter("config_reload") > before_ok

        if not harness.wait_until(applied, timeout=timeout, interval=0.005):
            raise RuntimeError(f"ECDS update {self.version} not applied in {timeout}s")
        ms = (time.monotonic() - t0) * 1000
        assert harness.wait_until(lambda: self.status(added[1]) == 200, timeout=5), f"{added[0]} never served"
        assert harness.wait_until(lambda: self.status(revoked[1]) == 401, timeout=5), f"{revoked[0]} still served"
        return ms


class Traffic:
    """Bounded traffic while the updates run: `connections` keep-alive
    connections with the steady key at about `rps` requests a second each,
    and one with the drained key at 10 a second. Stops at `stop()`, after
    `max_seconds` or after `max_requests` per connection, whichever is first."""

    def __init__(self, soak: Soak, connections: int = 2, rps: float = 50, max_seconds: float = 3600,
                 max_requests: int = 1_000_000):
        self.soak = soak
        self.statuses: collections.Counter = collections.Counter()
        self.errors: list[str] = []
        self.drained_admitted = 0
        self.drained_refused = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._deadline = time.monotonic() + max_seconds
        self._max = max_requests
        self._threads = [
            threading.Thread(target=self._run, args=(soak.steady, rps, False), daemon=True)
            for _ in range(connections)
        ] + [threading.Thread(target=self._run, args=(soak.drained, 10, True), daemon=True)]

    def start(self) -> "Traffic":
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)

    def total(self) -> int:
        with self._lock:
            return sum(self.statuses.values())

    def snapshot(self) -> tuple[dict[int, int], int]:
        """(count of each status so far, connection errors so far)."""
        with self._lock:
            return dict(sorted(self.statuses.items())), len(self.errors)

    def _run(self, key: str, rps: float, drained: bool) -> None:
        conn: Optional[harness.RawConnection] = None
        path = harness.unique_path("drained" if drained else "steady")
        period = 1.0 / rps
        next_at = time.monotonic()
        for _ in range(self._max):
            if self._stop.is_set() or time.monotonic() >= self._deadline:
                break
            try:
                if conn is None:
                    conn = self.soak.envoy.connect()
                status = conn.request("GET", path, [harness.xkey(key)]).status
            except OSError as e:  # also ConnectionError: a closed connection
                with self._lock:
                    self.errors.append(f"{type(e).__name__}: {e}")
                if conn is not None:
                    conn.close()
                conn = None
                status = 0
            if status:
                with self._lock:
                    self.statuses[status] += 1
                    if drained and status == 200:
                        self.drained_admitted += 1
                    elif drained and status == 429:
                        self.drained_refused += 1
            next_at += period
            self._stop.wait(max(0.0, next_at - time.monotonic()))
        if conn is not None:
            conn.close()


def run_soak(
    backend: harness.Backend,
    updates: int,
    every: int,
    *,
    ring_size: int = 200,
    concurrency: int = 2,
    rps: float = 50,
    interval: float = 0.0,
    keep_s: Optional[int] = None,
    max_seconds: float = 3600,
    say: Callable[[str], None] = print,
) -> SoakResult:
    """Start an Envoy, drain the drained key, then `updates` ECDS updates
    under traffic, one every `interval` seconds at most, sampling memory
    every `every` updates (and before the first). Stops Envoy before
    returning."""
    soak = Soak(backend.port, ring_size=ring_size, concurrency=concurrency, keep_s=keep_s)
    t_start = time.monotonic()
    try:
        soak.start()
        soak.drain()
        traffic = Traffic(soak, rps=rps, max_seconds=max_seconds).start()
        samples: list[Sample] = []
        update_ms: list[float] = []

        def sample(n: int) -> None:
            s = Sample(n, soak.rss_kib(), soak.heap_bytes(), traffic.total())
            samples.append(s)
            recent = update_ms[-every:]
            took = f", update applied in p50 {statistics.median(recent):.0f} ms" if recent else ""
            counts, errors = traffic.snapshot()
            say(
                f"updates {n:5d}: Envoy RSS {s.rss_kib / 1024:6.1f} MiB, heap {s.heap_bytes / 2**20:6.1f} MiB, "
                f"requests {s.requests} {counts}, connection errors {errors}{took}"
            )
            backend.clear()  # the recording backend keeps every request otherwise

        try:
            sample(0)
            t_updates = time.monotonic()
            for n in range(1, updates + 1):
                if time.monotonic() - t_start > max_seconds:
                    raise RuntimeError(f"soak over its {max_seconds}s bound after {n - 1} updates")
                due = t_updates + n * interval
                update_ms.append(soak.update())
                if n % every == 0:
                    sample(n)
                time.sleep(max(0.0, due - time.monotonic()))
        finally:
            traffic.stop()
        # The drained bucket, checked once more on a fresh connection.
        final = soak.status(soak.drained)
        if final == 200:
            traffic.drained_admitted += 1
        return SoakResult(
            updates=updates,
            samples=samples,
            statuses=traffic.statuses,
            errors=traffic.errors,
            drained_admitted=traffic.drained_admitted,
            drained_refused=traffic.drained_refused + (final == 429),
            update_ms=update_ms,
            seconds=time.monotonic() - t_start,
        )
    finally:
        soak.stop()


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--updates", type=int, default=1000)
    ap.add_argument("--every", type=int, default=100, help="sample memory every N updates")
    ap.add_argument("--warmup", type=int, default=100, help="updates before the RSS reference sample")
    ap.add_argument("--keys", type=int, default=200, help="size of the rotating key list")
    ap.add_argument("--concurrency", type=int, default=2, help="Envoy worker threads")
    ap.add_argument("--rps", type=float, default=50, help="steady-key requests a second, per connection")
    ap.add_argument("--interval", type=float, default=0.2, help="seconds from one update to the next, at least")
    ap.add_argument("--keep", type=int, default=None,
                    help="KEYGATE_SHARE_KEEP_S for the VMs (default: unset, as shipped: 60 s)")
    ap.add_argument("--max-seconds", type=float, default=1800)
    args = ap.parse_args(argv)
    if not harness.wasm_path().exists():
        print(f"{harness.wasm_path()} not built (bash -c 'source scripts/test.sh; build_wasm')", file=sys.stderr)
        return 2
    print(
        f"soak: {args.updates} ECDS updates of plugin {PLUGIN!r} ({args.keys + 2} keys, one revoked and one "
        f"added each, one every {args.interval:g}s at most), Envoy --concurrency {args.concurrency}, 2 connections at {args.rps:g} req/s "
        f"with a steady key and 1 at 10 req/s with a drained key"
    )
    with harness.Backend() as backend:
        r = run_soak(
            backend, args.updates, args.every, ring_size=args.keys, concurrency=args.concurrency,
            rps=args.rps, interval=args.interval, keep_s=args.keep, max_seconds=args.max_seconds,
        )
    ref, low, high = r.rss_drift(args.warmup)
    ms = sorted(r.update_ms)
    print(f"done in {r.seconds:.0f}s: {sum(r.statuses.values())} requests {dict(sorted(r.statuses.items()))}, "
          f"5xx {r.five_xx}, connection errors {len(r.errors)}")
    print(f"update applied (move to Envoy's reload count): p50 {statistics.median(ms):.0f} ms, "
          f"p99 {ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]:.0f} ms")
    print(f"drained key: {r.drained_refused} refused (429), {r.drained_admitted} admitted")
    print(f"RSS after warm-up ({args.warmup} updates, {ref / 1024:.1f} MiB): {low:+.1%} to {high:+.1%} (goal ±10 %)")
    heap = [s for s in r.samples if s.updates >= args.warmup]
    # Over the second half: by then the kept compiled lists (a keep period's
    # worth of updates) are being freed as fast as they come.
    half = [s for s in r.samples if s.updates >= args.updates // 2]
    slope = (half[-1].heap_bytes - half[0].heap_bytes) / max(1, half[-1].updates - half[0].updates) / 1024
    print(f"heap after warm-up ({heap[0].heap_bytes / 2**20:.1f} MiB): "
          f"{min(s.heap_bytes for s in heap) / heap[0].heap_bytes - 1:+.1%} to "
          f"{max(s.heap_bytes for s in heap) / heap[0].heap_bytes - 1:+.1%}; "
          f"{slope:+.1f} KiB per update over the second half (not judged)")
    failed = []
    if r.five_xx:
        failed.append(f"{r.five_xx} 5xx")
    if r.errors:
        failed.append(f"connection errors: {r.errors[:3]}")
    if r.drained_admitted or not r.drained_refused:
        failed.append("the drained bucket admitted a request: an update reset it")
    if low < -0.10 or high > 0.10:
        failed.append("RSS moved more than 10 % after warm-up")
    print("goal met" if not failed else "goal MISSED: " + "; ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
