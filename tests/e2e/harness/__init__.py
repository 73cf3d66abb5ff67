"""End-to-end harness for keygate: a recording backend, an Envoy launcher and raw HTTP/1.1 and HTTP/2 clients.

Only the Python standard library is used here (plus `h2` for HTTP/2; pytest
and httpx are used by the tests themselves). Everything listens on 127.0.0.1
with ports picked at run time. Each module owns one concept; this package
re-exports the names the tests use, so `import harness` and
`from harness import X` work as before.
"""

from __future__ import annotations

from .backend import Backend, ReceivedRequest
from .client import RawConnection, Response, build_request, http_request, unique_path
from .config import (
    ACCESS_LOG_FORMAT,
    ROUTER,
    bootstrap,
    credential_header_names,
    filter_state_headers,
    filter_state_route_config,
    lds_document,
    listener,
    static_bootstrap,
    static_cluster,
    wasm_filter,
)
from .denials import DENIAL_CODES_PATH, DENIAL_STATUS, check_denial
from .h2client import H2Result, h2_exchange
from .keys import bearer, key_entry, new_key, sha256_hex, xkey
from .launcher import Envoy, EnvoyStartError
from .module import wasm_exports
from .paths import DEFAULT_WASM, REPO_ROOT, envoy_binary, wasm_path
from .ports import free_port, free_ports
from .process import admin_ready, envoy_command, spawn, stop_process, wait_ready
from .waiting import wait_until
from .wire import HeaderList, HeaderValue

__all__ = [
    "ACCESS_LOG_FORMAT",
    "DEFAULT_WASM",
    "DENIAL_CODES_PATH",
    "DENIAL_STATUS",
    "REPO_ROOT",
    "ROUTER",
    "Backend",
    "Envoy",
    "EnvoyStartError",
    "H2Result",
    "HeaderList",
    "HeaderValue",
    "RawConnection",
    "ReceivedRequest",
    "Response",
    "admin_ready",
    "bearer",
    "bootstrap",
    "build_request",
    "check_denial",
    "credential_header_names",
    "envoy_binary",
    "envoy_command",
    "filter_state_headers",
    "filter_state_route_config",
    "free_port",
    "free_ports",
    "h2_exchange",
    "http_request",
    "key_entry",
    "lds_document",
    "listener",
    "new_key",
    "sha256_hex",
    "spawn",
    "static_bootstrap",
    "static_cluster",
    "stop_process",
    "unique_path",
    "wait_ready",
    "wait_until",
    "wasm_exports",
    "wasm_filter",
    "wasm_path",
    "xkey",
]
