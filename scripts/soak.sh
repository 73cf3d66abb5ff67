#!/usr/bin/env bash
# keygate: the soak. 1,000 plugin-configuration updates (each a changed key
# list: one key revoked, one added) delivered to one running Envoy through
# ECDS from a file, as Istio delivers a WasmPlugin, while bounded traffic
# flows. Prints Envoy's RSS and heap every 100 updates, then the verdict:
# RSS within ±10 % of the sample after 100 updates of warm-up, no 5xx, and a
# key whose bucket was drained before the first update still refused after
# the last (buckets are kept across updates with the same plugin name).
#
#   bash scripts/soak.sh [--updates N] [--every N] [--warmup N] [--keys N]
#                        [--concurrency N] [--rps R] [--max-seconds S]
#
# Builds the release keygate.wasm first (scripts/test.sh's build). Exits 1
# when the goal is missed. The program is tests/e2e/soak.py;
# tests/e2e/test_soak.py runs 150 updates in CI.

set -euo pipefail
# shellcheck source=test.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/test.sh"
prepare_envoy_run
ENVOY_BIN="$(envoy_bin)" exec "$KEYGATE_VENV/bin/python" tests/e2e/soak.py "$@"
