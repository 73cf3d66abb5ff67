#!/usr/bin/env bash
# keygate: fuzz keygate-core with cargo-fuzz (libFuzzer), every target in turn.
#
#   bash scripts/fuzz.sh [SECONDS]      # SECONDS per target, default 30
#
# Installs cargo-fuzz (crates.io, pinned) into target/cargo-fuzz/ when it is
# missing, builds the targets of fuzz/ (a crate with its own workspace, so the
# main workspace and CI never build it) and runs each for SECONDS, one at a
# time, in one process (-jobs=1 -workers=1). Prints each target's executions
# and exits non-zero when a target crashes; the input that crashed is in
# target/fuzz/artifacts/<target>/. To replay one:
#   target/cargo-fuzz/bin/cargo-fuzz run -O -a -s none --target-dir target/fuzz <target> <file>
#
# Toolchain: the project's stable one (rust-toolchain.toml). The targets are
# built without a sanitizer (-s none): keygate-core has no unsafe code, and
# with AddressSanitizer a target runs about a third as many inputs a second.
# Built so, cargo-fuzz 0.13 passes rustc only stable flags (SanitizerCoverage
# through -Cpasses and -Cllvm-args) and no RUSTC_BOOTSTRAP is needed. A
# sanitizer (KEYGATE_FUZZ_SANITIZER=address) adds -Zsanitizer, which stable
# rustc refuses ("the option `Z` is only accepted on the nightly compiler"):
# the script then sets RUSTC_BOOTSTRAP=1, which lets stable rustc take it
# (only then, since it also turns on nightly-only code in some crates).
# Overflow checks and debug assertions stay on (-a): an overflow is a crash.
#
# Seeds: fuzz/corpus/<target>/ (checked in, read only). What a run finds
# grows target/fuzz/corpus/<target>/, kept for the next run.
#
# Targets:
#   headers    credential extraction and Policy::decide on any header map
#   config     Policy::from_json on any bytes and on built JSON
#   keylist    control-plane key lists in pages (KeyListPages::add, finish)
#   json_body  JSON-body attribute reads and Policy::decide_body
#   ratelimit  take, take_shared, take_shared_all: no panic, no over-admission
#
# Environment:
#   KEYGATE_FUZZ_TARGETS     targets to run, space-separated (default: all)
#   KEYGATE_FUZZ_SANITIZER   none (default), address, leak, memory or thread

set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DURATION="${1:-30}"
CARGO_FUZZ_VERSION="0.13.2"
TARGETS="${KEYGATE_FUZZ_TARGETS:-headers config keylist json_body ratelimit}"
OUT="$ROOT/target/fuzz"

if ! [[ "$DURATION" =~ ^[0-9]+$ ]] || [ "$DURATION" -lt 1 ]; then
    echo "usage: scripts/fuzz.sh [SECONDS]  (SECONDS per target, a whole number)" >&2
    exit 2
fi

cd "$ROOT"
export PATH="$ROOT/target/cargo-fuzz/bin:$PATH"
if ! cargo fuzz --version 2>/dev/null | grep -q "$CARGO_FUZZ_VERSION"; then
    echo "== installing cargo-fuzz $CARGO_FUZZ_VERSION into target/cargo-fuzz/"
    cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked \
        --root "$ROOT/target/cargo-fuzz"
fi

SANITIZER="${KEYGATE_FUZZ_SANITIZER:-none}"
if [ "$SANITIZER" != none ]; then
    export RUSTC_BOOTSTRAP=1
    OUT="$OUT-$SANITIZER"
fi
FUZZ_FLAGS=(-O -a -s "$SANITIZER" --target-dir "$OUT")

echo "== building the fuzz targets"
cargo fuzz build "${FUZZ_FLAGS[@]}"

failed=()
summary=()
for t in $TARGETS; do
    mkdir -p "$OUT/corpus/$t" "$OUT/artifacts/$t" "$OUT/logs/$t"
    log="$OUT/logs/$t/run.log"
    echo "== $t: ${DURATION}s"
    # With -jobs, libFuzzer runs the fuzzing in a child that logs to
    # fuzz-0.log in the working directory: run from the target's log folder.
    status=0
    (cd "$OUT/logs/$t" && rm -f fuzz-0.log &&
        cargo fuzz run --fuzz-dir "$ROOT/fuzz" "${FUZZ_FLAGS[@]}" "$t" \
            "$OUT/corpus/$t" "$ROOT/fuzz/corpus/$t" -- \
            -max_total_time="$DURATION" -jobs=1 -workers=1 \
            -artifact_prefix="$OUT/artifacts/$t/" -print_final_stats=1 \
            >"$log" 2>&1) || status=$?
    child="$OUT/logs/$t/fuzz-0.log"
    [ -f "$child" ] && cat "$child" >>"$log"
    execs="$(grep -o 'stat::number_of_executed_units: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*$' || true)"
    crashed="$(grep -lE '^==[0-9]+== ERROR: libFuzzer|panicked at|^SUMMARY: libFuzzer' "$log" || true)"
    if [ "$status" -ne 0 ] || [ -n "$crashed" ]; then
        failed+=("$t")
        summary+=("$t: CRASH after ${execs:-?} execs (log: $log)")
        grep -E 'panicked at|ERROR: libFuzzer|Test unit written to' -A3 "$log" | head -20 >&2 || true
    else
        summary+=("$t: ${execs:-?} execs in ${DURATION}s, no crash")
    fi
done

echo "== summary"
printf '%s\n' "${summary[@]}"
if [ "${#failed[@]}" -gt 0 ]; then
    echo "crashed: ${failed[*]}" >&2
    exit 1
fi
