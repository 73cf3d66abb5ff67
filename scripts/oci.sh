#!/usr/bin/env bash
# keygate as an OCI image for Istio's WasmPlugin, built without a container
# daemon or a registry.
#
#   bash scripts/oci.sh            # build keygate.wasm, the image, and update envoy/istio/*.yaml
#   bash scripts/oci.sh --no-build # use the keygate.wasm already built
#   bash scripts/oci.sh --check    # build the image, fail if envoy/istio/*.yaml name another digest
#
# The image is an OCI image layout in target/oci/keygate (tag: the crate
# version), in the "compat" variant of the Wasm image specification that
# Istio's agent pulls: one application/vnd.oci.image.layer.v1.tar+gzip layer
# holding plugin.wasm, and the manifest annotation
# module.wasm.image/variant=compat. umoci (from Debian) writes the layout
# and compresses the layer; GNU tar makes the layer's archive. Every time
# stamp is SOURCE_DATE_EPOCH (default 0) and owners are 0:0, so the same
# keygate.wasm always gives the same image digest.
#
# Istio verifies a WasmPlugin's `sha256` against the digest of the image
# manifest for an oci:// url (against the module itself only for http(s)://),
# so that digest is what goes into `sha256` in envoy/istio/wasmplugin.yaml and
# envoy/istio/envoyfilter-body-rules.yaml; the module's own digest goes into
# their keygate.dev/plugin-wasm-sha256 annotation. Both are on lines marked
# `# oci.sh:` that this script rewrites (--check only compares).
#
# Push the layout to a registry with skopeo (see envoy/istio/README.md):
#   skopeo copy --preserve-digests oci:target/oci/keygate:<tag> docker://<registry>/keygate:<tag>

set -euo pipefail

# shellcheck source=scripts/test.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/test.sh"

BUILD=1
CHECK=0
for arg in "$@"; do
  case "$arg" in
    --no-build) BUILD=0 ;;
    --check) CHECK=1 ;;
    -h | --help) sed -n '2,26p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument: $arg (try --help)" ;;
  esac
done

OCI_DIR="$KEYGATE_ROOT/target/oci"
LAYOUT="$OCI_DIR/keygate"
TAG="$(sed -n 's/^version = "\(.*\)"/\1/p' "$KEYGATE_ROOT/Cargo.toml" | head -n 1)"
[[ -n "$TAG" ]] || die "no version in Cargo.toml"
EPOCH="${SOURCE_DATE_EPOCH:-0}"
CREATED="$(date -u -d "@$EPOCH" +%Y-%m-%dT%H:%M:%SZ)"
MANIFESTS=("$KEYGATE_ROOT/envoy/istio/wasmplugin.yaml" "$KEYGATE_ROOT/envoy/istio/envoyfilter-body-rules.yaml")

cd "$KEYGATE_ROOT"
ensure_apt_tools umoci umoci
ensure_apt_tools skopeo skopeo

if [[ "$BUILD" == 1 ]]; then
  ensure_rust
  ensure_binaryen
  step "build keygate.wasm (release)"
  build_wasm
fi
[[ -f "$KEYGATE_WASM" ]] || die "$KEYGATE_WASM not built (run without --no-build)"

step "OCI image layout $LAYOUT:$TAG"
rm -rf "$LAYOUT" "$OCI_DIR/stage"
mkdir -p "$OCI_DIR/stage"
cp "$KEYGATE_WASM" "$OCI_DIR/stage/plugin.wasm"
tar --format=ustar --sort=name --mtime="@$EPOCH" --owner=0 --group=0 --numeric-owner --mode=0644 \
  -cf "$OCI_DIR/stage/layer.tar" -C "$OCI_DIR/stage" plugin.wasm
umoci init --layout "$LAYOUT"
umoci new --image "$LAYOUT:$TAG"
umoci raw add-layer --image "$LAYOUT:$TAG" \
  --history.created "$CREATED" --history.created_by "scripts/oci.sh: plugin.wasm" \
  "$OCI_DIR/stage/layer.tar"
umoci config --image "$LAYOUT:$TAG" --no-history \
  --created "$CREATED" --architecture wasm --os wasip1 \
  --manifest.annotation module.wasm.image/variant=compat \
  --manifest.annotation org.opencontainers.image.title=keygate \
  --manifest.annotation "org.opencontainers.image.version=$TAG"
umoci gc --layout "$LAYOUT"
rm -rf "$OCI_DIR/stage"

# Read the digests back through skopeo, as a registry client would see them.
IMAGE_DIGEST="$(skopeo inspect --format '{{.Digest}}' "oci:$LAYOUT:$TAG")"
IMAGE_SHA256="${IMAGE_DIGEST#sha256:}"
WASM_SHA256="$(sha256sum "$KEYGATE_WASM" | cut -d' ' -f1)"
[[ "$IMAGE_SHA256" =~ ^[0-9a-f]{64}$ ]] || die "unexpected image digest: $IMAGE_DIGEST"

# set_digests FILE: rewrite the 64-hex digest on the lines marked for it.
set_digests() {
  sed -i -E \
    -e "/# oci.sh: image digest/ s/[0-9a-f]{64}/$IMAGE_SHA256/" \
    -e "/# oci.sh: plugin.wasm digest/ s/[0-9a-f]{64}/$WASM_SHA256/" "$1"
}

STALE=()
for f in "${MANIFESTS[@]}"; do
  grep -q '# oci.sh: image digest' "$f" || die "$f has no line marked '# oci.sh: image digest'"
  if [[ "$CHECK" == 1 ]]; then
    cp "$f" "$OCI_DIR/check.yaml"
    set_digests "$OCI_DIR/check.yaml"
    cmp -s "$f" "$OCI_DIR/check.yaml" || STALE+=("${f#"$KEYGATE_ROOT"/}")
    rm -f "$OCI_DIR/check.yaml"
  else
    set_digests "$f"
  fi
done

cat <<EOF
image:        oci:target/oci/keygate:$TAG
image digest: $IMAGE_DIGEST   (WasmPlugin sha256 for an oci:// url)
plugin.wasm:  sha256:$WASM_SHA256   ($(wc -c <"$KEYGATE_WASM" | tr -d ' ') bytes)
EOF
if ((${#STALE[@]})); then
  die "${STALE[*]}: digests differ from this build; run scripts/oci.sh and commit the result"
fi
if [[ "$CHECK" == 1 ]]; then
  echo "envoy/istio manifests name this image"
else
  echo "envoy/istio manifests updated (git diff envoy/istio shows any change)"
fi
