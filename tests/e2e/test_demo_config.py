"""The annotated demo configuration (envoy/envoy.yaml) as shipped: rendered
the way scripts/demo.sh renders it, but on free ports."""

from __future__ import annotations

import re

import pytest

from harness import REPO_ROOT, Envoy, new_key, sha256_hex, unique_path, wasm_path, xkey

ALPHA = new_key("kg_alpha_")
BETA = new_key("kg_beta_")


def render_demo_config() -> str:
    text = (REPO_ROOT / "envoy" / "envoy.yaml").read_text()
    for placeholder in ("__DEMO_ALPHA_SHA256__", "__DEMO_BETA_SHA256__"):
        assert placeholder in text, placeholder
    text = text.replace("__DEMO_ALPHA_SHA256__", sha256_hex(ALPHA))
    text = text.replace("__DEMO_BETA_SHA256__", sha256_hex(BETA))
    # The demo's fixed ports become the harness's free ones.
    for fixed, field in (("10000", "{port}"), ("9901", "{admin_port}"), ("18080", "{backend_port}")):
        text, n = re.subn(rf"port_value: {fixed}\b", f"port_value: {field}", text)
        assert n == 1, f"expected one port_value: {fixed} in envoy/envoy.yaml"
    rel = "target/wasm32-wasip1/release/keygate.wasm"
    assert f"filename: {rel}" in text
    # Envoy runs from the repository root, as in demo.sh; honour KEYGATE_WASM.
    text = text.replace(f"filename: {rel}", f"filename: {wasm_path()}")
    return text


@pytest.fixture(scope="module")
def demo(envoy_factory) -> Envoy:
    return envoy_factory(config_text=render_demo_config(), concurrency=2)


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
