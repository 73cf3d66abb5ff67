"""Route rules and key metadata end to end, where a case file cannot say
it: a request compared with another, rate limits over several requests
(per key, per rule and key, and where they sit in the order), JSON bodies
sent in pieces, with Expect: 100-continue or over HTTP/2 with trailers, a
body streamed to the backend, and the configuration errors of these fields.

The request/answer pairs of this configuration (every denial code, rule
matching, scopes, environments, expiry, revocation, CIDRs, per-rule sources,
header, query and JSON-body attachments) are cases in
tests/cases/authz.json, replayed by test_cases.py; that file also holds the
configuration and the test keys used here. The Envoy here runs with
Envoy's default connection manager and an access log showing keygate's
denial filter state.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from typing import Any, Optional

import pytest

import case_table
from harness import (
    Envoy,
    Response,
    build_request,
    check_denial,
    h2_exchange,
    sha256_hex,
    unique_path,
    wait_until,
    xkey,
)

AUTHZ = case_table.load("authz.json")
MAX_BODY = AUTHZ.config()["max_body_bytes"]

FULL = AUTHZ.keys["full"]  # read, write, ingest; live; campaigns c-17 c-42 17 true 0.5
READER = AUTHZ.keys["reader"]  # read; live; campaigns c-17
REVOKED = AUTHZ.keys["revoked"]  # disabled, and expired too
LIMITED = AUTHZ.keys["limited"]  # own limit: burst 2, 0.01/s
LIMITED_ATTACH = AUTHZ.keys["limited-attach"]  # own limit: burst 1; campaigns c-17
LIMITED_BODY = AUTHZ.keys["limited-body"]  # own limit: burst 2; campaigns c-17
UNLIMITED = AUTHZ.keys["unlimited"]  # no limit of its own
SLASHED = AUTHZ.keys["slashed"]  # id "metered/twin", own limit: burst 1
TWIN = AUTHZ.keys["twin"]  # id "twin", no limit of its own
UNKNOWN = AUTHZ.keys["unknown"]  # not configured

SLOW = lambda burst: {"requests_per_second": 0.01, "burst": burst}  # noqa: E731


def attach(**source: str) -> dict:
    return {"set": "campaigns", "from": source}


@pytest.fixture(scope="module")
def authz(envoy_factory) -> Envoy:
    return envoy_factory(AUTHZ.config_text(), access_log=True)


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
# A revoked key's reply, compared with an unknown key's
# ---------------------------------------------------------------------------


def test_revoked_key_looks_unknown(authz, backend):
    """Revocation is checked before expiry; the reply is byte for byte the
    unknown-key reply (the access log's reason, which tells them apart, is
    checked by the case in authz.json)."""
    p = unique_path()
    r = call(authz, "GET", p, REVOKED)
    body = denied(r, backend, p, "invalid_api_key", secrets_=(REVOKED,))
    unknown = call(authz, "GET", unique_path(), UNKNOWN)
    assert unknown.json() == body
    assert [h for h in r.headers if h[0] != "date"] == [h for h in unknown.headers if h[0] != "date"]


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
# JSON-body attachments sent in pieces (HTTP/1)
# ---------------------------------------------------------------------------


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
    backend has the request before the client finished sending). That its
    size is not limited by max_body_bytes is a case in authz.json."""
    p = unique_path("stream")
    with authz.connect() as c:
        c.sock.sendall(build_request("GET", p, [xkey(FULL), ("transfer-encoding", "chunked")]).replace(b"GET", b"POST", 1))
        c.sock.sendall(b"6\r\nhello \r\n")
        assert wait_until(lambda: backend.started(p), timeout=5), "Envoy held the body of a route without a body rule"
        c.sock.sendall(b"5\r\nworld\r\n0\r\n\r\n")
        r = c.read_response("POST")
    assert r.status == 200, r
    assert backend.only(p).body == b"hello world"


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
                                  "rules[0].attachment.from.cookie"),
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


def test_zz_vm_healthy(authz):
    stats = authz.stats()
    assert not {n: v for n, v in stats.items() if n.startswith("wasm.keygate.vm_reload") and v != "0"}
    assert "panicked" not in authz.log_text()
