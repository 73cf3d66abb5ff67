"""Every case file in tests/cases/ (one plugin configuration each), replayed
in real Envoy over HTTP/1.1 and HTTP/2 -- the same cases the core's unit
tests replay (core/tests/cases.rs). The format is in tests/cases/README.md;
test ids are `<file>::<case name>`.

Each configuration gets one Envoy (started on first use, with the file's
connection-manager settings and an access log). Every request carries a
marker header, `x-keygate-case`, by which the backend's record of it is
found, so cases may share paths.

Where Envoy differs from the core, on purpose and explicitly:

- A control character other than tab in a header value never reaches the
  filter: Envoy's HTTP/1 codec answers 400 itself, and over HTTP/2 it ends
  the stream or the connection. A case says so with `e2e.envoy_refuses`
  (the protocols on which Envoy refuses it); on the others it must be
  decided by keygate as the case says. A control character on a protocol
  not listed there, with Envoy refusing, fails the case.
- Envoy trims spaces and tabs around header values before the filter sees
  them over HTTP/1.1 (not HTTP/2). keygate trims them around a credential
  too, so such a value is allowed in a credential header only; elsewhere
  the well-formedness check flags it.
- Envoy's client address is the connection's (127.0.0.1), and its clock is
  the wall clock: cases with another `source` or a fixed `now` are
  native-only.
"""

from __future__ import annotations

import json
import secrets
from typing import Any, Callable, Optional

import pytest

import case_table
from case_table import CaseFile, Request
from conftest import report
from harness import DENIAL_STATUS, Envoy, Response, check_denial, filter_state_route_config, h2_exchange, wait_until

FILES = case_table.load_all()
PROTOCOLS = ("http1", "http2")
# `forward_with` of the replays: every case runs in both.
MODES = ("headers", "filter_state")
MARK = "x-keygate-case"
REQUEST_FIELDS = {"method", "path", "host", "headers", "body", "json", "source", "now"}
EXPECT_FIELDS = {"status", "code", "headers", "message_contains", "log", "identity", "stripped", "backend"}
BACKEND_FIELDS = {"headers", "body", "path", "method"}
_OUTCOMES: dict[str, list[str]] = {"keygate": [], "envoy": []}
_SENT_PATHS: set[str] = set()


def rows(protocol: str) -> list[Any]:
    """Every case in each forwarding mode: `headers` (keygate edits the
    request; test ids `<file>::<case>`) and `filter_state` (keygate writes
    filter state, the route adds the headers and strips the credential; ids
    `filter_state:<file>::<case>`)."""
    out = []
    for mode in MODES:
        for f in FILES:
            for c in f.cases:
                marks = []
                if case_table.only(c) == "native":
                    marks.append(pytest.mark.skip(reason=f"native-only: {c['why']}"))
                elif protocol not in case_table.e2e_options(c).get("protocols", PROTOCOLS):
                    marks.append(pytest.mark.skip(reason=f"{protocol} not replayed: {case_table.e2e_options(c)['why']}"))
                elif f.profile and mode == "headers":
                    # A profile's cases count in conftest's per-profile summary.
                    marks.append(pytest.mark.profile(f.profile, c["name"]))
                prefix = "" if mode == "headers" else f"{mode}:"
                out.append(pytest.param(f, c, mode, id=f"{prefix}{f.name}::{c['name']}", marks=marks))
    return out


def has_surrounding_ows(value: bytes) -> bool:
    return value[:1] in (b" ", b"\t") or value[-1:] in (b" ", b"\t")


@pytest.fixture(scope="module")
def envoy_for(envoy_factory) -> Callable[[CaseFile, str], Envoy]:
    started: dict[tuple[str, str], Envoy] = {}

    def get(f: CaseFile, mode: str = "headers") -> Envoy:
        if (f.name, mode) not in started:
            text, hcm = f.config_text(), f.hcm()
            if mode == "filter_state":
                # The same configuration forwarding through filter state, and
                # the route that puts it in headers (harness.filter_state_headers).
                config = json.loads(text)
                config["forward_with"] = "filter_state"
                text = json.dumps(config)
                hcm = {**(hcm or {}), **filter_state_route_config(config)}
            started[(f.name, mode)] = envoy_factory(text, hcm_extra=hcm, access_log=True)
        return started[(f.name, mode)]

    get.started = started  # type: ignore[attr-defined]
    return get


@pytest.mark.parametrize("f", FILES, ids=[f.name for f in FILES])
def test_file_is_well_formed(f: CaseFile):
    assert f.cases, f"{f.name}: no cases"
    assert ("profile" in f.doc) != ("config" in f.doc), f"{f.name}: one of profile or config"
    names = [c["name"] for c in f.cases]
    assert len(names) == len(set(names)), f"{f.name}: duplicate case names"
    carriers = f.credential_headers()
    for c in f.cases:
        where = f"{f.name}::{c['name']}"
        exp = c["expect"]
        assert set(c) <= {"name", "request", "expect", "only", "why", "e2e"}, where
        assert set(c.get("request", {})) <= REQUEST_FIELDS, where
        assert set(exp) <= EXPECT_FIELDS and set(exp.get("backend", {})) <= BACKEND_FIELDS, where
        assert case_table.only(c) in (None, "native", "e2e"), where
        assert (case_table.only(c) is not None) == ("why" in c), f"{where}: only with a reason, why"
        if "code" in exp:
            assert exp["status"] == DENIAL_STATUS[exp["code"]], where
        else:
            assert exp["status"] == 200 and not exp.get("headers"), where
        req = f.request(c)
        if req.source != "127.0.0.1" or req.now is not None:
            assert case_table.only(c) == "native", f"{where}: Envoy's client address and clock cannot be set"
        for name, value in req.headers:
            # Rows Envoy would alter before the filter must be handled explicitly here.
            assert name.lower() in carriers or not has_surrounding_ows(value), f"{where}: Envoy trims {name}"
        opts = case_table.e2e_options(c)
        assert set(opts) <= {"protocols", "envoy_refuses", "why"}, where
        assert ("protocols" in opts) == ("why" in opts), f"{where}: protocols with a reason, why"
        assert set(opts.get("protocols", PROTOCOLS)) <= set(PROTOCOLS), where
        assert set(opts.get("envoy_refuses", [])) <= set(PROTOCOLS), where


def identity_header(f: CaseFile) -> str:
    return f.config().get("identity_header", "x-api-key-id")


def check_forwarded(f: CaseFile, case: dict, req: Request, r: Response, backend, tag: str) -> None:
    exp = case["expect"]
    where = f"{f.name}::{case['name']}"
    assert r.status == 200, (where, r)
    seen_all = [x for x in backend.requests if x.value(MARK) == tag.encode()]
    assert len(seen_all) == 1, (where, len(seen_all))
    seen = seen_all[0]
    ident = identity_header(f)
    variants = [n for n, _ in seen.headers if n.replace("_", "-") == ident and n != ident]
    assert not variants, (where, "client copies of the identity header reached the backend", seen.headers)
    if "identity" in exp:
        want = [] if exp["identity"] is None else [exp["identity"].encode()]
        assert seen.values(ident) == want, (where, seen.headers)
    for name in exp.get("stripped", []):
        assert seen.values(name) == [], (where, name, seen.headers)
    observed = exp.get("backend", {})
    for name, values in observed.get("headers", {}).items():
        assert seen.values(name) == [case_table.expand(v, f.keys) for v in values], (where, name, seen.headers)
    if observed.get("body"):
        assert seen.body == req.body, (where, seen.body[:200])
    if "path" in observed:
        assert seen.path == observed["path"], (where, seen.path)
    if "method" in observed:
        assert seen.method == observed["method"], (where, seen.method)
    if exp.get("identity") is not None:
        for name, value in seen.headers:
            for k in f.keys.values():
                assert k.encode() not in value, f"{where}: key reached the backend in {name}"


def check_refused(f: CaseFile, case: dict, req: Request, r: Response, backend, tag: str, fresh: bool) -> None:
    exp = case["expect"]
    where = f"{f.name}::{case['name']}"
    carriers = f.credential_headers()
    leaks = list(f.keys.values()) + [v for n, v in req.headers if n.lower() in carriers and len(v) >= 8]
    body = check_denial(r, exp["code"], secrets_=leaks)
    assert r.status == exp["status"], (where, r)
    for name, value in exp.get("headers", {}).items():
        assert r.header_all(name) == ([] if value is None else [value]), (where, name, r)
    if "message_contains" in exp:
        assert exp["message_contains"] in body["message"], (where, body)
    assert not [x for x in backend.requests if x.value(MARK) == tag.encode()], f"{where}: backend saw it"
    if fresh:
        assert not backend.started(req.path), f"{where}: backend saw the start of it"


def check_log(envoy: Envoy, case: dict, tag: str) -> None:
    """The access-log line of this very request (found by its marker, so
    cases sharing a path cannot read each other's) names the expected
    denial."""
    if "log" not in case["expect"]:
        return
    entries: list[dict] = []

    def look() -> bool:
        entries[:] = [e for e in envoy.access_log_entries() if e.get("case") == tag]
        return bool(entries)

    assert wait_until(look, timeout=5), f"no access-log entry for {case['name']}"
    assert entries[0]["denial"] == case["expect"]["log"], (case["name"], entries[0])


def replay(f: CaseFile, case: dict, protocol: str, envoy: Envoy, backend) -> None:
    req = f.request(case)
    tag = secrets.token_hex(8)
    # Other modules' Envoys share the backend and may have sent this path.
    fresh = req.path not in _SENT_PATHS and not backend.started(req.path)
    _SENT_PATHS.add(req.path)
    refuses = protocol in case_table.e2e_options(case).get("envoy_refuses", [])
    r: Optional[Response]
    if protocol == "http1":
        try:
            r = envoy.request(req.method, req.path, req.headers + [(MARK, tag)], req.body, host=req.host)
        except ConnectionError:
            r = None
    else:
        # HTTP/2 header names are lowercase on the wire (an uppercase name is a
        # protocol error), which is what every HTTP/2 client sends.
        headers = [(n.lower(), v) for n, v in req.headers] + [(MARK, tag)]
        res = h2_exchange(envoy.port, req.method, req.path, headers, [req.body] if req.body else (),
                          authority=req.host)
        r = None if res.status is None else res.response()
    label = f"{protocol}:{f.name}::{case['name']}"
    if refuses:
        # Envoy's codec refuses the request before any filter runs: HTTP/1 with
        # its own 400 (no challenge), HTTP/2 by resetting the stream.
        if protocol == "http1":
            assert r is not None and r.status == 400 and r.header("www-authenticate") is None, (label, r)
        else:
            assert r is None, (label, r)
        assert not [x for x in backend.requests if x.value(MARK) == tag.encode()], label
        assert not fresh or not backend.started(req.path), label
        _OUTCOMES["envoy"].append(label)
        return
    assert r is not None, f"{label}: no response (declare e2e.envoy_refuses if Envoy refuses it)"
    if "code" in case["expect"]:
        check_refused(f, case, req, r, backend, tag, fresh)
    else:
        check_forwarded(f, case, req, r, backend, tag)
    check_log(envoy, case, tag)
    _OUTCOMES["keygate"].append(label)


@pytest.mark.parametrize("f,case,mode", rows("http1"))
def test_case_http1(envoy_for, backend, f: CaseFile, case: dict, mode: str):
    replay(f, case, "http1", envoy_for(f, mode), backend)


@pytest.mark.parametrize("f,case,mode", rows("http2"))
def test_case_http2(envoy_for, backend, f: CaseFile, case: dict, mode: str):
    replay(f, case, "http2", envoy_for(f, mode), backend)


def test_zz_summary(envoy_for):
    total = sum(len(f.cases) for f in FILES)
    n = len(_OUTCOMES["keygate"]) + len(_OUTCOMES["envoy"])
    line = (f"case files: {len(FILES)} files, {total} cases; {n} replays over HTTP/1.1 + HTTP/2 in both forwarding modes (forward_with headers, filter_state), "
            f"{len(_OUTCOMES['keygate'])} decided by keygate as the case says")
    if _OUTCOMES["envoy"]:
        line += f"; refused by Envoy's codec before the filter, as declared: {', '.join(_OUTCOMES['envoy'])}"
    report(line)
    for envoy in envoy_for.started.values():
        stats: dict[str, Any] = envoy.stats()
        assert not {k: v for k, v in stats.items() if k.startswith("wasm.keygate.vm_reload") and v != "0"}
        assert "panicked" not in envoy.log_text()
