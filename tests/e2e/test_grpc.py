"""gRPC callers in real Envoy: a grpcio client through Envoy and keygate to a
grpcio backend. A refused call gets the gRPC status for its code (16, 7, 8,
not the 14 Envoy maps a bare 429 to), the code in grpc-message and, on 429,
Retry-After; the backend never sees a refused call."""

from __future__ import annotations

import json
import secrets
import threading
from concurrent import futures

import pytest

from harness import ROUTER, listener, sha256_hex, static_bootstrap, static_cluster, wasm_filter, wasm_path

grpc = pytest.importorskip("grpc", reason="grpcio is installed by scripts/test.sh")

SERVICE, METHOD = "keygate.demo.Echo", "Say"
READER = "kg_grpc_reader_" + secrets.token_hex(8)
LIMITED = "kg_grpc_limited_" + secrets.token_hex(8)

CONFIG = {
    "keys": [
        {"id": "reader", "sha256": sha256_hex(READER), "scopes": ["read"]},
        {"id": "limited", "sha256": sha256_hex(LIMITED), "scopes": ["write"],
         "rate_limit": {"requests_per_second": 0.001, "burst": 1}},
    ],
    "rules": [
        {"name": "echo", "match": {"path": f"/{SERVICE}/{METHOD}"}, "action": "require",
         "scopes_any_of": ["write"]},
    ],
}


class EchoBackend:
    """A grpcio server whose one method answers with the identity it was given."""

    def __init__(self) -> None:
        self.calls: list[dict[str, str]] = []
        self._lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        handler = grpc.unary_unary_rpc_method_handler(self._say)
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {METHOD: handler}),))
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    def _say(self, request: bytes, context) -> bytes:
        metadata = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        with self._lock:
            self.calls.append(metadata)
        return json.dumps({"identity": metadata.get("x-api-key-id"), "got": request.decode()}).encode()

    def saw(self, marker: str) -> list[dict[str, str]]:
        with self._lock:
            return [c for c in self.calls if c.get("x-call") == marker]


@pytest.fixture(scope="module")
def echo():
    b = EchoBackend()
    b.server.start()
    yield b
    b.server.stop(grace=None)


@pytest.fixture(scope="module")
def channel(envoy_factory, echo):
    """A channel to Envoy, whose route sends gRPC to the echo backend over HTTP/2."""
    cluster = static_cluster("backend", 0)
    cluster["typed_extension_protocol_options"] = {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}},
        }
    }
    cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"][
        "port_value"
    ] = echo.port
    lst = listener(0, [wasm_filter(CONFIG, wasm_path())])
    boot = static_bootstrap(0, [lst], [cluster])
    # The launcher fills in the ports it picks.
    boot["admin"]["address"]["socket_address"]["port_value"] = "{admin_port}"
    lst["address"]["socket_address"]["port_value"] = "{port}"
    assert ROUTER in lst["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]
    gate = envoy_factory(None, config_text=json.dumps(boot))
    ch = grpc.insecure_channel(f"127.0.0.1:{gate.port}")
    yield ch
    ch.close()


def call(channel, key: str | None, marker: str):
    """One unary call; returns (status code, details, metadata of the reply, body)."""
    metadata = [("x-call", marker)] + ([("x-api-key", key)] if key else [])
    say = channel.unary_unary(f"/{SERVICE}/{METHOD}")
    try:
        body, c = say.with_call(b"hello", metadata=metadata, timeout=10)
        return grpc.StatusCode.OK, "", dict(c.initial_metadata() or ()), json.loads(body)
    except grpc.RpcError as e:
        md = dict((e.initial_metadata() or ()) + (e.trailing_metadata() or ()))
        return e.code(), e.details(), md, None


def test_an_allowed_call_reaches_the_backend_with_the_identity(channel, echo):
    marker = secrets.token_hex(6)
    code, _, _, body = call(channel, LIMITED, marker)
    assert code == grpc.StatusCode.OK
    assert body["identity"] == "limited"
    seen = echo.saw(marker)
    assert len(seen) == 1 and "x-api-key" not in seen[0], seen


@pytest.mark.parametrize(
    "key, status, number, denial",
    [
        (None, grpc.StatusCode.UNAUTHENTICATED, 16, "missing_api_key"),
        ("kg_grpc_unknown_" + "0" * 16, grpc.StatusCode.UNAUTHENTICATED, 16, "invalid_api_key"),
        (READER, grpc.StatusCode.PERMISSION_DENIED, 7, "insufficient_scope"),
    ],
    ids=["missing key", "unknown key", "wrong scope"],
)
def test_refused_calls_get_their_grpc_status_and_never_reach_the_backend(channel, echo, key, status, number, denial):
    marker = secrets.token_hex(6)
    code, details, md, _ = call(channel, key, marker)
    assert (code, code.value[0]) == (status, number)
    assert details.startswith(f"{denial}: "), details
    assert echo.saw(marker) == []
    for secret in (READER, LIMITED):
        assert secret not in details and secret not in json.dumps(md)


def test_rate_limited_calls_get_resource_exhausted_with_retry_after(channel, echo):
    # `limited` has a burst of 1, spent by the allowed call above or here.
    call(channel, LIMITED, secrets.token_hex(6))
    marker = secrets.token_hex(6)
    code, details, md, _ = call(channel, LIMITED, marker)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details)
    assert code.value[0] == 8
    assert details.startswith("rate_limited: "), details
    assert md.get("retry-after", "").isdigit() and int(md["retry-after"]) >= 1, md
    assert md.get("ratelimit-policy") == '"default";q=1;w=1000', md
    assert echo.saw(marker) == []
