"""The shared case table (tests/cases/auth.json), replayed in real Envoy over
HTTP/1.1 and HTTP/2 -- the same rows the core's unit tests replay
(core/tests/cases.rs).

Format: `keys` maps names to plaintext keys; `config` is the plugin
configuration with `{sha256:NAME}` placeholders; each case has `headers`
([name, value] pairs, `{key:NAME}` replaced by that key and `\\xNN` by the raw
byte) and `expect` (`status`, and `code`, `identity`, `stripped`).

Where Envoy differs from the core, on purpose and explicitly:

- A control character other than tab in a header value never reaches the
  filter: Envoy's HTTP/1 codec answers 400 itself, and over HTTP/2 it ends
  the connection. For such a row, an Envoy refusal with the backend untouched
  is accepted instead of the table's 401 (and reported in the summary).
- Envoy trims spaces and tabs around header values before the filter sees
  them; no row depends on it today, and a row that did would be flagged by
  the check below rather than silently passing.
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Any

import pytest

from conftest import report
from harness import REPO_ROOT, Envoy, Response, check_denial, h2_exchange, sha256_hex

TABLE = json.loads((REPO_ROOT / "tests" / "cases" / "auth.json").read_text())
KEYS: dict[str, str] = TABLE["keys"]
CASES: list[dict] = TABLE["cases"]
IDENTITY = TABLE["config"].get("identity_header", "x-api-key-id")

CONTROL = {b for b in range(0x20) if b != 0x09} | {0x7F}
_OUTCOMES: dict[str, list[str]] = {"keygate": [], "envoy": []}


def render_config() -> str:
    text = json.dumps(TABLE["config"])

    def sub(m: re.Match) -> str:
        return sha256_hex(KEYS[m.group(1)])

    text, _ = re.subn(r"\{sha256:([A-Za-z0-9_-]+)\}", sub, text)
    assert "{sha256:" not in text
    return text


def header_bytes(value: str) -> bytes:
    """`{key:NAME}` replaced, then `\\xNN` turned into raw bytes."""
    value = re.sub(r"\{key:([A-Za-z0-9_-]+)\}", lambda m: KEYS[m.group(1)], value)
    out = bytearray()
    i = 0
    while i < len(value):
        if value.startswith("\\x", i) and re.fullmatch(r"[0-9a-fA-F]{2}", value[i + 2 : i + 4]):
            out.append(int(value[i + 2 : i + 4], 16))
            i += 4
        else:
            out += value[i].encode("utf-8")
            i += 1
    return bytes(out)


def request_headers(case: dict) -> list[tuple[str, bytes]]:
    return [(n, header_bytes(v)) for n, v in case["headers"]]


def has_control(headers: list[tuple[str, bytes]]) -> bool:
    return any(b in CONTROL for _, v in headers for b in v)


def has_surrounding_ows(headers: list[tuple[str, bytes]]) -> bool:
    return any(v[:1] in (b" ", b"\t") or v[-1:] in (b" ", b"\t") for _, v in headers if v)


@pytest.fixture(scope="module")
def table_envoy(envoy_factory) -> Envoy:
    return envoy_factory(render_config())


def test_table_is_well_formed():
    assert CASES, "empty case table"
    names = [c["name"] for c in CASES]
    assert len(names) == len(set(names)), "duplicate case names"
    for c in CASES:
        exp = c["expect"]
        assert exp["status"] in (200, 401), c
        assert (exp["status"] == 200) == ("code" not in exp), c
        # Rows Envoy would alter before the filter must be handled explicitly here.
        assert not has_surrounding_ows(request_headers(c)), f"{c['name']}: Envoy trims this value; adapt the check"


def check_row(case: dict, r: Response, backend, path: str, headers: list[tuple[str, bytes]]) -> None:
    exp = case["expect"]
    secrets_ = [v for v in KEYS.values()]
    if exp["status"] == 200:
        assert r.status == 200, (case["name"], r)
        seen = backend.only(path)
        assert seen.values(IDENTITY) == [exp["identity"].encode()], (case["name"], seen.headers)
        for name in exp.get("stripped", []):
            assert seen.values(name) == [], (case["name"], name, seen.headers)
        for name, value in seen.headers:
            for k in secrets_:
                assert k.encode() not in value, f"{case['name']}: key reached the backend in {name}"
    else:
        check_denial(r, exp["code"], secrets_=[v for _, v in headers if len(v) >= 8])
        assert not backend.saw(path), case["name"]


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_case_http1(table_envoy, backend, case):
    headers = request_headers(case)
    path = f"/cases/h1/{secrets.token_hex(6)}"
    if has_control(headers):
        # Envoy's HTTP/1 codec refuses the request before any filter runs.
        try:
            r = table_envoy.request("GET", path, headers)
        except ConnectionError:
            r = None
        if r is not None and r.status == 401:
            check_row(case, r, backend, path, headers)  # the filter saw it after all: must match the table
            _OUTCOMES["keygate"].append(f"h1:{case['name']}")
        else:
            assert r is None or (r.status == 400 and r.header("www-authenticate") is None), r
            assert case["expect"]["status"] != 200, "Envoy refused a row the table allows"
            _OUTCOMES["envoy"].append(f"h1:{case['name']}")
        assert not backend.started(path)
        return
    r = table_envoy.request("GET", path, headers)
    check_row(case, r, backend, path, headers)
    _OUTCOMES["keygate"].append(f"h1:{case['name']}")


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_case_http2(table_envoy, backend, case):
    # HTTP/2 header names are lowercase on the wire (an uppercase name is a
    # protocol error), which is what every HTTP/2 client sends.
    headers = [(n.lower(), v) for n, v in request_headers(case)]
    path = f"/cases/h2/{secrets.token_hex(6)}"
    res = h2_exchange(table_envoy.port, "GET", path, headers)
    if has_control(headers):
        if res.status == 401:
            check_row(case, res.response(), backend, path, headers)
            _OUTCOMES["keygate"].append(f"h2:{case['name']}")
        else:
            # Envoy's HTTP/2 codec treats the value as a protocol error.
            assert res.status in (None, 400), res
            _OUTCOMES["envoy"].append(f"h2:{case['name']}")
        assert not backend.started(path)
        return
    check_row(case, res.response(), backend, path, headers)
    _OUTCOMES["keygate"].append(f"h2:{case['name']}")


def test_zz_summary(table_envoy):
    n = len(_OUTCOMES["keygate"]) + len(_OUTCOMES["envoy"])
    line = f"case table: {len(CASES)} rows x HTTP/1.1 + HTTP/2 = {n} replays; {len(_OUTCOMES['keygate'])} decided by keygate as the table says"
    if _OUTCOMES["envoy"]:
        line += f"; refused by Envoy's codec before the filter: {', '.join(_OUTCOMES['envoy'])}"
    report(line)
    stats: dict[str, Any] = table_envoy.stats()
    assert not {k: v for k, v in stats.items() if k.startswith("wasm.keygate.vm_reload") and v != "0"}
