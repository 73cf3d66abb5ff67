#!/usr/bin/env bash
# keygate across a fleet: three Envoys (two workers each), each in a network
# namespace of its own on one bridge, polling one `keygate serve`.
#
#   bash scripts/fleet.sh [--quick] [--keep]
#
# Builds what it needs (keygate.wasm, the keygate CLI, .venv with Envoy;
# installs h2load from Debian's nghttp2-client when missing), then
# tests/fleet/fleet.py measures: revocation propagation (20 trials, 5 with
# --quick), a partition of a `serve` and of a `fail_closed` Envoy, a
# control-plane restart under traffic, the bytes a key change costs the
# fleet, and `keygate serve` answering 1,000 unchanged polls per second of a
# 100k-key list (CPU, p99). Then, if the tree has it, the fleet-wide rate
# limit measurement ($KEYGATE_FLEET_LIMIT_SCRIPT, default
# scripts/fleet-limit.sh, run with --quick when quick), whose JSON fields are
# merged in.
#
# Progress goes to stderr; stdout gets one line, a JSON object with every
# figure. Exit status 1 when a behavioural check failed (partition,
# fail_closed, catch-up, restart, propagation reaching every Envoy); figures
# against their goals are reported in "goals" and never fail the run.
#
# Root only (ip netns). Everything is torn down on exit, error or signal.
# --quick (CI, about 2 minutes) uses the debug CLI; the full run (about 3
# minutes plus the release build) the release one.

set -euo pipefail

# shellcheck source=scripts/test.sh
source "$(dirname "${BASH_SOURCE[0]}")/test.sh"

quick=()
keep=()
for arg in "$@"; do
  case "$arg" in
    --quick) quick=(--quick) ;;
    --keep) keep=(--keep) ;;
    -h | --help)
      sed -n '2,25p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
      exit 0
      ;;
    *) die "unknown argument: $arg (try --help)" ;;
  esac
done

[[ $(id -u) == 0 ]] || die "scripts/fleet.sh needs root: it creates network namespaces"
command -v ip >/dev/null || die "ip not found (Debian/Ubuntu: apt-get install iproute2)"

cd "$KEYGATE_ROOT"
# Only the JSON line goes to stdout: set-up and builds report on stderr.
{
  ensure_rust
  ensure_venv
  ensure_binaryen
  ensure_apt_tools nghttp2-client h2load

  step "fleet: build keygate.wasm and the keygate CLI"
  build_wasm
  if ((${#quick[@]})); then
    cargo build -p keygate-cli
  else
    cargo build --release -p keygate-cli
  fi
} >&2
if ((${#quick[@]})); then
  cli="$KEYGATE_ROOT/target/debug/keygate"
else
  cli="$KEYGATE_ROOT/target/release/keygate"
fi

run_id="$(printf '%04x' $((RANDOM % 65536)))"
work="$(mktemp -d "${TMPDIR:-/tmp}/keygate-fleet-XXXXXX")"
# However this script ends, nothing of the run stays (fleet.py cleans up
# itself; this covers it being killed outright).
cleanup() {
  "$KEYGATE_VENV/bin/python" tests/fleet/fleet.py --teardown --run-id "$run_id" >/dev/null 2>&1 || true
  ((${#keep[@]})) || rm -rf "$work"
}
trap cleanup EXIT

step "fleet: measure (run $run_id${quick:+, quick})" >&2
"$KEYGATE_VENV/bin/python" tests/fleet/fleet.py "${quick[@]}" "${keep[@]}" --run-id "$run_id" --workdir "$work" \
  --keygate "$cli" --envoy "$(envoy_bin)" --wasm "$KEYGATE_WASM" \
  --limit-script "${KEYGATE_FLEET_LIMIT_SCRIPT:-$KEYGATE_ROOT/scripts/fleet-limit.sh}"
