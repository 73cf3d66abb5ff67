"""Fleet-wide limits: a real `redis-server`, the `keygate-ratelimit` service
(Envoy's RLS gRPC API on limitador) and Envoys with Envoy's
`envoy.filters.http.ratelimit` placed after keygate.

Used by tests/e2e/test_fleet_limits.py and scripts/fleet_limits.py.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from .config import static_cluster
from .launcher import Envoy
from .paths import REPO_ROOT
from .ports import free_port
from .process import spawn, stop_process

# The gRPC cluster of the service in every bootstrap.
RLS_CLUSTER = "keygate_ratelimit"

# What Envoy answers when the service cannot be asked and
# `failure_mode_deny` is on: keygate's body shape, from Envoy's local-reply
# mapping of the response flag RLSE (rate-limit service error).
UNAVAILABLE_BODY = {
    "error": "rate_limit_unavailable",
    "message": "The rate-limit service cannot be reached; try again later.",
}


def ratelimit_filter(
    *,
    failure_mode_deny: bool = False,
    identity_header: str = "x-api-key-id",
    key_id_header: str = "x-api-key-key-id",
    timeout: str = "0.5s",
) -> dict:
    """Envoy's rate-limit filter, to be placed after keygate: one descriptor
    per request that keygate gave an identity, with the key's own id for a
    key with a consumer."""
    return {
        "name": "envoy.filters.http.ratelimit",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimit",
            "domain": "keygate",
            "timeout": timeout,
            "failure_mode_deny": failure_mode_deny,
            "status_on_error": {"code": "ServiceUnavailable"},
            "rate_limited_as_resource_exhausted": True,
            "disable_x_envoy_ratelimited_header": True,
            "rate_limit_service": {
                "grpc_service": {"envoy_grpc": {"cluster_name": RLS_CLUSTER}},
                "transport_api_version": "V3",
            },
            "rate_limits": [
                {
                    "actions": [
                        {"request_headers": {"header_name": identity_header, "descriptor_key": "identity"}},
                        {
                            "request_headers": {
                                "header_name": key_id_header,
                                "descriptor_key": "key_id",
                                "skip_if_absent": True,
                            }
                        },
                    ]
                }
            ],
        },
    }


def rls_cluster(port: int) -> dict:
    """The service's cluster: HTTP/2 (gRPC) to 127.0.0.1:`port`."""
    cluster = static_cluster(RLS_CLUSTER, port)
    cluster["connect_timeout"] = "0.25s"
    cluster["typed_extension_protocol_options"] = {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}},
        }
    }
    return cluster


def unavailable_reply_mapper() -> dict:
    """`local_reply_config` giving Envoy's fail-closed refusal keygate's
    JSON shape."""
    return {
        "mappers": [
            {
                "filter": {"response_flag_filter": {"flags": ["RLSE"]}},
                "headers_to_add": [
                    {"header": {"key": "cache-control", "value": "no-store"}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"},
                    {"header": {"key": "retry-after", "value": "1"}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"},
                ],
                "body_format_override": {
                    "json_format": UNAVAILABLE_BODY,
                    "content_type": "application/json",
                },
            }
        ]
    }


class FleetEnvoy(Envoy):
    """An Envoy with keygate and, when `rls_port` is given, Envoy's
    rate-limit filter after it asking the service on that port."""

    def __init__(
        self,
        backend_port: int,
        plugin_config: Any,
        rls_port: Optional[int],
        *,
        failure_mode_deny: bool = False,
        **kw: Any,
    ):
        if rls_port is not None:
            extra = dict(kw.pop("hcm_extra", None) or {})
            extra["local_reply_config"] = unavailable_reply_mapper()
            kw["hcm_extra"] = extra
        super().__init__(backend_port, plugin_config, **kw)
        self.rls_port = rls_port
        self.failure_mode_deny = failure_mode_deny

    def _filters(self) -> list[dict]:
        filters = super()._filters()
        if self.rls_port is not None:
            filters.append(ratelimit_filter(failure_mode_deny=self.failure_mode_deny))
        return filters

    def _write_config(self) -> Path:
        path = super()._write_config()
        if self.rls_port is not None:
            cfg = json.loads(path.read_text())
            cfg["static_resources"]["clusters"].append(rls_cluster(self.rls_port))
            path.write_text(json.dumps(cfg, indent=2))
        return path


def _wait_port(port: int, proc: subprocess.Popen, timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} not listening on {port} after {timeout}s:\n{log.read_text(errors='replace')[-3000:]}")


class Redis:
    """A throwaway `redis-server` on 127.0.0.1 (no persistence); `stop()` and
    `start()` again keep its port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix="keygate-redis-"))
        self.proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> "Redis":
        binary = shutil.which("redis-server")
        if binary is None:
            raise FileNotFoundError("redis-server not found (Debian: apt-get install redis-server)")
        log = self.workdir / "redis.log"
        self.proc = spawn(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir), "--logfile", str(log)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        log.touch()
        _wait_port(self.port, self.proc, 10.0, "redis-server", log)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "Redis":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.cleanup()


def rls_binary() -> Path:
    """`KEYGATE_RLS`, else the release build, else the debug build."""
    if os.environ.get("KEYGATE_RLS"):
        return Path(os.environ["KEYGATE_RLS"])
    for profile in ("release", "debug"):
        path = REPO_ROOT / "target" / profile / "keygate-ratelimit"
        if path.exists():
            return path
    return REPO_ROOT / "target" / "debug" / "keygate-ratelimit"


class RateLimitService:
    """`keygate-ratelimit serve` on a free port, reading `plugin_config`
    (written to a file; none when it is None) and/or polling `control_plane`."""

    def __init__(
        self,
        plugin_config: Any,
        redis_url: str,
        *,
        poll: float = 0.2,
        port: Optional[int] = None,
        control_plane: Optional[str] = None,
    ):
        self.port = port or free_port()
        self.redis_url = redis_url
        self.poll = poll
        self.control_plane = control_plane
        self.workdir = Path(tempfile.mkdtemp(prefix="keygate-rls-"))
        self.config_path = self.workdir / "keygate.json"
        self.log_path = self.workdir / "rls.log"
        self.with_config = plugin_config is not None
        if self.with_config:
            self.config_path.write_text(json.dumps(plugin_config))
        self.proc: Optional[subprocess.Popen] = None
        self._out: Any = None

    def start(self, timeout: float = 20.0) -> "RateLimitService":
        binary = rls_binary()
        if not binary.exists():
            raise FileNotFoundError(f"{binary} not built (bash scripts/ratelimit.sh build)")
        self._out = open(self.log_path, "ab")
        source = ["--config", str(self.config_path)] if self.with_config else []
        if self.control_plane:
            source += ["--control-plane", self.control_plane]
        self.proc = spawn(
            [str(binary), "serve", *source, "--redis", self.redis_url,
             "--listen", f"127.0.0.1:{self.port}", "--poll", str(self.poll)],
            stdout=self._out,
            stderr=subprocess.STDOUT,
        )
        _wait_port(self.port, self.proc, timeout, "keygate-ratelimit", self.log_path)
        return self

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None
        if self._out is not None:
            self._out.close()
            self._out = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "RateLimitService":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.cleanup()
