"""The suite's Envoy: one process with keygate (or a plain proxy) on free ports, its admin, logs and reloads."""

from __future__ import annotations

import atexit
import json
import os
import random
import shutil
import subprocess
import tempfile
import threading
import urllib.request
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from .client import RawConnection, Response, http_request
from .config import ACCESS_LOG_FORMAT, bootstrap, lds_document, wasm_filter
from .paths import REPO_ROOT, envoy_binary, wasm_path
from .ports import free_ports
from .process import envoy_command, spawn, stop_process, wait_ready
from .waiting import wait_until
from .wire import HeaderList


class EnvoyStartError(RuntimeError):
    """Envoy exited or was not ready in time; carries its log."""

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
        failure_policy: str = "FAIL_RELOAD",
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
        `vm_env` sets environment variables in the keygate VM.
        `failure_policy` is every keygate filter's (FAIL_RELOAD or FAIL_CLOSED)."""
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
        self.failure_policy = failure_policy
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
        policy = self.failure_policy
        more = [
            wasm_filter(c, self.wasm, f"keygate-{n}", self.vm_env, failure_policy=policy)
            for n, c in enumerate(self.more_plugin_configs, 2)
        ]
        return [wasm_filter(self.plugin_config, self.wasm, vm_env=self.vm_env, failure_policy=policy)] + more

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
        extra = ["--base-id", str(self.base_id)]
        if self.component_log_level:
            extra += ["--component-log-level", self.component_log_level]
        if self.drain_time_s is not None:
            extra += ["--drain-time-s", str(self.drain_time_s)]
        if self.access_log:
            extra += ["--file-flush-interval-msec", "100"]
        cmd = envoy_command(
            envoy_binary(),
            cfg,
            concurrency=self.concurrency,
            log_level=self.log_level,
            log_path=self.log_path,
            extra=extra,
        )
        self._out = open(self.stdio_path, "wb")
        self.proc = spawn(cmd, stdout=self._out, stderr=subprocess.STDOUT, cwd=str(REPO_ROOT))
        with _LIVE_LOCK:
            _LIVE.add(self)

    def start(self, _attempts: int = 3) -> "Envoy":
        self._launch()
        assert self.proc is not None
        outcome = wait_ready(self.proc, self.admin_port, self.ready_timeout)
        if outcome == "ready":
            return self
        if outcome == "exited":
            rc = self.proc.returncode
            self.stop()
            log = self.log_text()
            if "Address already in use" in log and _attempts > 1:
                # Another process took a port between picking and binding.
                self.cleanup()
                return self.start(_attempts - 1)
            raise EnvoyStartError(f"envoy exited during startup with code {rc}", log, rc)
        log = self.log_text()
        self.stop()
        raise EnvoyStartError(f"envoy not ready after {self.ready_timeout}s", log, None)

    def start_expect_failure(self, timeout: float = 20.0) -> str:
        """Start Envoy expecting it to refuse its configuration. Returns the
        log text once the process has exited. Fails (AssertionError) if Envoy
        becomes ready or is still running after `timeout`."""
        self._launch()
        assert self.proc is not None
        try:
            outcome = wait_ready(self.proc, self.admin_port, timeout)
            if outcome == "ready":
                raise AssertionError("envoy became ready with a configuration it should refuse:\n" + self.log_text()[-4000:])
            if outcome == "timeout":
                raise AssertionError(f"envoy still running after {timeout}s:\n" + self.log_text()[-4000:])
            self.returncode = self.proc.returncode
            assert self.returncode != 0, "envoy exited with status 0"
            return self.log_text()
        finally:
            self.stop()

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
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
