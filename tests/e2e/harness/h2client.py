"""The HTTP/2 client: one h2c request (prior knowledge) sent frame by frame with the `h2` library."""

from __future__ import annotations

import dataclasses
import socket
import time
from typing import Optional, Sequence

from .client import Response
from .wire import HeaderList, to_bytes, to_str


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
                hs = [(to_str(n).lower(), to_str(v)) for n, v in ev.headers]
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
        req += [(to_bytes(n).decode("latin-1"), v) for n, v in headers]
        conn.send_headers(sid, [(to_bytes(n), to_bytes(v)) for n, v in req], end_stream=not body_chunks and trailers is None)
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
            conn.send_headers(sid, [(to_bytes(n), to_bytes(v)) for n, v in trailers], end_stream=True)
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

