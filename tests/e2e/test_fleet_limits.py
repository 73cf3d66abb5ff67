"""Fleet-wide limits: Envoys with keygate and Envoy's rate-limit filter after
it, asking `keygate-ratelimit` (limitador on a real `redis-server`).

Needs `redis-server` (Debian package) and `target/*/keygate-ratelimit`
(`bash scripts/ratelimit.sh build`); skipped without them unless
KEYGATE_REQUIRE_WASM=1 (scripts/test.sh), where they fail.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest

import harness
from harness.ratelimit_service import UNAVAILABLE_BODY, FleetEnvoy, RateLimitService, Redis, rls_binary


def _need(ok: bool, msg: str) -> None:
    if ok:
        return
    if os.environ.get("KEYGATE_REQUIRE_WASM") == "1":
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture(scope="module", autouse=True)
def _tools(wasm: Any) -> None:
    _need(shutil.which("redis-server") is not None, "redis-server not installed (apt-get install redis-server)")
    _need(rls_binary().exists(), f"{rls_binary()} not built (bash scripts/ratelimit.sh build)")


@pytest.fixture
def envoys(backend: harness.Backend) -> Iterator[Any]:
    made: list[FleetEnvoy] = []

    def make(config: dict, rls_port: Any, **kw: Any) -> FleetEnvoy:
        e = FleetEnvoy(backend.port, config, rls_port, **kw)
        made.append(e)
        return e.start()

    yield make
    for e in made:
        e.stop()
        e.cleanup()


@pytest.fixture
def redis() -> Iterator[Redis]:
    with Redis() as r:
        yield r


KEY = harness.new_key("fl_")
OTHER = harness.new_key("fl_")
PROBE = harness.new_key("fl_")


def config(limit: dict, **extra: Any) -> dict:
    return {
        "keys": [
            harness.key_entry("fleet-key", KEY, limit),
            harness.key_entry("other-key", OTHER, limit),
        ],
        **extra,
    }


def send(envoy: FleetEnvoy, key: str = KEY) -> harness.Response:
    return envoy.request(path=harness.unique_path("/fleet"), headers=[("x-api-key", key)])


def statuses(envoy: FleetEnvoy, n: int, key: str = KEY) -> list[int]:
    return [send(envoy, key).status for _ in range(n)]


def reply_shape(r: harness.Response) -> dict:
    """What a client sees of a 429, with the seconds left out of RateLimit."""
    return {
        "status": r.status,
        "body": r.json(),
        "content-type": r.header_all("content-type"),
        "cache-control": r.header_all("cache-control"),
        "retry-after": [v.isdigit() and int(v) >= 1 for v in r.header_all("retry-after")],
        "ratelimit-policy": r.header_all("ratelimit-policy"),
        "ratelimit": [re.sub(r";t=\d+$", ";t=N", v) for v in r.header_all("ratelimit")],
        "x-envoy-ratelimited": r.header_all("x-envoy-ratelimited"),
    }


def test_fleet_refusal_has_the_local_429_shape(envoys: Any, redis: Redis) -> None:
    # 4 per minute: both Envoys' local buckets hold 4, the fleet 4 in all.
    cfg = config({"requests": 4, "per": "1m"})
    with RateLimitService(cfg, redis.url) as rls:
        a = envoys(cfg, rls.port)
        b = envoys(cfg, rls.port)
        assert statuses(a, 2) + statuses(b, 2) == [200] * 4
        fleet = send(b)  # b's local bucket has 2 left: the fleet refuses
        assert fleet.status == 429, fleet
    local_only = envoys(cfg, None)
    assert statuses(local_only, 4) == [200] * 4
    local = send(local_only)
    assert local.status == 429
    assert reply_shape(fleet) == reply_shape(local)
    assert reply_shape(fleet)["ratelimit-policy"] == ['"default";q=4;w=60']
    assert fleet.json()["error"] == "rate_limited"
    # The fleet's Retry-After is the rest of its window (at most 60 s).
    assert 1 <= int(fleet.header("retry-after") or 0) <= 60
    # A key with no use so far is not affected.
    assert send(a, OTHER).status == 200


def test_two_envoys_share_one_fleet_limit(envoys: Any, redis: Redis, backend: harness.Backend) -> None:
    cfg = config({"requests": 10, "per": "1m"})
    with RateLimitService(cfg, redis.url) as rls:
        a = envoys(cfg, rls.port)
        b = envoys(cfg, rls.port)
        seen = [send(e).status for _ in range(8) for e in (a, b)]
    # Each Envoy saw 8 requests, under its local 10: only the fleet refuses.
    assert seen.count(200) == 10, seen
    assert seen[:10] == [200] * 10 and set(seen[10:]) == {429}, seen


def test_consumer_keys_share_the_fleet_limit(envoys: Any, redis: Redis) -> None:
    second = harness.new_key("fl_")
    limit = {"requests": 3, "per": "1m"}
    cfg = {
        "keys": [
            {**harness.key_entry("acme-1", KEY, limit), "consumer": "acme"},
            {**harness.key_entry("acme-2", second, limit), "consumer": "acme"},
            harness.key_entry("acme", OTHER, limit),  # a key id equal to the consumer: counted apart
        ]
    }
    with RateLimitService(cfg, redis.url) as rls:
        a = envoys(cfg, rls.port)
        b = envoys(cfg, rls.port)
        seen = [send(a, KEY).status, send(b, second).status, send(b, KEY).status, send(a, second).status]
        assert seen == [200, 200, 200, 429]
        assert statuses(a, 3, OTHER) == [200] * 3


def test_service_down_fails_open_to_local_limits(envoys: Any) -> None:
    cfg = config({"requests": 3, "per": "1m"})
    nobody = harness.free_port()
    e = envoys(cfg, nobody, failure_mode_deny=False)
    seen = [send(e) for _ in range(5)]
    assert [r.status for r in seen] == [200, 200, 200, 429, 429]
    assert seen[3].json()["error"] == "rate_limited"
    assert e.counter("ratelimit.failure_mode_allowed") >= 3


def test_service_down_fails_closed(envoys: Any) -> None:
    cfg = config({"requests": 3, "per": "1m"})
    e = envoys(cfg, harness.free_port(), failure_mode_deny=True)
    r = send(e)
    assert r.status == 503, r
    assert r.json() == UNAVAILABLE_BODY
    assert r.header("content-type") == "application/json"
    assert r.header("cache-control") == "no-store"
    # keygate still answers first: no key is a 401, the service is not asked.
    assert e.request(path="/fleet-nokey").status == 401


def test_redis_down_fails_open_or_closed_and_recovers(envoys: Any, redis: Redis) -> None:
    cfg = config({"requests": 3, "per": "1m"})
    cfg["keys"].append(harness.key_entry("probe", PROBE, {"requests": 1000, "per": "1m"}))
    with RateLimitService(cfg, redis.url) as rls:
        open_ = envoys(cfg, rls.port, failure_mode_deny=False)
        closed = envoys(cfg, rls.port, failure_mode_deny=True)
        assert send(closed, OTHER).status == 200  # Redis up: the fleet admits
        redis.stop()
        # Open: keygate's local buckets only (3 per minute on this Envoy).
        assert statuses(open_, 4) == [200, 200, 200, 429]
        down = send(closed)
        assert down.status == 503 and down.json() == UNAVAILABLE_BODY
        assert "storage error" in rls.log_text()
        redis.start()
        # The service reconnects by itself (Redis came back empty). The probe
        # key has room for every try, so a refusal can only be the service's.
        recovered = harness.wait_until(lambda: send(closed, PROBE).status == 200, timeout=10.0)
        assert recovered, rls.log_text()[-2000:]
        assert statuses(closed, 3) == [200, 200, 429]


def test_limits_from_a_control_plane_list_in_pages(envoys: Any, redis: Redis, tmp_path: Path) -> None:
    """The service polls `keygate serve` (two-key pages): the list's limits
    apply, and a new version of the list replaces them."""
    cli = harness.REPO_ROOT / "target" / "debug" / "keygate"
    _need(cli.exists(), f"{cli} not built (cargo build -p keygate-cli)")

    def write_list(version: int, requests: int) -> None:
        limit = {"requests": requests, "per": "1m"}
        keys = [harness.key_entry(f"filler-{i}", harness.new_key(), limit) for i in range(3)]
        keys.append(harness.key_entry("fleet-key", KEY, limit))
        tmp = tmp_path / "keys.json.tmp"
        tmp.write_text(json.dumps({"version": version, "keys": keys}))
        os.replace(tmp, tmp_path / "keys.json")

    write_list(1, 2)
    port = harness.free_port()
    log = open(tmp_path / "serve.log", "w")
    serve = subprocess.Popen(
        [str(cli), "serve", "--keys", str(tmp_path / "keys.json"), "--listen", f"127.0.0.1:{port}",
         "--page-size", "2"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        url = f"http://127.0.0.1:{port}/v1/keys"
        with RateLimitService(None, redis.url, control_plane=url) as rls:
            assert harness.wait_until(lambda: "version 1 loaded" in rls.log_text(), timeout=10), rls.log_text()
            # keygate itself: the key without a local limit.
            cfg = {"keys": [harness.key_entry("fleet-key", KEY)]}
            a = envoys(cfg, rls.port)
            b = envoys(cfg, rls.port)
            assert [send(a).status, send(b).status, send(a).status] == [200, 200, 429]
            write_list(2, 4)
            assert harness.wait_until(lambda: "version 2 loaded" in rls.log_text(), timeout=10), rls.log_text()
            # New limits, new counters: 4 more.
            assert statuses(b, 5) == [200, 200, 200, 200, 429]
    finally:
        serve.terminate()
        serve.wait(timeout=5)
        log.close()
