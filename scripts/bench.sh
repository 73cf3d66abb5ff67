#!/usr/bin/env bash
# keygate benchmark: the filter's cost in Envoy 1.40, against Envoy with no
# auth filter, an empty proxy-wasm filter, and Envoy's native api_key_auth +
# local_ratelimit.
#
#   bash scripts/bench.sh                 # full run: 5 rounds of 5 s samples, 1M-key startup probe (~30 min)
#   bash scripts/bench.sh --quick         # 2 rounds of 1 s samples, no 1M-key probe (< 3 min)
#   bash scripts/bench.sh --latency-only  # one-connection latency, 11 rounds (~10 min)
#   other options go to bench/bench.py (--rounds N, --duration S, --busy-threshold PCT,
#   --startup-only, --host-calls, --no-1m, --keep, --out DIR; see bench/README.md)
#
# Installs what is missing (wrk and h2load from Debian packages; the project
# .venv with Envoy via scripts/test.sh), builds the release keygate.wasm and
# the empty filter (bench/empty-filter), then measures. Prints a table and
# writes the same figures to target/bench/summary.json.
#
# Needs 2 cores (Envoy under test on core 0, load generator and upstream on
# core 1). Never judges the timings: exits 0 when it ran, 2 when a
# configuration did not answer as benchmarked (200/401/429 checks).

set -euo pipefail

# shellcheck source=scripts/test.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/test.sh"

BENCH_EMPTY_TARGET="$KEYGATE_ROOT/target/bench-empty"
BENCH_EMPTY_WASM="$BENCH_EMPTY_TARGET/wasm32-wasip1/release/keygate_bench_empty.wasm"
BENCH_EMPTY_TRIMMED_WASM="$BENCH_EMPTY_TARGET/keygate_bench_empty.trimmed.wasm"

for arg in "$@"; do
  case "$arg" in
    -h | --help) sed -n '2,19p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
  esac
done

# wrk and h2load (nghttp2-client); apt-get update only when something is missing.
ensure_load_tools() {
  local missing=()
  command -v wrk >/dev/null || missing+=(wrk)
  command -v h2load >/dev/null || missing+=(nghttp2-client)
  command -v taskset >/dev/null || missing+=(util-linux)
  ((${#missing[@]} == 0)) && return 0
  command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get: install them by hand"
  local sudo=()
  [[ $(id -u) == 0 ]] || sudo=(sudo)
  step "installing ${missing[*]}"
  "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
}

BENCH_PROBE_TARGET="$KEYGATE_ROOT/target/bench-probe"
BENCH_PROBE_WASM="$BENCH_PROBE_TARGET/wasm32-wasip1/release/keygate_hostcall_probe.wasm"

build_probe_filter() {
  (cd "$KEYGATE_ROOT" && cargo build --release --target wasm32-wasip1 \
    --manifest-path bench/hostcall-probe/Cargo.toml --target-dir "$BENCH_PROBE_TARGET")
  [[ -f "$BENCH_PROBE_WASM" ]] || die "build succeeded but $BENCH_PROBE_WASM is missing"
}

build_empty_filter() {
  (cd "$KEYGATE_ROOT" && cargo build --release --target wasm32-wasip1 \
    --manifest-path bench/empty-filter/Cargo.toml --target-dir "$BENCH_EMPTY_TARGET")
  [[ -f "$BENCH_EMPTY_WASM" ]] || die "build succeeded but $BENCH_EMPTY_WASM is missing"
  # The same filter exporting only what a request-header filter needs, as
  # keygate.wasm is built: the floor without the SDK's idle callbacks.
  cp "$BENCH_EMPTY_WASM" "$BENCH_EMPTY_TRIMMED_WASM"
  trim_exports "$BENCH_EMPTY_TRIMMED_WASM" "$KEYGATE_ROOT/bench/empty-filter/exports.txt"
}

BENCH_PID=""
on_signal() {
  trap - INT TERM HUP
  if [[ -n "$BENCH_PID" ]]; then
    # bench.py stops every Envoy and load generator it started on SIGTERM.
    kill -TERM "$BENCH_PID" 2>/dev/null || true
    wait "$BENCH_PID" 2>/dev/null || true
  fi
  echo "interrupted" >&2
  exit 130
}

main_bench() {
  cd "$KEYGATE_ROOT"
  (($(nproc) >= 2)) || echo "warning: $(nproc) core(s): the pinning (envoy core 0, load core 1) needs 2" >&2

  step "setup: wrk, h2load, rust target, .venv with Envoy"
  ensure_load_tools
  ensure_rust
  ensure_venv
  ensure_binaryen

  step "build: keygate.wasm (release), the empty filter, the keygate CLI"
  build_wasm
  build_empty_filter
  build_probe_filter
  (cd "$KEYGATE_ROOT" && cargo build --release -p keygate-cli)
  echo "keygate.wasm: $(wasm_size) bytes; empty filter: $(wc -c <"$BENCH_EMPTY_WASM" | tr -d ' ') bytes"

  # keygate's own code per request, without Envoy or any host call: the part
  # of the cost that is not the floor or the host's (also in target/bench/).
  step "keygate's decision, native (core/examples/decide.rs)"
  mkdir -p "$KEYGATE_ROOT/target/bench"
  (cd "$KEYGATE_ROOT" && cargo run -q --release -p keygate-core --example decide) \
    | tee "$KEYGATE_ROOT/target/bench/native-decide.txt"

  step "benchmark"
  trap on_signal INT TERM HUP
  BENCH_ENVOY="$(envoy_bin)" \
    BENCH_KEYGATE_WASM="$KEYGATE_WASM" \
    BENCH_EMPTY_WASM="$BENCH_EMPTY_WASM" \
    BENCH_EMPTY_TRIMMED_WASM="$BENCH_EMPTY_TRIMMED_WASM" \
    BENCH_KEYGATE_CLI="$KEYGATE_ROOT/target/release/keygate" \
    BENCH_PROBE_WASM="$BENCH_PROBE_WASM" \
    BENCH_WRK="$(command -v wrk)" \
    BENCH_H2LOAD="$(command -v h2load)" \
    "$KEYGATE_VENV/bin/python" "$KEYGATE_ROOT/bench/bench.py" "$@" &
  BENCH_PID=$!
  local rc=0
  wait "$BENCH_PID" || rc=$?
  BENCH_PID=""
  trap - INT TERM HUP
  return "$rc"
}

main_bench "$@"
