#!/usr/bin/env bash
# Fleet-wide limits, measured: runs scripts/fleet_limits.py (three Envoys
# behind one keygate-ratelimit and one redis-server, then local-only) with
# the project's .venv and prints its one JSON line. scripts/fleet.sh calls
# this with --quick when quick.
#
#   bash scripts/fleet-limit.sh [--quick] [--seconds N] [--rate R] [--burst B]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
exec "${KEYGATE_VENV:-$root/.venv}/bin/python" "$root/scripts/fleet_limits.py" "$@"
