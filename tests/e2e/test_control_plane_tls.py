"""Trusted key-list delivery: `keygate serve` with TLS and client certificates,
polled by Envoy through the cluster of envoy/control-plane-tls.yaml (as shipped,
with its certificate paths pointed at certificates made for the test).

- the right certificates: the list loads;
- a bad client setup (server certificate from a CA Envoy does not trust, no
  client certificate, one from another CA, an expired one, plain HTTP): every
  fetch fails, counted in fetch_failed, and no list is ever loaded (503
  key_list_unavailable);
- a bad rotation of the control plane's certificates after a good start:
  every fetch fails and the last good list stays in use until it is fixed;
- plain HTTP to the TLS port gets no list."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
from pathlib import Path
from typing import Optional

import pytest
import yaml

import harness
import tls_material
from conftest import report
from test_cli_control_plane import cli, keygate_bin
from test_control_plane import cp_config, start_envoy  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "envoy" / "control-plane-tls.yaml"
FAILED = "keygate.control_plane.fetch_failed"
OK = "keygate.control_plane.fetch_ok"


def transport_socket(trusted_ca: Path, client: Optional[tuple[Path, Path]]) -> dict:
    """The documented cluster's transport socket, trusting `trusted_ca` and
    showing the certificate and key `client` (none if None)."""
    cluster = yaml.safe_load(TEMPLATE.read_text())
    text = json.dumps(cluster["transport_socket"])
    cert, key = client or (Path("/absent.pem"), Path("/absent.key"))
    for placeholder, path in [
        ("/etc/keygate/tls/control-plane-ca.pem", trusted_ca),
        ("/etc/keygate/tls/envoy-client.pem", cert),
        ("/etc/keygate/tls/envoy-client.key", key),
    ]:
        assert placeholder in text, f"{placeholder} no longer in {TEMPLATE}"
        text = text.replace(placeholder, str(path))
    socket_ = json.loads(text)
    ctx = socket_["typed_config"]["common_tls_context"]
    assert socket_["typed_config"]["sni"] == tls_material.SERVER_NAME
    if client is None:
        del ctx["tls_certificates"]
    return socket_


class TlsServe:
    """`keygate serve` with TLS on a fixed port, restartable with other files."""

    def __init__(self, dir: Path, keys: Path):
        self.dir, self.keys, self.port = dir, keys, harness.free_port()
        self.proc: Optional[subprocess.Popen] = None
        self.starts = 0

    @property
    def log(self) -> Path:
        return self.dir / f"serve-{self.starts}.log"

    def start(self, cert: Path, key: Path, client_ca: Optional[Path]) -> "TlsServe":
        self.stop()
        self.starts += 1
        args = ["--tls-cert", str(cert), "--tls-key", str(key)] + (["--client-ca", str(client_ca)] if client_ca else [])
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [str(keygate_bin()), "serve", "--keys", str(self.keys), "--listen", f"127.0.0.1:{self.port}", *args],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        assert harness.wait_until(lambda: "listening on https://" in self.log.read_text(), timeout=10), self.log.read_text()
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
            self.proc = None


@pytest.fixture
def tls(tmp_path: Path) -> tls_material.TlsMaterial:
    return tls_material.make(tmp_path / "tls")


@pytest.fixture
def serve(tmp_path: Path):
    """keygate serve (not started) on a keys.json holding one key; yields (server, key)."""
    keys = tmp_path / "keys.json"
    key = cli("keys", "create", "--id", "listed", "--file", str(keys)).strip()
    server = TlsServe(tmp_path, keys)
    try:
        yield server, key
    finally:
        server.stop()


def status(envoy: harness.Envoy, key: str) -> int:
    return envoy.request("GET", harness.unique_path("tls"), [harness.xkey(key)]).status


def plugin() -> dict:
    return cp_config(authority=tls_material.SERVER_NAME)


def test_the_right_certificates_load_the_list(tls, serve, start_envoy) -> None:
    server, key = serve
    server.start(tls.server_cert, tls.server_key, tls.ca)
    envoy = start_envoy(plugin(), server.port, cp_transport_socket=transport_socket(tls.ca, (tls.client_cert, tls.client_key)))
    assert harness.wait_until(lambda: status(envoy, key) == 200, timeout=10), envoy.log_text()[-2000:]
    assert status(envoy, harness.new_key("other_")) == 401
    assert envoy.counter(OK) >= 1
    assert "handshake" not in server.log.read_text()


# Each: what Envoy trusts, the client certificate it shows, and what keygate
# serve logs about the handshake (None: Envoy refuses the server, so the
# reason is on Envoy's side).
BAD_SETUPS = {
    "server_cert_from_an_untrusted_ca": ("other_ca", ("client_cert", "client_key"), None),
    "no_client_certificate": ("ca", None, "no certificates"),
    "client_certificate_from_another_ca": ("ca", ("stranger_cert", "stranger_key"), "UnknownIssuer"),
    "expired_client_certificate": ("ca", ("expired_cert", "expired_key"), "expired"),
    "plain_http": (None, None, "corrupt message"),
}


@pytest.mark.parametrize("setup", list(BAD_SETUPS))
def test_a_bad_client_setup_never_loads_a_list(setup: str, tls, serve, start_envoy) -> None:
    server, key = serve
    server.start(tls.server_cert, tls.server_key, tls.ca)
    trusted, client, logged = BAD_SETUPS[setup]
    socket_ = None
    if trusted is not None:
        pair = (getattr(tls, client[0]), getattr(tls, client[1])) if client else None
        socket_ = transport_socket(getattr(tls, trusted), pair)
    envoy = start_envoy(plugin(), server.port, cp_transport_socket=socket_)
    assert harness.wait_until(lambda: envoy.counter(FAILED) >= 3, timeout=10), envoy.log_text()[-2000:]
    r = envoy.request("GET", harness.unique_path("tls"), [harness.xkey(key)])
    assert r.status == 503, r
    assert r.json()["error"] == "key_list_unavailable"
    assert envoy.counter(OK) == 0
    log = server.log.read_text()
    assert "TLS handshake with" in log
    if logged:
        assert logged in log, log
    first = next(line for line in log.splitlines() if "TLS handshake with" in line)
    report(f"control plane TLS, {setup}: fetch_failed={envoy.counter(FAILED)}, 503; serve: {first.split(' failed: ')[-1]}")


def test_a_bad_rotation_keeps_the_last_good_list(tls, serve, start_envoy, tmp_path: Path) -> None:
    server, key = serve
    server.start(tls.server_cert, tls.server_key, tls.ca)
    envoy = start_envoy(plugin(), server.port, cp_transport_socket=transport_socket(tls.ca, (tls.client_cert, tls.client_key)))
    assert harness.wait_until(lambda: status(envoy, key) == 200, timeout=10)
    # A key added while the control plane is misconfigured is not delivered.
    added = cli("keys", "create", "--id", "added", "--file", str(server.keys)).strip()
    for wrong in ["server certificate from another CA", "client CA that is not Envoy's"]:
        if wrong.startswith("server"):
            server.start(tls.untrusted_server_cert, tls.untrusted_server_key, tls.ca)
        else:
            server.start(tls.server_cert, tls.server_key, tls.other_ca)
        failed = envoy.counter(FAILED)
        assert harness.wait_until(lambda: envoy.counter(FAILED) >= failed + 3, timeout=10), wrong
        assert {status(envoy, key) for _ in range(5)} == {200}, wrong
        assert {status(envoy, added) for _ in range(5)} == {401}, wrong
    server.start(tls.server_cert, tls.server_key, tls.ca)
    assert harness.wait_until(lambda: status(envoy, added) == 200, timeout=10), "not delivered after the fix"
    assert status(envoy, key) == 200


def _get_over(sock: socket.socket) -> bytes:
    sock.sendall(b"GET /v1/keys HTTP/1.1\r\nHost: keys.internal\r\nConnection: close\r\n\r\n")
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def _tls_get(port: int, tls: tls_material.TlsMaterial, client: bool) -> bytes:
    ctx = ssl.create_default_context(cafile=str(tls.ca))
    if client:
        ctx.load_cert_chain(str(tls.client_cert), str(tls.client_key))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname=tls_material.SERVER_NAME) as s:
            return _get_over(s)


def test_plain_http_to_the_tls_port_gets_no_list(tls, serve) -> None:
    server, _key = serve
    server.start(tls.server_cert, tls.server_key, tls.ca)
    assert _tls_get(server.port, tls, client=True).startswith(b"HTTP/1.1 200 ")
    # Plain HTTP: the handshake fails on the first bytes and the connection closes.
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        try:
            answer = _get_over(s)
        except OSError:
            answer = b""
    assert not answer.startswith(b"HTTP/") and b'"keys"' not in answer, answer
    # TLS without a client certificate: an alert instead of a response.
    try:
        answer = _tls_get(server.port, tls, client=False)
    except (ssl.SSLError, OSError):
        answer = b""
    assert answer == b"", answer
