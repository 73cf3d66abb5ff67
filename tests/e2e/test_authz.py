"""Route rules and key metadata, end to end: every denial code and every
branch of rule matching, attachments (header, query, JSON body over HTTP/1
and HTTP/2 with trailers), per-rule credential sources and rate limits,
allowed_cidrs, expiry, revocation, and the configuration errors of these
fields, in real Envoy.

Two Envoys serve the module: `authz` (default_action require_key, many
rules, an access log showing keygate's denial filter state; Envoy's default
connection manager) and `closed` (default_action deny, behind a connection
manager configured as envoy/profiles/README.md asks: paths normalized,
trailing host dot stripped, client address from the connection).
"""

from __future__ import annotations

import json
import re
import secrets
import time
from typing import Any, Optional

import pytest

from harness import (
    Envoy,
    Response,
    bearer,
    build_request,
    check_denial,
    h2_exchange,
    new_key,
    sha256_hex,
    unique_path,
    wait_until,
    xkey,
)

# ---------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------

FULL = new_key("kz_full_")  # read, write, ingest; live; campaigns c-17 c-42 17 true 0.5
READER = new_key("kz_reader_")  # read; live; campaigns c-17
WRITER = new_key("kz_writer_")  # write only; live
TESTENV = new_key("kz_testenv_")  # read, write; environment test
NOENV = new_key("kz_noenv_")  # read, write; no environment
EXPIRED = new_key("kz_expired_")  # expired in 2020, and no scope at all
FUTURE = new_key("kz_future_")  # expires in 2099 (+02:00 offset)
REVOKED = new_key("kz_revoked_")  # disabled, and expired too
LOCAL = new_key("kz_local_")  # allowed_cidrs 127.0.0.1/32
TENNET = new_key("kz_tennet_")  # allowed_cidrs 10.0.0.0/8 and 2001:db8::/32, no scope
LIMITED = new_key("kz_limited_")  # own limit: burst 2, 0.01/s
LIMITED_ATTACH = new_key("kz_limatt_")  # own limit: burst 1; campaigns c-17
LIMITED_BODY = new_key("kz_limbody_")  # own limit: burst 2; campaigns c-17
UNLIMITED = new_key("kz_unlimited_")  # no limit of its own
SLASHED = new_key("kz_slashed_")  # id "metered/twin", own limit: burst 1
TWIN = new_key("kz_twin_")  # id "twin", no limit of its own
UNKNOWN = new_key("kz_unknown_")  # not configured

SLOW = lambda burst: {"requests_per_second": 0.01, "burst": burst}  # noqa: E731


def rec(key_id: str, key: str, **meta: Any) -> dict:
    return {"id": key_id, "sha256": sha256_hex(key), **meta}


KEYS = [
    rec("full", FULL, scopes=["read", "write", "ingest"], environment="live",
        attachments={"campaigns": ["c-17", "c-42", "17", "true", "0.5"]}),
    rec("reader", READER, scopes=["read"], environment="live", attachments={"campaigns": ["c-17"]}),
    rec("writer", WRITER, scopes=["write"], environment="live"),
    rec("testenv", TESTENV, scopes=["read", "write"], environment="test"),
    rec("noenv", NOENV, scopes=["read", "write"]),
    rec("expired", EXPIRED, expires_at="2020-01-01T00:00:00Z"),
    rec("future", FUTURE, scopes=["read"], expires_at="2099-12-31T23:59:59+02:00"),
    rec("revoked", REVOKED, scopes=["read"], disabled=True, expires_at="2020-01-01T00:00:00Z"),
    rec("local", LOCAL, scopes=["read"], allowed_cidrs=["127.0.0.1/32"]),
    rec("tennet", TENNET, allowed_cidrs=["10.0.0.0/8", "2001:db8::/32"]),
    rec("limited", LIMITED, scopes=["read"], rate_limit=SLOW(2)),
    rec("limited-attach", LIMITED_ATTACH, rate_limit=SLOW(1), attachments={"campaigns": ["c-17"]}),
    rec("limited-body", LIMITED_BODY, rate_limit=SLOW(2), attachments={"campaigns": ["c-17"]}),
    rec("unlimited", UNLIMITED, attachments={"campaigns": ["c-17"]}),
    rec("metered/twin", SLASHED, rate_limit=SLOW(1)),
    rec("twin", TWIN),
]

def attach(**source: str) -> dict:
    return {"set": "campaigns", "from": source}


RULES = [
    {"name": "health", "match": {"path": "/healthz"}, "action": "public"},
    {"name": "docs", "match": {"path_prefix": "/docs/", "methods": ["GET"]}, "action": "public"},
    {"name": "admin-host", "match": {"host": "admin.example.com"}, "action": "deny"},
    {"name": "tenant-hosts", "match": {"host": "*.tenants.example.com"}, "action": "require", "scopes_any_of": ["write"]},
    {"name": "order-first", "match": {"path_prefix": "/order/"}, "action": "require", "scopes_any_of": ["write"]},
    {"name": "order-shadowed", "match": {"path": "/order/x"}, "action": "public"},
    {"name": "data-read", "match": {"path_prefix": "/data/", "methods": ["GET", "HEAD"]}, "action": "require",
     "scopes_any_of": ["read"]},
    {"name": "data-write", "match": {"path_prefix": "/data/"}, "action": "require", "scopes_all_of": ["read", "write"]},
    {"name": "live", "match": {"path_prefix": "/live/"}, "action": "require", "environments": ["live"]},
    {"name": "live-or-test", "match": {"path_prefix": "/both/"}, "action": "require", "environments": ["live", "test"]},
    {"name": "attach-header", "match": {"path": "/attach/header"}, "action": "require",
     "attachment": attach(header="x-campaign")},
    {"name": "attach-query", "match": {"path": "/attach/query"}, "action": "require",
     "attachment": attach(query="campaign")},
    {"name": "attach-body", "match": {"path_prefix": "/attach/body"}, "action": "require",
     "attachment": attach(json_body="campaign")},
    {"name": "attach-pointer", "match": {"path_prefix": "/attach/pointer"}, "action": "require",
     "attachment": attach(json_body="/lead/campaign/id")},
    {"name": "attach-array", "match": {"path_prefix": "/attach/array"}, "action": "require",
     "attachment": attach(json_body="/campaigns/1")},
    {"name": "attach-slash-name", "match": {"path_prefix": "/attach/slashname"}, "action": "require",
     "attachment": attach(json_body="a/b")},
    {"name": "legacy", "match": {"path_prefix": "/legacy/"}, "action": "require",
     "credential_sources": [{"type": "header", "name": "x-legacy-key"}]},
    {"name": "metered", "match": {"path_prefix": "/metered/"}, "action": "require", "rate_limit": SLOW(3)},
    {"name": "metered-b", "match": {"path_prefix": "/metered-b/"}, "action": "require", "rate_limit": SLOW(1)},
    {"name": "closed", "match": {"path_prefix": "/closed/"}, "action": "deny"},
]

MAX_BODY = 1024
AUTHZ_CONFIG = {"keys": KEYS, "rules": RULES, "max_body_bytes": MAX_BODY}

CLOSED_CONFIG = {
    "keys": [rec("full", FULL, scopes=["read"]), rec("local", LOCAL, allowed_cidrs=["127.0.0.1/32"]),
             rec("tennet", TENNET, allowed_cidrs=["10.0.0.0/8"])],
    "default_action": "deny",
    "rules": [
        {"name": "internal-host", "match": {"host": "internal.example.com"}, "action": "deny"},
        {"name": "health", "match": {"path": "/healthz"}, "action": "public"},
        {"name": "api", "match": {"path_prefix": "/api/"}, "action": "require"},
    ],
}
HARDENED_HCM = {
    "normalize_path": True,
    "merge_slashes": True,
    "path_with_escaped_slashes_action": "REJECT_REQUEST",
    "strip_trailing_host_dot": True,
    "use_remote_address": True,
}

CHALLENGE = 'Bearer realm="keygate"'


@pytest.fixture(scope="module")
def authz(envoy_factory) -> Envoy:
    return envoy_factory(AUTHZ_CONFIG, access_log=True)


@pytest.fixture(scope="module")
def closed(envoy_factory) -> Envoy:
    return envoy_factory(CLOSED_CONFIG, hcm_extra=HARDENED_HCM)


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def uniq(prefix: str) -> str:
    """A fresh path under `prefix` (which ends with '/')."""
    return prefix + secrets.token_hex(6)


def call(envoy: Envoy, method: str, path: str, key: Optional[str] = None, headers=(), body: bytes = b"",
         host: str = "localhost") -> Response:
    hs = list(headers)
    if key is not None:
        hs.append(xkey(key))
    return envoy.request(method, path, hs, body, host=host)


def allowed(r: Response, backend, path: str, key_id: Optional[str]):
    assert r.status == 200, r
    seen = backend.only(path)
    if key_id is None:
        assert seen.values("x-api-key-id") == [], seen.headers
    else:
        assert seen.values("x-api-key-id") == [key_id.encode()], seen.headers
    return seen


def denied(r: Response, backend, path: str, code: str, **kw: Any) -> dict:
    body = check_denial(r, code, **kw)
    assert not backend.started(path), f"backend saw the refused request {path}"
    return body


def js(obj: Any) -> bytes:
    return json.dumps(obj).encode()


# ---------------------------------------------------------------------------
# Every denial code, with its reply headers, and the order of the checks
# ---------------------------------------------------------------------------


def test_missing_malformed_ambiguous_invalid(authz, backend):
    p = unique_path()
    denied(call(authz, "GET", p), backend, p, "missing_api_key", challenge=CHALLENGE)
    p = unique_path()
    denied(call(authz, "GET", p, headers=[xkey("a b")]), backend, p, "malformed_api_key", challenge=CHALLENGE)
    p = unique_path()
    denied(call(authz, "GET", p, headers=[xkey(FULL), bearer(READER)]), backend, p, "ambiguous_api_key",
           challenge=CHALLENGE, secrets_=(FULL, READER))
    p = unique_path()
    denied(call(authz, "GET", p, UNKNOWN), backend, p, "invalid_api_key", challenge=CHALLENGE, secrets_=(UNKNOWN,))
    assert authz.access_log_entry(p)["denial"] == "invalid_api_key (unknown key)"


def test_expired_key(authz, backend):
    """Expiry is checked before scopes: the expired key (which holds no
    scope) gets 401 expired_api_key on a route that needs one."""
    for p in (unique_path(), uniq("/data/")):
        denied(call(authz, "GET", p, EXPIRED), backend, p, "expired_api_key", challenge=CHALLENGE,
               secrets_=(EXPIRED,))
    assert authz.access_log_entry(p)["denial"] == "expired_api_key (key expired)"


def test_expiry_in_the_future_with_offset(authz, backend):
    p = uniq("/data/")
    allowed(call(authz, "GET", p, FUTURE), backend, p, "future")


def test_revoked_key_looks_unknown(authz, backend):
    """Revocation is checked before expiry; the reply is byte for byte the
    unknown-key reply, only the filter state tells them apart."""
    p = unique_path()
    r = call(authz, "GET", p, REVOKED)
    body = denied(r, backend, p, "invalid_api_key", challenge=CHALLENGE, secrets_=(REVOKED,))
    unknown = call(authz, "GET", unique_path(), UNKNOWN)
    assert unknown.json() == body
    assert [h for h in r.headers if h[0] != "date"] == [h for h in unknown.headers if h[0] != "date"]
    assert authz.access_log_entry(p)["denial"] == "invalid_api_key (revoked key)"


def test_allowed_cidrs(authz, backend):
    p = uniq("/data/")
    allowed(call(authz, "GET", p, LOCAL), backend, p, "local")
    # Outside the allowlist: 403, decided before the scope check (the key has no scope).
    for p in (unique_path(), uniq("/data/")):
        denied(call(authz, "POST", p, TENNET), backend, p, "ip_not_allowed", secrets_=(TENNET,))
    assert authz.access_log_entry(p)["denial"].startswith("ip_not_allowed (")


def test_allowed_cidrs_with_use_remote_address(closed, backend):
    """With `use_remote_address: true` Envoy's client address is the TCP
    peer: X-Forwarded-For cannot move a request into (or out of) an allowlist."""
    for xff in ("10.1.2.3", "10.1.2.3, 10.9.9.9"):
        p = uniq("/api/")
        denied(call(closed, "GET", p, TENNET, headers=[("x-forwarded-for", xff)]), backend, p, "ip_not_allowed")
        p = uniq("/api/")
        allowed(call(closed, "GET", p, LOCAL, headers=[("x-forwarded-for", xff)]), backend, p, "local")


def test_allowed_cidrs_follow_envoys_client_address(authz, backend):
    """keygate checks Envoy's `source.address`, which is Envoy's *trusted
    client address*. With the connection manager's defaults
    (use_remote_address: false, no trusted hops) Envoy takes it from
    X-Forwarded-For, so any client can claim an allowlisted address. This
    test documents that hazard (see envoy/profiles/README.md): allowed_cidrs
    needs `use_remote_address: true` at the edge, as in the test above."""
    p = unique_path()
    r = call(authz, "GET", p, TENNET, headers=[("x-forwarded-for", "10.1.2.3")])
    assert r.status == 200, r
    p = unique_path()
    denied(call(authz, "GET", p, LOCAL, headers=[("x-forwarded-for", "10.1.2.3")]), backend, p, "ip_not_allowed")


def test_insufficient_scope_any_of_and_all_of(authz, backend):
    # GET /data/ needs any of [read]
    p = uniq("/data/")
    allowed(call(authz, "GET", p, READER), backend, p, "reader")
    p = uniq("/data/")
    denied(call(authz, "GET", p, WRITER), backend, p, "insufficient_scope")
    # any other method on /data/ needs all of [read, write]
    p = uniq("/data/")
    denied(call(authz, "POST", p, READER), backend, p, "insufficient_scope")
    p = uniq("/data/")
    denied(call(authz, "POST", p, WRITER), backend, p, "insufficient_scope")
    p = uniq("/data/")
    allowed(call(authz, "POST", p, NOENV), backend, p, "noenv")
    # HEAD matches the GET rule
    with authz.connect() as c:
        p = uniq("/data/")
        assert c.request("HEAD", p, [xkey(READER)]).status == 200
        assert backend.only(p).method == "HEAD"


def test_environments(authz, backend):
    p = uniq("/live/")
    allowed(call(authz, "GET", p, FULL), backend, p, "full")
    for key in (TESTENV, NOENV):  # another environment, or none at all
        p = uniq("/live/")
        denied(call(authz, "GET", p, key), backend, p, "insufficient_scope")
    p = uniq("/both/")
    allowed(call(authz, "GET", p, TESTENV), backend, p, "testenv")
    p = uniq("/both/")
    denied(call(authz, "GET", p, NOENV), backend, p, "insufficient_scope")


def test_deny_rule(authz, backend):
    """A deny rule needs no key and is not affected by one."""
    for key in (None, FULL, UNKNOWN):
        p = uniq("/closed/")
        denied(call(authz, "GET", p, key), backend, p, "route_not_allowed")
    assert authz.access_log_entry(p)["denial"] == "route_not_allowed (rule denies this route)"


# ---------------------------------------------------------------------------
# Matching: host, path, prefix, method, first match wins, default action
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["admin.example.com", "ADMIN.Example.COM", "admin.example.com:8443"])
def test_host_exact_case_insensitive_port_ignored(authz, backend, host):
    p = unique_path()
    denied(call(authz, "GET", p, FULL, host=host), backend, p, "route_not_allowed")


def test_host_other_hosts_fall_through(authz, backend):
    for host in ("www.example.com", "admin.example.com.evil", "xadmin.example.com", "127.0.0.1"):
        p = unique_path()
        allowed(call(authz, "GET", p, READER, host=host), backend, p, "reader")


def test_host_trailing_dot_is_the_same_host(authz, backend):
    """BUG: `admin.example.com.` (fully qualified, trailing dot) is the same
    host as `admin.example.com` for DNS, for Envoy's own
    `strip_trailing_host_dot` and for most backends, yet keygate's host
    matcher compares it byte for byte, so a `deny` (or `require`) rule on a
    host is skipped and the request falls through to the default action."""
    p = unique_path()
    r = call(authz, "GET", p, READER, host="admin.example.com.")
    denied(r, backend, p, "route_not_allowed")


def test_host_wildcard(authz, backend):
    for host in ("a.tenants.example.com", "a.b.tenants.example.com", "A.Tenants.Example.com:80"):
        p = unique_path()
        denied(call(authz, "GET", p, READER, host=host), backend, p, "insufficient_scope")
        p = unique_path()
        allowed(call(authz, "GET", p, WRITER, host=host), backend, p, "writer")
    # The bare domain and look-alikes are not subdomains.
    for host in ("tenants.example.com", "eviltenants.example.com"):
        p = unique_path()
        allowed(call(authz, "GET", p, READER, host=host), backend, p, "reader")


def test_exact_path_ignores_query(authz, backend):
    p = "/healthz?probe=" + secrets.token_hex(4)
    allowed(call(authz, "GET", p), backend, p, None)
    # Not the same path: the default action (a key) applies.
    for p in ("/healthz/", "/healthz/x", "/healthzz", "/HEALTHZ"):
        r = call(authz, "GET", p)
        check_denial(r, "missing_api_key")


def test_prefix_and_methods(authz, backend):
    p = uniq("/docs/")
    allowed(call(authz, "GET", p), backend, p, None)
    p = uniq("/docs/")  # POST is not in the public rule's methods
    denied(call(authz, "POST", p), backend, p, "missing_api_key")
    p = "/docs"  # the prefix is "/docs/"
    check_denial(call(authz, "GET", p), "missing_api_key")


def test_first_match_wins(authz, backend):
    """/order/x matches `order-first` (require write) before the public
    `order-shadowed` rule listed after it."""
    p = "/order/x"
    check_denial(call(authz, "GET", p), "missing_api_key")
    check_denial(call(authz, "GET", p, READER), "insufficient_scope")
    before = len(backend.find(p))
    assert call(authz, "GET", p, WRITER).status == 200
    assert len(backend.find(p)) == before + 1


def test_default_action_require_key(authz, backend):
    """No rule matches: any valid key, whatever its scopes or environment."""
    p = unique_path("anything")
    allowed(call(authz, "DELETE", p, TESTENV), backend, p, "testenv")
    p = unique_path("anything")
    denied(call(authz, "DELETE", p), backend, p, "missing_api_key", challenge=CHALLENGE)


def test_default_action_deny(closed, backend):
    for key in (None, FULL, UNKNOWN):
        p = unique_path("elsewhere")
        denied(call(closed, "GET", p, key), backend, p, "route_not_allowed")
    p = uniq("/api/")
    allowed(call(closed, "GET", p, FULL), backend, p, "full")
    p = uniq("/api/")
    denied(call(closed, "GET", p), backend, p, "missing_api_key")
    p = "/healthz"
    assert call(closed, "GET", p).status == 200


def test_paths_are_matched_after_envoy_normalization(closed, backend):
    """With normalize_path/merge_slashes (as envoy/profiles/README.md asks),
    the filter matches the path Envoy normalized, and the backend gets that
    same path."""
    r = call(closed, "GET", "/api/../secret", FULL)
    check_denial(r, "route_not_allowed")
    tag = secrets.token_hex(4)
    r = call(closed, "GET", f"//api/x/..//{tag}", FULL)
    assert r.status == 200, r
    assert backend.only(f"/api/{tag}").values("x-api-key-id") == [b"full"]
    # strip_trailing_host_dot: the host rule also holds for the FQDN form.
    p = uniq("/api/")
    denied(call(closed, "GET", p, FULL, host="internal.example.com."), backend, p, "route_not_allowed")


def test_without_normalization_dot_segments_are_not_resolved(authz, backend):
    """Without normalize_path, Envoy hands the filter (and the backend) the
    raw path: a deny prefix does not cover `/x/../closed/`. This is why the
    profiles README requires path normalization in Envoy."""
    p = "/x/../closed/" + secrets.token_hex(4)
    r = call(authz, "GET", p, READER)
    assert r.status == 200, r
    assert backend.only(p).path == p


# ---------------------------------------------------------------------------
# Public routes
# ---------------------------------------------------------------------------


def test_public_route_needs_no_key_and_strips_spoofed_identity(authz, backend):
    p = "/healthz?n=" + secrets.token_hex(4)
    spoof = [("x-api-key-id", "full"), ("X-Api-Key-Id", "admin"), ("x_api_key_id", "root")]
    seen = allowed(call(authz, "GET", p, headers=spoof), backend, p, None)
    assert not [n for n, _ in seen.headers if n.replace("_", "-") == "x-api-key-id"], seen.headers


@pytest.mark.parametrize("headers", [[xkey(UNKNOWN)], [xkey("a b")], [xkey(REVOKED)], [xkey(FULL), bearer(READER)]],
                         ids=["unknown", "malformed", "revoked", "ambiguous"])
def test_public_route_ignores_bad_credentials(authz, backend, headers):
    p = "/healthz?n=" + secrets.token_hex(4)
    allowed(call(authz, "GET", p, headers=headers), backend, p, None)


# ---------------------------------------------------------------------------
# Per-rule credential sources
# ---------------------------------------------------------------------------


def test_rule_credential_sources_override(authz, backend):
    p = uniq("/legacy/")
    seen = allowed(call(authz, "GET", p, headers=[("x-legacy-key", READER)]), backend, p, "reader")
    assert seen.values("x-legacy-key") == []  # the rule's carrier is stripped
    # The top-level sources do not apply on this route...
    for headers in ([xkey(READER)], [bearer(READER)]):
        p = uniq("/legacy/")
        denied(call(authz, "GET", p, headers=headers), backend, p, "missing_api_key", secrets_=(READER,))
    # ...and the rule's source does not apply elsewhere.
    p = unique_path()
    denied(call(authz, "GET", p, headers=[("x-legacy-key", READER)]), backend, p, "missing_api_key")
    p = uniq("/legacy/")
    denied(call(authz, "GET", p, headers=[("x-legacy-key", UNKNOWN)]), backend, p, "invalid_api_key")


def test_rule_credential_sources_challenge(authz, backend):
    """BUG (minor): the WWW-Authenticate scheme follows the top-level sources
    only. README: `Bearer realm=…` "or `ApiKey realm=…` when no Bearer source
    is configured" -- on a route whose own credential_sources have no Bearer
    source, the 401 still invites the client to send a Bearer token, which
    that route never reads."""
    p = uniq("/legacy/")
    r = call(authz, "GET", p)
    denied(r, backend, p, "missing_api_key", challenge='ApiKey realm="keygate"')


# ---------------------------------------------------------------------------
# Rate limits: per key, per rule and key, and where they sit in the order
# ---------------------------------------------------------------------------


def test_rule_rate_limit_has_its_own_bucket(authz, backend):
    def get(prefix: str, key: str) -> Response:
        p = uniq(prefix) if prefix.endswith("/") else unique_path()
        r = call(authz, "GET", p, key)
        if r.status != 200:
            assert not backend.started(p)
        return r

    # `limited` has its own default limit (burst 2); /metered/ (burst 3) and
    # /metered-b/ (burst 1) each keep another bucket for it.
    assert [get("/metered/", LIMITED).status for _ in range(3)] == [200] * 3
    r = get("/metered/", LIMITED)
    check_denial(r, "rate_limited", secrets_=(LIMITED,))
    assert r.header("ratelimit-policy") == '"default";q=3;w=300', r
    assert [get("/metered-b/", LIMITED).status for _ in range(1)] == [200]
    r = get("/metered-b/", LIMITED)
    check_denial(r, "rate_limited")
    assert r.header("ratelimit-policy") == '"default";q=1;w=100', r
    # The key's own bucket was untouched by the rule buckets.
    assert [get("", LIMITED).status for _ in range(2)] == [200, 200]
    r = get("", LIMITED)
    check_denial(r, "rate_limited")
    assert r.header("ratelimit-policy") == '"default";q=2;w=200', r
    assert int(r.header("retry-after")) > 90
    # Another key has its own bucket on the same rule, even without a limit of its own.
    assert [get("/metered/", UNLIMITED).status for _ in range(4)] == [200, 200, 200, 429]
    assert [get("", UNLIMITED).status for _ in range(10)] == [200] * 10


def test_a_key_id_with_a_slash_keeps_its_own_bucket(authz, backend):
    """Rule `metered` keeps a bucket for key `twin`; the key `metered/twin` has
    a limit of its own. Both were once named `keygate/rl/metered/twin`."""
    assert [call(authz, "GET", uniq("/metered/"), TWIN).status for _ in range(4)] == [200, 200, 200, 429]
    assert call(authz, "GET", unique_path(), SLASHED).status == 200
    check_denial(call(authz, "GET", unique_path(), SLASHED), "rate_limited")


def test_header_checks_do_not_spend_tokens(authz, backend):
    """missing_attribute and not_attached come before the rate limit: they
    do not consume the (single) token of `limited-attach`."""
    p = "/attach/header"
    check_denial(call(authz, "GET", p, LIMITED_ATTACH), "missing_attribute")
    check_denial(call(authz, "GET", p, LIMITED_ATTACH, headers=[("x-campaign", "c-99")]), "not_attached")
    assert call(authz, "GET", p, LIMITED_ATTACH, headers=[("x-campaign", "c-17")]).status == 200
    check_denial(call(authz, "GET", p, LIMITED_ATTACH, headers=[("x-campaign", "c-17")]), "rate_limited")


def test_rate_limit_before_body(authz, backend):
    """The limit is taken before the body is read: a request refused by its
    body still spends a token, and an over-limit request is refused without
    its body being looked at."""
    p = uniq("/attach/body/")
    denied(call(authz, "POST", p, LIMITED_BODY, body=js({"campaign": "c-99"})), backend, p, "not_attached")
    p = uniq("/attach/body/")
    allowed(call(authz, "POST", p, LIMITED_BODY, body=js({"campaign": "c-17"})), backend, p, "limited-body")
    p = uniq("/attach/body/")
    denied(call(authz, "POST", p, LIMITED_BODY, body=js({"campaign": "c-17"})), backend, p, "rate_limited")
    p = uniq("/attach/body/")
    denied(call(authz, "POST", p, LIMITED_BODY, body=b"not json"), backend, p, "rate_limited")


# ---------------------------------------------------------------------------
# Header and query attachments
# ---------------------------------------------------------------------------


def test_header_attachment(authz, backend):
    for value in ("c-17", "c-42"):
        before = len(backend.find("/attach/header"))
        r = call(authz, "GET", "/attach/header", FULL, headers=[("x-campaign", value)])
        assert r.status == 200, r
        assert backend.find("/attach/header")[before:][0].values("x-campaign") == [value.encode()]
    check_denial(call(authz, "GET", "/attach/header", READER, headers=[("x-campaign", "c-42")]), "not_attached")
    check_denial(call(authz, "GET", "/attach/header", FULL, headers=[("x-campaign", "C-17")]), "not_attached")
    check_denial(call(authz, "GET", "/attach/header", FULL), "missing_attribute")
    # The value in the query does not count for a header rule.
    check_denial(call(authz, "GET", "/attach/header?x-campaign=c-17", FULL), "missing_attribute")
    # A key without the set at all.
    check_denial(call(authz, "GET", "/attach/header", WRITER, headers=[("x-campaign", "c-17")]), "not_attached")


def test_header_attachment_repeated_header(authz, backend):
    """BUG: with `x-campaign: c-17` and `x-campaign: c-99`, keygate checks only
    the first value and forwards both; a backend reading the last value (or
    the joined "c-17, c-99") acts on campaign c-99, which the key is not
    attached to. Expected: refused (400 missing_attribute or 403
    not_attached), never forwarded."""
    p = "/attach/header?dup=" + secrets.token_hex(4)
    r = call(authz, "GET", p, READER, headers=[("x-campaign", "c-17"), ("x-campaign", "c-99")])
    assert r.status in (400, 403), r
    assert not backend.saw(p), "a request naming an unattached campaign reached the backend"


def test_header_attachment_underscore_copy(authz, backend):
    """`x_campaign` beside `x-campaign`: CGI-style servers merge both into
    HTTP_X_CAMPAIGN, so the copy makes the value ambiguous. Alone, it is not
    the attribute."""
    p = "/attach/header?u=" + secrets.token_hex(4)
    r = call(authz, "GET", p, READER, headers=[("x-campaign", "c-17"), ("x_campaign", "c-99")])
    denied(r, backend, p, "ambiguous_attribute", secrets_=(READER,))
    p = "/attach/header?u=" + secrets.token_hex(4)
    denied(call(authz, "GET", p, READER, headers=[("x_campaign", "c-17")]), backend, p, "missing_attribute")


def test_query_attachment_case_copy(authz, backend):
    """`Campaign` beside `campaign`: ASP.NET binds query parameters ignoring
    case, so the copy makes the value ambiguous."""
    p = "/attach/query?campaign=c-17&Campaign=c-99&n=" + secrets.token_hex(4)
    denied(call(authz, "GET", p, READER), backend, p, "ambiguous_attribute", secrets_=(READER,))


def test_query_attachment(authz, backend):
    for q in ("campaign=c-17", "campaign=c%2D17", "x=1&campaign=c-42&y=2"):
        p = f"/attach/query?{q}"
        before = len(backend.find(p))
        assert call(authz, "GET", p, FULL).status == 200
        assert len(backend.find(p)) == before + 1
    check_denial(call(authz, "GET", "/attach/query?campaign=c-99", FULL), "not_attached")
    check_denial(call(authz, "GET", "/attach/query?campaign=c-42", READER), "not_attached")
    for q in ("", "?", "?campaigns=c-17", "?Campaign=c-17"):
        check_denial(call(authz, "GET", "/attach/query" + q, FULL), "missing_attribute")
    # A header of that name does not count for a query rule.
    check_denial(call(authz, "GET", "/attach/query", FULL, headers=[("campaign", "c-17")]), "missing_attribute")


def test_query_attachment_repeated_parameter(authz, backend):
    """BUG: `?campaign=c-17&campaign=c-99` is judged on the first value only
    and forwarded as is; PHP, Django (QueryDict.get), Rails and others read
    the last one, c-99, which the key is not attached to. Expected: refused
    (400/403), never forwarded."""
    p = "/attach/query?campaign=c-17&campaign=c-99&n=" + secrets.token_hex(4)
    r = call(authz, "GET", p, READER)
    assert r.status in (400, 403), r
    assert not backend.saw(p), "a request naming an unattached campaign reached the backend"


# ---------------------------------------------------------------------------
# JSON-body attachments (HTTP/1)
# ---------------------------------------------------------------------------

BODY_CASES = {
    # name: (path prefix, body, expected code or None for allowed)
    "string": ("/attach/body/", js({"campaign": "c-17", "email": "a@example.com"}), None),
    "number": ("/attach/body/", js({"campaign": 17}), None),
    "bool": ("/attach/body/", js({"campaign": True}), None),
    "float_not_int": ("/attach/body/", js({"campaign": 17.0}), "not_attached"),
    "fraction": ("/attach/body/", js({"campaign": 0.5}), None),
    "fraction_spelled_otherwise": ("/attach/body/", b'{"campaign": 5e-1}', None),
    "other_fraction": ("/attach/body/", js({"campaign": 0.25}), "not_attached"),
    "other_campaign": ("/attach/body/", js({"campaign": "c-99"}), "not_attached"),
    "null": ("/attach/body/", js({"campaign": None}), "missing_attribute"),
    "object": ("/attach/body/", js({"campaign": {"id": "c-17"}}), "missing_attribute"),
    "array": ("/attach/body/", js({"campaign": ["c-17"]}), "missing_attribute"),
    "absent": ("/attach/body/", js({"campaign_id": "c-17"}), "missing_attribute"),
    "top_level_array": ("/attach/body/", js([{"campaign": "c-17"}]), "missing_attribute"),
    "not_json": ("/attach/body/", b"campaign=c-17", "invalid_json_body"),
    "truncated_json": ("/attach/body/", b'{"campaign": "c-17"', "invalid_json_body"),
    "empty": ("/attach/body/", b"", "invalid_json_body"),
    "pointer": ("/attach/pointer/", js({"lead": {"campaign": {"id": "c-42"}}}), None),
    "pointer_wrong": ("/attach/pointer/", js({"lead": {"campaign": {"id": "c-99"}}}), "not_attached"),
    "pointer_short": ("/attach/pointer/", js({"lead": {"campaign": "c-42"}}), "missing_attribute"),
    "pointer_top_level_not_used": ("/attach/pointer/", js({"campaign": "c-17"}), "missing_attribute"),
    "pointer_array_index": ("/attach/array/", js({"campaigns": ["c-99", "c-17"]}), None),
    "pointer_array_index_wrong": ("/attach/array/", js({"campaigns": ["c-17", "c-99"]}), "not_attached"),
    "slash_in_top_level_name": ("/attach/slashname/", js({"a/b": "c-17"}), None),
    "slash_name_is_not_a_pointer": ("/attach/slashname/", js({"a": {"b": "c-17"}}), "missing_attribute"),
    # Duplicate names: parsers disagree on which copy counts (most keep the
    # last, some the first), so a body naming a field twice is refused
    # whichever copy is attached, and wherever the repeated field is.
    "duplicate_last_unattached": ("/attach/body/", b'{"campaign": "c-17", "campaign": "c-99"}', "ambiguous_attribute"),
    "duplicate_first_unattached": ("/attach/body/", b'{"campaign": "c-99", "campaign": "c-17"}', "ambiguous_attribute"),
    "duplicate_elsewhere": ("/attach/body/", b'{"campaign": "c-17", "meta": {"x": 1, "x": 2}}', "ambiguous_attribute"),
    "same_name_in_two_objects": ("/attach/body/", b'{"campaign": "c-17", "a": {"x": 1}, "b": {"x": 2}}', None),
    # Go's encoding/json (and ASP.NET's defaults) match names ignoring case:
    # such a backend may read the unattached copy.
    "case_copy_unattached": ("/attach/body/", b'{"campaign": "c-17", "CAMPAIGN": "c-99"}', "ambiguous_attribute"),
    "case_copy_first": ("/attach/body/", b'{"Campaign": "c-99", "campaign": "c-17"}', "ambiguous_attribute"),
    "case_copy_on_the_pointer": ("/attach/pointer/", b'{"lead": {"campaign": {"id": "c-42"}}, "LEAD": {}}', "ambiguous_attribute"),
    # encoding/json folds each character to the upper case of its lower case,
    # which takes the dotless and the dotted i to I (escaped or raw UTF-8).
    "dotless_i_copy": ("/attach/body/", b'{"campaign": "c-17", "campa\\u0131gn": "c-99"}', "ambiguous_attribute"),
    "dotted_capital_i_copy": ("/attach/body/", '{"campaign": "c-17", "CAMPA\u0130GN": "c-99"}'.encode(), "ambiguous_attribute"),
    "i_with_diaeresis_is_another_name": ("/attach/body/", '{"campaign": "c-17", "campa\u00efgn": "c-99"}'.encode(), None),
    "case_variant_only": ("/attach/body/", b'{"Campaign": "c-17"}', "missing_attribute"),
    "case_variants_elsewhere": ("/attach/body/", b'{"campaign": "c-17", "meta": {"x": 1, "X": 2}}', None),
}


@pytest.mark.parametrize("prefix,body,code", list(BODY_CASES.values()), ids=list(BODY_CASES))
def test_json_body_attachment(authz, backend, prefix, body, code):
    p = uniq(prefix)
    r = call(authz, "POST", p, FULL, headers=[("content-type", "application/json")], body=body)
    if code is None:
        seen = allowed(r, backend, p, "full")
        assert seen.body == body
    else:
        denied(r, backend, p, code, secrets_=(FULL,))


def test_json_body_on_get_without_body(authz, backend):
    p = uniq("/attach/body/")
    denied(call(authz, "GET", p, FULL), backend, p, "invalid_json_body")


def test_json_body_size_boundary(authz, backend):
    def body_of(n: int) -> bytes:
        head = b'{"campaign": "c-17", "pad": "'
        b = head + b"x" * (n - len(head) - 2) + b'"}'
        assert len(b) == n
        return b

    p = uniq("/attach/body/")
    allowed(call(authz, "POST", p, FULL, body=body_of(MAX_BODY)), backend, p, "full")
    p = uniq("/attach/body/")
    denied(call(authz, "POST", p, FULL, body=body_of(MAX_BODY + 1)), backend, p, "body_too_large")
    p = uniq("/attach/body/")
    denied(call(authz, "POST", p, FULL, body=body_of(200_000)), backend, p, "body_too_large")
    assert authz.access_log_entry(p)["denial"] == "body_too_large (body over max_body_bytes)"


def _send_in_pieces(envoy: Envoy, path: str, key: str, pieces: list[bytes], chunked: bool, pause: float,
                    between=None) -> Response:
    body = b"".join(pieces)
    with envoy.connect() as c:
        head = [xkey(key), ("content-type", "application/json")]
        if chunked:
            head.append(("transfer-encoding", "chunked"))
            raw = build_request("GET", path, head)  # no content-length
            raw = raw.replace(b"GET ", b"POST ", 1)
        else:
            raw = build_request("POST", path, head, body)[: -len(body)]
        c.sock.sendall(raw)
        for i, piece in enumerate(pieces):
            time.sleep(pause)
            if between is not None:
                between(i)
            c.sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
        if chunked:
            c.sock.sendall(b"0\r\n\r\n")
        return c.read_response("POST")


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_json_body_in_pieces(authz, backend, chunked):
    """The body arrives in several reads (the campaign in the last one): the
    decision waits for the whole body, and the backend sees nothing before."""
    pad = b'{"pad": "' + b"p" * 300 + b'", '
    for campaign, code in (("c-17", None), ("c-99", "not_attached")):
        p = uniq("/attach/body/")
        pieces = [pad[:100], pad[100:], b'"campaign": "' + campaign.encode() + b'"}']

        def not_yet(_i: int, p=p) -> None:
            assert not backend.started(p), "a held request reached the backend before its body was checked"

        r = _send_in_pieces(authz, p, FULL, pieces, chunked, pause=0.1, between=not_yet)
        if code is None:
            assert allowed(r, backend, p, "full").body == b"".join(pieces)
        else:
            denied(r, backend, p, code)


def test_route_without_body_rule_is_not_buffered(authz, backend):
    """No body rule: the body streams to the backend as it arrives (the
    backend has the request before the client finished sending), and its
    size is not limited by max_body_bytes."""
    p = unique_path("stream")
    with authz.connect() as c:
        c.sock.sendall(build_request("GET", p, [xkey(FULL), ("transfer-encoding", "chunked")]).replace(b"GET", b"POST", 1))
        c.sock.sendall(b"6\r\nhello \r\n")
        assert wait_until(lambda: backend.started(p), timeout=5), "Envoy held the body of a route without a body rule"
        c.sock.sendall(b"5\r\nworld\r\n0\r\n\r\n")
        r = c.read_response("POST")
    assert r.status == 200, r
    assert backend.only(p).body == b"hello world"
    big = b"z" * (MAX_BODY * 50)
    p = unique_path("big")
    allowed(call(authz, "POST", p, FULL, body=big), backend, p, "full")
    assert backend.only(p).body == big


def test_expect_100_continue_on_body_route(authz, backend):
    body = js({"campaign": "c-42", "pad": "q" * 900})
    p = uniq("/attach/body/")
    with authz.connect() as c:
        raw = build_request("POST", p, [xkey(FULL), ("expect", "100-continue")], body)[: -len(body)]
        c.sock.sendall(raw)
        assert c.read_response().status == 100
        c.sock.sendall(body)
        r = c.read_response("POST")
    assert allowed(r, backend, p, "full").body == body


# ---------------------------------------------------------------------------
# JSON-body attachments over HTTP/2, with and without trailers
# ---------------------------------------------------------------------------


def _h2_post(envoy: Envoy, path: str, key: str, chunks: list[bytes], trailers=None) -> Response:
    res = h2_exchange(envoy.port, "POST", path, [("x-api-key", key), ("content-type", "application/json")],
                      chunks, trailers=trailers, pause=0.05)
    return res.response()


TRAILERS = [("x-body-sha256", "0" * 64)]


def test_h2_body_with_trailers_allowed(authz, backend):
    p = uniq("/attach/body/")
    chunks = [b'{"email": "a@example.com", ', b'"campaign": "c-17"}']
    r = _h2_post(authz, p, FULL, chunks, TRAILERS)
    seen = allowed(r, backend, p, "full")
    assert seen.body == b"".join(chunks)


@pytest.mark.parametrize("chunks,code", [
    ([b'{"campaign": ', b'"c-99"}'], "not_attached"),
    ([b'{"other": ', b'"c-17"}'], "missing_attribute"),
    ([b'{"campaign": ', b'"c-17"'], "invalid_json_body"),
    ([b'{"campaign": "c-17", "pad": "', b"x" * MAX_BODY, b'"}'], "body_too_large"),
], ids=["not_attached", "missing_attribute", "invalid_json_body", "body_too_large"])
def test_h2_body_with_trailers_denied(authz, backend, chunks, code):
    p = uniq("/attach/body/")
    denied(_h2_post(authz, p, FULL, chunks, TRAILERS), backend, p, code)


def test_h2_body_in_frames_without_trailers(authz, backend):
    p = uniq("/attach/pointer/")
    chunks = [b'{"lead": ', b'{"campaign": ', b'{"id": "c-42"}}}']
    assert allowed(_h2_post(authz, p, FULL, chunks), backend, p, "full").body == b"".join(chunks)
    p = uniq("/attach/pointer/")
    denied(_h2_post(authz, p, READER, chunks), backend, p, "not_attached")


def test_h2_header_and_query_attachments(authz, backend):
    p = "/attach/query?campaign=c-17&h2=" + secrets.token_hex(4)
    res = h2_exchange(authz.port, "GET", p, [("x-api-key", READER)])
    allowed(res.response(), backend, p, "reader")
    res = h2_exchange(authz.port, "GET", "/attach/header", [("x-api-key", READER), ("x-campaign", "c-42")])
    check_denial(res.response(), "not_attached")


# ---------------------------------------------------------------------------
# Invalid configurations of the rule and key-metadata fields
# ---------------------------------------------------------------------------

_H = sha256_hex("kz_config_key")


def _key(**meta: Any) -> dict:
    return {"keys": [{"id": "a", "sha256": _H, **meta}]}


def _rule(**fields: Any) -> dict:
    rule = {"name": "r", "match": {"path_prefix": "/x/"}, "action": "require"}
    rule.update(fields)
    return {"rules": [rule]}


# Each of these alone makes Envoy refuse to start (one start each: the
# field-type errors stop parsing, so they cannot share a configuration).
INVALID = {
    "bad_expires_at": (_key(expires_at="next tuesday"), "keys[0].expires_at"),
    "bad_cidr": (_key(allowed_cidrs=["127.0.0.1/32", "10.0.0.0/33"]), "keys[0].allowed_cidrs[1]"),
    "public_rule_with_scopes": (_rule(action="public", scopes_any_of=["read"]), "rules[0].action"),
    "path_without_slash": (_rule(match={"path": "api/v1"}), "rules[0].match.path"),
    "duplicate_rule_names": ({"rules": [{"name": "same", "action": "public", "match": {"path": "/a"}},
                                        {"name": "same", "action": "deny", "match": {"path": "/b"}}]},
                             "rules[1].name"),
    "unknown_action": (_rule(action="allow"), "rules[0].action"),
    "unknown_default_action": ({"default_action": "allow_all"}, "default_action"),
    "unknown_match_field": (_rule(match={"paths": "/x"}), "rules[0].match.paths"),
    "unknown_attachment_source": (_rule(attachment={"set": "campaigns", "from": {"cookie": "c"}}),
                                  "rules[0].attachment.from"),
}


@pytest.mark.parametrize("config,field", list(INVALID.values()), ids=list(INVALID))
def test_invalid_configuration_names_the_field(envoy_fn, config: dict, field: str):
    log = envoy_fn(config, start=False).start_expect_failure(timeout=20)
    pattern = r"keygate: invalid configuration: " + re.escape(field) + r": "
    assert re.search(pattern, log), f"no line matching {pattern!r}:\n{log[-3000:]}"


def test_invalid_rules_and_keys_reported_together(envoy_fn):
    """Every other validation of the new fields, in one configuration: Envoy
    refuses it and the log names each field."""

    def key(i: int, **meta: Any) -> dict:
        return {"id": f"k{i}", "sha256": sha256_hex(f"kz_config_key_{i}"), **meta}

    def rule(name: str, **fields: Any) -> dict:
        r = {"name": name, "match": {"path_prefix": f"/{name}/"}, "action": "require"}
        r.update(fields)
        return r

    cfg = {
        "keys": [
            key(0, expires_at="2030-01-01T00:00:00"),  # no offset
            key(1, expires_at="2030-13-01T00:00:00Z"),  # month 13
            key(2, allowed_cidrs=["localhost"]),
            key(3, allowed_cidrs=["300.1.1.1"]),
            key(4, scopes=["read", "has space"]),
            key(5, environment=""),
        ],
        "rules": [
            rule("deny-attach", action="deny", attachment=attach(header="x-c")),
            rule("public-limit", action="public", rate_limit=SLOW(1)),
            rule("public-sources", action="public", credential_sources=[{"type": "bearer"}]),
            rule("prefix", match={"path_prefix": "api/"}),
            rule("both", match={"path": "/a", "path_prefix": "/a/"}),
            rule("host", match={"host": "api.*.example.com"}),
            rule("method", match={"methods": ["GE T"]}),
            rule("json-empty", attachment=attach(json_body="")),
            rule("zero-burst", rate_limit=SLOW(0)),
            rule("no-sources", credential_sources=[]),
            rule("identity-source", credential_sources=[{"type": "header", "name": "x-api-key-id"}]),
            rule("bad name"),
            rule("env", environments=[""]),
            rule("scope", scopes_all_of=["a b"]),
            rule("host-port", action="deny", match={"host": "admin.example.com:8443"}),
            rule("host-dot", action="deny", match={"host": "admin.example.com."}),
        ],
        "max_body_bytes": 0,
    }
    log = envoy_fn(cfg, start=False).start_expect_failure(timeout=20)
    fields = [
        "keys[0].expires_at", "keys[1].expires_at", "keys[2].allowed_cidrs[0]", "keys[3].allowed_cidrs[0]",
        "keys[4].scopes[1]", "keys[5].environment",
        "rules[0].action", "rules[1].action", "rules[2].action", "rules[3].match.path_prefix", "rules[4].match",
        "rules[5].match.host", "rules[6].match.methods[0]", "rules[7].attachment.from.json_body",
        "rules[8].rate_limit.burst", "rules[9].credential_sources", "identity_header", "rules[11].name",
        "rules[12].environments[0]", "rules[13].scopes_all_of[0]", "rules[14].match.host", "rules[15].match.host",
        "max_body_bytes",
    ]
    missing = [f for f in fields if f"keygate: invalid configuration: {f}: " not in log]
    assert not missing, (missing, log[-4000:])


def test_zz_vm_healthy(authz, closed):
    for envoy in (authz, closed):
        stats = envoy.stats()
        assert not {n: v for n, v in stats.items() if n.startswith("wasm.keygate.vm_reload") and v != "0"}
        assert "panicked" not in envoy.log_text()
