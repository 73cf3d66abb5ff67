"""Revocation latency in CI: `keygate keys revoke` on the list `keygate serve`
serves, until every worker of one Envoy (poll 1 s) answers 401. The
measurement is tests/e2e/revocation.py's (also scripts/revocation.sh, which
holds it to the goal: p99 <= 2 s over 20 trials)."""

from __future__ import annotations

import harness
from conftest import report
from revocation import create_trial_keys, measure
from test_cli_control_plane import cli, served  # noqa: F401 (fixture)
from test_control_plane import cp_config, start_envoy  # noqa: F401 (fixture)

TRIALS = 20
# The goal is p99 <= 2 s. CI allows 2.5 s: the suite shares two cores with
# whatever else the runner does, and one stalled poll tick (0.25 s) or a slow
# CLI start adds a few hundred milliseconds to a single trial, which with 20
# trials is the p99. A missed poll cycle (1 s more) still fails, as does a
# median over 1.5 s.
CI_P99_S = 2.5
CI_P50_S = 1.5


def test_revocation_reaches_every_worker_within_seconds(served, start_envoy) -> None:
    keys, port, seed = served
    trial_keys = create_trial_keys(keys, TRIALS)
    envoy = start_envoy(cp_config(poll_interval="1s", timeout="1s"), port, concurrency=2)
    # The listed file never contains a key, only its masked form.
    listing = cli("keys", "list", "--file", str(keys))
    assert all(k not in listing and k not in keys.read_text() for k in trial_keys.values())

    result = measure(envoy, keys, trial_keys)
    report(result.line())
    assert len([w for w, n in result.per_worker_cx.items() if n > 0]) == 2, result.per_worker_cx
    # The worst case adds up: serve's file check (0.2 s), the 1 s poll, the
    # tick the fetch waits for and the other worker's adopting tick (0.25 s
    # each), plus the CLI, the fetch and compiling.
    assert result.p50 <= CI_P50_S, result.seconds
    assert result.p99 <= CI_P99_S, result.seconds
    # A revoked key stays revoked, the seed key is unaffected.
    assert envoy.request("GET", "/", [harness.xkey(seed)]).status == 200
    assert all(envoy.request("GET", "/", [harness.xkey(k)]).status == 401 for k in trial_keys.values())
