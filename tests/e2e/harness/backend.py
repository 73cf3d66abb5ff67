"""The recording backend: a threaded HTTP/1.1 server that keeps every request it gets, bytes and all."""

from __future__ import annotations

import dataclasses
import json
import socket
import socketserver
import threading
from typing import Any, Optional

from .wire import Reader, read_body, read_headers


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
        r = Reader(sock)
        try:
            while True:
                line = r.line()
                if line is None:
                    return
                if not line:
                    continue
                method, path, _version = line.decode("latin-1").split(" ", 2)
                headers = read_headers(r)
                self.server.owner._note_start(path)
                body = read_body(r, headers, until_close=False)
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
