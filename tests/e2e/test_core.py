"""keygate behaviour, end to end: Envoy + the wasm filter + a recording backend.

Each Envoy is started once per plugin configuration (module-scoped), and each
request uses a fresh path so the backend's record can be searched for it.
"""

from __future__ import annotations

import os
import re
import threading
import time
import urllib.request
from typing import Any, Optional

import pytest

from conftest import report
import harness
from harness import (
    Envoy,
    Response,
    bearer,
    key_entry,
    new_key,
    sha256_hex,
    unique_path,
    wait_until,
    xkey,
)

# ---------------------------------------------------------------------------
# Keys and configurations
# ---------------------------------------------------------------------------

ALPHA = new_key()  # unlimited
OTHER = new_key()  # unlimited, a second valid key
RL_A = new_key()  # rps 1, burst 3
RL_B = new_key()  # rps 1, burst 3 (independent bucket)
UNKNOWN = new_key()  # never configured

GATE_CONFIG = {
    "keys": [
        key_entry("alpha", ALPHA),
        key_entry("other", OTHER),
        key_entry("rl-a", RL_A, {"requests_per_second": 1, "burst": 3}),
        key_entry("rl-b", RL_B, {"requests_per_second": 1, "burst": 3}),
    ],
}

VARIANT_KEY = "kg_" + new_key()
VARIANT_CONFIG = {
    "credential_sources": [{"type": "header", "name": "x-api-key"}, {"type": "bare"}],
    "keys": [key_entry("variant", VARIANT_KEY)],
    "strip_credentials": False,
    "identity_header": "x-client",
    "key_prefixes": ["kg_"],
    "realm": "e2e",
}

HEADER_ONLY_KEY = new_key()
HEADER_ONLY_CONFIG = {
    "credential_sources": [{"type": "header", "name": "x-api-key"}],
    "keys": [key_entry("h", HEADER_ONLY_KEY)],
}

CHALLENGE = 'Bearer realm="keygate"'


@pytest.fixture(scope="module")
def gate(envoy_factory) -> Envoy:
    return envoy_factory(GATE_CONFIG)


@pytest.fixture(scope="module")
def variant(envoy_factory) -> Envoy:
    return envoy_factory(VARIANT_CONFIG)


@pytest.fixture(scope="module")
def header_only(envoy_factory) -> Envoy:
    return envoy_factory(HEADER_ONLY_CONFIG)


# ---------------------------------------------------------------------------
# Assertions
# ---------------------------------------------------------------------------

def assert_denied(
    r: Response,
    code: str,
    *,
    backend=None,
    path: Optional[str] = None,
    secrets_: tuple = (),
    challenge: str = CHALLENGE,
) -> dict:
    """The reply is keygate's denial `code` (harness.check_denial), and the
    backend never saw `path`."""
    body = harness.check_denial(r, code, challenge=challenge, secrets_=secrets_)
    if backend is not None and path is not None:
        assert not backend.saw(path), f"backend saw denied request {path}"
    return body


def assert_allowed(r: Response, backend, path: str, key_id: str, identity: str = "x-api-key-id"):
    assert r.status == 200, r
    seen = backend.only(path)
    assert seen.values(identity) == [key_id.encode()], seen.headers
    return seen


def assert_vm_healthy(envoy: Envoy) -> None:
    """No panic was logged and Envoy never had to reload the keygate VM
    (FAIL_RELOAD would hide a crash behind a fresh VM otherwise)."""
    stats = envoy.stats()
    reloads = {k: v for k, v in stats.items() if k.startswith("wasm.keygate.vm_reload") and v != "0"}
    assert not reloads, reloads
    log = envoy.log_text()
    assert "panicked" not in log and "panic:" not in log, log[-3000:]


def get(envoy: Envoy, headers, path: Optional[str] = None) -> tuple[Response, str]:
    path = path or unique_path()
    return envoy.request("GET", path, headers), path


# ---------------------------------------------------------------------------
# 401s
# ---------------------------------------------------------------------------


def test_missing_key(gate, backend):
    r, p = get(gate, [("x-other", "v")])
    assert_denied(r, "missing_api_key", backend=backend, path=p)


def test_missing_key_post_with_body(gate, backend):
    p = unique_path()
    r = gate.request("POST", p, [("content-type", "application/json")], b'{"a":1}')
    assert_denied(r, "missing_api_key", backend=backend, path=p)


MALFORMED = {
    "empty": [("x-api-key", b"")],
    "space_inside": [("x-api-key", b"ab cd")],
    "space_inside_valid_parts": [("x-api-key", ALPHA[:10] + " " + ALPHA[10:])],
    "tab_inside": [("x-api-key", b"ab\tcd")],  # the only control char Envoy's codec lets through
    "comma": [("x-api-key", ALPHA + ",x")],
    "too_long": [("x-api-key", b"a" * 257)],
    "non_utf8": [("x-api-key", b"ab\xffcd")],
    "non_ascii_utf8": [("x-api-key", "cl\u00e9-" + ALPHA)],
    "bearer_without_token": [("authorization", b"Bearer")],
    "bearer_space_only": [("authorization", b"Bearer ")],
    "bearer_token_with_space": [("authorization", b"Bearer ab cd")],
    "basic_scheme": [("authorization", b"Basic xyz")],
    "schemeless_without_bare": [("authorization", ALPHA)],
    "bearer_empty_token_two_spaces": [("authorization", b"Bearer  ")],
}


@pytest.mark.parametrize("headers", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed(gate, backend, headers):
    r, p = get(gate, headers)
    assert_denied(r, "malformed_api_key", backend=backend, path=p, secrets_=(ALPHA,))


@pytest.mark.parametrize("ctl", [b"\x01", b"\x00", b"\x7f", b"\x1b"], ids=["soh", "nul", "del", "esc"])
def test_control_chars_refused_before_the_filter(gate, backend, ctl):
    """Envoy's HTTP/1 codec rejects control characters (other than tab) in
    header values with its own 400; either way nothing reaches the backend."""
    p = unique_path()
    try:
        r = gate.request("GET", p, [("x-api-key", b"ab" + ctl + b"cd")])
        assert r.status in (400, 401), r
        if r.status == 401:
            assert_denied(r, "malformed_api_key")
    except ConnectionError:
        pass
    assert not backend.saw(p)


def test_max_key_length_boundary(gate, backend):
    r, p = get(gate, [xkey("a" * 256)])
    assert_denied(r, "invalid_api_key", backend=backend, path=p)
    r, p = get(gate, [xkey("a" * 257)])
    assert_denied(r, "malformed_api_key", backend=backend, path=p)


def test_ambiguous_x_api_key_twice_different(gate, backend):
    r, p = get(gate, [xkey(ALPHA), xkey(OTHER)])
    assert_denied(r, "ambiguous_api_key", backend=backend, path=p, secrets_=(ALPHA, OTHER))


def test_ambiguous_x_api_key_twice_same_value(gate, backend):
    r, p = get(gate, [xkey(ALPHA), xkey(ALPHA)])
    assert_denied(r, "ambiguous_api_key", backend=backend, path=p, secrets_=(ALPHA,))


def test_ambiguous_header_and_bearer_differ(gate, backend):
    r, p = get(gate, [xkey(ALPHA), bearer(OTHER)])
    assert_denied(r, "ambiguous_api_key", backend=backend, path=p, secrets_=(ALPHA, OTHER))


def test_authorization_twice_is_refused(gate, backend):
    """Envoy folds repeated Authorization headers into one value joined by
    ',' before the filter sees them, so this is malformed (comma) rather than
    ambiguous; either code is a refusal."""
    r, p = get(gate, [bearer(ALPHA), bearer(OTHER)])
    assert r.status == 401, r
    assert r.json()["error"] in ("malformed_api_key", "ambiguous_api_key")
    assert not backend.saw(p)


@pytest.mark.parametrize("how", ["x-api-key", "bearer"])
def test_invalid_key(gate, backend, how):
    h = xkey(UNKNOWN) if how == "x-api-key" else bearer(UNKNOWN)
    r, p = get(gate, [h])
    assert_denied(r, "invalid_api_key", backend=backend, path=p, secrets_=(UNKNOWN,))


def test_sha256_of_key_is_not_accepted_as_key(gate, backend):
    r, p = get(gate, [xkey(sha256_hex(ALPHA))])
    assert_denied(r, "invalid_api_key", backend=backend, path=p)


# ---------------------------------------------------------------------------
# Allowed requests
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        [xkey(ALPHA)],
        [("X-API-KEY", ALPHA)],
        [bearer(ALPHA)],
        [("authorization", "bearer " + ALPHA)],
        [("authorization", "BEARER " + ALPHA)],
        [("Authorization", "Bearer   " + ALPHA)],
        [xkey(ALPHA), bearer(ALPHA)],
        [("x-api-key", "  " + ALPHA + "  ")],
    ],
    ids=["x-api-key", "x-api-key-uppercase-name", "bearer", "bearer-lower", "bearer-upper",
         "bearer-extra-spaces", "same-key-both-sources", "surrounding-ows"],
)
def test_allowed(gate, backend, headers):
    r, p = get(gate, headers)
    seen = assert_allowed(r, backend, p, "alpha")
    assert r.json()["ok"] is True
    # strip_credentials defaults to true: no credential carrier reaches the backend
    assert seen.values("x-api-key") == [], seen.headers
    assert seen.values("authorization") == [], seen.headers
    for _, v in seen.headers:
        assert ALPHA.encode() not in v


def test_post_body_passes_through(gate, backend):
    p = unique_path()
    r = gate.request("POST", p, [xkey(ALPHA), ("content-type", "text/plain")], b"payload-123")
    assert_allowed(r, backend, p, "alpha")
    assert backend.only(p).body == b"payload-123"


def test_the_module_exports_no_response_callback(wasm, gate, backend):
    """Envoy calls a filter only for the callbacks its module exports: the
    build keeps those src/exports.txt lists, so no response passes through
    keygate's VM, and responses still reach the client whole."""
    listed = {
        line.strip()
        for line in (harness.REPO_ROOT / "src" / "exports.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    exports = set(harness.wasm_exports(wasm))
    assert exports == listed, sorted(exports ^ listed)
    assert not [n for n in exports if n.startswith("proxy_on_response")]
    p = unique_path()
    r = gate.request("POST", p, [xkey(ALPHA), ("content-type", "text/plain")], b"x" * 200_000)
    assert_allowed(r, backend, p, "alpha")
    assert r.header("content-type") == "application/json" and r.header("x-backend") == "e2e", r
    assert r.json()["path"] == p and backend.only(p).body == b"x" * 200_000


def test_identity_header_cannot_be_spoofed(gate, backend):
    r, p = get(
        gate,
        [
            ("x-api-key-id", "evil"),
            xkey(ALPHA),
            ("X-Api-Key-Id", "evil2"),
            ("x_api_key_id", "evil3"),
            ("X_API_KEY_ID", "evil4"),
            ("x-api-key_id", "evil5"),
        ],
    )
    seen = assert_allowed(r, backend, p, "alpha")
    names = seen.names()
    assert names.count("x-api-key-id") == 1, seen.headers
    for n, v in seen.headers:
        assert n.replace("_", "-") != "x-api-key-id" or v == b"alpha", seen.headers
        assert not v.startswith(b"evil"), seen.headers


def test_spoofed_identity_on_denied_request_does_not_pass(gate, backend):
    r, p = get(gate, [("x-api-key-id", "alpha")])
    assert_denied(r, "missing_api_key", backend=backend, path=p)


def test_other_headers_untouched(gate, backend):
    r, p = get(gate, [xkey(ALPHA), ("x-keep", "1"), ("x-keep", "2"), ("x-api-key-other", "z")])
    seen = assert_allowed(r, backend, p, "alpha")
    assert seen.values("x-keep") == [b"1", b"2"]
    assert seen.values("x-api-key-other") == [b"z"]


def test_non_utf8_header_elsewhere_is_fine(gate, backend):
    with gate.connect() as c:
        p1 = unique_path()
        r = c.request("GET", p1, [("x-junk", b"\xff\xfe"), xkey(ALPHA), ("x-junk2", b"caf\xe9")])
        seen = assert_allowed(r, backend, p1, "alpha")
        assert seen.values("x-junk") == [b"\xff\xfe"]
        # The VM survived: the next request on the same connection is decided normally.
        p2 = unique_path()
        assert_allowed(c.request("GET", p2, [bearer(ALPHA)]), backend, p2, "alpha")
        p3 = unique_path()
        assert_denied(c.request("GET", p3, []), "missing_api_key", backend=backend, path=p3)
    assert_vm_healthy(gate)


def test_next_request_after_malformed_works(gate, backend):
    with gate.connect() as c:
        p = unique_path()
        assert_denied(c.request("GET", p, [xkey(b"\xff\xfe\x80")]), "malformed_api_key", backend=backend, path=p)
        p2 = unique_path()
        r = c.request("GET", p2, [xkey(ALPHA)])
        assert_allowed(r, backend, p2, "alpha")
    p3 = unique_path()
    assert_allowed(gate.request("GET", p3, [xkey(ALPHA)]), backend, p3, "alpha")
    assert_vm_healthy(gate)


def test_unlimited_key_is_not_limited(gate, backend):
    with gate.connect() as c:
        for _ in range(30):
            assert c.request("GET", unique_path(), [xkey(OTHER)]).status == 200


def test_stats_counters(gate):
    """Counts are batched inside each VM and handed to Envoy once a second:
    they arrive within a few seconds, and exactly, on every worker."""
    names = ("keygate.allowed", "keygate.denied.missing_api_key", "keygate.denied.invalid_api_key")
    time.sleep(1.2)  # counts of earlier tests' requests arrive first
    before = {n: gate.counter(n) for n in names}
    sent = {"keygate.allowed": 5, "keygate.denied.missing_api_key": 3, "keygate.denied.invalid_api_key": 2}
    for _ in range(sent["keygate.allowed"]):
        assert gate.request("GET", unique_path(), [xkey(ALPHA)]).status == 200
    for _ in range(sent["keygate.denied.missing_api_key"]):
        assert gate.request("GET", unique_path(), []).status == 401
    for _ in range(sent["keygate.denied.invalid_api_key"]):
        assert gate.request("GET", unique_path(), [xkey(UNKNOWN)]).status == 401

    def delta():
        return {n: gate.counter(n) - before[n] for n in names}

    assert wait_until(lambda: delta() == sent, timeout=5), (delta(), sorted(k for k in gate.stats() if "keygate" in k))
    time.sleep(1.2)  # one more flush period: nothing is counted twice
    assert delta() == sent


# ---------------------------------------------------------------------------
# Configuration variants
# ---------------------------------------------------------------------------


def test_variant_bare_authorization(variant, backend):
    r, p = get(variant, [("authorization", VARIANT_KEY)])
    seen = assert_allowed(r, backend, p, "variant", identity="x-client")
    # strip_credentials: false keeps the credential for the backend
    assert seen.values("authorization") == [VARIANT_KEY.encode()]
    assert seen.values("x-api-key-id") == []


def test_variant_keeps_x_api_key_when_not_stripping(variant, backend):
    r, p = get(variant, [xkey(VARIANT_KEY), ("x-client", "evil")])
    seen = assert_allowed(r, backend, p, "variant", identity="x-client")
    assert seen.values("x-api-key") == [VARIANT_KEY.encode()]


def test_variant_wrong_prefix_is_malformed(variant, backend):
    r, p = get(variant, [xkey("zz_" + VARIANT_KEY[3:])])
    assert_denied(r, "malformed_api_key", backend=backend, path=p, challenge='ApiKey realm="e2e"')


def test_variant_bearer_is_not_a_source(variant, backend):
    """Without a bearer source the Authorization value is taken whole (bare),
    and `Bearer <key>` contains a space."""
    r, p = get(variant, [bearer(VARIANT_KEY)])
    assert_denied(r, "malformed_api_key", backend=backend, path=p, challenge='ApiKey realm="e2e"',
                  secrets_=(VARIANT_KEY,))


def test_variant_missing_uses_apikey_challenge(variant, backend):
    r, p = get(variant, [])
    assert_denied(r, "missing_api_key", backend=backend, path=p, challenge='ApiKey realm="e2e"')


def test_header_only_refuses_bearer(header_only, backend):
    """Authorization is not a configured source here: a Bearer-only request
    carries no credential at all, and the challenge is not Bearer."""
    r, p = get(header_only, [bearer(HEADER_ONLY_KEY)])
    assert_denied(r, "missing_api_key", backend=backend, path=p, challenge='ApiKey realm="keygate"',
                  secrets_=(HEADER_ONLY_KEY,))


def test_header_only_accepts_x_api_key(header_only, backend):
    r, p = get(header_only, [xkey(HEADER_ONLY_KEY)])
    assert_allowed(r, backend, p, "h")


# ---------------------------------------------------------------------------
# Rate limiting
# ---------------------------------------------------------------------------


def test_rate_limit_burst_then_429_then_refill(gate, backend):
    statuses = []
    with gate.connect() as c:
        for _ in range(3):
            p = unique_path()
            r = c.request("GET", p, [xkey(RL_A)])
            statuses.append(r.status)
            assert_allowed(r, backend, p, "rl-a")
        p = unique_path()
        r = c.request("GET", p, [xkey(RL_A)])
    assert statuses == [200, 200, 200]
    assert_denied(r, "rate_limited", backend=backend, path=p, secrets_=(RL_A,))
    retry_after = r.header("retry-after")
    assert retry_after is not None and retry_after.isdigit() and int(retry_after) >= 1, r
    assert int(retry_after) == 1, r  # one token every second
    assert r.header("ratelimit-policy") == '"default";q=3;w=3', r
    assert r.header("ratelimit") == f'"default";r=0;t={retry_after}', r

    # A second key's bucket is independent, and unlimited keys are unaffected.
    for _ in range(3):
        assert gate.request("GET", unique_path(), [bearer(RL_B)]).status == 200
    assert gate.request("GET", unique_path(), [bearer(RL_B)]).status == 429
    assert gate.request("GET", unique_path(), [xkey(ALPHA)]).status == 200

    time.sleep(1.1)
    p = unique_path()
    assert_allowed(gate.request("GET", p, [xkey(RL_A)]), backend, p, "rl-a")
    p = unique_path()
    assert_denied(gate.request("GET", p, [xkey(RL_A)]), "rate_limited", backend=backend, path=p)


def test_rate_limit_counter(gate):
    wait_until(lambda: gate.counter("keygate.denied.rate_limited") >= 1, timeout=2)
    assert gate.counter("keygate.denied.rate_limited") >= 1


# ---------------------------------------------------------------------------
# Concurrency: one bucket across Envoy workers
# ---------------------------------------------------------------------------

HAMMER_KEY = new_key()
HAMMER_RPS = 50
HAMMER_BURST = 20


def _worker_cx(envoy: Envoy) -> dict[str, int]:
    out = {}
    for name, value in envoy.stats().items():
        m = re.match(r"listener\.127\.0\.0\.1_\d+\.(worker_\d+)\.downstream_cx_total$", name)
        if m:
            out[m.group(1)] = int(value)
    return out


@pytest.mark.parametrize("workers", [2, 4], ids=["2-workers", "4-workers"])
@pytest.mark.parametrize(
    "filler",
    [0, 10_000],
    ids=["buckets-made-at-configure", "buckets-made-on-first-use"],
)
def test_rate_limit_holds_across_workers(envoy_fn, backend, filler, workers):
    # Up to 10,000 keys, every bucket exists before traffic; beyond, a bucket
    # is created by the first request of its key, on whichever worker.
    fillers = [{"id": f"filler-{i}", "sha256": os.urandom(32).hex()} for i in range(filler)]
    envoy = envoy_fn(
        {
            "keys": [key_entry("hammer", HAMMER_KEY)] + fillers,
            # the default limit applies to keys without their own
            "rate_limit": {"requests_per_second": HAMMER_RPS, "burst": HAMMER_BURST},
        },
        concurrency=workers,
    )
    # Open connections until every worker holds at least one (the kernel
    # spreads them with SO_REUSEPORT), with at least 2 and at most 8 per worker.
    conns = []
    for _ in range(8 * workers):
        conns.append(envoy.connect())
        if len(conns) >= 2 * workers:
            wait_until(lambda: sum(_worker_cx(envoy).values()) >= len(conns), timeout=1)
            if sum(1 for v in _worker_cx(envoy).values() if v > 0) >= workers:
                break
    per_worker = _worker_cx(envoy)

    admitted = 0
    rejected = 0
    errors: list[str] = []
    other: list[int] = []
    lock = threading.Lock()
    start = threading.Barrier(len(conns) + 1)
    duration = 3.0
    per_conn_cap = 6000  # bounded count as well as bounded time

    def run(c):
        nonlocal admitted, rejected
        a = rj = 0
        start.wait()
        deadline = time.monotonic() + duration
        try:
            for _ in range(per_conn_cap):
                if time.monotonic() >= deadline:
                    break
                r = c.request("GET", "/hammer", [xkey(HAMMER_KEY)])
                if r.status == 200:
                    a += 1
                elif r.status == 429:
                    rj += 1
                else:
                    with lock:
                        other.append(r.status)
        except Exception as e:  # noqa: BLE001
            with lock:
                errors.append(repr(e))
        finally:
            with lock:
                admitted += a
                rejected += rj

    threads = [threading.Thread(target=run, args=(c,)) for c in conns]
    for t in threads:
        t.start()
    t0 = time.monotonic()  # taken before the release: a conservative (larger) elapsed
    start.wait()
    for t in threads:
        t.join(timeout=duration + 30)
    elapsed = time.monotonic() - t0
    for c in conns:
        c.close()

    bound = HAMMER_BURST + HAMMER_RPS * elapsed + 1
    report(
        f"concurrency: workers={workers} connections={len(conns)} per_worker_cx={per_worker} "
        f"admitted={admitted} rejected={rejected} elapsed={elapsed:.2f}s "
        f"bound=burst+rate*elapsed+1={bound:.1f}"
    )
    assert not errors, errors
    assert not other, other
    assert_vm_healthy(envoy)
    assert admitted > 0
    assert rejected > 0
    assert admitted <= bound, f"admitted {admitted} > bound {bound:.1f}"
    assert sum(1 for v in per_worker.values() if v > 0) == workers, per_worker


def test_each_configuration_is_compiled_once_and_adopted_by_the_other_vms(envoy_fn):
    """Every VM (two on the main thread, one per worker) loads the plugin
    configuration, but only the first compiles it: the others find its
    compiled form in shared data under the configuration's id. Two keygate
    filters in the same VM, with configurations of their own, each keep
    their own keys."""
    only_a, only_b, both = new_key(), new_key(), new_key()
    # The first filter leaves the key in place for the second.
    config_a = {"keys": [key_entry("a-only", only_a), key_entry("both", both)], "strip_credentials": False}
    config_b = {"keys": [key_entry("b-only", only_b), key_entry("both", both), key_entry("b-spare", new_key())]}
    envoy = envoy_fn(config_a, more_plugin_configs=[config_b], concurrency=2)
    # New connections, so that both workers answer some.
    for _ in range(6):
        assert envoy.request("GET", unique_path(), [xkey(both)]).status == 200
        assert envoy.request("GET", unique_path(), [xkey(only_a)]).status == 401  # the second filter
        assert envoy.request("GET", unique_path(), [xkey(only_b)]).status == 401  # the first filter
    assert_vm_healthy(envoy)
    envoy.stop()  # flush the log
    loads = re.findall(r"configuration loaded: (\d) keys, (compiled|adopted from another VM)", envoy.log_text())
    for keys in ("2", "3"):
        origins = [origin for n, origin in loads if n == keys]
        assert origins.count("compiled") == 1, loads
        # Both workers at least; the main thread's second VM too, today.
        assert origins.count("adopted from another VM") >= 2, loads


def test_filters_sharing_a_vm_count_a_key_in_buckets_of_their_own(envoy_fn):
    """Shared data is per vm_id, and both filters here load into the VM
    `keygate` and list key id `k` with a burst of 3. Each request passes
    both, so with one bucket per key id the second request would find it
    empty; named after each plugin, each filter admits three."""
    key = new_key()
    limit = {"requests_per_second": 0.001, "burst": 3}
    first = {"keys": [key_entry("k", key, limit)], "strip_credentials": False}
    second = {"keys": [key_entry("k", key, limit)]}
    envoy = envoy_fn(first, more_plugin_configs=[second])
    statuses = [envoy.request("GET", unique_path(), [xkey(key)]).status for _ in range(4)]
    assert statuses == [200, 200, 200, 429], statuses
    assert_vm_healthy(envoy)
    envoy.stop()  # flush the log
    scopes = set(re.findall(r"buckets under (\S+)", envoy.log_text()))
    assert scopes == {"keygate/rl/keygate/", "keygate/rl/keygate-2/"}, scopes


# ---------------------------------------------------------------------------
# Logging: the key is never written
# ---------------------------------------------------------------------------


def test_key_never_in_envoy_log(envoy_fn):
    limited = new_key()
    envoy = envoy_fn(
        {"keys": [key_entry("logged", ALPHA), key_entry("limited", limited, {"requests_per_second": 0.01, "burst": 1})]},
        component_log_level="wasm:trace",
    )
    spaced = ALPHA[:12] + " " + ALPHA[12:]
    assert envoy.request("GET", unique_path(), [xkey(ALPHA)]).status == 200
    assert envoy.request("GET", unique_path(), [bearer(ALPHA)]).status == 200
    assert envoy.request("GET", unique_path(), [xkey(UNKNOWN)]).status == 401
    assert envoy.request("GET", unique_path(), [("x-api-key", spaced)]).status == 401
    assert envoy.request("GET", unique_path(), [xkey(ALPHA), bearer(UNKNOWN)]).status == 401
    assert envoy.request("GET", unique_path(), [xkey(limited)]).status == 200
    assert envoy.request("GET", unique_path(), [xkey(limited)]).status == 429
    envoy.stop()  # flush the log
    log = envoy.log_text()
    assert "keygate" in log, "expected keygate's own log lines at wasm:trace"
    for secret in (ALPHA, UNKNOWN, limited, spaced):
        assert secret not in log, f"key material in Envoy log: {secret[:4]}..."
    # Half a key is still too much.
    for secret in (ALPHA, UNKNOWN, limited):
        assert secret[: len(secret) // 2] not in log
        assert secret[len(secret) // 2 :] not in log


def test_log_level_raised_at_runtime_takes_effect_within_a_tick(envoy_fn):
    """keygate reads Envoy's log level once a tick instead of on every denial:
    raising it through the admin /logging endpoint still shows the denial
    lines within a second, and lines below the level before."""
    envoy = envoy_fn({"keys": [key_entry("logged", ALPHA)]})
    before, after = new_key("kgbefore"), new_key("kgafter")
    assert envoy.request("GET", unique_path(), [xkey(before)]).status == 401
    req = urllib.request.Request(envoy.admin_url + "/logging?wasm=debug", data=b"", method="POST")
    with urllib.request.urlopen(req, timeout=5) as r:
        assert r.status == 200
    time.sleep(2.0)  # one tick on every worker, with margin
    assert envoy.request("GET", unique_path(), [xkey(after)]).status == 401
    envoy.stop()  # flush the log
    denials = [line for line in envoy.log_text().splitlines() if "denied invalid_api_key" in line]
    assert len(denials) == 1, denials
    assert "kgaf" in denials[0], denials  # the masked form of the second key: its first 4 characters
    for secret in (before, after):
        assert secret not in envoy.log_text()


# ---------------------------------------------------------------------------
# Invalid configuration: Envoy refuses to start and names the field
# ---------------------------------------------------------------------------

_K = new_key()
INVALID_CONFIGS = {
    "bad_json": ('{"keys": [', r"keygate: invalid configuration: "),
    "not_an_object": ("[1, 2]", r"keygate: invalid configuration: "),
    "unknown_top_field": ({"keys": [], "bogus_field": 1}, r"keygate: invalid configuration: .*bogus_field"),
    "unknown_key_field": (
        {"keys": [{"id": "a", "sha256": sha256_hex(_K), "plaintext": "x"}]},
        r"keygate: invalid configuration: keys\[0\].*plaintext",
    ),
    "sha256_short": ({"keys": [{"id": "a", "sha256": "abc123"}]}, r"keygate: invalid configuration: keys\[0\]\.sha256: "),
    "sha256_not_hex": ({"keys": [{"id": "a", "sha256": "z" * 64}]}, r"keygate: invalid configuration: keys\[0\]\.sha256: "),
    "duplicate_ids": (
        {"keys": [key_entry("a", _K), key_entry("a", new_key())]},
        r"keygate: invalid configuration: keys\[1\]\.id: ",
    ),
    "duplicate_hashes": (
        {"keys": [key_entry("a", _K), key_entry("b", _K)]},
        r"keygate: invalid configuration: keys: ",
    ),
    "zero_rate": (
        {"keys": [], "rate_limit": {"requests_per_second": 0, "burst": 5}},
        r"keygate: invalid configuration: rate_limit\.requests_per_second: ",
    ),
    "negative_burst": (
        {"keys": [], "rate_limit": {"requests_per_second": 5, "burst": -1}},
        r"keygate: invalid configuration: rate_limit\.burst: ",
    ),
    "zero_burst_on_key": (
        {"keys": [key_entry("a", _K, {"requests_per_second": 1, "burst": 0})]},
        r"keygate: invalid configuration: keys\[0\]\.rate_limit\.burst: ",
    ),
    "empty_sources": ({"credential_sources": [], "keys": []}, r"keygate: invalid configuration: credential_sources: "),
    "identity_header_host": ({"identity_header": "host"}, r'keygate: invalid configuration: identity_header: "host" cannot carry the key id'),
    "identity_header_content_length": (
        {"identity_header": "content-length"},
        r'keygate: invalid configuration: identity_header: "content-length" cannot carry the key id',
    ),
    "identity_header_credential_with_underscore": (
        {"identity_header": "x_api_key", "strip_credentials": False},
        r"keygate: invalid configuration: identity_header: must differ from every credential header",
    ),
    "source_host_header": (
        {"credential_sources": [{"type": "header", "name": "Host"}]},
        r'keygate: invalid configuration: credential_sources\[0\]\.name: "Host" cannot carry a key',
    ),
    "bearer_with_a_scheme_field": (
        {"credential_sources": [{"type": "bearer", "scheme": "Token"}]},
        r"keygate: invalid configuration: credential_sources\[0\]: unknown field `scheme`",
    ),
    "rule_path_with_query": (
        {"rules": [{"match": {"path": "/a?b=1"}, "action": "deny"}]},
        r"keygate: invalid configuration: rules\[0\]\.match\.path: must not hold '\?'",
    ),
    "rule_path_prefix_with_query": (
        {"rules": [{"match": {"path_prefix": "/a?admin"}, "action": "deny"}]},
        r"keygate: invalid configuration: rules\[0\]\.match\.path_prefix: must not hold '\?'",
    ),
    "attachment_set_given_twice": (
        '{"keys": [{"id": "a", "sha256": "' + sha256_hex(_K) + '", "attachments": {"c": ["x"], "c": ["y"]}}]}',
        r'keygate: invalid configuration: keys\[0\]\.attachments\.c: "c" is given twice',
    ),
    "json_pointer_bad_escape": (
        {"rules": [{"action": "require", "attachment": {"set": "c", "from": {"json_body": "/a~2"}}}]},
        r"keygate: invalid configuration: rules\[0\]\.attachment\.from\.json_body: in a JSON pointer",
    ),
    "duration_with_two_points": (
        {"control_plane": {"cluster": "cp", "authority": "cp.local", "poll_interval": "1.2.3s"}},
        r'keygate: invalid configuration: control_plane\.poll_interval: "1\.2\.3s" is not a duration',
    ),
    "duration_with_an_exponent": (
        {"control_plane": {"cluster": "cp", "authority": "cp.local", "timeout": "1e3ms"}},
        r'keygate: invalid configuration: control_plane\.timeout: "1e3ms" is not a duration',
    ),
    # Polled hourly against the default 5m: stale between every two polls.
    "staleness_shorter_than_a_poll": (
        {"control_plane": {"cluster": "cp", "authority": "cp.local", "poll_interval": "1h", "stale_policy": "fail_closed"}},
        r'keygate: invalid configuration: control_plane\.max_staleness: "5m" is not longer than poll_interval \+ timeout',
    ),
}


@pytest.mark.parametrize("config,pattern", list(INVALID_CONFIGS.values()), ids=list(INVALID_CONFIGS))
def test_invalid_configuration_refused(envoy_fn, config: Any, pattern: str):
    envoy = envoy_fn(config, start=False)
    t0 = time.monotonic()
    log = envoy.start_expect_failure(timeout=20)
    took = time.monotonic() - t0
    assert re.search(pattern, log), f"no line matching {pattern!r} in log:\n{log[-3000:]}"
    assert _K not in log
    assert took < 20


def test_invalid_configuration_reports_every_problem(envoy_fn):
    cfg = {
        "keys": [{"id": "a", "sha256": "nothex"}, {"id": "a", "sha256": sha256_hex(_K)}],
        "rate_limit": {"requests_per_second": -1, "burst": 0},
    }
    log = envoy_fn(cfg, start=False).start_expect_failure(timeout=20)
    for field in ("keys[0].sha256", "keys[1].id", "rate_limit.requests_per_second", "rate_limit.burst"):
        assert f"keygate: invalid configuration: {field}: " in log, (field, log[-3000:])


def test_valid_minimal_configuration_starts(envoy_fn, backend):
    """An empty object is a valid configuration: default sources, no keys:
    every request is refused."""
    envoy = envoy_fn({})
    r, p = get(envoy, [xkey(ALPHA)])
    assert_denied(r, "invalid_api_key", backend=backend, path=p)


# ---------------------------------------------------------------------------
# HTTP/2 (h2c, prior knowledge)
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def h2client():
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("h2")
    with httpx.Client(http1=False, http2=True, timeout=10) as c:
        yield c


def _h2(h2client, envoy: Envoy, headers) -> tuple[Response, str]:
    p = unique_path()
    r = h2client.get(envoy.url + p, headers=headers)
    assert r.http_version == "HTTP/2"
    resp = Response(r.status_code, "", [(k.lower(), v) for k, v in r.headers.multi_items()], r.content)
    return resp, p


def test_h2_valid_key(gate, backend, h2client):
    r, p = _h2(h2client, gate, [("x-api-key", ALPHA), ("x-api-key-id", "evil")])
    seen = assert_allowed(r, backend, p, "alpha")
    assert seen.values("x-api-key") == []


def test_h2_bearer(gate, backend, h2client):
    r, p = _h2(h2client, gate, [("authorization", "Bearer " + OTHER)])
    assert_allowed(r, backend, p, "other")


def test_h2_missing(gate, backend, h2client):
    r, p = _h2(h2client, gate, [])
    assert_denied(r, "missing_api_key", backend=backend, path=p)


def test_h2_duplicate_x_api_key(gate, backend, h2client):
    r, p = _h2(h2client, gate, [("x-api-key", ALPHA), ("x-api-key", OTHER)])
    assert_denied(r, "ambiguous_api_key", backend=backend, path=p, secrets_=(ALPHA, OTHER))


def test_h2_invalid(gate, backend, h2client):
    r, p = _h2(h2client, gate, [("x-api-key", UNKNOWN)])
    assert_denied(r, "invalid_api_key", backend=backend, path=p, secrets_=(UNKNOWN,))


def test_h2_rate_limited_shares_bucket_with_h1(envoy_fn, backend, h2client):
    k = new_key()
    envoy = envoy_fn({"keys": [key_entry("k", k, {"requests_per_second": 0.01, "burst": 2})]})
    assert envoy.request("GET", unique_path(), [xkey(k)]).status == 200
    r, _ = _h2(h2client, envoy, [("x-api-key", k)])
    assert r.status == 200
    r, p = _h2(h2client, envoy, [("x-api-key", k)])
    assert_denied(r, "rate_limited", backend=backend, path=p)
    assert r.header("ratelimit-policy") == '"default";q=2;w=200'
    assert r.header("retry-after") is not None and int(r.header("retry-after")) > 90
    r2 = envoy.request("GET", unique_path(), [xkey(k)])
    assert r2.status == 429
    assert_vm_healthy(envoy)


def test_429_headers_follow_each_bucket_as_time_passes(envoy_fn, backend):
    """429 replies are encoded once and reused while a bucket's figures stay the
    same: they must still change with the clock and differ between keys."""
    slow, other = new_key(), new_key()
    envoy = envoy_fn(
        {
            "keys": [
                key_entry("slow", slow, {"requests_per_second": 0.1, "burst": 1}),
                key_entry("other", other, {"requests_per_second": 0.05, "burst": 2}),
            ]
        }
    )
    assert envoy.request("GET", unique_path(), [xkey(slow)]).status == 200
    first = envoy.request("GET", unique_path(), [xkey(slow)])
    again = envoy.request("GET", unique_path(), [xkey(slow)])
    for r in (first, again):
        assert r.status == 429, r
        assert r.header("ratelimit-policy") == '"default";q=1;w=10', r
    assert int(first.header("retry-after")) == 10, first

    for _ in range(2):
        assert envoy.request("GET", unique_path(), [xkey(other)]).status == 200
    r = envoy.request("GET", unique_path(), [xkey(other)])
    assert r.status == 429, r
    assert r.header("ratelimit-policy") == '"default";q=2;w=40', r
    assert int(r.header("retry-after")) == 20, r

    time.sleep(1.2)
    p = unique_path()
    later = envoy.request("GET", p, [xkey(slow)])
    assert_denied(later, "rate_limited", backend=backend, path=p, secrets_=(slow,))
    assert int(later.header("retry-after")) == 9, later
    assert later.header("ratelimit") == '"default";r=0;t=9', later
    assert_vm_healthy(envoy)


def test_zz_gate_vm_never_crashed(gate, variant, header_only):
    """Runs last in this module: after everything above, no VM panicked or reloaded."""
    for envoy in (gate, variant, header_only):
        assert_vm_healthy(envoy)


def test_spaces_around_a_key_are_trimmed_on_both_protocols(gate, backend):
    """Envoy trims spaces around HTTP/1.1 header values but passes them on
    from HTTP/2; either way they are not part of the key."""
    for name, value in (("x-api-key", f" {ALPHA} "), ("x-api-key", f"\t{ALPHA}"), ("authorization", f" Bearer {OTHER} ")):
        p = unique_path()
        r = harness.h2_exchange(gate.port, "GET", p, [(name, value)])
        assert_allowed(r.response(), backend, p, "alpha" if name == "x-api-key" else "other")
        p = unique_path()
        assert_allowed(gate.request("GET", p, [(name, value)]), backend, p, "alpha" if name == "x-api-key" else "other")
    # Inside the Authorization value, a tab is not the space after the scheme.
    p = unique_path()
    r = harness.h2_exchange(gate.port, "GET", p, [("authorization", f"Bearer\t{OTHER}")])
    assert_denied(r.response(), "malformed_api_key", backend=backend, path=p, secrets_=(OTHER,))
