"""`"forward_with": "filter_state"` in real Envoy: keygate writes the identity
and the forwarded key fields to filter state and edits no request header on
an honest request; the route's `request_headers_to_remove` and
`request_headers_to_add` put them on the wire. The case files replay every
case in this mode too (test_cases.py, ids `filter_state:...`); this module
covers what they cannot: Envoy's own order (remove, then add), no header for
an absent filter state, consumers and forwarded fields, a route that forgets
the header configuration, and `keygate validate --kind envoy` on Envoy's
own configuration dump."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from harness import Envoy, filter_state_headers, key_entry, new_key, unique_path, xkey
from test_cli_control_plane import keygate_bin

ALPHA = new_key()
TEAM_A = new_key()
TEAM_B = new_key()

CONFIG = {
    "forward_with": "filter_state",
    "forward": {"environment": "x-api-key-environment", "scopes": "x-api-key-scopes"},
    "keys": [
        {**key_entry("alpha", ALPHA), "environment": "live", "scopes": ["read", "write"]},
        {**key_entry("team-a-1", TEAM_A), "consumer": "team-a"},
        {**key_entry("team-a-2", TEAM_B), "consumer": "team-a"},
    ],
    "rules": [{"name": "health", "match": {"path_prefix": "/public"}, "action": "public"}],
}


def routes() -> dict:
    """Three routes: `/forgot` forwards without the header configuration (as
    an operator might forget it), `/order` shows Envoy's order (it removes
    and adds `x-order`), everything else has the configuration keygate's
    mode needs."""
    good = filter_state_headers(CONFIG)
    order = {
        "request_headers_to_remove": good["request_headers_to_remove"] + ["x-order"],
        "request_headers_to_add": good["request_headers_to_add"] + [{"header": {"key": "x-order", "value": "route"}}],
    }
    return {
        "route_config": {
            "name": "local",
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [
                        {"match": {"prefix": "/forgot"}, "route": {"cluster": "backend"}},
                        {"match": {"prefix": "/order"}, "route": {"cluster": "backend"}, **order},
                        {"match": {"prefix": "/"}, "route": {"cluster": "backend"}, **good},
                    ],
                }
            ],
        }
    }


@pytest.fixture(scope="module")
def gate(envoy_factory) -> Envoy:
    return envoy_factory(CONFIG, hcm_extra=routes(), access_log=True)


def forwarded(gate: Envoy, backend, headers, prefix: str = "r"):
    path = unique_path(prefix)
    r = gate.request("GET", path, headers)
    assert r.status == 200, r
    return backend.only(path)


def test_identity_and_fields_reach_the_backend_and_the_credential_does_not(gate, backend):
    seen = forwarded(gate, backend, [xkey(ALPHA)])
    assert seen.values("x-api-key-id") == [b"alpha"], seen.headers
    assert seen.values("x-api-key-environment") == [b"live"], seen.headers
    assert seen.values("x-api-key-scopes") == [b"read,write"], seen.headers
    assert seen.values("x-api-key") == [] and seen.values("x-api-key-key-id") == [], seen.headers
    assert not [v for _, v in seen.headers if ALPHA.encode() in v], seen.headers


def test_a_consumer_key_forwards_the_consumer_and_its_own_id(gate, backend):
    for key, key_id in ((TEAM_A, "team-a-1"), (TEAM_B, "team-a-2")):
        seen = forwarded(gate, backend, [("authorization", f"Bearer {key}")])
        assert seen.values("x-api-key-id") == [b"team-a"], seen.headers
        assert seen.values("x-api-key-key-id") == [key_id.encode()], seen.headers
        # A key without environment or scopes: the route adds no empty header.
        assert seen.values("x-api-key-environment") == [] and seen.values("x-api-key-scopes") == [], seen.headers
        assert seen.values("authorization") == [], seen.headers


def test_identity_cannot_be_spoofed(gate, backend):
    spoofs = [
        ("x-api-key-id", "evil"),
        ("X-Api-Key-Id", "evil2"),
        ("x_api_key_id", "evil3"),
        ("x-api-key_id", "evil4"),
        ("x-api-key-key-id", "evil5"),
        ("x-api-key-environment", "evil6"),
        ("x_api_key_scopes", "evil7"),
    ]
    for prefix in ("r", "forgot"):
        # Even on the route that forgot the configuration: keygate removes
        # client copies itself (an edit only when a client sends one).
        seen = forwarded(gate, backend, [*spoofs, xkey(TEAM_A)], prefix)
        assert not [v for _, v in seen.headers if v.startswith(b"evil")], (prefix, seen.headers)
    seen = forwarded(gate, backend, [*spoofs, xkey(TEAM_A)])
    assert seen.values("x-api-key-id") == [b"team-a"], seen.headers


def test_a_public_route_gets_no_identity(gate, backend):
    # No filter state: %FILTER_STATE(...)% formats empty and Envoy adds no header.
    seen = forwarded(gate, backend, [("x-api-key-id", "evil"), ("x_api_key_id", "evil2")], "public")
    for name in ("x-api-key-id", "x-api-key-key-id", "x-api-key-environment", "x-api-key-scopes"):
        assert seen.values(name) == [], (name, seen.headers)
    assert not [v for _, v in seen.headers if v.startswith(b"evil")], seen.headers


def test_envoy_removes_before_it_adds(gate, backend):
    seen = forwarded(gate, backend, [xkey(ALPHA), ("x-order", "client")], "order")
    assert seen.values("x-order") == [b"route"], seen.headers
    assert seen.values("x-api-key-id") == [b"alpha"], seen.headers


def test_a_route_without_the_configuration_forwards_no_identity(gate, backend):
    """What `keygate validate --kind envoy` is for: keygate cannot see the
    route, so a route without the headers forwards the credential and no
    identity (still no spoofed one)."""
    seen = forwarded(gate, backend, [xkey(ALPHA)], "forgot")
    assert seen.values("x-api-key-id") == [], seen.headers
    assert seen.values("x-api-key") == [ALPHA.encode()], seen.headers


def validate(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(keygate_bin()), "validate", "--kind", "envoy", str(path)], capture_output=True, text=True, timeout=30
    )


def test_validate_names_the_route_that_forgot(gate, tmp_path: Path):
    dump = tmp_path / "config_dump.json"
    dump.write_text(gate.admin_get("/config_dump"))
    out = validate(dump)
    assert out.returncode == 1, out
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    # Only the first route (/forgot), and every header it lacks.
    assert errors and all(".routes[0]: " in e for e in errors), errors
    lacking = {"x-api-key", "authorization", "x-api-key-id", "x-api-key-key-id", "x-api-key-environment", "x-api-key-scopes"}
    for name in lacking:
        assert any(f'request_headers_to_remove lacks "{name}"' in e for e in errors), (name, errors)
    assert any("wasm.keygate_identity:PLAIN" in e for e in errors), errors


def test_validate_accepts_the_routes_with_the_configuration(envoy_fn, tmp_path: Path):
    e = envoy_fn(CONFIG, hcm_extra={"route_config": {**routes()["route_config"]}})
    dump = json.loads(e.admin_get("/config_dump"))
    text = json.dumps(dump)
    # Drop the /forgot route: the two others pass.
    for cfg in _route_configs(dump):
        cfg["virtual_hosts"][0]["routes"] = cfg["virtual_hosts"][0]["routes"][1:]
    assert json.dumps(dump) != text
    path = tmp_path / "config_dump.json"
    path.write_text(json.dumps(dump))
    out = validate(path)
    assert out.returncode == 0, out.stderr
    assert "forward_with filter_state, 2 forwarding routes checked" in out.stdout, out.stdout


def _route_configs(node):
    if isinstance(node, dict):
        if "virtual_hosts" in node:
            yield node
        for v in node.values():
            yield from _route_configs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _route_configs(v)


@pytest.mark.parametrize("mode", ["headers", "filter_state"])
def test_only_header_mode_lets_the_identity_select_a_route(envoy_fn, mode: str):
    """keygate's header edits make Envoy match the route again, so a route can
    match on the identity header; with filter state the route is chosen before
    its header options run, so the same route never matches (README,
    "Forwarding through filter state")."""
    config = {**CONFIG, "forward_with": mode}
    answer = lambda text: {"direct_response": {"status": 200, "body": {"inline_string": text}}}  # noqa: E731
    by_identity = {"prefix": "/who", "headers": [{"name": "x-api-key-id", "string_match": {"exact": "alpha"}}]}
    route_config = {
        "route_config": {
            "name": "local",
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [{"match": by_identity, **answer("by-identity")}, {"match": {"prefix": "/who"}, **answer("default")}],
                }
            ],
        }
    }
    gate = envoy_fn(config, hcm_extra=route_config)
    r = gate.request("GET", "/who", [xkey(ALPHA)])
    assert r.status == 200, r
    assert r.body == (b"by-identity" if mode == "headers" else b"default"), (mode, r.body)
    # A client's own copy of the identity header never selects the route: keygate
    # removes it (any mode), and a request without a valid key is refused first.
    r = gate.request("GET", "/who", [xkey(TEAM_A), ("x-api-key-id", "alpha")])
    assert r.body == b"default", (mode, r.body)
