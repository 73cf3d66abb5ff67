"""Self-tests of the harness against a plain Envoy (no wasm filter).

They also pin down what Envoy's own codec does with odd requests, which the
keygate tests rely on: duplicates reach the filter as separate entries,
non-UTF-8 bytes pass through untouched.
"""

from __future__ import annotations

import pytest

import harness
from harness import unique_path


@pytest.fixture(scope="module")
def plain(envoy_factory):
    return envoy_factory(with_wasm=False)


def test_free_port_is_bindable():
    import socket

    p = harness.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", p))


def test_sha256_hex_known_vector():
    assert harness.sha256_hex("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_backend_records_raw_headers_through_envoy(plain, backend):
    path = unique_path()
    r = plain.request(
        "GET",
        path,
        [("x-dup", "one"), ("x-dup", "two"), ("x-bin", b"\xff\xfe"), ("X-Mixed-Case", "v")],
    )
    assert r.status == 200, r
    assert r.json()["ok"] is True
    seen = backend.only(path)
    assert seen.values("x-dup") == [b"one", b"two"]
    assert seen.values("x-bin") == [b"\xff\xfe"]
    assert seen.values("x-mixed-case") == [b"v"]


def test_post_body_reaches_backend(plain, backend):
    path = unique_path()
    r = plain.request("POST", path, [("content-type", "text/plain")], b"hello")
    assert r.status == 200
    assert backend.only(path).body == b"hello"


def test_keep_alive_connection(plain, backend):
    with plain.connect() as c:
        paths = [unique_path() for _ in range(3)]
        for p in paths:
            assert c.request("GET", p).status == 200
    assert all(backend.saw(p) for p in paths)


def test_stats_and_admin(plain):
    plain.request("GET", unique_path())
    stats = plain.stats()
    assert "server.live" in stats
    assert plain.counter("http.ingress.downstream_rq_total") >= 1


def test_bad_bootstrap_fails_fast_with_log(envoy_fn):
    e = envoy_fn(with_wasm=False, start=False, hcm_extra={"no_such_field": 1})
    log = e.start_expect_failure(timeout=20)
    assert "no_such_field" in log


def test_start_raises_with_log_tail(envoy_fn):
    e = envoy_fn(with_wasm=False, start=False, hcm_extra={"no_such_field": 1})
    with pytest.raises(harness.EnvoyStartError) as info:
        e.start()
    assert "no_such_field" in str(info.value)


def test_h2c_prior_knowledge_through_plain_envoy(plain, backend):
    httpx = pytest.importorskip("httpx")
    path = unique_path()
    with httpx.Client(http1=False, http2=True) as c:
        r = c.get(plain.url + path, headers=[("x-dup", "a"), ("x-dup", "b")])
    assert r.status_code == 200
    assert r.http_version == "HTTP/2"
    assert backend.only(path).values("x-dup") == [b"a", b"b"]
