"""A short soak in CI: 150 plugin-configuration updates (ECDS, each a changed
key list of 1,002 keys) to one Envoy under traffic. scripts/soak.sh runs the
long one (1,000 updates, as shipped) and holds it to the goal (RSS within
±10 % after warm-up)."""

from __future__ import annotations

from conftest import report
from soak import run_soak

UPDATES = 150
EVERY = 20
WARMUP = 40
# The VMs keep each update's compiled key list in shared data for this long
# (60 s as shipped; the short run would never see one freed). With one update
# every 50 ms about 40 lists are kept at a time.
KEEP_S = 2
# A leak of one compiled 1,002-key list per update (about 50 KiB) grows the
# heap by 5 MiB over the 110 updates after warm-up (measured with the keep
# period at 60 s); kept lists being freed, it moves by under 1 MiB.
HEAP_GROWTH_MIB = 2
# RSS is mostly V8's reservations: a loose bound, twice the long run's goal.
RSS_GROWTH = 0.20


def test_soak_updates_under_traffic_keep_buckets_and_memory(backend, wasm) -> None:
    r = run_soak(
        backend, UPDATES, EVERY, ring_size=1000, interval=0.05, keep_s=KEEP_S, max_seconds=300, say=report
    )
    report(
        f"soak: {r.updates} ECDS updates in {r.seconds:.0f}s, {sum(r.statuses.values())} requests "
        f"{dict(sorted(r.statuses.items()))}, drained key refused {r.drained_refused}x"
    )
    assert r.five_xx == 0, r.statuses
    assert not r.errors, r.errors[:5]
    # The key drained before the first update stayed limited through all of them.
    assert r.drained_admitted == 0 and r.drained_refused > 0, (r.drained_admitted, r.drained_refused)
    assert r.statuses[200] > 0
    figures = [(s.updates, s.rss_kib, s.heap_bytes) for s in r.samples]
    _ref, _low, high = r.rss_drift(WARMUP)
    assert high <= RSS_GROWTH, figures
    after = [s.heap_bytes for s in r.samples if s.updates >= WARMUP]
    assert max(after) - after[0] <= HEAP_GROWTH_MIB * 2**20, figures
