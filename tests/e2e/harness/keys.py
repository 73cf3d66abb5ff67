"""API keys: making them, their digests in a configuration, and the headers that carry them."""

from __future__ import annotations

import hashlib
import secrets
from typing import Any, Optional, Union

from .wire import HeaderValue


def sha256_hex(key: Union[str, bytes]) -> str:
    """Lowercase hex SHA-256 of a key, as written in the plugin configuration."""
    if isinstance(key, str):
        key = key.encode("utf-8")
    return hashlib.sha256(key).hexdigest()


def new_key(prefix: str = "") -> str:
    """A random API key (URL-safe characters only, no whitespace)."""
    return prefix + secrets.token_urlsafe(24)


def key_entry(key_id: str, key: str, rate_limit: Optional[dict] = None) -> dict:
    """A key record of the plugin configuration: its id and digest, and its limit if given."""
    e: dict[str, Any] = {"id": key_id, "sha256": sha256_hex(key)}
    if rate_limit is not None:
        e["rate_limit"] = rate_limit
    return e


def bearer(key: str) -> tuple[str, str]:
    """The key as an `Authorization: Bearer` header."""
    return ("authorization", f"Bearer {key}")


def xkey(key: HeaderValue) -> tuple[str, HeaderValue]:
    """The key as an `x-api-key` header."""
    return ("x-api-key", key)
