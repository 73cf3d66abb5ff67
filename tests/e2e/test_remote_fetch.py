"""Envoy fetching keygate itself: envoy/remote-fetch.yaml as shipped (on free
ports), its module served over HTTP by nginx (Debian's package, installed
when missing; Python's http.server only if nginx cannot be had).

- the right digest: keygate loads and enforces (401 without a key, 200 with);
- a wrong digest: Envoy refuses the module and nothing is ever forwarded
  (a listener that is not serving, or 5xx: never a 200);
- the server down at start-up: the retry policy brings keygate up once the
  server is back, and not before;
- the server never up: once the retries run out, still nothing forwarded.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

import pytest

import harness
from conftest import report
from harness import REPO_ROOT, check_denial, new_key, sha256_hex, unique_path, xkey

TEMPLATE = REPO_ROOT / "envoy" / "remote-fetch.yaml"
KEY = new_key("kg_remote_")
FETCHED = re.compile(r'"GET /keygate\.wasm HTTP/1\.[01]" 200 ')


def find_nginx() -> Optional[str]:
    """nginx, installed from Debian's packages when missing (scripts/test.sh's
    ensure_apt_tools); None if it cannot be had."""
    path = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if path is None:
        subprocess.run(
            ["bash", "-c", f'source "{REPO_ROOT}/scripts/test.sh" && ensure_apt_tools nginx nginx'],
            capture_output=True,
            timeout=300,
            env={**os.environ, "PATH": os.environ.get("PATH", "") + ":/usr/sbin"},
        )
        path = shutil.which("nginx", path=os.environ.get("PATH", "") + ":/usr/sbin")
    return path


NGINX_CONF = """\
daemon off;
worker_processes 1;
{user}
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log {dir}/access.log;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    types {{ application/wasm wasm; }}
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port};
        root {root};
    }}
}}
"""


class ModuleServer:
    """A web server for `root` on 127.0.0.1:`port`, stopped by stop() or on
    leaving a `with` block."""

    def __init__(self, nginx: Optional[str], root: Path, port: int, workdir: Path, probe: str = "keygate.wasm"):
        self.nginx, self.root, self.port, self.dir = nginx, root, port, workdir
        self.probe = probe  # the file whose HEAD says the server is up
        self.proc: Optional[subprocess.Popen] = None
        self.access_log = workdir / "access.log"

    def start(self) -> "ModuleServer":
        self.dir.mkdir(parents=True, exist_ok=True)
        log = open(self.dir / "server.out", "ab")
        if self.nginx:
            conf = self.dir / "nginx.conf"
            # As root, nginx's workers would otherwise drop to a user that
            # cannot read the test's private temporary directories.
            user = "user root;" if os.geteuid() == 0 else ""
            conf.write_text(NGINX_CONF.format(user=user, dir=self.dir, port=self.port, root=self.root))
            cmd = [self.nginx, "-p", str(self.dir), "-c", str(conf), "-e", str(self.dir / "error.log")]
        else:
            cmd = [sys.executable, "-m", "http.server", str(self.port), "--bind", "127.0.0.1", "--directory", str(self.root)]
            log.close()
            log = open(self.access_log, "ab")  # http.server logs each request on stderr
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        log.close()
        ok = harness.wait_until(self._serves, timeout=15, interval=0.1)
        if not ok:
            self.stop()
            raise RuntimeError(f"module server did not come up: {cmd}\n" + self._text("error.log") + self._text("server.out"))
        return self

    def _serves(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            return False
        try:
            probe = urllib.request.Request(f"http://127.0.0.1:{self.port}/{self.probe}", method="HEAD")
            with urllib.request.urlopen(probe, timeout=1) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def _text(self, name: str) -> str:
        try:
            return (self.dir / name).read_text("utf-8", "replace")
        except OSError:
            return ""

    def fetches(self) -> int:
        """Successful GETs of the module (the readiness probe is a HEAD)."""
        try:
            return len(FETCHED.findall(self.access_log.read_text("utf-8", "replace")))
        except OSError:
            return 0

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def __enter__(self) -> "ModuleServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture(scope="module")
def nginx() -> Optional[str]:
    path = find_nginx()
    report(f"remote fetch: module served by {path or 'python -m http.server (nginx could not be installed)'}")
    return path


@pytest.fixture(scope="module")
def module_root(wasm: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("www")
    shutil.copyfile(wasm, root / "keygate.wasm")
    for p in (root, root.parent):
        p.chmod(0o755)
    (root / "keygate.wasm").chmod(0o644)
    return root


@pytest.fixture
def server(nginx: Optional[str], module_root: Path, tmp_path: Path):
    """A module server on a free port, not yet started; always stopped."""
    srv = ModuleServer(nginx, module_root, harness.free_port(), tmp_path / "server")
    yield srv
    srv.stop()


def render(module_port: int, module_sha256: str, fast_retries: bool = False) -> str:
    """envoy/remote-fetch.yaml with its placeholders filled and its fixed ports
    replaced by the harness's free ones (and the module server's)."""
    text = TEMPLATE.read_text()
    for placeholder, value in (("__KEYGATE_WASM_SHA256__", module_sha256), ("__ACME_KEY_SHA256__", sha256_hex(KEY))):
        assert placeholder in text, placeholder
        text = text.replace(placeholder, value)
    for fixed, field in (("10000", "{port}"), ("9901", "{admin_port}"), ("18080", "{backend_port}"), ("18090", str(module_port))):
        text, n = re.subn(rf"port_value: {fixed}\b", f"port_value: {field}", text)
        assert n == 1, fixed
    text, n = re.subn(r"uri: http://127\.0\.0\.1:18090/", f"uri: http://127.0.0.1:{module_port}/", text)
    assert n == 1
    if fast_retries:  # the refusal is the point, not the half minute of retries
        for old, new in (("num_retries: 10", "num_retries: 2"), ("base_interval: 1s", "base_interval: 0.2s")):
            assert old in text, old
            text = text.replace(old, new)
    return text


def module_sha256(wasm: Path) -> str:
    return hashlib.sha256(wasm.read_bytes()).hexdigest()


def assert_enforces(envoy: harness.Envoy, backend: harness.Backend) -> None:
    check_denial(envoy.request("GET", unique_path("x")), "missing_api_key", secrets_=[KEY])
    check_denial(envoy.request("GET", unique_path("x"), headers=[xkey("kg_not_a_key_at_all")]), "invalid_api_key")
    path = unique_path("x")
    r = envoy.request("GET", path, headers=[xkey(KEY)])
    assert r.status == 200, r
    assert backend.only(path).values("x-api-key-id") == [b"acme"]


def test_template_fetches_with_digest_and_retries() -> None:
    text = TEMPLATE.read_text()
    assert 'sha256: "__KEYGATE_WASM_SHA256__"' in text
    assert "retry_policy:" in text and "num_retries: 10" in text
    assert "failure_policy: FAIL_RELOAD" in text and "FAIL_OPEN" not in text.replace("FAIL_OPEN for", "")


def test_right_digest_loads_keygate(envoy_fn, server: ModuleServer, wasm: Path, backend: harness.Backend) -> None:
    server.start()
    envoy = envoy_fn(config_text=render(server.port, module_sha256(wasm)))
    assert server.fetches() == 1, "Envoy did not fetch the module from the server"
    assert_enforces(envoy, backend)
    assert envoy.counter("wasm.keygate.vm_reload") == 0


def start_never_forwarding(envoy: harness.Envoy, backend: harness.Backend) -> str:
    """Starts Envoy whose module cannot be had and checks that it never
    serves unauthenticated: either it does not become ready, or for 3 s every
    request (with a valid key or none) fails or gets a 5xx, and the backend
    sees none of them. Returns what happened."""
    try:
        envoy.start()
    except harness.EnvoyStartError as e:  # refused at start-up: nothing listens
        return f"not ready ({str(e).splitlines()[0]})"
    statuses: set[object] = set()
    paths = []
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        for headers in ([xkey(KEY)], []):
            path = unique_path("refused")
            paths.append(path)
            try:
                status: object = envoy.request("GET", path, headers=headers).status
            except (ConnectionError, OSError) as e:
                status = type(e).__name__
            statuses.add(status)
            assert not (isinstance(status, int) and status < 500), f"{path} answered {status}"
        time.sleep(0.1)
    assert not any(backend.saw(p) for p in paths)
    assert "failed to load" in envoy.log_text()
    return "ready, answering " + ", ".join(sorted(map(str, statuses)))


def test_wrong_digest_never_forwards(envoy_fn, server: ModuleServer, backend: harness.Backend) -> None:
    """Envoy gets the module but it is not the one the digest names: Envoy
    refuses it. Acceptable: a listener that is not ready, or 5xx. Never 200,
    and the backend never sees a request."""
    server.start()
    wrong = hashlib.sha256(b"not keygate").hexdigest()
    envoy = envoy_fn(config_text=render(server.port, wrong, fast_retries=True), start=False)
    outcome = start_never_forwarding(envoy, backend)
    # The server did hand over the module: the refusal is the digest's doing.
    assert server.fetches() >= 1
    report(f"remote fetch, wrong digest: {outcome}")


def test_server_never_up_fails_closed(envoy_fn, server: ModuleServer, wasm: Path, backend: harness.Backend) -> None:
    """The retries run out with no server: Envoy gives up on the module the
    same way, and still forwards nothing."""
    envoy = envoy_fn(config_text=render(server.port, module_sha256(wasm), fast_retries=True), start=False)
    outcome = start_never_forwarding(envoy, backend)
    assert envoy.counter("cluster.keygate_module.upstream_cx_connect_fail") >= 3 or outcome.startswith("not ready")
    report(f"remote fetch, server never up: {outcome}")


def test_server_down_at_startup_then_retried(envoy_fn, server: ModuleServer, wasm: Path, backend: harness.Backend) -> None:
    """Envoy starts first; the server comes up a few seconds later. Until then
    Envoy is not ready and forwards nothing; the retry policy then loads
    keygate, which enforces as usual."""
    envoy = envoy_fn(config_text=render(server.port, module_sha256(wasm)), start=False, ready_timeout=60)
    seen: dict[str, object] = {"early": set()}

    def meanwhile() -> None:
        # Runs while the main thread waits in envoy.start() (Envoy must be
        # started from the main thread: it dies with the thread that made it).
        try:
            if not harness.wait_until(lambda: envoy.admin_port != 0 and _admin_answers(envoy), timeout=15):
                raise AssertionError("envoy admin never came up")
            down_until = time.monotonic() + 3
            while time.monotonic() < down_until:
                seen["ready_early"] = seen.get("ready_early") or harness.admin_ready(envoy.admin_port)
                try:
                    status: object = envoy.request("GET", unique_path("early"), headers=[xkey(KEY)]).status
                except (ConnectionError, OSError) as e:
                    status = type(e).__name__
                seen["early"].add(status)  # type: ignore[union-attr]
                time.sleep(0.2)
            seen["connect_fail"] = envoy.counter("cluster.keygate_module.upstream_cx_connect_fail")
            seen["t0"] = time.monotonic()
            server.start()
        except BaseException as e:  # reported by the main thread
            seen["error"] = e

    helper = threading.Thread(target=meanwhile, name="module-server-later", daemon=True)
    helper.start()
    try:
        envoy.start()
    finally:
        helper.join(timeout=30)
    assert "error" not in seen, seen["error"]
    assert not seen.get("ready_early"), "envoy was ready before its module could be fetched"
    early = seen["early"]
    assert not any(isinstance(s, int) and s < 500 for s in early), early  # type: ignore[union-attr]
    assert seen["connect_fail"] >= 1, "no fetch was tried while the server was down"  # type: ignore[operator]
    report(
        f"remote fetch, server down at start-up: {seen['connect_fail']} failed fetch(es), answers meanwhile "
        f"{sorted(map(str, early))}; keygate up {time.monotonic() - seen['t0']:.1f} s after the server came back"  # type: ignore[operator]
    )
    assert_enforces(envoy, backend)


def _admin_answers(envoy: harness.Envoy) -> bool:
    try:
        envoy.admin_get("/server_info")
        return True
    except (urllib.error.URLError, OSError):
        return False
