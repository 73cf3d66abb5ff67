"""The configurations under test: keygate's key lists, the wasm filters, Envoy's native equivalent and the bootstraps.

The filter entry, listener, clusters and bootstrap come from the e2e
harness's builders (tests/e2e/harness/config.py), so the benchmark loads
keygate exactly as the suite does.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Optional

import harness

# Configurations without an auth filter: measured on the allowed path only.
NO_AUTH = ("baseline", "empty-wasm", "empty-trimmed")
# keygate in shadow mode: its "401" and "429" requests are the shadow path,
# decided and reported as refusals, then forwarded (200).
SHADOW = ("keygate-10-shadow",)
# Variants of keygate-10's allowed path measured on the direct route only
# (HTTP/1.1 under load and at one connection): the allowed key belongs to a
# consumer, or carries four named limits (one shared-data value for all).
DIRECT_ONLY = ("keygate-10-consumer", "keygate-10-4limits")


def _ok(prefix: str) -> dict:
    """A route answering 200 "ok" from Envoy itself (direct_response)."""
    return {"match": {"prefix": prefix}, "direct_response": {"status": 200, "body": {"inline_string": "ok\n"}}}


def key_list(n: int, extra: list[dict]) -> list[dict]:
    """`n` keys in total: `extra` first, then random ones (only their digests
    exist: nobody knows those keys)."""
    out = list(extra)
    for i in range(n - len(extra)):
        out.append({"id": f"k{i:07d}", "sha256": harness.sha256_hex(secrets.token_bytes(24))})
    return out


def keygate_config(keys: list[dict], mode: str = "enforce", control_plane: Optional[dict] = None, **extra: str) -> str:
    """keygate's plugin configuration for `keys` in `mode`, with a default
    limit too large to reach, an optional `control_plane`, and the top-level
    fields `extra` (e.g. `forward_with="filter_state"`)."""
    cfg: dict = {"keys": keys, "rate_limit": {"requests_per_second": 1000000, "burst": 1000000}}
    if mode != "enforce":  # the default: left out, so that older builds load the same configuration (compare.py)
        cfg["mode"] = mode
    if control_plane is not None:
        cfg["control_plane"] = control_plane
    cfg.update(extra)
    return json.dumps(cfg, separators=(",", ":"))


# The control plane of the usage configuration: `keygate serve` with an
# empty list (the keys stay static) taking the usage reports.
CP_CLUSTER = "keygate_cp"
# Usage reported every second (the shortest interval allowed), so that a
# measurement second holds a merge on every tick and a report.
USAGE_CONTROL_PLANE = {"cluster": CP_CLUSTER, "authority": "keygate-cp", "poll_interval": "1s", "usage_report_interval": "1s"}


def huge_limits(n: int) -> list[dict]:
    """`n` named limits too large to reach, as a key's `rate_limits`."""
    return [{"name": f"l{i}", "requests_per_second": 1000000 - i, "burst": 1000000} for i in range(n)]


def proxy_route_headers(http_filters: list[dict]) -> dict:
    """The proxied route's header fields: for a keygate filter with
    `"forward_with": "filter_state"`, the removals and additions that mode
    needs (harness.filter_state_headers); otherwise none."""
    for f in http_filters:
        value = f.get("typed_config", {}).get("config", {}).get("configuration", {}).get("value", "")
        if "forward_with" in value:
            cfg = json.loads(value)
            if cfg.get("forward_with") == "filter_state":
                return harness.filter_state_headers(cfg)
    return {}


def wasm_filter(name: str, root_id: str, wasm: Path, configuration: str) -> dict:
    """A proxy-wasm HTTP filter entry in a VM of its own (`vm_id` = `name`),
    with the same VM settings as keygate's deployment (the harness's
    `wasm_filter`, envoy/envoy.yaml)."""
    return harness.wasm_filter(configuration, wasm, name, root_id=root_id, vm_id=name)


def native_filters(keys: list[tuple[str, str]], limited: tuple[str, str]) -> list[dict]:
    """Envoy's own equivalent of keygate: api_key_auth (401 without a valid
    key) then local_ratelimit with one descriptor per key (429 when the key's
    bucket is empty). `keys` = [(id, key)]; `limited` gets a bucket of one
    token refilled once an hour, the others a bucket too large to ever run
    dry."""
    huge = {"max_tokens": 1_000_000_000, "tokens_per_fill": 1_000_000_000, "fill_interval": "1s"}
    descriptors = [
        {"entries": [{"key": "api_key", "value": key}], "token_bucket": huge} for _id, key in keys
    ]
    descriptors.append(
        {
            "entries": [{"key": "api_key", "value": limited[1]}],
            "token_bucket": {"max_tokens": 1, "tokens_per_fill": 1, "fill_interval": "3600s"},
        }
    )
    always = {"default_value": {"numerator": 100, "denominator": "HUNDRED"}, "runtime_key": "bench_lrl"}
    return [
        {
            "name": "envoy.filters.http.api_key_auth",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.api_key_auth.v3.ApiKeyAuth",
                "credentials": [{"key": key, "client": cid} for cid, key in keys + [limited]],
                "key_sources": [{"header": "x-api-key"}],
            },
        },
        {
            "name": "envoy.filters.http.local_ratelimit",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
                "stat_prefix": "bench_native",
                "token_bucket": huge,
                "filter_enabled": always,
                "filter_enforced": always,
                # Per-key buckets only: the default bucket is for requests
                # matching no descriptor.
                "always_consume_default_token_bucket": False,
                "descriptors": descriptors,
                # The descriptor comes from the filter's own rate_limits (the
                # route-level RouteAction.rate_limits does not exist on a
                # direct_response route).
                "rate_limits": [
                    {"actions": [{"request_headers": {"header_name": "x-api-key", "descriptor_key": "api_key"}}]}
                ],
            },
        },
    ]


def bootstrap(
    port: int,
    admin_port: int,
    http_filters: list[dict],
    upstream_port: Optional[int],
    listener_metadata: Optional[dict] = None,
    clusters: Optional[list[dict]] = None,
) -> dict:
    """One listener on 127.0.0.1 with two routes: /direct answered by Envoy
    itself (direct_response) and /proxy forwarded to the upstream."""
    routes = [_ok("/direct")]
    clusters = list(clusters or [])
    if upstream_port is not None:
        routes.append({"match": {"prefix": "/proxy"}, "route": {"cluster": "upstream"}, **proxy_route_headers(http_filters)})
        clusters.append(harness.static_cluster("upstream", upstream_port))
    listener = harness.listener(port, http_filters, routes=routes)
    if listener_metadata is not None:
        listener["metadata"] = listener_metadata
    return harness.static_bootstrap(admin_port, [listener], clusters)


def upstream_bootstrap(port: int, admin_port: int) -> dict:
    """The trivial upstream: an Envoy answering 200 "ok" to everything."""
    return harness.static_bootstrap(admin_port, [harness.listener(port, [], routes=[_ok("/")])], [])


def blob_metadata(value: str) -> dict:
    """The same JSON text in a StringValue inside listener metadata: Envoy
    parses and keeps it but nothing interprets it (no wasm)."""
    return {"typed_filter_metadata": {"bench.blob": {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": value}}}
