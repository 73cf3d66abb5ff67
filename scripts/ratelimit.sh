#!/usr/bin/env bash
# keygate-ratelimit (ratelimit/, a Cargo workspace of its own): runs cargo on
# it, after preparing the limitador it is built with.
#
#   bash scripts/ratelimit.sh build [--release]   # target/{debug,release}/keygate-ratelimit
#   bash scripts/ratelimit.sh test
#   bash scripts/ratelimit.sh clippy --all-targets -- -D warnings
#   bash scripts/ratelimit.sh fmt -- --check
#
# That is `cargo SUBCOMMAND --manifest-path ratelimit/Cargo.toml ARGS...` from
# the repository root with the root target/ as target directory: the binary
# lands where tests/e2e and scripts/fleet_limits.py look for it, and the
# dependencies compiled for it stay cached there.
#
# limitador: ratelimit/Cargo.toml takes it from target/limitador-0.14.0-redis
# ([patch.crates-io]): limitador 0.14.0 as published on crates.io with our
# patch ratelimit/limitador-redis-storage.patch (two #[cfg] lines; the patch
# says why). ensure_limitador makes that directory when it is missing or was
# made from another patch: it takes limitador-0.14.0.crate from cargo's
# registry cache (first `cargo fetch`ing it through a throwaway manifest under
# target/ when it is not there), checks the file's SHA-256 against crates.io's,
# pinned below, unpacks it into a temporary directory, applies the patch and
# renames the result into place. Needs `patch` (Debian: apt-get install patch).
#
# scripts/test.sh sources this file; run as a script it executes cargo.

set -euo pipefail

KEYGATE_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LIMITADOR_VERSION=0.14.0
# crates.io's SHA-256 of limitador-0.14.0.crate (the "cksum" of its index
# entry, the "checksum" a Cargo.lock records for it).
LIMITADOR_SHA256=77e33de992fdc347850a81f1ed242cc702900a9651a2b5d044d153a2db5e2d1a
LIMITADOR_PATCH="$KEYGATE_ROOT/ratelimit/limitador-redis-storage.patch"
# The [patch.crates-io] path of ratelimit/Cargo.toml.
LIMITADOR_DIR="$KEYGATE_ROOT/target/limitador-$LIMITADOR_VERSION-redis"

ratelimit_die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# limitador_cached_crate: prints the path of a limitador .crate in cargo's
# registry cache that has crates.io's SHA-256; fails when there is none (and
# says so of any other).
limitador_cached_crate() {
  local f sum
  for f in "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/"limitador-$LIMITADOR_VERSION.crate"; do
    [[ -f "$f" ]] || continue
    sum="$(sha256sum "$f" | cut -d' ' -f1)"
    if [[ "$sum" == "$LIMITADOR_SHA256" ]]; then
      printf '%s\n' "$f"
      return 0
    fi
    printf 'warning: %s has SHA-256 %s, not crates.io'"'"'s %s: not used (remove it)\n' \
      "$f" "$sum" "$LIMITADOR_SHA256" >&2
  done
  return 1
}

# limitador_fetch: gets limitador's .crate into cargo's registry cache through
# cargo itself (which checks it against the crates.io index), and checks that
# the index's checksum is the one pinned here.
limitador_fetch() {
  local dir="$KEYGATE_ROOT/target/limitador-fetch" sum
  mkdir -p "$dir"
  cat >"$dir/Cargo.toml" <<EOF
# Throwaway manifest of scripts/ratelimit.sh: only to fetch limitador.
[package]
name = "limitador-fetch"
version = "0.0.0"
edition = "2021"
publish = false

[lib]
path = "lib.rs"

[dependencies]
limitador = { version = "=$LIMITADOR_VERSION", default-features = false }

[workspace]
EOF
  : >"$dir/lib.rs"
  # Starting from keygate-ratelimit's lock keeps limitador's dependencies at
  # the versions cargo's cache already holds for it.
  [[ -f "$dir/Cargo.lock" ]] || cp "$KEYGATE_ROOT/ratelimit/Cargo.lock" "$dir/Cargo.lock"
  echo "fetching limitador $LIMITADOR_VERSION from crates.io (cargo fetch)" >&2
  (cd "$KEYGATE_ROOT" && cargo fetch -q --manifest-path "$dir/Cargo.toml")
  sum="$(awk '$0 == "name = \"limitador\"" { p = 1 } p && /^$/ { exit }
              p && /^checksum = / { gsub(/checksum = |"/, ""); print; exit }' "$dir/Cargo.lock")"
  [[ "$sum" == "$LIMITADOR_SHA256" ]] \
    || ratelimit_die "crates.io's checksum of limitador $LIMITADOR_VERSION is '$sum', not the pinned $LIMITADOR_SHA256"
}

# ensure_limitador: makes LIMITADOR_DIR (see the top of this file). Does
# nothing when it exists and was made from this crate and this patch.
ensure_limitador() {
  local stamp crate tmp old
  stamp="limitador $LIMITADOR_VERSION $LIMITADOR_SHA256 patch $(sha256sum <"$LIMITADOR_PATCH" | cut -d' ' -f1)"
  if [[ -f "$LIMITADOR_DIR/.keygate-patched" && "$(cat "$LIMITADOR_DIR/.keygate-patched")" == "$stamp" ]]; then
    return 0
  fi
  command -v patch >/dev/null || ratelimit_die "patch not found (Debian/Ubuntu: apt-get install patch)"
  if ! crate="$(limitador_cached_crate)"; then
    limitador_fetch
    crate="$(limitador_cached_crate)" \
      || ratelimit_die "no limitador-$LIMITADOR_VERSION.crate with crates.io's SHA-256 in cargo's registry cache"
  fi
  mkdir -p "$KEYGATE_ROOT/target"
  tmp="$(mktemp -d "$LIMITADOR_DIR.tmp.XXXXXX")"
  chmod 755 "$tmp"
  # --touch: files dated now, so that cargo rebuilds limitador from this copy.
  tar -xzf "$crate" -C "$tmp" --strip-components=1 --touch --no-same-owner
  grep -qx "version = \"$LIMITADOR_VERSION\"" "$tmp/Cargo.toml" \
    || { rm -rf "$tmp"; ratelimit_die "$crate does not hold limitador $LIMITADOR_VERSION"; }
  patch -p1 --batch --forward --quiet -d "$tmp" <"$LIMITADOR_PATCH" \
    || { rm -rf "$tmp"; ratelimit_die "$LIMITADOR_PATCH does not apply to limitador $LIMITADOR_VERSION"; }
  printf '%s\n' "$stamp" >"$tmp/.keygate-patched"
  if [[ -e "$LIMITADOR_DIR" ]]; then
    old="$(mktemp -d "$LIMITADOR_DIR.old.XXXXXX")"
    mv "$LIMITADOR_DIR" "$old/"
    rm -rf "$old"
  fi
  if ! mv -T "$tmp" "$LIMITADOR_DIR" 2>/dev/null; then
    # Another run put its copy there first: keep that one if it is this one.
    rm -rf "$tmp"
    [[ "$(cat "$LIMITADOR_DIR/.keygate-patched" 2>/dev/null)" == "$stamp" ]] \
      || ratelimit_die "could not rename the patched limitador to $LIMITADOR_DIR"
    return 0
  fi
  echo "limitador $LIMITADOR_VERSION from crates.io, patched with ${LIMITADOR_PATCH#"$KEYGATE_ROOT"/}: ${LIMITADOR_DIR#"$KEYGATE_ROOT"/}" >&2
}

# ratelimit_cargo SUBCOMMAND [ARGS...]: cargo on the ratelimit workspace, into
# the root target/.
ratelimit_cargo() {
  [[ $# -ge 1 ]] || ratelimit_die "usage: scripts/ratelimit.sh CARGO_SUBCOMMAND [ARGS...]"
  ensure_limitador
  (cd "$KEYGATE_ROOT" && CARGO_TARGET_DIR="$KEYGATE_ROOT/target" \
    cargo "$1" --manifest-path ratelimit/Cargo.toml "${@:2}")
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  ratelimit_cargo "$@"
fi
