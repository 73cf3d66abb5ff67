#!/usr/bin/env bash
# keygate demo: Envoy on 127.0.0.1:10000 (and HTTPS on 127.0.0.1:10443) with
# keygate in front of an echo backend on 127.0.0.1:18080, and `keygate serve` on 127.0.0.1:18081 as the
# control plane for target/demo/keys.json.
#
#   bash scripts/demo.sh           # start, print curl commands to try, wait for Ctrl-C
#   bash scripts/demo.sh --check   # start, run those commands, check 200/401/403/429, stop
#   --no-build                     # use the keygate.wasm already built
#
# Two random demo keys are generated on each run; only their SHA-256 digests
# go into the rendered Envoy configuration (target/demo/envoy.yaml). The
# HTTPS listener's certificate is made at each start too, from a throwaway CA
# (target/demo/tls/ca.pem, for curl --cacert).
# Envoy's log: target/demo/envoy.log (keygate's decisions at debug level).
# The keys, the curl lines and the check are shared with scripts/compose-demo.sh
# (scripts/demo_common.sh).

set -euo pipefail

# shellcheck source=scripts/test.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/test.sh"
# shellcheck source=scripts/demo_common.sh
source "$KEYGATE_ROOT/scripts/demo_common.sh"

demo_args "$@"

# Fixed by envoy/envoy.yaml.
LISTEN_PORT=10000
TLS_PORT=10443
ADMIN_PORT=9901
BACKEND_PORT=18080
CP_PORT=18081
URL="http://127.0.0.1:$LISTEN_PORT"
TLS_URL="https://127.0.0.1:$TLS_PORT"
TLS_CA=target/demo/tls/ca.pem
ADMIN="http://127.0.0.1:$ADMIN_PORT"
DEMO_DIR="$KEYGATE_ROOT/target/demo"

BACKEND_PID=""
ENVOY_PID=""
CP_PID=""

cleanup() {
  trap - EXIT INT TERM
  local pid
  for pid in $ENVOY_PID $BACKEND_PID $CP_PID; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in $ENVOY_PID $BACKEND_PID $CP_PID; do
    # Give each a few seconds, then insist.
    for _ in $(seq 50); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  ENVOY_PID=""
  BACKEND_PID=""
  CP_PID=""
}
trap cleanup EXIT
trap 'echo; echo "stopping..."; cleanup; exit 130' INT
trap 'cleanup; exit 143' TERM

wait_http() { # url timeout_s pid_to_watch what
  local url="$1" deadline=$((SECONDS + $2)) pid="$3" what="$4"
  until curl -fsS -o /dev/null "$url" 2>/dev/null; do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "$what exited during startup" >&2
      return 1
    fi
    ((SECONDS < deadline)) || { echo "$what not ready after $2 s" >&2; return 1; }
    sleep 0.1
  done
}

cd "$KEYGATE_ROOT"

step "setup: rust target, .venv"
ensure_rust
ensure_venv
ensure_binaryen
command -v curl >/dev/null || die "curl not found (Debian/Ubuntu: apt-get install curl)"

if [[ "$BUILD" == 1 ]]; then
  step "build keygate.wasm (release)"
  build_wasm
else
  [[ -f "$KEYGATE_WASM" ]] || die "$KEYGATE_WASM not built (run without --no-build)"
fi
echo "keygate.wasm: $(wasm_size) bytes"
step "build the keygate CLI"
cargo build -q -p keygate-cli
KEYGATE="$KEYGATE_ROOT/target/debug/keygate"

for p in $LISTEN_PORT $TLS_PORT $ADMIN_PORT $BACKEND_PORT $CP_PORT; do
  port_free "$p" || die "127.0.0.1:$p is already in use (another demo running?)"
done

step "render target/demo/envoy.yaml with two fresh demo keys"
mkdir -p "$DEMO_DIR"
demo_render_config "$DEMO_DIR/envoy.yaml"
step "make target/demo/tls/: a throwaway CA and a certificate for the HTTPS listener"
demo_make_tls "$DEMO_DIR/tls"

step "start the control plane: keygate serve on 127.0.0.1:$CP_PORT"
rm -f "$DEMO_DIR/keys.json" "$DEMO_DIR/keys.json.lock"
CP_KEY="$("$KEYGATE" keys create --id demo-cp --scopes read --file "$DEMO_DIR/keys.json" 2>/dev/null)"
"$KEYGATE" serve --keys "$DEMO_DIR/keys.json" --listen "127.0.0.1:$CP_PORT" >"$DEMO_DIR/serve.log" 2>&1 &
CP_PID=$!
wait_http "http://127.0.0.1:$CP_PORT/healthz" 10 "$CP_PID" "keygate serve" \
  || { cat "$DEMO_DIR/serve.log" >&2; exit 1; }

step "start the demo backend (127.0.0.1:$BACKEND_PORT) and Envoy (127.0.0.1:$LISTEN_PORT)"
"$KEYGATE_VENV/bin/python" scripts/demo_backend.py "$BACKEND_PORT" >"$DEMO_DIR/backend.log" 2>&1 &
BACKEND_PID=$!
wait_http "http://127.0.0.1:$BACKEND_PORT/" 10 "$BACKEND_PID" "demo backend" \
  || { cat "$DEMO_DIR/backend.log" >&2; exit 1; }

: >"$DEMO_DIR/envoy.log"
"$(envoy_bin)" -c "$DEMO_DIR/envoy.yaml" \
  --base-id "$(( (RANDOM << 15 | RANDOM) + 1000 ))" \
  --concurrency 2 \
  -l info --component-log-level wasm:debug \
  --log-path "$DEMO_DIR/envoy.log" \
  </dev/null >"$DEMO_DIR/envoy.stdio" 2>&1 &
ENVOY_PID=$!
if ! wait_http "$ADMIN/ready" 30 "$ENVOY_PID" "envoy"; then
  tail -n 40 "$DEMO_DIR/envoy.log" "$DEMO_DIR/envoy.stdio" >&2
  exit 1
fi
echo "envoy ready (pid $ENVOY_PID), log: target/demo/envoy.log"

# How demo_common.sh runs and prints the CLI.
DEMO_CLI=target/debug/keygate
DEMO_KEYS_FILE=target/demo/keys.json
demo_cli() { "$KEYGATE" "$@" --file "$DEMO_DIR/keys.json"; }
demo_logs() { cat "$DEMO_DIR/envoy.log" "$DEMO_DIR/keys.json"; }
demo_print_curls

if [[ "$CHECK" != 1 ]]; then
  echo
  echo "Press Ctrl-C to stop Envoy and the backend."
  # Returns when Envoy exits or a signal arrives (the traps clean up).
  wait "$ENVOY_PID" || true
  echo "envoy exited; see target/demo/envoy.log" >&2
  exit 1
fi

# --check: run the commands above and verify the answers.
demo_check
