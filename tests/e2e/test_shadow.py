"""Shadow (report-only) mode in real Envoy: one request set against one
configuration, in enforce and in shadow. Shadow reports the refusals enforce
answers (same codes, same counts), forwards every request, and sets the
identity header only for a valid key."""

from __future__ import annotations

import secrets

import pytest

from harness import (
    Envoy,
    bearer,
    sha256_hex,
    unique_path,
    wait_until,
    xkey,
)

READER = "kg_shadow_reader_" + secrets.token_hex(8)
CAMPAIGNER = "kg_shadow_camp_" + secrets.token_hex(8)
REVOKED = "kg_shadow_gone_" + secrets.token_hex(8)
EXPIRED = "kg_shadow_old_" + secrets.token_hex(8)
UNKNOWN = "kg_shadow_unknown_" + secrets.token_hex(8)


def config(mode: str) -> dict:
    return {
        "mode": mode,
        "keys": [
            {"id": "reader", "sha256": sha256_hex(READER), "scopes": ["read"],
             "rate_limit": {"requests_per_second": 0.001, "burst": 2}},
            {"id": "campaigner", "sha256": sha256_hex(CAMPAIGNER),
             "attachments": {"campaigns": ["c-1"]}},
            {"id": "gone", "sha256": sha256_hex(REVOKED), "disabled": True},
            {"id": "old", "sha256": sha256_hex(EXPIRED), "expires_at": "2020-01-01T00:00:00Z"},
        ],
        "rules": [
            {"name": "admin", "match": {"path_prefix": "/admin"}, "action": "deny"},
            {"name": "write", "match": {"path_prefix": "/write"}, "action": "require",
             "scopes_any_of": ["write"]},
            {"name": "ingest", "match": {"path_prefix": "/ingest"}, "action": "require",
             "attachment": {"set": "campaigns", "from": {"json_body": "campaign"}}},
        ],
    }


# (name, path prefix, headers, body, code enforce answers or None when allowed)
REQUESTS = [
    ("allowed", "/r", [xkey(READER)], b"", None),
    ("allowed again", "/r", [xkey(READER)], b"", None),
    ("over the burst", "/r", [xkey(READER)], b"", "rate_limited"),
    ("no key, spoofed identity", "/r", [("x-api-key-id", "reader")], b"", "missing_api_key"),
    ("malformed", "/r", [("x-api-key", "two words")], b"", "malformed_api_key"),
    ("unknown", "/r", [xkey(UNKNOWN)], b"", "invalid_api_key"),
    ("revoked", "/r", [bearer(REVOKED)], b"", "invalid_api_key"),
    ("expired", "/r", [xkey(EXPIRED)], b"", "expired_api_key"),
    ("scope", "/write", [xkey(CAMPAIGNER)], b"", "insufficient_scope"),
    ("denied route", "/admin", [xkey(CAMPAIGNER)], b"", "route_not_allowed"),
    ("attached body", "/ingest", [xkey(CAMPAIGNER)], b'{"campaign":"c-1"}', None),
    ("unattached body", "/ingest", [xkey(CAMPAIGNER)], b'{"campaign":"c-2"}', "not_attached"),
]

CODES = sorted({c for *_, c in REQUESTS if c})


def run_set(gate: Envoy, backend) -> dict[str, dict]:
    """Sends REQUESTS once; for each, the status, whether the backend saw it,
    the identity it saw, and the access-log entry."""
    out = {}
    for name, prefix, headers, body, _ in REQUESTS:
        path = unique_path(prefix.strip("/"))
        method = "POST" if body else "GET"
        r = gate.request(method, path, headers=[*headers, ("x_api_key_id", "spoofed")], body=body)
        seen = backend.find(path)
        out[name] = {
            "status": r.status,
            "reached": bool(seen),
            "identity": [v.decode() for s in seen for v in s.values("x-api-key-id") + s.values("x_api_key_id")],
            "log": gate.access_log_entry(path),
        }
    return out


def counts(gate: Envoy, kind: str) -> dict[str, int]:
    return {c: gate.counter(f"keygate.{kind}.{c}") for c in CODES}


@pytest.fixture(scope="module")
def both(envoy_factory, backend):
    enforce = envoy_factory(config("enforce"), access_log=True, concurrency=2)
    shadow = envoy_factory(config("shadow"), access_log=True, concurrency=2)
    return run_set(enforce, backend), run_set(shadow, backend), enforce, shadow


def test_shadow_counts_equal_enforce_denials_and_every_request_reaches_the_backend(both):
    e, s, enforce, shadow = both
    want = {c: sum(1 for *_, code in REQUESTS if code == c) for c in CODES}
    assert wait_until(lambda: counts(enforce, "denied") == want, timeout=5), counts(enforce, "denied")
    assert wait_until(lambda: counts(shadow, "shadow") == want, timeout=5), counts(shadow, "shadow")
    assert counts(shadow, "denied") == {c: 0 for c in CODES}
    assert counts(enforce, "shadow") == {c: 0 for c in CODES}
    for name, *_, code in REQUESTS:
        assert e[name]["reached"] == (code is None), name
        assert s[name]["reached"], f"shadow forwards {name}"
        assert s[name]["status"] == 200, name


def test_shadow_state_names_the_refusal_in_the_access_log(both):
    e, s, _, _ = both
    for name, *_, code in REQUESTS:
        log = s[name]["log"]
        if code is None:
            assert log["shadow"] in ("-", "", None), (name, log)
        else:
            assert log["shadow"].startswith(f"{code} ("), (name, log)
            assert e[name]["log"]["denial"].startswith(f"{code} ("), (name, e[name]["log"])
        assert log["denial"] in ("-", "", None), (name, log)


def test_identity_only_for_a_valid_key_and_never_spoofed(both):
    _, s, _, _ = both
    valid = {"allowed": "reader", "allowed again": "reader", "over the burst": "reader",
             "scope": "campaigner", "denied route": None, "attached body": "campaigner",
             "unattached body": "campaigner"}
    for name, *_ in REQUESTS:
        want = valid.get(name)
        assert s[name]["identity"] == ([want] if want else []), (name, s[name]["identity"])


def test_debug_log_reports_what_would_be_denied(envoy_fn, backend):
    gate = envoy_fn(config("shadow"), log_level="info", component_log_level="wasm:debug")
    path = unique_path("r")
    assert gate.request("GET", path, headers=[xkey(UNKNOWN)]).status == 200
    gate.stop()  # flushes the log
    text = gate.log_text()
    assert "shadow: would deny invalid_api_key (unknown key) key=masked=kg_s…" in text
    assert UNKNOWN not in text and UNKNOWN[4:-4] not in text


def test_invalid_mode_is_refused_with_its_field(envoy_fn):
    gate = envoy_fn({"mode": "report"}, start=False)
    log = gate.start_expect_failure()
    assert "mode" in log and "unknown variant" in log, log[-2000:]

