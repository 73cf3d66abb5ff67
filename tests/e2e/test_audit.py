"""Audit by key in the access log: on every refusal after the key is read,
the filter state `wasm.keygate_key` names it (its id, or its masked form for
a key not in the list), never the key itself."""

from __future__ import annotations

import secrets

import pytest

from harness import sha256_hex, unique_path, xkey

READER = "kg_audit_reader_" + secrets.token_hex(8)
LIMITED = "kg_audit_limited_" + secrets.token_hex(8)
EXPIRED = "kg_audit_old_" + secrets.token_hex(8)
REVOKED = "kg_audit_gone_" + secrets.token_hex(8)
UNKNOWN = "kg_audit_unknown_" + secrets.token_hex(8)

CONFIG = {
    "keys": [
        {"id": "reader", "sha256": sha256_hex(READER), "scopes": ["read"]},
        {"id": "limited", "sha256": sha256_hex(LIMITED), "rate_limit": {"requests_per_second": 0.001, "burst": 1}},
        {"id": "old", "sha256": sha256_hex(EXPIRED), "expires_at": "2020-01-01T00:00:00Z"},
        {"id": "gone", "sha256": sha256_hex(REVOKED), "disabled": True},
    ],
    "rules": [{"name": "write", "match": {"path_prefix": "/write"}, "action": "require", "scopes_any_of": ["write"]}],
}


@pytest.fixture(scope="module")
def gate(envoy_factory):
    return envoy_factory(CONFIG, access_log=True)


def logged(gate, prefix: str, key: str | None) -> dict:
    path = unique_path(prefix)
    gate.request("GET", path, headers=[xkey(key)] if key else [])
    return gate.access_log_entry(path)


@pytest.mark.parametrize(
    "prefix, key, status, code, shown",
    [
        ("write", READER, 403, "insufficient_scope", "reader"),
        ("r", EXPIRED, 401, "expired_api_key", "old"),
        ("r", REVOKED, 401, "invalid_api_key", "gone"),
        ("r", UNKNOWN, 401, "invalid_api_key", UNKNOWN[:4] + "…" + UNKNOWN[-4:]),
    ],
    ids=["403 scope", "401 expired", "401 revoked", "401 unknown (masked)"],
)
def test_a_refusal_names_its_key_in_the_access_log(gate, prefix, key, status, code, shown):
    e = logged(gate, prefix, key)
    assert (e["status"], e["denial"].split(" ")[0], e["key"]) == (status, code, shown), e
    assert key not in str(e)


def test_a_rate_limited_key_is_named(gate):
    assert logged(gate, "r", LIMITED)["key"] in ("-", "", None)  # allowed: nothing to audit
    e = logged(gate, "r", LIMITED)
    assert (e["status"], e["key"]) == (429, "limited"), e


def test_no_key_means_no_key_named(gate):
    e = logged(gate, "r", None)
    assert e["status"] == 401 and e["key"] in ("-", "", None), e
