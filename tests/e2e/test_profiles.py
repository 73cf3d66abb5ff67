"""The shipped profiles (envoy/profiles/*.json), each loaded as is into a real
Envoy and walked through the behaviour its product documents (the seed pages
in envoy/profiles/README.md).

The plaintext demo keys live in profile_keys.json; the profiles hold only
their SHA-256. Every test is marked with its profile and a short case name,
and conftest prints the outcome per profile in the terminal summary.

The profiles run behind an HTTP connection manager that normalizes paths
(`normalize_path`, `merge_slashes`, escaped slashes rejected) and takes the
client address from the connection (`use_remote_address`), as
envoy/profiles/README.md asks of any deployment using path rules or
allowed_cidrs.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any, Optional

import pytest

from conftest import PROFILE_TITLES, report
from harness import (
    REPO_ROOT,
    Envoy,
    Response,
    check_denial,
    h2_exchange,
    sha256_hex,
    unique_path,
    wait_until,
)

PROFILES_DIR = REPO_ROOT / "envoy" / "profiles"
KEYS: dict[str, dict[str, str]] = json.loads((Path(__file__).parent / "profile_keys.json").read_text())["profiles"]
PROFILE_NAMES = ["lead-distro", "trust-leads", "leadflip", "leadterra"]
PROFILE_TITLES.update({
    "lead-distro": "Lead Distro, seeds 000 + 001",
    "trust-leads": "Trust Leads, seed 002",
    "leadflip": "Leadflip, seed 003",
    "leadterra": "Leadterra, seed 004",
})

# What envoy/profiles/README.md asks of the HTTP connection manager.
HARDENED_HCM = {
    "normalize_path": True,
    "merge_slashes": True,
    "path_with_escaped_slashes_action": "REJECT_REQUEST",
    "use_remote_address": True,
}


def load_profile(name: str) -> dict:
    return json.loads((PROFILES_DIR / f"{name}.json").read_text())


def k(profile: str, key_id: str) -> str:
    return KEYS[profile][key_id]


def all_keys() -> list[str]:
    return [v for keys in KEYS.values() for v in keys.values()]


def start_profile(envoy_factory, name: str, **kw: Any) -> Envoy:
    """The profile file's bytes, unchanged, as the plugin configuration."""
    return envoy_factory((PROFILES_DIR / f"{name}.json").read_text(), hcm_extra=HARDENED_HCM, access_log=True, **kw)


def forwarded(backend, path: str, identity_header: str, key_id: str, secret: str):
    """The backend got `path` once, with the identity and without the key."""
    seen = backend.only(path)
    assert seen.values(identity_header) == [key_id.encode()], seen.headers
    for name, value in seen.headers:
        assert secret.encode() not in value, f"key reached the backend in {name}"
    return seen


def refused(backend, path: str) -> None:
    assert not backend.started(path) and not backend.saw(path), f"backend saw refused request {path}"


# ---------------------------------------------------------------------------
# The profile files themselves
# ---------------------------------------------------------------------------


def test_every_profile_is_listed_and_has_demo_keys():
    on_disk = sorted(p.stem for p in PROFILES_DIR.glob("*.json"))
    assert on_disk == sorted(PROFILE_NAMES)
    readme = (PROFILES_DIR / "README.md").read_text()
    for name in PROFILE_NAMES:
        assert f"`{name}.json`" in readme, f"{name} missing from envoy/profiles/README.md"
        cfg = load_profile(name)
        by_id = {e["id"]: e for e in cfg["keys"]}
        # Every configured key has a known demo plaintext and vice versa.
        assert set(by_id) == set(KEYS[name]), name
        for key_id, plaintext in KEYS[name].items():
            assert by_id[key_id]["sha256"] == sha256_hex(plaintext), (name, key_id)
            assert "DEMO" in plaintext and "NOT" in plaintext.upper(), "demo keys must look fake"
            # Only digests in the profile, never a plaintext key.
            assert plaintext not in (PROFILES_DIR / f"{name}.json").read_text()
            display = by_id[key_id].get("display")
            if display is not None:  # prefix + last 4, as the products show them
                prefix, _, last4 = display.partition("…")
                assert plaintext.startswith(prefix) and plaintext.endswith(last4) and len(last4) == 4, display


# ===========================================================================
# Lead Distro (seeds 000 and 001): supplier keys in x-api-key, campaign in the
# JSON body, read-only lookups, 100 rps / burst 200
# ===========================================================================

LD = "lead-distro"
LD_CHALLENGE = 'ApiKey realm="lead-distro"'
LD_ID = "x-supplier-id"


def ld(case: str):
    return pytest.mark.profile(LD, case)


@pytest.fixture(scope="module")
def lead_distro(envoy_factory) -> Envoy:
    return start_profile(envoy_factory, LD)


def ingest(envoy: Envoy, key: Optional[str], body: Any, path: str = "/api/v1/ingest", extra=()) -> Response:
    headers = [("content-type", "application/json")] + list(extra)
    if key is not None:
        headers.append(("x-api-key", key))
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return envoy.request("POST", path, headers, raw)


def lead(campaign: Any, tag: str) -> dict:
    return {"flo_campaign_id": campaign, "flo_supplier_id": "sup-1", "email": f"{tag}@example.com", "first_name": "Ada"}


@ld("ingest with x-api-key and an attached campaign reaches the backend")
def test_ld_ingest_allowed(lead_distro, backend):
    tag = unique_path("lead")[6:]
    body = json.dumps(lead("c-17", tag)).encode()
    key = k(LD, "supplier-acme")
    r = ingest(lead_distro, key, body, extra=[(LD_ID, "supplier-bolt")])  # spoofed identity
    assert r.status == 200, r
    seen = [x for x in backend.find("/api/v1/ingest") if x.body == body]
    assert len(seen) == 1
    assert seen[0].values(LD_ID) == [b"supplier-acme"], seen[0].headers
    assert seen[0].values("x-api-key") == []
    assert all(key.encode() not in v for _, v in seen[0].headers)


@ld("ping (V2) with the second attached campaign")
def test_ld_ping_allowed(lead_distro, backend):
    tag = unique_path("ping")[6:]
    body = json.dumps(lead("c-42", tag)).encode()
    r = ingest(lead_distro, k(LD, "supplier-acme"), body, path="/api/v1/ping")
    assert r.status == 200, r
    assert [x.values(LD_ID) for x in backend.find("/api/v1/ping") if x.body == body] == [[b"supplier-acme"]]


@ld("header name is case-insensitive")
def test_ld_header_name_case(lead_distro):
    r = lead_distro.request("POST", "/api/v1/ingest", [("X-API-KEY", k(LD, "supplier-bolt"))],
                            json.dumps(lead("c-99", "case")).encode())
    assert r.status == 200, r


@ld("large payload sent with Expect: 100-continue (curl -d) is checked and forwarded")
def test_ld_expect_continue(lead_distro, backend):
    body = json.dumps(dict(lead("c-17", "big"), notes="n" * 4000)).encode()
    key = k(LD, "supplier-acme")
    with lead_distro.connect() as c:
        c.sock.sendall(
            b"POST /api/v1/ingest HTTP/1.1\r\nhost: app.leaddistro.example\r\ncontent-type: application/json\r\n"
            + f"x-api-key: {key}\r\ncontent-length: {len(body)}\r\nexpect: 100-continue\r\n\r\n".encode()
        )
        first = c.read_response()
        assert first.status == 100, first
        c.sock.sendall(body)
        r = c.read_response("POST")
    assert r.status == 200, r
    assert any(x.body == body for x in backend.find("/api/v1/ingest"))


@ld("missing key: 401 missing_api_key")
def test_ld_missing(lead_distro, backend):
    r = ingest(lead_distro, None, lead("c-17", "missing"))
    check_denial(r, "missing_api_key", challenge=LD_CHALLENGE)


@ld("Authorization: Bearer is not accepted: 401")
def test_ld_bearer_refused(lead_distro):
    key = k(LD, "supplier-acme")
    r = lead_distro.request("POST", "/api/v1/ingest", [("authorization", f"Bearer {key}")],
                            json.dumps(lead("c-17", "bearer")).encode())
    check_denial(r, "missing_api_key", challenge=LD_CHALLENGE, secrets_=(key,))


@ld("unknown key: 401 invalid_api_key")
def test_ld_invalid(lead_distro):
    fake = "sk_supplier_abc123xyz789"  # the documentation's example key
    r = ingest(lead_distro, fake, lead("c-17", "invalid"))
    check_denial(r, "invalid_api_key", challenge=LD_CHALLENGE, secrets_=(fake,))


@ld("expired key: 401 expired_api_key")
def test_ld_expired(lead_distro):
    key = k(LD, "supplier-expired")
    r = ingest(lead_distro, key, lead("c-17", "expired"))
    check_denial(r, "expired_api_key", challenge=LD_CHALLENGE, secrets_=(key,))


@ld("deleted supplier's key: 401 like an unknown key; the access log says revoked")
def test_ld_deleted(lead_distro):
    key = k(LD, "supplier-deleted")
    p = "/api/v1/leads/lookup?email=" + unique_path("deleted")[9:]
    r = lead_distro.request("GET", p, [("x-api-key", key)])
    body = check_denial(r, "invalid_api_key", challenge=LD_CHALLENGE, secrets_=(key,))
    unknown = lead_distro.request("GET", "/api/v1/leads/lookup", [("x-api-key", "sk_supplier_DEMO_unknown_0000")])
    assert unknown.json() == body, "a deleted key must look exactly like an unknown key"
    assert lead_distro.access_log_entry(p)["denial"] == "invalid_api_key (revoked key)"


@ld("campaign not attached to the key: 403 not_attached")
def test_ld_wrong_campaign(lead_distro, backend):
    key = k(LD, "supplier-acme")
    r = ingest(lead_distro, key, lead("c-99", "wrong"))
    check_denial(r, "not_attached", secrets_=(key,))


@ld("one supplier's key cannot post into another supplier's campaign: 403")
def test_ld_other_suppliers_campaign(lead_distro):
    r = ingest(lead_distro, k(LD, "supplier-bolt"), lead("c-17", "other"), path="/api/v1/ping")
    check_denial(r, "not_attached")


@ld("flo_campaign_id missing from the body: 400 missing_attribute")
def test_ld_campaign_missing(lead_distro):
    r = ingest(lead_distro, k(LD, "supplier-acme"), {"flo_supplier_id": "sup-1", "email": "x@example.com"})
    check_denial(r, "missing_attribute")


@ld("body that is not JSON: 400 invalid_json_body")
def test_ld_not_json(lead_distro):
    r = ingest(lead_distro, k(LD, "supplier-acme"), b"flo_campaign_id=c-17&email=x@example.com")
    check_denial(r, "invalid_json_body")


@ld("body nesting past the parser's depth: 400 invalid_json_body that says so; 127 levels still read")
def test_ld_body_too_deep(lead_distro, backend):
    def nested(levels: int, tag: str) -> bytes:
        # The lead object is one level, the arrays beside the fields the rest.
        inner = levels - 1
        fields = json.dumps(lead("c-17", tag))[:-1]
        return f'{fields}, "x": {"[" * inner}{"]" * inner}}}'.encode()

    tag = unique_path("deep")[6:]
    ok = nested(127, tag)
    r = ingest(lead_distro, k(LD, "supplier-acme"), ok)
    assert r.status == 200, r
    assert [x for x in backend.find("/api/v1/ingest") if x.body == ok]
    too_deep = nested(128, tag + "x")
    body = check_denial(ingest(lead_distro, k(LD, "supplier-acme"), too_deep), "invalid_json_body")
    assert "127 levels" in body["message"], body
    assert not [x for x in backend.find("/api/v1/ingest") if x.body == too_deep]


@ld("read-only key can look leads up")
def test_ld_lookup_read_only(lead_distro, backend):
    p = "/api/v1/leads/lookup?email=" + unique_path("lk")[4:]
    r = lead_distro.request("GET", p, [("x-api-key", k(LD, "lookup-readonly"))])
    assert r.status == 200, r
    forwarded(backend, p, LD_ID, "lookup-readonly", k(LD, "lookup-readonly"))


@ld("read-only key cannot ingest: 403 insufficient_scope")
def test_ld_read_only_cannot_ingest(lead_distro):
    r = ingest(lead_distro, k(LD, "lookup-readonly"), lead("c-17", "ro"))
    check_denial(r, "insufficient_scope")


@ld("undocumented route or method: 403 route_not_allowed")
@pytest.mark.parametrize("method,path", [("GET", "/api/v1/ingest"), ("DELETE", "/api/v1/leads/lookup"),
                                         ("GET", "/api/v2/anything"), ("POST", "/api/v1/ingest/../admin")])
def test_ld_undocumented_route(lead_distro, backend, method, path):
    r = lead_distro.request(method, path, [("x-api-key", k(LD, "supplier-acme"))])
    check_denial(r, "route_not_allowed")


@ld("IP allowlist: a listed address passes")
def test_ld_ip_allowlist_allows(lead_distro):
    r = ingest(lead_distro, k(LD, "supplier-local"), lead("c-17", "local"))
    assert r.status == 200, r


@ld("IP allowlist: any other address gets 403 ip_not_allowed")
def test_ld_ip_allowlist_denies(lead_distro):
    r = ingest(lead_distro, k(LD, "supplier-office"), lead("c-17", "office"))
    check_denial(r, "ip_not_allowed")


@ld("X-Forwarded-For cannot fake an allowlisted address")
def test_ld_ip_allowlist_ignores_xff(lead_distro):
    r = ingest(lead_distro, k(LD, "supplier-office"), lead("c-17", "xff"),
               extra=[("x-forwarded-for", "198.51.100.7")])
    check_denial(r, "ip_not_allowed")


@ld("100 rps per key with a burst of 200, then 429 with retry-after")
def test_ld_rate_limit(lead_distro, backend):
    """Four connections send as fast as they can until one sees a 429: the
    first 200 pass, and no more than burst + rate x elapsed are admitted."""
    key = k(LD, "supplier-burst")
    stop = threading.Event()
    lock = threading.Lock()
    admitted = 0
    other: list[int] = []
    limited: list[Response] = []

    def run(c) -> None:
        nonlocal admitted
        for _ in range(3000):
            if stop.is_set():
                return
            r = c.request("GET", "/api/v1/leads/lookup?email=burst%40example.com", [("x-api-key", key)])
            with lock:
                if r.status == 200:
                    admitted += 1
                elif r.status == 429:
                    limited.append(r)
                    stop.set()
                else:
                    other.append(r.status)
                    stop.set()

    conns = [lead_distro.connect() for _ in range(4)]
    threads = [threading.Thread(target=run, args=(c,)) for c in conns]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    elapsed = time.monotonic() - t0
    for c in conns:
        c.close()
    assert not other, other
    assert limited, f"no 429 after {admitted} requests in {elapsed:.2f}s"
    last = limited[0]
    check_denial(last, "rate_limited", secrets_=(key,))
    bound = 200 + 100 * elapsed + 1
    assert 200 <= admitted <= bound, (admitted, bound)
    assert last.header("ratelimit-policy") == '"default";q=200;w=2', last
    assert last.header("retry-after") == "1", last
    report(f"lead-distro rate limit: {admitted} admitted in {elapsed:.2f}s before the first 429 "
           f"(burst 200 + 100 rps x elapsed = {bound - 1:.0f})")
    # The bucket refills at 100/s: after 50 ms a few requests pass again.
    time.sleep(0.05)
    assert lead_distro.request("GET", "/api/v1/leads/lookup", [("x-api-key", key)]).status == 200
    # Another supplier's bucket was never touched.
    assert lead_distro.request("GET", "/api/v1/leads/lookup", [("x-api-key", k(LD, "supplier-bolt"))]).status == 200


# ===========================================================================
# Trust Leads (seed 002): Bearer or X-API-Key, lfk_ prefix, revocation
# ===========================================================================

TL = "trust-leads"
TL_CHALLENGE = 'Bearer realm="trust-leads"'


def tl(case: str):
    return pytest.mark.profile(TL, case)


@pytest.fixture(scope="module")
def trust_leads(envoy_factory) -> Envoy:
    # Served by LDS so that a revocation can be pushed to the running Envoy;
    # wasm debug logging so that the "never log keys" check sees denial lines.
    return start_profile(envoy_factory, TL, dynamic_listener=True, component_log_level="wasm:debug")


@tl("Authorization: Bearer (recommended) reaches the backend")
def test_tl_bearer(trust_leads, backend):
    key = k(TL, "crm-production")
    p = unique_path("v1/jobs")
    r = trust_leads.request("POST", p, [("authorization", f"Bearer {key}"), ("content-type", "application/json")],
                            b'{"file_url": "https://storage.example/leads.csv"}')
    assert r.status == 200, r
    seen = forwarded(backend, p, "x-api-key-id", "crm-production", key)
    assert seen.values("authorization") == []


@tl("X-API-Key (alternative) is equivalent")
def test_tl_x_api_key(trust_leads, backend):
    key = k(TL, "zapier-automation")
    p = unique_path("v1/usage")
    r = trust_leads.request("GET", p, [("X-API-Key", key)])
    assert r.status == 200, r
    seen = forwarded(backend, p, "x-api-key-id", "zapier-automation", key)
    assert seen.values("x-api-key") == []


@tl("the same key in both headers is fine")
def test_tl_both_same(trust_leads, backend):
    key = k(TL, "crm-production")
    p = unique_path("v1/usage")
    r = trust_leads.request("GET", p, [("X-API-Key", key), ("authorization", f"Bearer {key}")])
    assert r.status == 200, r
    forwarded(backend, p, "x-api-key-id", "crm-production", key)


@tl("two different keys: 401 ambiguous_api_key")
def test_tl_both_different(trust_leads):
    a, b = k(TL, "crm-production"), k(TL, "zapier-automation")
    r = trust_leads.request("GET", unique_path("v1/usage"), [("X-API-Key", a), ("authorization", f"Bearer {b}")])
    check_denial(r, "ambiguous_api_key", challenge=TL_CHALLENGE, secrets_=(a, b))


@tl("missing key: 401 missing_api_key")
def test_tl_missing(trust_leads):
    check_denial(trust_leads.request("GET", "/v1/usage"), "missing_api_key", challenge=TL_CHALLENGE)


@tl("a key without the lfk_ prefix: 401 malformed_api_key")
@pytest.mark.parametrize("value", ["sk_a1b2c3d4e5f6g7h8i9j0k1l2m3n4o5p6q7r8s9t0",
                                   "LFK_sk_a1b2c3d4e5f6g7h8i9j0k1l2m3n4o5p6q7r8s9t0",
                                   "sk_DEMOcrmprodNOTAREALKEY000000000000000001"],
                         ids=["other-vendor", "uppercase-prefix", "prefix-dropped"])
def test_tl_wrong_prefix(trust_leads, value):
    r = trust_leads.request("GET", "/v1/usage", [("authorization", f"Bearer {value}")])
    check_denial(r, "malformed_api_key", challenge=TL_CHALLENGE, secrets_=(value,))


@tl("an lfk_ key that does not exist: 401 invalid_api_key")
def test_tl_unknown(trust_leads):
    fake = "lfk_sk_a1b2c3d4e5f6g7h8i9j0k1l2m3n4o5p6q7r8s9t0"  # the documentation's example
    r = trust_leads.request("GET", "/v1/usage", [("X-API-Key", fake)])
    check_denial(r, "invalid_api_key", challenge=TL_CHALLENGE, secrets_=(fake,))


@tl("revoked key: 401, same body as an unknown key; the access log says revoked")
def test_tl_revoked(trust_leads):
    key = k(TL, "dev-environment")
    p = unique_path("v1/usage")
    r = trust_leads.request("GET", p, [("authorization", f"Bearer {key}")])
    check_denial(r, "invalid_api_key", challenge=TL_CHALLENGE, secrets_=(key,))
    assert trust_leads.access_log_entry(p)["denial"] == "invalid_api_key (revoked key)"


@tl("revoking a key in the running gateway gives 401 within seconds")
def test_tl_revocation_is_immediate(trust_leads):
    key = k(TL, "staging-rotation")

    def status() -> int:
        return trust_leads.request("GET", unique_path("v1/usage"), [("authorization", f"Bearer {key}")]).status

    assert status() == 200
    cfg = load_profile(TL)
    for entry in cfg["keys"]:
        if entry["id"] == "staging-rotation":
            entry["disabled"] = True
    t0 = time.monotonic()
    trust_leads.reconfigure(cfg)
    assert wait_until(lambda: status() == 401, timeout=5)
    took = time.monotonic() - t0
    report(f"trust-leads revocation: 401 {took:.2f}s after the configuration update was written")
    assert took < 5
    # Other keys keep working.
    assert trust_leads.request("GET", "/v1/usage", [("X-API-Key", k(TL, "crm-production"))]).status == 200


@tl("keys never appear in Envoy's log or access log (wasm at debug level)")
def test_tl_keys_never_logged(trust_leads):
    # Denials with a known key are logged with its id, others masked.
    trust_leads.request("GET", "/v1/usage", [("X-API-Key", "lfk_sk_DEMOunknownNOTAREALKEY00000000000000099")])
    time.sleep(0.3)  # let Envoy flush its log (file flush interval 100 ms)
    text = trust_leads.log_text() + trust_leads.access_log_path.read_text()
    assert "denied" in text, "expected keygate's debug denial lines"
    for secret in all_keys() + ["lfk_sk_DEMOunknownNOTAREALKEY00000000000000099"]:
        assert secret not in text
        assert secret[-20:] not in text


# ===========================================================================
# Leadflip (seed 003): Bearer, or the bare key in Authorization; never the URL
# ===========================================================================

LF = "leadflip"
LF_CHALLENGE = 'Bearer realm="leadflip"'


def lf(case: str):
    return pytest.mark.profile(LF, case)


@pytest.fixture(scope="module")
def leadflip(envoy_factory) -> Envoy:
    return start_profile(envoy_factory, LF)


@lf("Authorization: Bearer <key> reaches the backend")
@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_lf_bearer(leadflip, backend, scheme):
    key = k(LF, "production-integration")
    p = unique_path("api/entities")
    r = leadflip.request("GET", p, [("authorization", f"{scheme} {key}"), ("accept", "application/json")])
    assert r.status == 200, r
    seen = forwarded(backend, p, "x-api-key-id", "production-integration", key)
    assert seen.values("authorization") == []


@lf("Authorization: <key> without Bearer also works")
def test_lf_bare(leadflip, backend):
    key = k(LF, "staging-webhook")
    p = unique_path("api/leads")
    r = leadflip.request("GET", p, [("authorization", key)])
    assert r.status == 200, r
    seen = forwarded(backend, p, "x-api-key-id", "staging-webhook", key)
    assert seen.values("authorization") == []


@lf("HTTP/2 bare key")
def test_lf_h2_bare(leadflip, backend):
    key = k(LF, "staging-webhook")
    p = unique_path("api/forms")
    r = h2_exchange(leadflip.port, "GET", p, [("authorization", key)]).response()
    assert r.status == 200, r
    forwarded(backend, p, "x-api-key-id", "staging-webhook", key)


@lf("key in the query string is refused: 401 missing_api_key")
@pytest.mark.parametrize("param", ["api_key", "apikey", "key", "token", "access_token"])
def test_lf_query_refused(leadflip, backend, param):
    key = k(LF, "production-integration")
    p = unique_path("api/entities") + f"?{param}={key}"
    r = leadflip.request("GET", p)
    check_denial(r, "missing_api_key", challenge=LF_CHALLENGE, secrets_=(key,))
    refused(backend, p)


@lf("key in the request body is refused: 401 missing_api_key")
def test_lf_body_refused(leadflip, backend):
    key = k(LF, "production-integration")
    p = unique_path("api/leads")
    r = leadflip.request("POST", p, [("content-type", "application/json")], json.dumps({"api_key": key}).encode())
    check_denial(r, "missing_api_key", challenge=LF_CHALLENGE, secrets_=(key,))
    refused(backend, p)


@lf("key in another header (X-API-Key) is refused: 401 missing_api_key")
def test_lf_other_header_refused(leadflip):
    r = leadflip.request("GET", "/api/entities", [("x-api-key", k(LF, "production-integration"))])
    check_denial(r, "missing_api_key", challenge=LF_CHALLENGE)


@lf("revoked key: 401 invalid_api_key")
def test_lf_revoked(leadflip):
    key = k(LF, "old-integration")
    p = unique_path("api/entities")
    check_denial(leadflip.request("GET", p, [("authorization", f"Bearer {key}")]), "invalid_api_key",
                 challenge=LF_CHALLENGE, secrets_=(key,))
    assert leadflip.access_log_entry(p)["denial"] == "invalid_api_key (revoked key)"


@lf("unknown key: 401 invalid_api_key")
def test_lf_unknown(leadflip):
    check_denial(leadflip.request("GET", "/api/entities", [("authorization", "your_api_key_here")]),
                 "invalid_api_key", challenge=LF_CHALLENGE)


@lf("another scheme (Basic, Token): 401 malformed_api_key")
@pytest.mark.parametrize("scheme", ["Basic", "Token"])
def test_lf_other_scheme(leadflip, scheme):
    key = k(LF, "production-integration")
    r = leadflip.request("GET", "/api/entities", [("authorization", f"{scheme} {key}")])
    check_denial(r, "malformed_api_key", challenge=LF_CHALLENGE, secrets_=(key,))


# ===========================================================================
# Leadterra (seed 004): Bearer only, sk_live_/sk_test_, scopes, sandbox keys
# ===========================================================================

LT = "leadterra"
LT_CHALLENGE = 'Bearer realm="leadterra"'


def lt(case: str):
    return pytest.mark.profile(LT, case)


@pytest.fixture(scope="module")
def leadterra(envoy_factory) -> Envoy:
    return start_profile(envoy_factory, LT)


def lt_get(envoy: Envoy, path: str, key: Optional[str], method: str = "GET", raw_auth: Optional[bytes] = None):
    headers: list = []
    if raw_auth is not None:
        headers.append(("authorization", raw_auth))
    elif key is not None:
        headers.append(("authorization", f"Bearer {key}"))
    return envoy.request(method, path, headers, b"{}" if method in ("POST", "PUT", "PATCH") else b"")


@lt("live key lists sender pools")
def test_lt_live_key(leadterra, backend):
    key = k(LT, "production-agent")
    p = unique_path("v1/sender-pools")
    assert lt_get(leadterra, p, key).status == 200
    forwarded(backend, p, "x-api-key-id", "production-agent", key)


@lt("live key with the permission creates a campaign")
def test_lt_live_key_write(leadterra, backend):
    p = unique_path("v1/campaigns")
    assert lt_get(leadterra, p, k(LT, "production-agent"), "POST").status == 200


@lt("no Authorization header: 401 missing_api_key")
def test_lt_missing(leadterra):
    check_denial(lt_get(leadterra, "/v1/sender-pools", None), "missing_api_key", challenge=LT_CHALLENGE)


@lt("key in X-API-Key (not Bearer): 401")
def test_lt_x_api_key_refused(leadterra):
    r = leadterra.request("GET", "/v1/sender-pools", [("x-api-key", k(LT, "production-agent"))])
    check_denial(r, "missing_api_key", challenge=LT_CHALLENGE)


@lt("Authorization without the Bearer scheme: 401 malformed_api_key")
def test_lt_no_scheme(leadterra):
    key = k(LT, "production-agent")
    check_denial(lt_get(leadterra, "/v1/sender-pools", None, raw_auth=key.encode()), "malformed_api_key",
                 challenge=LT_CHALLENGE, secrets_=(key,))


@lt("a key without sk_live_/sk_test_: 401 malformed_api_key")
@pytest.mark.parametrize("value", ["pk_live_DEMO_agent_NOT_A_REAL_KEY_0001", "sk_prod_DEMO_agent_NOT_A_REAL_KEY_0001",
                                   "SK_LIVE_DEMO_agent_NOT_A_REAL_KEY_0001"], ids=["pk", "sk_prod", "uppercase"])
def test_lt_wrong_prefix(leadterra, value):
    check_denial(lt_get(leadterra, "/v1/sender-pools", value), "malformed_api_key", challenge=LT_CHALLENGE)


@lt("unknown key: 401 invalid_api_key")
def test_lt_unknown(leadterra):
    check_denial(lt_get(leadterra, "/v1/sender-pools", "sk_live_YOUR_KEY"), "invalid_api_key", challenge=LT_CHALLENGE)


@lt("revoked key: 401 invalid_api_key")
def test_lt_revoked(leadterra):
    key = k(LT, "revoked-agent")
    p = unique_path("v1/sender-pools")
    check_denial(lt_get(leadterra, p, key), "invalid_api_key", challenge=LT_CHALLENGE, secrets_=(key,))
    assert leadterra.access_log_entry(p)["denial"] == "invalid_api_key (revoked key)"


@lt("valid key without the permission: 403 insufficient_scope")
@pytest.mark.parametrize("method,path", [("POST", "/v1/campaigns"), ("DELETE", "/v1/sender-pools/sp_1"),
                                         ("GET", "/v1/leads")])
def test_lt_restricted_key(leadterra, backend, method, path):
    key = k(LT, "ci-pipeline")
    check_denial(lt_get(leadterra, path, key, method), "insufficient_scope", secrets_=(key,))


@lt("restricted key still reads what it may")
def test_lt_restricted_key_reads(leadterra):
    assert lt_get(leadterra, unique_path("v1/campaigns"), k(LT, "ci-pipeline")).status == 200


@lt("test key works on sandbox routes")
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_lt_test_key_sandbox(leadterra, backend, method):
    key = k(LT, "sandbox-agent")
    p = unique_path("v1/sandbox/campaigns")
    assert lt_get(leadterra, p, key, method).status == 200
    forwarded(backend, p, "x-api-key-id", "sandbox-agent", key)


@lt("test key outside the sandbox: 403 insufficient_scope")
@pytest.mark.parametrize("path", ["/v1/sender-pools", "/v1/campaigns", "/v1/sandbox", "/v1/other",
                                  "/v1/sandbox/../sender-pools", "/v1/sandbox/%2e%2e/sender-pools",
                                  "//v1/sandbox/..//sender-pools"])
def test_lt_test_key_outside_sandbox(leadterra, backend, path):
    r = lt_get(leadterra, path, k(LT, "sandbox-agent"))
    check_denial(r, "insufficient_scope")


@lt("stray space or tab inside the key: 401 malformed_api_key")
@pytest.mark.parametrize("sep", [" ", "\t"], ids=["space", "tab"])
def test_lt_whitespace_inside(leadterra, sep):
    key = k(LT, "production-agent")
    broken = key[:12] + sep + key[12:]
    check_denial(lt_get(leadterra, "/v1/sender-pools", broken), "malformed_api_key", challenge=LT_CHALLENGE)


@lt("line break pasted inside the key: 401, or refused by Envoy before the filter")
def test_lt_newline_inside(leadterra, backend):
    key = k(LT, "production-agent")
    # HTTP/1 obsolete line folding (CRLF + space inside the value): Envoy
    # unfolds it into a space, which keygate refuses.
    p1 = unique_path("v1/sender-pools")
    r = leadterra.request("GET", p1, [("authorization", f"Bearer {key[:12]}\r\n {key[12:]}".encode())])
    check_denial(r, "malformed_api_key", challenge=LT_CHALLENGE, secrets_=(key,))
    # A bare LF inside the value: Envoy's HTTP/1 codec answers 400 itself.
    p2 = unique_path("v1/sender-pools")
    r = leadterra.request("GET", p2, [("authorization", f"Bearer {key[:12]}\n{key[12:]}".encode())])
    assert r.status == 400 and r.header("www-authenticate") is None, r
    # HTTP/2: a LF in a header value is a protocol error; Envoy drops the connection.
    p3 = unique_path("v1/sender-pools")
    res = h2_exchange(leadterra.port, "GET", p3, [("authorization", f"Bearer {key[:12]}\n{key[12:]}")])
    assert res.status is None, res
    for p in (p1, p2, p3):
        refused(backend, p)


@lt("truncated key: 401 invalid_api_key")
def test_lt_truncated(leadterra):
    key = k(LT, "production-agent")
    check_denial(lt_get(leadterra, "/v1/sender-pools", key[:-1]), "invalid_api_key", challenge=LT_CHALLENGE)


@lt("URL-encoded newline copied along with the key: 401 invalid_api_key")
def test_lt_encoded_newline(leadterra):
    key = k(LT, "production-agent")
    check_denial(lt_get(leadterra, "/v1/sender-pools", key + "%0A"), "invalid_api_key", challenge=LT_CHALLENGE)


@lt("surrounding spaces are trimmed by Envoy: the key still works")
def test_lt_surrounding_spaces(leadterra):
    key = k(LT, "production-agent")
    r = lt_get(leadterra, unique_path("v1/sender-pools"), None, raw_auth=f"  Bearer   {key}   ".encode())
    assert r.status == 200, r


def test_zz_profiles_vm_healthy(lead_distro, trust_leads, leadflip, leadterra):
    """After every case above, no keygate VM panicked or reloaded."""
    for envoy in (lead_distro, trust_leads, leadflip, leadterra):
        stats = envoy.stats()
        assert not {n: v for n, v in stats.items() if n.startswith("wasm.keygate.vm_reload") and v != "0"}
        assert "panicked" not in envoy.log_text()
