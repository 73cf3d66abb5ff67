"""Raw HTTP/1.1 on the wire: header types, and reading lines, headers and bodies from a socket.

Shared by the recording backend and the raw client.
"""

from __future__ import annotations

import socket
from typing import Optional, Sequence, Union

HeaderValue = Union[str, bytes]
HeaderList = Sequence[tuple[HeaderValue, HeaderValue]]


def to_bytes(v: HeaderValue) -> bytes:
    """A header name or value as bytes (str is encoded as UTF-8)."""
    return v if isinstance(v, bytes) else v.encode("utf-8")


def to_str(v: HeaderValue) -> str:
    """A header name or value as str (bytes are decoded as latin-1)."""
    return v.decode("latin-1") if isinstance(v, bytes) else v


class Reader:
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


def read_headers(r: Reader) -> list[tuple[str, bytes]]:
    """Header lines up to the blank one, as (lowercased name, raw value) in order."""
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


def read_body(r: Reader, headers: list[tuple[str, bytes]], until_close: bool) -> bytes:
    """The body the headers announce (chunked, content-length, or up to EOF if `until_close`)."""
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
