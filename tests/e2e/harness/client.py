"""The raw HTTP/1.1 client: requests sent byte for byte (duplicates, any bytes) and the responses read back."""

from __future__ import annotations

import dataclasses
import json
import secrets
import socket
from typing import Any, Optional

from .wire import HeaderList, Reader, read_body, read_headers, to_bytes


@dataclasses.dataclass
class Response:
    """One HTTP response as read off the wire."""

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
        lines.append(to_bytes(n) + b": " + to_bytes(v))
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
        self._r = Reader(self.sock)

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
        headers = read_headers(self._r)
        code = int(status)
        if method == "HEAD" or code in (204, 304) or 100 <= code < 200:
            body = b""
        else:
            body = read_body(self._r, headers, until_close=True)
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
