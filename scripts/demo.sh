#!/usr/bin/env bash
# keygate demo: Envoy on 127.0.0.1:10000 with keygate in front of an echo
# backend on 127.0.0.1:18080, and `keygate serve` on 127.0.0.1:18081 as the
# control plane for target/demo/keys.json.
#
#   bash scripts/demo.sh           # start, print curl commands to try, wait for Ctrl-C
#   bash scripts/demo.sh --check   # start, run those commands, check 200/401/429, stop
#   --no-build                     # use the keygate.wasm already built
#
# Two random demo keys are generated on each run; only their SHA-256 digests
# go into the rendered Envoy configuration (target/demo/envoy.yaml).
# Envoy's log: target/demo/envoy.log (keygate's decisions at debug level).

set -euo pipefail

# shellcheck source=scripts/test.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/test.sh"

CHECK="${KEYGATE_DEMO_CHECK:-0}"
BUILD=1
for arg in "$@"; do
  case "$arg" in
    --check) CHECK=1 ;;
    --no-build) BUILD=0 ;;
    -h | --help) sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument: $arg (try --help)" ;;
  esac
done

# Fixed by envoy/envoy.yaml.
LISTEN_PORT=10000
ADMIN_PORT=9901
BACKEND_PORT=18080
CP_PORT=18081
URL="http://127.0.0.1:$LISTEN_PORT"
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

port_free() {
  "$KEYGATE_VENV/bin/python" - "$1" <<'PY'
import socket, sys
s = socket.socket()
# Like the servers themselves: a port with only TIME_WAIT leftovers is free.
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)
PY
}

sha256_of() {
  printf '%s' "$1" | "$KEYGATE_VENV/bin/python" -c 'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())'
}

new_key() {
  "$KEYGATE_VENV/bin/python" -c 'import secrets, sys; print(sys.argv[1] + secrets.token_urlsafe(24))' "$1"
}

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

for p in $LISTEN_PORT $ADMIN_PORT $BACKEND_PORT $CP_PORT; do
  port_free "$p" || die "127.0.0.1:$p is already in use (another demo running?)"
done

step "render target/demo/envoy.yaml with two fresh demo keys"
ALPHA_KEY="$(new_key kg_alpha_)"
BETA_KEY="$(new_key kg_beta_)"
mkdir -p "$DEMO_DIR"
sed -e "s/__DEMO_ALPHA_SHA256__/$(sha256_of "$ALPHA_KEY")/" \
    -e "s/__DEMO_BETA_SHA256__/$(sha256_of "$BETA_KEY")/" \
    envoy/envoy.yaml >"$DEMO_DIR/envoy.yaml"
if grep -q '__DEMO_' "$DEMO_DIR/envoy.yaml"; then die "placeholder left in $DEMO_DIR/envoy.yaml"; fi

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

cat <<EOF

Demo keys (generated for this run; Envoy only knows their SHA-256):
  demo-alpha  $ALPHA_KEY   (default limit: 5/s, burst 10)
  demo-beta   $BETA_KEY   (own limit: 0.2/s, burst 2)

# 200: a valid key. The backend echoes what it got: x-api-key-id: demo-alpha, no x-api-key.
curl -i $URL/hello -H 'x-api-key: $ALPHA_KEY'
curl -i $URL/hello -H 'Authorization: Bearer $ALPHA_KEY'

# 401 missing_api_key: no key at all
curl -i $URL/hello

# 401 invalid_api_key: a key that is not in the list
curl -i $URL/hello -H 'x-api-key: kg_not_a_real_key_123'

# 429 rate_limited: demo-beta allows 2 at once, then one every 5 s
for i in 1 2 3; do curl -s -o /dev/null -w '%{http_code}\\n' $URL/hello -H 'x-api-key: $BETA_KEY'; done
curl -i $URL/hello -H 'x-api-key: $BETA_KEY'

# Control plane: keys.json is served by keygate serve and polled every second.
#   demo-cp     $CP_KEY   (created with the CLI at start-up)
curl -i $URL/hello -H 'x-api-key: $CP_KEY'
# Create a key (printed once), use it, revoke it, watch it get 401 within seconds:
KEY=\$(target/debug/keygate keys create --id my-app --file target/demo/keys.json)
sleep 2; curl -i $URL/hello -H "x-api-key: \$KEY"
target/debug/keygate keys list --file target/demo/keys.json
target/debug/keygate keys revoke my-app --file target/demo/keys.json
sleep 2; curl -i $URL/hello -H "x-api-key: \$KEY"

# keygate's counters
curl -s $ADMIN/stats | grep keygate
EOF

if [[ "$CHECK" != 1 ]]; then
  echo
  echo "Press Ctrl-C to stop Envoy and the backend."
  # Returns when Envoy exits or a signal arrives (the traps clean up).
  wait "$ENVOY_PID" || true
  echo "envoy exited; see target/demo/envoy.log" >&2
  exit 1
fi

# --check: run the commands above and verify the answers.
step "checking the demo"
FAILED=0
expect() { # description expected_status curl args...
  local what="$1" want="$2"
  shift 2
  local got
  got="$(curl -s -o "$DEMO_DIR/last_body" -D "$DEMO_DIR/last_headers" -w '%{http_code}' "$@")"
  if [[ "$got" == "$want" ]]; then
    printf '  ok    %-44s %s\n' "$what" "$got"
  else
    printf '  FAIL  %-44s got %s, want %s\n' "$what" "$got" "$want"
    cat "$DEMO_DIR/last_body"; echo
    FAILED=1
  fi
}
body_has() { grep -q -- "$1" "$DEMO_DIR/last_body" || { echo "  FAIL  body lacks $1"; FAILED=1; }; }
body_lacks() { if grep -q -- "$1" "$DEMO_DIR/last_body"; then echo "  FAIL  body contains $2"; FAILED=1; fi; }

expect "alpha via x-api-key" 200 "$URL/hello" -H "x-api-key: $ALPHA_KEY"
body_has '"x-api-key-id": "demo-alpha"'
body_lacks "$ALPHA_KEY" "the key (credential not stripped)"
expect "alpha via Authorization: Bearer" 200 "$URL/hello" -H "Authorization: Bearer $ALPHA_KEY"
expect "no key -> missing_api_key" 401 "$URL/hello"
body_has '"error":"missing_api_key"'
expect "unknown key -> invalid_api_key" 401 "$URL/hello" -H 'x-api-key: kg_not_a_real_key_123'
body_has '"error":"invalid_api_key"'
expect "underscore header -> rejected by Envoy" 400 "$URL/hello" -H "x-api-key: $ALPHA_KEY" -H 'x_api_key_id: evil'
expect "beta #1" 200 "$URL/hello" -H "x-api-key: $BETA_KEY"
expect "beta #2" 200 "$URL/hello" -H "x-api-key: $BETA_KEY"
expect "beta #3 -> rate_limited" 429 "$URL/hello" -H "x-api-key: $BETA_KEY"
body_has '"error":"rate_limited"'
grep -i '^\(retry-after\|ratelimit\)' "$DEMO_DIR/last_headers" | sed 's/^/        /'
grep -qi '^ratelimit-policy: "default";q=2;w=10' "$DEMO_DIR/last_headers" \
  || { echo "  FAIL  ratelimit-policy header"; FAILED=1; }
wait_status() { # want key timeout_s
  local deadline=$((SECONDS + $3))
  until [[ "$(curl -s -o /dev/null -w '%{http_code}' "$URL/hello" -H "x-api-key: $2")" == "$1" ]]; do
    ((SECONDS < deadline)) || return 1
    sleep 0.2
  done
}
wait_status 200 "$CP_KEY" 5 || true  # the first poll runs within a second of start-up
expect "control-plane key demo-cp" 200 "$URL/hello" -H "x-api-key: $CP_KEY"
body_has '"x-api-key-id": "demo-cp"'
NEW_KEY="$("$KEYGATE" keys create --id my-app --file "$DEMO_DIR/keys.json" 2>/dev/null)"
if wait_status 200 "$NEW_KEY" 5; then echo "  ok    new key created with the CLI -> 200"; else echo "  FAIL  new key never accepted"; FAILED=1; fi
"$KEYGATE" keys revoke my-app --file "$DEMO_DIR/keys.json" >/dev/null
T0=$SECONDS
if wait_status 401 "$NEW_KEY" 5; then echo "  ok    revoked with the CLI -> 401 within $((SECONDS - T0 + 1)) s"; else echo "  FAIL  revoked key still accepted"; FAILED=1; fi
echo "  stats:"
curl -s "$ADMIN/stats" | grep 'keygate\.' | sed 's/^/        /'
if grep -q -e "$ALPHA_KEY" -e "$BETA_KEY" -e "$CP_KEY" -e "$NEW_KEY" "$DEMO_DIR/envoy.log" "$DEMO_DIR/keys.json"; then
  echo "  FAIL  a demo key appears in target/demo/envoy.log"
  FAILED=1
fi

if [[ "$FAILED" != 0 ]]; then
  die "demo check failed"
fi
step "demo check passed"
