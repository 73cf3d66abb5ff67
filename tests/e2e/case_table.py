"""Reading the case files in tests/cases/ (format: tests/cases/README.md).

One file holds one plugin configuration (inline, or a profile under
envoy/profiles/ loaded unchanged), the plaintext test keys it needs and its
cases. This module turns a file into what the e2e runner sends: the
configuration text, each request's headers and body as bytes. The core's
runner (core/tests/cases.rs) reads the same files the same way.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Optional

from harness import REPO_ROOT, credential_header_names, sha256_hex

CASES_DIR = REPO_ROOT / "tests" / "cases"
PROFILES_DIR = REPO_ROOT / "envoy" / "profiles"

_KEY = re.compile(r"\{key:([A-Za-z0-9_-]+)\}")
_SHA = re.compile(r"\{sha256:([A-Za-z0-9_-]+)\}")
_BYTE = re.compile(r"\\x([0-9a-fA-F]{2})")

# What a request is when the case does not say.
REQUEST_DEFAULTS = {"method": "GET", "path": "/", "host": "localhost", "source": "127.0.0.1"}


def expand(text: str, keys: dict[str, str]) -> bytes:
    """`{key:NAME}` replaced by that test key, then `\\xNN` by the raw byte;
    everything else as UTF-8."""
    text = _KEY.sub(lambda m: keys[m.group(1)], text)
    out = bytearray()
    pos = 0
    for m in _BYTE.finditer(text):
        out += text[pos : m.start()].encode("utf-8")
        out.append(int(m.group(1), 16))
        pos = m.end()
    out += text[pos:].encode("utf-8")
    return bytes(out)


@dataclasses.dataclass
class CaseFile:
    """One file of tests/cases/."""

    name: str  # the file name, e.g. "auth.json"
    doc: dict

    @property
    def keys(self) -> dict[str, str]:
        return self.doc.get("keys", {})

    @property
    def cases(self) -> list[dict]:
        return self.doc["cases"]

    @property
    def profile(self) -> Optional[str]:
        return self.doc.get("profile")

    def config_text(self) -> str:
        """The plugin configuration: the profile file's bytes unchanged, or the
        inline `config` with `{sha256:NAME}` replaced by the key's digest."""
        if self.profile is not None:
            return (PROFILES_DIR / f"{self.profile}.json").read_text()
        text = _SHA.sub(lambda m: sha256_hex(self.keys[m.group(1)]), json.dumps(self.doc["config"]))
        assert "{sha256:" not in text, self.name
        return text

    def config(self) -> dict:
        return json.loads(self.config_text())

    def hcm(self) -> Optional[dict]:
        """HttpConnectionManager settings for the Envoy around it (e2e only)."""
        return self.doc.get("envoy", {}).get("hcm")

    def request(self, case: dict) -> "Request":
        spec = {**REQUEST_DEFAULTS, **self.doc.get("defaults", {}), **case.get("request", {})}
        return Request(
            method=spec["method"],
            path=spec["path"],
            host=spec["host"],
            headers=[(n, expand(v, self.keys)) for n, v in spec.get("headers", [])],
            body=self.body(spec),
            source=spec["source"],
            now=spec.get("now"),
        )

    def body(self, spec: dict) -> bytes:
        """`body`: a string, or a list of pieces, each a string or [string, count];
        `json`: any JSON value, written compactly."""
        if "json" in spec:
            return expand(json.dumps(spec["json"], separators=(",", ":"), ensure_ascii=False), self.keys)
        body = spec.get("body", "")
        pieces = [body] if isinstance(body, str) else body
        return b"".join(expand(p, self.keys) if isinstance(p, str) else expand(p[0], self.keys) * p[1] for p in pieces)

    def credential_headers(self) -> set[str]:
        """Every header that can carry a key in this configuration."""
        return set(credential_header_names(self.config()))


@dataclasses.dataclass
class Request:
    method: str
    path: str
    host: str
    headers: list[tuple[str, bytes]]
    body: bytes
    source: str
    now: Optional[int]


def load(name: str) -> CaseFile:
    return CaseFile(name, json.loads((CASES_DIR / name).read_text()))


def load_all() -> list[CaseFile]:
    return [load(p.name) for p in sorted(CASES_DIR.glob("*.json"))]


def profile_file(profile: str) -> CaseFile:
    """The case file of `envoy/profiles/<profile>.json` (it holds the demo keys)."""
    found = [f for f in load_all() if f.profile == profile]
    assert len(found) == 1, (profile, [f.name for f in found])
    return found[0]


def only(case: dict) -> Optional[str]:
    """"native" or "e2e" when the case runs on one side only."""
    return case.get("only")


def e2e_options(case: dict) -> dict[str, Any]:
    """`e2e`: {"protocols": [...], "envoy_refuses": [...], "why": ...}."""
    return case.get("e2e", {})
