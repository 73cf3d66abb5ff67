"""The shipped profiles (envoy/profiles/*.json) in real Envoy, where a case
file cannot say it: a large body with Expect: 100-continue, the rate limit
under load, a revocation pushed to a running gateway, keys never logged, and
a deleted key's reply compared with an unknown key's.

Each profile's documented request/answer pairs are cases in
tests/cases/profile-<name>.json, replayed by test_cases.py (natively too by
core/tests/cases.rs); those files also hold the plaintext demo keys (the
profiles hold only their SHA-256). Every test is marked with its profile
and a short case name, and conftest prints the outcome per profile in the
terminal summary.

The profiles run behind an HTTP connection manager that normalizes paths
(`normalize_path`, `merge_slashes`, escaped slashes rejected) and takes the
client address from the connection (`use_remote_address`), as
envoy/profiles/README.md asks of any deployment using path rules or
allowed_cidrs: the `envoy.hcm` of the case files.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest

import case_table
from case_table import PROFILES_DIR
from conftest import PROFILE_TITLES, report
from harness import (
    Envoy,
    Response,
    check_denial,
    sha256_hex,
    unique_path,
    wait_until,
)

PROFILE_NAMES = ["lead-distro", "trust-leads", "leadflip", "leadterra"]
PROFILE_TITLES.update({
    "lead-distro": "Lead Distro, seeds 000 + 001",
    "trust-leads": "Trust Leads, seed 002",
    "leadflip": "Leadflip, seed 003",
    "leadterra": "Leadterra, seed 004",
})
CASE_FILES = {name: case_table.profile_file(name) for name in PROFILE_NAMES}
KEYS: dict[str, dict[str, str]] = {name: f.keys for name, f in CASE_FILES.items()}


def load_profile(name: str) -> dict:
    return json.loads((PROFILES_DIR / f"{name}.json").read_text())


def k(profile: str, key_id: str) -> str:
    return KEYS[profile][key_id]


def all_keys() -> list[str]:
    return [v for keys in KEYS.values() for v in keys.values()]


def start_profile(envoy_factory, name: str, **kw: Any) -> Envoy:
    """The profile file's bytes, unchanged, as the plugin configuration."""
    f = CASE_FILES[name]
    return envoy_factory(f.config_text(), hcm_extra=f.hcm(), access_log=True, **kw)


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


def ld(case: str):
    return pytest.mark.profile(LD, case)


@pytest.fixture(scope="module")
def lead_distro(envoy_factory) -> Envoy:
    return start_profile(envoy_factory, LD)


def lead(campaign: Any, tag: str, supplier: str = "sup-acme") -> dict:
    return {"flo_campaign_id": campaign, "flo_supplier_id": supplier, "email": f"{tag}@example.com", "first_name": "Ada"}


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


@ld("deleted supplier's key: the reply is exactly an unknown key's")
def test_ld_deleted_looks_unknown(lead_distro):
    key = k(LD, "supplier-deleted")
    r = lead_distro.request("GET", "/api/v1/leads/lookup", [("x-api-key", key)])
    body = check_denial(r, "invalid_api_key", secrets_=(key,))
    unknown = lead_distro.request("GET", "/api/v1/leads/lookup", [("x-api-key", "sk_supplier_DEMO_unknown_0000")])
    assert unknown.json() == body, "a deleted key must look exactly like an unknown key"


@ld("a flood is cut by the peak limit (200 rps, 60 in reserve), then 429 with retry-after")
def test_ld_rate_limit(lead_distro, backend):
    """Four connections send as fast as they can until one sees a 429: the
    peak limit refuses first, and no more than its burst + rate x elapsed
    are admitted."""
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
    bound = 60 + 200 * elapsed + 1
    assert 60 <= admitted <= bound, (admitted, bound)
    assert last.header("ratelimit-policy") == '"peak";q=60;w=1', last
    assert last.header("retry-after") == "1", last
    report(f"lead-distro flood: {admitted} admitted in {elapsed:.2f}s before the first 429 "
           f"(peak: 60 + 200 rps x elapsed = {bound - 1:.0f})")
    # The peak bucket refills at 200/s: after 50 ms a few requests pass again.
    time.sleep(0.05)
    assert lead_distro.request("GET", "/api/v1/leads/lookup", [("x-api-key", key)]).status == 200
    # Another supplier's bucket was never touched.
    assert lead_distro.request("GET", "/api/v1/leads/lookup", [("x-api-key", k(LD, "supplier-bolt"))]).status == 200


def paced(gate: Envoy, key: str, rate: float, seconds: float) -> tuple[list[tuple[int, float, str]], float]:
    """Sends GETs on one connection, never faster than `rate` per second,
    for `seconds`; the (index, send time, refusing limit) of each 429, and
    the rate actually kept."""
    gap = 1.0 / rate
    refused: list[tuple[int, float, str]] = []
    with gate.connect() as c:
        t0 = time.monotonic()
        due, i = t0, 0
        while due - t0 < seconds:
            now = time.monotonic()
            if now < due:
                time.sleep(due - now)
            sent = time.monotonic()
            r = c.request("GET", "/api/v1/leads/lookup?email=paced%40example.com", [("x-api-key", key)])
            assert r.status in (200, 429), r
            if r.status == 429:
                refused.append((i, sent - t0, r.header("ratelimit-policy") or ""))
            # Never two requests closer than the gap: a late one is not made up.
            due = max(due + gap, sent + gap)
            i += 1
    return refused, i / (time.monotonic() - t0)


def first_refusal(envoy_fn, rate: float, seconds: float, limit: str) -> tuple[int, float, float]:
    """Paces a fresh lead-distro Envoy at `rate` for `seconds`; the index and
    time of the first 429 (which must name `limit`), and the rate kept."""
    refused, kept = paced(start_profile(envoy_fn, LD), k(LD, "supplier-burst"), rate, seconds)
    assert refused, f"never refused at {kept:.0f} rps"
    i, at, policy = refused[0]
    assert policy.startswith(f'"{limit}"'), policy
    report(f"lead-distro {rate:.0f} rps x {seconds} s: first 429 at {at:.2f} s "
           f"(request {i + 1}, by {limit}, {kept:.0f} rps kept)")
    return i, at, kept


@ld("200 rps for 10 s is never refused (100 rps sustained, 1,010 in reserve)")
def test_ld_two_hundred_rps_for_ten_seconds(envoy_fn):
    gate = start_profile(envoy_fn, LD)
    refused, kept = paced(gate, k(LD, "supplier-burst"), 200, 10)
    assert refused == [], refused[:5]
    report(f"lead-distro 200 rps x 10 s: 0 refused ({kept:.0f} rps kept)")


@ld("200 rps for 20 s is refused from about the 10th second, by the sustained limit")
def test_ld_two_hundred_rps_for_twenty_seconds(envoy_fn):
    i, at, kept = first_refusal(envoy_fn, 200, 20, "sustained")
    # GCRA: refused once the requests sent exceed 100/s x elapsed + 1010.
    assert abs((i + 1 - 100 * at) - 1010) <= 25, (i, at)
    if kept >= 195:
        assert 9.5 <= at <= 11, at


@ld("300 rps is refused at once, by the peak limit")
def test_ld_three_hundred_rps(envoy_fn):
    _, at, _ = first_refusal(envoy_fn, 300, 2, "peak")
    assert at < 1.0, at


# ===========================================================================
# Trust Leads (seed 002): revocation in a running gateway, keys never logged
# ===========================================================================

TL = "trust-leads"


def tl(case: str):
    return pytest.mark.profile(TL, case)


@pytest.fixture(scope="module")
def trust_leads(envoy_factory) -> Envoy:
    # Served by LDS so that a revocation can be pushed to the running Envoy;
    # wasm debug logging so that the "never log keys" check sees denial lines.
    return start_profile(envoy_factory, TL, dynamic_listener=True, component_log_level="wasm:debug")


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
    # Every request of the profile's cases, then an unknown key: denials with
    # a known key are logged with its id, others masked.
    f = CASE_FILES[TL]
    for case in f.cases:
        req = f.request(case)
        trust_leads.request(req.method, req.path, req.headers, req.body, host=req.host)
    trust_leads.request("GET", "/v1/usage", [("X-API-Key", "lfk_DEMOunknownNOTAREALKEY000000000000000099")])
    time.sleep(0.3)  # let Envoy flush its log (file flush interval 100 ms)
    text = trust_leads.log_text() + trust_leads.access_log_path.read_text()
    assert "denied" in text, "expected keygate's debug denial lines"
    for secret in all_keys() + ["lfk_DEMOunknownNOTAREALKEY000000000000000099"]:
        assert secret not in text
        assert secret[-20:] not in text


def test_zz_profiles_vm_healthy(lead_distro, trust_leads):
    """After every case above, no keygate VM panicked or reloaded."""
    for envoy in (lead_distro, trust_leads):
        stats = envoy.stats()
        assert not {n: v for n, v in stats.items() if n.startswith("wasm.keygate.vm_reload") and v != "0"}
        assert "panicked" not in envoy.log_text()
