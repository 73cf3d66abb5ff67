"""keygate's denial replies: the status of each public code (from the core-checked table) and `check_denial`."""

from __future__ import annotations

import json
from typing import Optional, Sequence, Union

from .client import Response
from .paths import REPO_ROOT
from .wire import to_bytes

# The table core/tests/denial_codes.rs checks against the core's `DenyCode`.
DENIAL_CODES_PATH = REPO_ROOT / "tests" / "denial_codes.json"


def load_denial_status() -> dict[str, int]:
    """Every public denial code and its HTTP status, from `DENIAL_CODES_PATH`."""
    rows = json.loads(DENIAL_CODES_PATH.read_text("utf-8"))["codes"]
    table = {row["code"]: row["status"] for row in rows}
    assert len(table) == len(rows), f"a code appears twice in {DENIAL_CODES_PATH}"
    return table


DENIAL_STATUS = load_denial_status()


def check_denial(
    r: Response,
    code: str,
    *,
    challenge: Optional[str] = None,
    secrets_: Sequence[Union[str, bytes]] = (),
) -> dict:
    """`r` is keygate's local reply for `code`: its status, the JSON body
    {"error", "message"}, no-store, WWW-Authenticate exactly on 401 (equal to
    `challenge` plus `, error="invalid_token"` except on missing_api_key, when
    `challenge` is given), Retry-After and RateLimit headers exactly on 429,
    and none of `secrets_` anywhere in it. Returns the parsed body."""
    assert r.status == DENIAL_STATUS[code], r
    assert r.header("content-type") == "application/json", r
    assert r.header("cache-control") == "no-store", r
    body = r.json()
    assert set(body) == {"error", "message"}, body
    assert body["error"] == code, body
    assert isinstance(body["message"], str) and body["message"], body
    challenges = r.header_all("www-authenticate")
    if r.status == 401:
        assert len(challenges) == 1, r
        if challenge is not None:
            want = challenge if code == "missing_api_key" else challenge + ', error="invalid_token"'
            assert challenges == [want], r
    else:
        assert challenges == [], r
    rate_headers = [r.header(h) for h in ("retry-after", "ratelimit-policy", "ratelimit")]
    if r.status == 429:
        assert all(v is not None for v in rate_headers), r
        assert rate_headers[0].isdigit() and int(rate_headers[0]) >= 1, r
    else:
        assert rate_headers == [None, None, None], r
    raw = r.body + json.dumps(r.headers).encode()
    for s in secrets_:
        s_b = to_bytes(s)
        if len(s_b) >= 4:
            assert s_b not in raw, f"reply leaks {s_b[:4]!r}...: {r}"
    return body
