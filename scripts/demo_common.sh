# keygate demo, the part shared by scripts/demo.sh (processes on this host)
# and scripts/compose-demo.sh (the same demo in Docker Compose): the demo keys,
# the rendered configuration, the curl lines printed for people, and --check.
# Sourced after scripts/test.sh (step, die, KEYGATE_VENV).
#
# The sourcing script sets, before demo_print_curls and demo_check:
#   URL, ADMIN         Envoy's listener and admin interface, as seen from here
#   TLS_URL, TLS_CA    Envoy's HTTPS listener and the CA its certificate is from
#   DEMO_DIR           a directory for the check's scratch files
#   DEMO_CLI           the keygate command as the printed lines spell it
#   DEMO_KEYS_FILE     the control plane's keys.json, as DEMO_CLI sees it
#   DEMO_REVOKE_WITHIN seconds a revoked key may still pass (default 5)
# and defines demo_cli ARGS..., which runs `keygate ARGS... --file <keys.json>`
# against the control plane's key list, and demo_logs, which prints every log
# that must never contain a key.

# demo_args ARGS...: the options both demos take. Sets CHECK (--check, or
# KEYGATE_DEMO_CHECK=1) and BUILD (0 with --no-build); --help prints the
# script's leading comment.
demo_args() {
  CHECK="${KEYGATE_DEMO_CHECK:-0}"
  BUILD=1
  local arg
  for arg in "$@"; do
    case "$arg" in
      --check) CHECK=1 ;;
      --no-build) BUILD=0 ;;
      -h | --help) awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"; exit 0 ;;
      *) die "unknown argument: $arg (try --help)" ;;
    esac
  done
}

# port_free PORT: nothing listens on 127.0.0.1:PORT.
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

# sha256_of KEY: the hex SHA-256 that goes into the configuration.
sha256_of() {
  printf '%s' "$1" | "$KEYGATE_VENV/bin/python" -c 'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())'
}

# new_key PREFIX: a fresh random demo key.
new_key() {
  "$KEYGATE_VENV/bin/python" -c 'import secrets, sys; print(sys.argv[1] + secrets.token_urlsafe(24))' "$1"
}

# demo_render_config OUT [sed args...]: envoy/envoy.yaml with two fresh demo
# keys (ALPHA_KEY, BETA_KEY, set here) replaced by their SHA-256, and the
# caller's own sed expressions applied. Fails if a placeholder is left.
demo_render_config() {
  local out="$1"
  shift
  ALPHA_KEY="$(new_key kg_alpha_)"
  BETA_KEY="$(new_key kg_beta_)"
  sed -e "s/__DEMO_ALPHA_SHA256__/$(sha256_of "$ALPHA_KEY")/" \
      -e "s/__DEMO_BETA_SHA256__/$(sha256_of "$BETA_KEY")/" \
      "$@" "$KEYGATE_ROOT/envoy/envoy.yaml" >"$out"
  if grep -q '__DEMO_' "$out"; then die "placeholder left in $out"; fi
}

# demo_make_tls DIR: a throwaway CA (ca.pem) and a server certificate for
# localhost and 127.0.0.1 signed by it (server.pem, server.key), valid for 7
# days, for the demo's HTTPS listener. Made fresh at each start with the
# openssl command; the CA's key is deleted once it has signed.
demo_make_tls() {
  local dir="$1"
  command -v openssl >/dev/null || die "openssl not found (Debian/Ubuntu: apt-get install openssl)"
  rm -rf "$dir"
  mkdir -p "$dir"
  (
    cd "$dir"
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out ca.key
    openssl req -x509 -new -key ca.key -out ca.pem -days 7 -subj "/CN=keygate demo CA" \
      -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign"
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out server.key
    openssl req -new -key server.key -out server.csr -subj "/CN=localhost"
    printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature" \
      "extendedKeyUsage=serverAuth" "subjectAltName=DNS:localhost,IP:127.0.0.1" >server.ext
    openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem \
      -days 7 -extfile server.ext
    rm -f ca.key ca.srl server.csr server.ext
  ) >/dev/null 2>&1 || die "could not make the demo's TLS certificate in $dir"
}

# demo_print_curls: the ready-to-paste lines, with this run's keys.
demo_print_curls() {
  cat <<EOF

Demo keys (generated for this run; Envoy only knows their SHA-256):
  demo-alpha  $ALPHA_KEY   (default limit: 5/s, burst 10)
  demo-beta   $BETA_KEY   (own limit: 0.2/s, burst 2)

# 200: a valid key. The backend echoes what it got: x-api-key-id: demo-alpha, no x-api-key.
curl -i $URL/hello -H 'x-api-key: $ALPHA_KEY'
curl -i $URL/hello -H 'Authorization: Bearer $ALPHA_KEY'

# 200 over HTTPS (TLS 1.2 or newer), trusting this run's demo CA
curl -i --cacert $TLS_CA $TLS_URL/hello -H 'x-api-key: $ALPHA_KEY'

# 401 missing_api_key: no key at all
curl -i $URL/hello

# 401 invalid_api_key: a key that is not in the list
curl -i $URL/hello -H 'x-api-key: kg_not_a_real_key_123'

# 403 insufficient_scope: /admin needs the scope "admin", which demo-alpha lacks
curl -i $URL/admin/users -H 'x-api-key: $ALPHA_KEY'

# 429 rate_limited: demo-beta allows 2 at once, then one every 5 s
for i in 1 2 3; do curl -s -o /dev/null -w '%{http_code}\\n' $URL/hello -H 'x-api-key: $BETA_KEY'; done
curl -i $URL/hello -H 'x-api-key: $BETA_KEY'

# Control plane: keys.json is served by keygate serve and polled every second.
#   demo-cp     $CP_KEY   (created with the CLI at start-up)
curl -i $URL/hello -H 'x-api-key: $CP_KEY'
# Create a key (printed once), use it, revoke it, watch it get 401 within seconds:
KEY=\$($DEMO_CLI keys create --id my-app --file $DEMO_KEYS_FILE)
sleep 2; curl -i $URL/hello -H "x-api-key: \$KEY"
$DEMO_CLI keys list --file $DEMO_KEYS_FILE
$DEMO_CLI keys revoke my-app --file $DEMO_KEYS_FILE
sleep 2; curl -i $URL/hello -H "x-api-key: \$KEY"

# keygate's counters
curl -s $ADMIN/stats | grep keygate
EOF
}

# demo_check: runs the lines above and checks every answer; dies if one differs.
demo_check() {
  step "checking the demo"
  FAILED=0
  expect "alpha via x-api-key" 200 "$URL/hello" -H "x-api-key: $ALPHA_KEY"
  body_has '"x-api-key-id": "demo-alpha"'
  body_lacks "$ALPHA_KEY" "the key (credential not stripped)"
  expect "alpha via Authorization: Bearer" 200 "$URL/hello" -H "Authorization: Bearer $ALPHA_KEY"
  expect "alpha over HTTPS (TLS 1.2+)" 200 "$TLS_URL/hello" --cacert "$TLS_CA" --tlsv1.2 -H "x-api-key: $ALPHA_KEY"
  body_has '"x-api-key-id": "demo-alpha"'
  expect "no key over HTTPS -> missing_api_key" 401 "$TLS_URL/hello" --cacert "$TLS_CA"
  expect "no key -> missing_api_key" 401 "$URL/hello"
  body_has '"error":"missing_api_key"'
  expect "unknown key -> invalid_api_key" 401 "$URL/hello" -H 'x-api-key: kg_not_a_real_key_123'
  body_has '"error":"invalid_api_key"'
  expect "alpha on /admin -> insufficient_scope" 403 "$URL/admin/users" -H "x-api-key: $ALPHA_KEY"
  body_has '"error":"insufficient_scope"'
  expect "underscore header -> rejected by Envoy" 400 "$URL/hello" -H "x-api-key: $ALPHA_KEY" -H 'x_api_key_id: evil'
  expect "beta #1" 200 "$URL/hello" -H "x-api-key: $BETA_KEY"
  expect "beta #2" 200 "$URL/hello" -H "x-api-key: $BETA_KEY"
  expect "beta #3 -> rate_limited" 429 "$URL/hello" -H "x-api-key: $BETA_KEY"
  body_has '"error":"rate_limited"'
  grep -i '^\(retry-after\|ratelimit\)' "$DEMO_DIR/last_headers" | sed 's/^/        /'
  grep -qi '^ratelimit-policy: "default";q=2;w=10' "$DEMO_DIR/last_headers" \
    || { echo "  FAIL  ratelimit-policy header"; FAILED=1; }
  wait_status 200 "$CP_KEY" 5 || true # the first poll runs within a second of start-up
  expect "control-plane key demo-cp" 200 "$URL/hello" -H "x-api-key: $CP_KEY"
  body_has '"x-api-key-id": "demo-cp"'
  NEW_KEY="$(demo_cli keys create --id my-app 2>/dev/null)" || true
  [[ -n "$NEW_KEY" ]] || { echo "  FAIL  keys create printed no key"; FAILED=1; NEW_KEY=kg_none; }
  if wait_status 200 "$NEW_KEY" 5; then echo "  ok    new key created with the CLI -> 200"; else echo "  FAIL  new key never accepted"; FAILED=1; fi
  local t_cmd t0 ms cmd_ms within="${DEMO_REVOKE_WITHIN:-5}"
  t_cmd="$(now_ms)"
  demo_cli keys revoke my-app >/dev/null || { echo "  FAIL  keys revoke"; FAILED=1; }
  # The limit counts from when the command returned; how long the command
  # itself took (docker-compose exec adds about a second) is shown beside it.
  t0="$(now_ms)"
  cmd_ms=$((t0 - t_cmd))
  if wait_status 401 "$NEW_KEY" "$within"; then
    ms=$(($(now_ms) - t0))
    printf '  ok    revoked with the CLI -> 401 %d.%d s after it returned (limit %s s; the command took %d.%d s)\n' \
      $((ms / 1000)) $((ms % 1000 / 100)) "$within" $((cmd_ms / 1000)) $((cmd_ms % 1000 / 100))
  else
    echo "  FAIL  revoked key still accepted after $within s"
    FAILED=1
  fi
  echo "  stats:"
  curl -s "$ADMIN/stats" | grep 'keygate\.' | sed 's/^/        /'
  if demo_logs | grep -q -e "$ALPHA_KEY" -e "$BETA_KEY" -e "$CP_KEY" -e "$NEW_KEY"; then
    echo "  FAIL  a demo key appears in a log or in keys.json"
    FAILED=1
  fi
  [[ "$FAILED" == 0 ]] || die "demo check failed"
  step "demo check passed"
}

expect() { # description expected_status curl args...
  local what="$1" want="$2"
  shift 2
  local got
  got="$(curl -s -m 5 -o "$DEMO_DIR/last_body" -D "$DEMO_DIR/last_headers" -w '%{http_code}' "$@")"
  if [[ "$got" == "$want" ]]; then
    printf '  ok    %-44s %s\n' "$what" "$got"
  else
    printf '  FAIL  %-44s got %s, want %s\n' "$what" "$got" "$want"
    cat "$DEMO_DIR/last_body"
    echo
    FAILED=1
  fi
}
body_has() { grep -q -- "$1" "$DEMO_DIR/last_body" || { echo "  FAIL  body lacks $1"; FAILED=1; }; }
body_lacks() { if grep -q -- "$1" "$DEMO_DIR/last_body"; then echo "  FAIL  body contains $2"; FAILED=1; fi; }

now_ms() { local us="${EPOCHREALTIME//[!0-9]/}"; echo $((us / 1000)); }

wait_status() { # want key timeout_s
  local deadline=$(($(now_ms) + $3 * 1000))
  until [[ "$(curl -s -m 2 -o /dev/null -w '%{http_code}' "$URL/hello" -H "x-api-key: $2")" == "$1" ]]; do
    (($(now_ms) < deadline)) || return 1
    sleep 0.1
  done
}
