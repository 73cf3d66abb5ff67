"""The annotated demo configuration (envoy/envoy.yaml) as shipped: rendered
the way scripts/demo.sh renders it, but on free ports, with a certificate made
by the demo's own script function (scripts/demo_common.sh, demo_make_tls)."""

from __future__ import annotations

import http.client
import re
import ssl
import subprocess
from pathlib import Path

import pytest

from harness import REPO_ROOT, Envoy, free_ports, new_key, sha256_hex, unique_path, wasm_path, xkey

ALPHA = new_key("kg_alpha_")
BETA = new_key("kg_beta_")


def make_demo_tls(dir: Path) -> None:
    """The demo's CA and server certificate, made as scripts/demo.sh makes them."""
    script = f'source "{REPO_ROOT}/scripts/test.sh"; source "{REPO_ROOT}/scripts/demo_common.sh"; demo_make_tls "$1"'
    out = subprocess.run(["bash", "-c", script, "demo_make_tls", str(dir)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert {"ca.pem", "server.pem", "server.key"} <= {p.name for p in dir.iterdir()}, list(dir.iterdir())


def render_demo_config(tls_dir: Path, tls_port: int) -> str:
    text = (REPO_ROOT / "envoy" / "envoy.yaml").read_text()
    for placeholder in ("__DEMO_ALPHA_SHA256__", "__DEMO_BETA_SHA256__"):
        assert placeholder in text, placeholder
    text = text.replace("__DEMO_ALPHA_SHA256__", sha256_hex(ALPHA))
    text = text.replace("__DEMO_BETA_SHA256__", sha256_hex(BETA))
    # The demo's fixed ports become the harness's free ones.
    for fixed, field in (
        ("10000", "{port}"),
        ("10443", str(tls_port)),
        ("9901", "{admin_port}"),
        ("18080", "{backend_port}"),
    ):
        text, n = re.subn(rf"port_value: {fixed}\b", f"port_value: {field}", text)
        assert n == 1, f"expected one port_value: {fixed} in envoy/envoy.yaml"
    rel = "target/wasm32-wasip1/release/keygate.wasm"
    assert f"filename: {rel}" in text
    # Envoy runs from the repository root, as in demo.sh; honour KEYGATE_WASM.
    text = text.replace(f"filename: {rel}", f"filename: {wasm_path()}")
    assert text.count("filename: target/demo/tls/") == 2
    return text.replace("filename: target/demo/tls/", f"filename: {tls_dir}/")


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory) -> Path:
    dir = tmp_path_factory.mktemp("demo-tls") / "tls"
    make_demo_tls(dir)
    return dir


@pytest.fixture(scope="module")
def tls_port() -> int:
    return free_ports(1)[0]


@pytest.fixture(scope="module")
def demo(envoy_factory, tls_dir, tls_port) -> Envoy:
    return envoy_factory(config_text=render_demo_config(tls_dir, tls_port), concurrency=2)


def https_get(port: int, path: str, headers: dict[str, str], context: ssl.SSLContext) -> tuple[int, bytes, str]:
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
    try:
        conn.request("GET", path, headers=headers)
        r = conn.getresponse()
        return r.status, r.read(), conn.sock.version() if conn.sock else ""
    finally:
        conn.close()


def test_demo_https_listener(demo, backend, tls_dir, tls_port):
    """The HTTPS listener runs the same keygate policy; its certificate is the
    one the demo made, for 127.0.0.1, from the demo CA."""
    ctx = ssl.create_default_context(cafile=str(tls_dir / "ca.pem"))
    p = unique_path()
    status, _, version = https_get(tls_port, p, {"x-api-key": ALPHA, "x-api-key-id": "evil"}, ctx)
    assert status == 200
    assert version in ("TLSv1.2", "TLSv1.3")
    seen = backend.only(p)
    assert seen.values("x-api-key-id") == [b"demo-alpha"]
    assert seen.values("x-api-key") == []
    status, body, _ = https_get(tls_port, unique_path(), {}, ctx)
    assert status == 401 and b"missing_api_key" in body
    # A client that does not trust the demo CA refuses the certificate.
    with pytest.raises(ssl.SSLCertVerificationError):
        https_get(tls_port, unique_path(), {}, ssl.create_default_context())


def test_demo_https_refuses_tls_1_1(demo, tls_dir, tls_port):
    """TLS 1.0 and 1.1 are refused by Envoy (tls_minimum_protocol_version), not
    merely by this client: the client is allowed to offer 1.1 and nothing newer."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(tls_dir / "ca.pem"))
    try:
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        ctx.minimum_version = ssl.TLSVersion.TLSv1_1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    except (ValueError, ssl.SSLError) as e:
        pytest.skip(f"this Python's OpenSSL cannot offer TLS 1.1: {e}")
    with pytest.raises(ssl.SSLError) as refused:
        https_get(tls_port, unique_path(), {"x-api-key": ALPHA}, ctx)
    # Envoy's alert says why: the version (not, say, a cipher both lack).
    assert "PROTOCOL_VERSION" in str(refused.value), refused.value
    # The same client allowed up to TLS 1.2 gets through: the refusal above is the version.
    ctx12 = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx12.load_verify_locations(cafile=str(tls_dir / "ca.pem"))
    ctx12.set_ciphers("DEFAULT:@SECLEVEL=0")
    ctx12.minimum_version = ssl.TLSVersion.TLSv1_1
    ctx12.maximum_version = ssl.TLSVersion.TLSv1_2
    status, _, version = https_get(tls_port, unique_path(), {"x-api-key": ALPHA}, ctx12)
    assert (status, version) == (200, "TLSv1.2")


def test_demo_config_mentions_what_it_must():
    text = (REPO_ROOT / "envoy" / "envoy.yaml").read_text()
    assert "failure_policy: FAIL_RELOAD" in text
    assert "FAIL_OPEN" in text  # the comment explaining why not
    assert "headers_with_underscores_action: REJECT_REQUEST" in text
    assert "name: demo_backend" in text


def test_demo_alpha(demo, backend):
    p = unique_path()
    r = demo.request("GET", p, [xkey(ALPHA), ("x-api-key-id", "evil")])
    assert r.status == 200, r
    seen = backend.only(p)
    assert seen.values("x-api-key-id") == [b"demo-alpha"]
    assert seen.values("x-api-key") == []


def test_demo_bearer_and_401s(demo, backend):
    p = unique_path()
    assert demo.request("GET", p, [("authorization", f"Bearer {ALPHA}")]).status == 200
    r = demo.request("GET", unique_path(), [])
    assert r.status == 401 and r.json()["error"] == "missing_api_key"
    assert r.header("www-authenticate") == 'Bearer realm="keygate-demo"'
    r = demo.request("GET", unique_path(), [xkey("kg_not_a_real_key_123")])
    assert r.status == 401 and r.json()["error"] == "invalid_api_key"


def test_demo_beta_rate_limit(demo):
    got = [demo.request("GET", unique_path(), [xkey(BETA)]) for _ in range(3)]
    assert [r.status for r in got] == [200, 200, 429], got
    r = got[2]
    assert r.json()["error"] == "rate_limited"
    assert r.header("ratelimit-policy") == '"default";q=2;w=10'
    assert r.header("retry-after") == "5"
    assert r.header("ratelimit") == '"default";r=0;t=5'


def test_demo_alpha_default_limit(demo):
    """demo-alpha has the default limit, 5/s with a burst of 10."""
    with demo.connect() as c:
        statuses = [c.request("GET", unique_path(), [xkey(ALPHA)]).status for _ in range(14)]
    # Up to 2 were used by the tests above; a few more may have refilled.
    assert statuses.count(429) >= 1, statuses
    assert statuses[0] == 200


def test_demo_rejects_underscore_headers(demo, backend):
    p = unique_path()
    r = demo.request("GET", p, [xkey(ALPHA), ("x_api_key_id", "evil")])
    assert r.status == 400, r
    assert not backend.saw(p)


def test_demo_admin_needs_scope(demo, backend):
    """The demo's one rule: /admin needs the scope "admin", which no demo key holds."""
    p = unique_path("admin")
    r = demo.request("GET", p, [xkey(ALPHA)])
    assert r.status == 403, r
    assert r.json()["error"] == "insufficient_scope"
    assert not backend.saw(p)
