"""Istio roll-out: the OCI image scripts/oci.sh builds and the manifests in
envoy/istio/.

The image is read back without umoci (the layout's JSON and blobs, and skopeo
as a registry client sees it), its plugin.wasm is loaded in real Envoy with
each manifest's keygate configuration, the manifests are validated against
Istio's CRD schemas (tests/e2e/schemas, see tests/istio-schemas) with
check-jsonschema, the EnvoyFilter's patches by `envoy --mode validate`, and
the keygate configurations with `keygate validate`.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import io
import json
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest
import yaml

import harness
from harness import REPO_ROOT, check_denial, new_key, sha256_hex, unique_path, xkey
from test_cli_control_plane import keygate_bin

ISTIO = REPO_ROOT / "envoy" / "istio"
WASMPLUGIN = ISTIO / "wasmplugin.yaml"
ENVOYFILTER = ISTIO / "envoyfilter-body-rules.yaml"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
LAYOUT = REPO_ROOT / "target" / "oci" / "keygate"
COMPAT_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def extension_config(doc: dict) -> dict:
    """The Wasm filter configuration of the EnvoyFilter's EXTENSION_CONFIG patch."""
    (patch,) = [p for p in doc["spec"]["configPatches"] if p["applyTo"] == "EXTENSION_CONFIG"]
    return patch["patch"]["value"]["typed_config"]


def plugin_configs() -> dict[str, dict]:
    """Each manifest's keygate configuration, as the JSON keygate is given."""
    envoyfilter = json.loads(extension_config(load(ENVOYFILTER))["config"]["configuration"]["value"])
    return {"wasmplugin": load(WASMPLUGIN)["spec"]["pluginConfig"], "envoyfilter": envoyfilter}


def image_digest_in(doc: dict) -> str:
    if doc["kind"] == "WasmPlugin":
        return doc["spec"]["sha256"]
    return extension_config(doc)["config"]["vm_config"]["code"]["remote"]["sha256"]


def blob(digest: str) -> bytes:
    """A blob of the layout, checked against its digest."""
    algo, _, hexdigest = digest.partition(":")
    assert algo == "sha256", digest
    data = (LAYOUT / "blobs" / "sha256" / hexdigest).read_bytes()
    assert hashlib.sha256(data).hexdigest() == hexdigest, f"blob {digest} does not match its digest"
    return data


# ---------------------------------------------------------------------------
# The image
# ---------------------------------------------------------------------------


def run_oci_sh() -> subprocess.CompletedProcess:
    """scripts/oci.sh on the keygate.wasm already built, comparing (not
    rewriting) the manifests' digests."""
    return subprocess.run(
        ["bash", str(REPO_ROOT / "scripts" / "oci.sh"), "--no-build", "--check"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=str(REPO_ROOT),
    )


@pytest.fixture(scope="module")
def oci_build(wasm: Path) -> str:
    """Runs scripts/oci.sh --no-build --check on the keygate.wasm under test;
    returns its output. Its status is judged by test_manifests_name_this_image."""
    out = run_oci_sh()
    text = out.stdout + out.stderr
    if not (LAYOUT / "index.json").exists():
        if re.search(r"(umoci|skopeo) not found: install it", text):
            pytest.skip("umoci/skopeo could not be installed from Debian's packages:\n" + text[-2000:])
        pytest.fail("scripts/oci.sh built no image:\n" + text[-4000:])
    return f"exit {out.returncode}\n{text}"


@pytest.fixture(scope="module")
def image(oci_build: str) -> dict[str, Any]:
    """The image read back from the layout: index, manifest, config, layer."""
    index = json.loads((LAYOUT / "index.json").read_text())
    assert json.loads((LAYOUT / "oci-layout").read_text())["imageLayoutVersion"] == "1.0.0"
    assert len(index["manifests"]) == 1, index
    desc = index["manifests"][0]
    assert desc["mediaType"] == MANIFEST_TYPE, desc
    raw = blob(desc["digest"])
    assert len(raw) == desc["size"], desc
    manifest = json.loads(raw)
    config = json.loads(blob(manifest["config"]["digest"]))
    return {
        "tag": desc["annotations"]["org.opencontainers.image.ref.name"],
        "digest": desc["digest"],
        "manifest": manifest,
        "config": config,
    }


@pytest.fixture(scope="module")
def plugin_wasm(image: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """plugin.wasm extracted from the image's only layer."""
    (layer,) = image["manifest"]["layers"]
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob(layer["digest"])))) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == ["plugin.wasm"], [m.name for m in members]
        assert members[0].isfile()
        data = tar.extractfile(members[0]).read()  # type: ignore[union-attr]
    path = tmp_path_factory.mktemp("oci") / "plugin.wasm"
    path.write_bytes(data)
    return path


def test_image_is_istios_compat_variant_with_one_layer(image: dict[str, Any], plugin_wasm: Path) -> None:
    manifest = image["manifest"]
    assert manifest["schemaVersion"] == 2
    assert len(manifest["layers"]) == 1, manifest
    assert manifest["layers"][0]["mediaType"] == COMPAT_LAYER
    # Istio's agent takes a tar+gzip layer as the compat variant, which this
    # annotation declares (the Wasm image specification, compat variant).
    assert manifest["annotations"]["module.wasm.image/variant"] == "compat"
    assert image["config"]["rootfs"]["diff_ids"] and len(image["config"]["rootfs"]["diff_ids"]) == 1
    assert plugin_wasm.read_bytes()[:4] == b"\0asm"


def test_plugin_wasm_is_the_module_under_test(plugin_wasm: Path, wasm: Path) -> None:
    assert plugin_wasm.read_bytes() == wasm.read_bytes()


def test_manifests_name_this_image(oci_build: str, image: dict[str, Any], plugin_wasm: Path) -> None:
    """The digests in the committed manifests are those of a fresh build: the
    image manifest's in `sha256` (what Istio checks for oci://), plugin.wasm's
    in the annotation. scripts/oci.sh rewrites them."""
    module = hashlib.sha256(plugin_wasm.read_bytes()).hexdigest()
    fix = "run `bash scripts/oci.sh` (it rewrites the digests) and commit envoy/istio/"
    for path in (WASMPLUGIN, ENVOYFILTER):
        doc = load(path)
        assert image_digest_in(doc) == image["digest"].removeprefix("sha256:"), f"{path.name}: stale image digest; {fix}"
        assert doc["metadata"]["annotations"]["keygate.dev/plugin-wasm-sha256"] == module, (
            f"{path.name}: stale plugin.wasm digest; {fix}"
        )
    assert oci_build.startswith("exit 0\n"), oci_build


def test_manifests_pull_the_image_they_pin(image: dict[str, Any]) -> None:
    wasmplugin = load(WASMPLUGIN)["spec"]
    remote = extension_config(load(ENVOYFILTER))["config"]["vm_config"]["code"]["remote"]
    for url in (wasmplugin["url"], remote["http_uri"]["uri"]):
        assert url.startswith("oci://") and url.endswith(f":{image['tag']}"), url


def test_image_digest_is_reproducible(oci_build: str, image: dict[str, Any]) -> None:
    """Rebuilding from the same keygate.wasm gives the same digest, so the
    committed digest is a function of the source, not of the build time."""
    out = run_oci_sh()
    assert f"image digest: {image['digest']}" in out.stdout, out.stdout + out.stderr


def test_skopeo_reads_the_image_as_a_registry_client(image: dict[str, Any], tmp_path: Path) -> None:
    """skopeo (the push tool in envoy/istio/README.md) sees the same manifest
    and digest, and a copy with --preserve-digests keeps the digest the
    manifests pin."""
    skopeo = shutil.which("skopeo")
    if skopeo is None:
        pytest.skip("skopeo not installed (scripts/oci.sh installs it with apt-get)")
    ref = f"oci:{LAYOUT}:{image['tag']}"
    raw = subprocess.run([skopeo, "inspect", "--raw", ref], capture_output=True, timeout=60, check=True).stdout
    assert "sha256:" + hashlib.sha256(raw).hexdigest() == image["digest"]
    digest = subprocess.run(
        [skopeo, "inspect", "--format", "{{.Digest}}", ref], capture_output=True, text=True, timeout=60, check=True
    ).stdout.strip()
    assert digest == image["digest"]
    copied = tmp_path / "copy"
    subprocess.run(
        [skopeo, "copy", "--preserve-digests", ref, f"oci:{copied}:{image['tag']}"],
        capture_output=True,
        timeout=120,
        check=True,
    )
    index = json.loads((copied / "index.json").read_text())
    assert [m["digest"] for m in index["manifests"]] == [image["digest"]]


# ---------------------------------------------------------------------------
# The extracted plugin.wasm in Envoy, with the manifests' configurations
# ---------------------------------------------------------------------------

LIVE = new_key("sk_live_")  # billing-service
TRIAL = new_key("sk_test_")  # partner-trial: burst 5
RETIRED = new_key("sk_live_")  # legacy-export: disabled
KEYS = {"billing-service": LIVE, "partner-trial": TRIAL, "legacy-export": RETIRED}
SECRETS = list(KEYS.values())


def with_test_keys(config: dict) -> dict:
    """The configuration with each key record's digest replaced by that of a
    key made for this run (the manifests hold digests of nobody's keys)."""
    config = copy.deepcopy(config)
    assert sorted(k["id"] for k in config["keys"]) == sorted(KEYS)
    for record in config["keys"]:
        record["sha256"] = sha256_hex(KEYS[record["id"]])
    return config


def envoyfilter_bootstrap(wasm_file: Path, config: dict) -> str:
    """A bootstrap whose only filter before the router is the EnvoyFilter's
    own Wasm configuration (allow_on_headers_stop_iteration and all), with the
    module Istio's agent would have fetched as a local file."""
    typed = copy.deepcopy(extension_config(load(ENVOYFILTER)))
    typed["config"]["vm_config"]["code"] = {"local": {"filename": str(wasm_file)}}
    typed["config"]["configuration"]["value"] = json.dumps(config)
    ports = {"listen_port": "{port}", "admin_port": "{admin_port}", "backend_port": "{backend_port}"}
    cfg = harness.bootstrap(http_filters=[{"name": "envoy.filters.http.wasm", "typed_config": typed}], **ports)
    text = json.dumps(cfg, indent=1)
    for placeholder in ports.values():  # numbers, once the harness fills them in
        text = text.replace(f'"{placeholder}"', placeholder)
    return text


@pytest.fixture(scope="module")
def wasmplugin_envoy(envoy_factory, plugin_wasm: Path) -> harness.Envoy:
    return envoy_factory(with_test_keys(plugin_configs()["wasmplugin"]), wasm=plugin_wasm, concurrency=2)


@pytest.fixture(scope="module")
def envoyfilter_envoy(envoy_factory, plugin_wasm: Path) -> harness.Envoy:
    text = envoyfilter_bootstrap(plugin_wasm, with_test_keys(plugin_configs()["envoyfilter"]))
    return envoy_factory(config_text=text, concurrency=2)


def orders(envoy: harness.Envoy, key: str | None, tenant: str = "acme", method: str = "GET", body: bytes = b""):
    headers = [("x-tenant", tenant)] if method in ("GET", "DELETE") else [("content-type", "application/json")]
    if key is not None:
        headers.append(xkey(key))
    return envoy.request(method, unique_path("v1/orders"), headers=headers, body=body)


@pytest.mark.parametrize("which", ["wasmplugin_envoy", "envoyfilter_envoy"])
def test_manifest_config_allows_denies_and_limits(which: str, request, backend: harness.Backend) -> None:
    envoy: harness.Envoy = request.getfixturevalue(which)
    assert envoy.request("GET", "/healthz").status == 200

    path = unique_path("v1/orders")
    r = envoy.request("GET", path, headers=[("x-tenant", "acme"), xkey(LIVE)])
    assert r.status == 200, r
    assert backend.only(path).values("x-api-key-id") == [b"billing-service"]
    assert backend.only(path).value("x-api-key") is None

    check_denial(orders(envoy, None), "missing_api_key", secrets_=SECRETS)
    check_denial(orders(envoy, RETIRED), "invalid_api_key", secrets_=SECRETS)
    check_denial(orders(envoy, LIVE, tenant="initech"), "not_attached", secrets_=SECRETS)
    check_denial(envoy.request("GET", "/admin/users", headers=[xkey(LIVE)]), "route_not_allowed")

    # partner-trial: a test key, read only, burst 5 at 0.5/s.
    # (the scope is checked before the rate limit: no token spent)
    check_denial(orders(envoy, TRIAL, method="DELETE", tenant="sandbox"), "insufficient_scope")
    codes = [orders(envoy, TRIAL, tenant="sandbox").status for _ in range(5)]
    assert codes == [200] * 5, codes
    # The bucket is empty now; on a slow machine a token may have refilled.
    replies = [orders(envoy, TRIAL, tenant="sandbox") for _ in range(3)]
    limited = [r for r in replies if r.status != 200]
    assert limited, [r.status for r in replies]
    check_denial(limited[0], "rate_limited", secrets_=SECRETS)
    assert envoy.counter("wasm.keygate.vm_reload") == 0


def test_envoyfilter_config_reads_json_bodies(envoyfilter_envoy: harness.Envoy, backend: harness.Backend) -> None:
    """What the EnvoyFilter is for: a JSON-body attachment rule, which needs
    allow_on_headers_stop_iteration, answered from the body."""
    path = unique_path("v1/orders")
    body = json.dumps({"tenant_id": "globex", "items": [{"sku": "A-1", "qty": 2}]}).encode()
    r = envoyfilter_envoy.request("POST", path, headers=[xkey(LIVE), ("content-type", "application/json")], body=body)
    assert r.status == 200, r
    assert backend.only(path).body == body
    other = json.dumps({"tenant_id": "initech"}).encode()
    check_denial(orders(envoyfilter_envoy, LIVE, method="POST", body=other), "not_attached")
    check_denial(orders(envoyfilter_envoy, LIVE, method="POST", body=b"{}"), "missing_attribute")


# ---------------------------------------------------------------------------
# Offline validation: Istio's CRD schemas, and keygate's own checks
# ---------------------------------------------------------------------------

SCHEMA_OF = {
    "WasmPlugin": SCHEMAS / "wasmplugins.extensions.istio.io-v1alpha1.json",
    "EnvoyFilter": SCHEMAS / "envoyfilters.networking.istio.io-v1alpha3.json",
}


def strict(schema: Any) -> Any:
    """The schema with every object that lists its properties closed to
    others (additionalProperties: false), unless it says otherwise, as
    `kubectl apply --validate=strict` refuses unknown fields. Free-form
    objects (pluginConfig, a patch's value) stay open."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


def check_jsonschema(schema: Path, *docs: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--schemafile", str(schema), *map(str, docs)],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def strict_schemas(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("schemas")
    paths = {}
    for kind, path in SCHEMA_OF.items():
        paths[kind] = out / path.name
        paths[kind].write_text(json.dumps(strict(json.loads(path.read_text()))))
    return paths


def test_schemas_say_where_they_come_from() -> None:
    for kind, path in SCHEMA_OF.items():
        comment = json.loads(path.read_text())["$comment"]
        assert comment.startswith(f"{kind} ") and "istio-api-rs 0.12.0" in comment and "Istio 1.27.0" in comment


@pytest.mark.parametrize("manifest", [WASMPLUGIN, ENVOYFILTER], ids=lambda p: p.name)
@pytest.mark.parametrize("mode", ["published", "strict"])
def test_manifest_matches_istio_schema(manifest: Path, mode: str, strict_schemas: dict[str, Path]) -> None:
    kind = load(manifest)["kind"]
    schema = SCHEMA_OF[kind] if mode == "published" else strict_schemas[kind]
    out = check_jsonschema(schema, manifest)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize(
    "mutate, fails_in",
    [
        (lambda d: d["spec"].update(failStrategy="FAIL_CLOSED"), "published"),  # Envoy's spelling, not Istio's
        (lambda d: d["spec"].update(phase="AUTHENTICATION"), "published"),
        (lambda d: d["spec"].update(priority="high"), "published"),
        (lambda d: d["spec"].update(imagePullPolicy="IfNotPresnt"), "published"),
        (lambda d: d["spec"].update(failstrategy="FAIL_CLOSE"), "strict"),  # a misspelt field
        (lambda d: d["spec"]["selector"].update(labels={"istio": "ingressgateway"}), "strict"),
    ],
    ids=["fail-closed-spelling", "phase", "priority-type", "pull-policy", "field-case", "selector-labels"],
)
def test_schema_refuses_a_broken_wasmplugin(mutate, fails_in: str, strict_schemas: dict[str, Path], tmp_path: Path) -> None:
    """The validation has teeth: each mistake is caught (the last two only in
    strict mode, as the API server would prune or, strict, refuse them)."""
    doc = load(WASMPLUGIN)
    mutate(doc)
    broken = tmp_path / "wasmplugin.yaml"
    broken.write_text(yaml.safe_dump(doc))
    assert check_jsonschema(strict_schemas["WasmPlugin"], broken).returncode == 1
    published = check_jsonschema(SCHEMA_OF["WasmPlugin"], broken)
    assert published.returncode == (1 if fails_in == "published" else 0), published.stdout


def test_schema_refuses_a_broken_envoyfilter(strict_schemas: dict[str, Path], tmp_path: Path) -> None:
    doc = load(ENVOYFILTER)
    doc["spec"]["configPatches"][1]["patch"]["operation"] = "PREPEND"
    broken = tmp_path / "envoyfilter.yaml"
    broken.write_text(yaml.safe_dump(doc))
    out = check_jsonschema(SCHEMA_OF["EnvoyFilter"], broken)
    assert out.returncode == 1 and "PREPEND" in out.stdout, out.stdout


def envoy_validates(cfg: dict, tmp_path: Path) -> subprocess.CompletedProcess:
    path = tmp_path / "bootstrap.json"
    path.write_text(json.dumps(cfg))
    cmd = [str(harness.envoy_binary()), "--mode", "validate", "-c", str(path), "-l", "error"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_envoyfilter_patches_are_envoy_configuration(tmp_path: Path) -> None:
    """What the EnvoyFilter hands Envoy, checked by Envoy itself (`--mode
    validate`): the Wasm configuration as written (remote code and all), and
    the HTTP filter that takes it from ECDS (under an ADS bootstrap)."""
    doc = load(ENVOYFILTER)
    (http_filter,) = [p["patch"]["value"] for p in doc["spec"]["configPatches"] if p["applyTo"] == "HTTP_FILTER"]
    wasm_filter = {"name": "keygate", "typed_config": extension_config(doc)}
    for filters in ([wasm_filter], [http_filter]):
        cfg = harness.bootstrap(10000, 9901, 18080, filters)
        cfg["node"] = {"id": "validate", "cluster": "validate"}
        cfg["dynamic_resources"] = {
            "ads_config": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": "backend"}}],
            }
        }
        out = envoy_validates(cfg, tmp_path)
        assert out.returncode == 0, out.stdout + out.stderr
    wasm_filter["typed_config"]["config"]["allow_on_headers_stop_iteration_"] = True  # a control: typos are caught
    out = envoy_validates(harness.bootstrap(10000, 9901, 18080, [wasm_filter]), tmp_path)
    assert out.returncode == 1 and "allow_on_headers_stop_iteration_" in out.stdout + out.stderr


@pytest.mark.parametrize("which", ["wasmplugin", "envoyfilter"])
def test_keygate_validate_accepts_the_plugin_config(which: str, tmp_path: Path) -> None:
    config = tmp_path / f"{which}.json"
    config.write_text(json.dumps(plugin_configs()[which]))
    out = subprocess.run(
        [str(keygate_bin()), "validate", "--kind", "config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok: 3 keys"


def test_keygate_validate_catches_a_bad_plugin_config(tmp_path: Path) -> None:
    config = copy.deepcopy(plugin_configs()["wasmplugin"])
    config["keys"][1]["sha256"] = TRIAL  # a plaintext key where its digest belongs
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(config))
    out = subprocess.run([str(keygate_bin()), "validate", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "keys[1].sha256" in out.stderr and TRIAL not in out.stderr + out.stdout, out.stderr
