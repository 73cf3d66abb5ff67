"""Envoy configuration builders: the keygate wasm filter, a listener, clusters, the bootstrap and LDS documents.

The benchmark builds its bootstraps from the same pieces.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Union

ROUTER = {
    "name": "envoy.filters.http.router",
    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
}

# Access-log line written with `Envoy(access_log=True)`: keygate's denial
# ("<code> (<reason>)") comes from the filter state it sets.
ACCESS_LOG_FORMAT = {
    "status": "%RESPONSE_CODE%",
    "path": "%REQ(:PATH)%",
    "method": "%REQ(:METHOD)%",
    "denial": "%FILTER_STATE(wasm.keygate_denial:PLAIN)%",
    "shadow": "%FILTER_STATE(wasm.keygate_shadow:PLAIN)%",
    "key": "%FILTER_STATE(wasm.keygate_key:PLAIN)%",
    # The case table's marker, so that a case finds its own line.
    "case": "%REQ(X-KEYGATE-CASE)%",
    "details": "%RESPONSE_CODE_DETAILS%",
    "upstream": "%UPSTREAM_HOST%",
}


def wasm_filter(
    plugin_config: Union[str, dict, None],
    wasm: Union[str, Path],
    plugin: str = "keygate",
    vm_env: Optional[dict[str, str]] = None,
    *,
    root_id: Optional[str] = None,
    vm_id: str = "keygate",
    failure_policy: str = "FAIL_RELOAD",
) -> dict:
    """The keygate wasm HTTP filter entry. `plugin_config` may be a dict
    (rendered as JSON) or a raw string (for malformed-JSON tests). Every
    entry loads into the VM `vm_id` (default `keygate`); `plugin` names the
    plugin and, unless `root_id` is given, its root context, so that several
    filters can share that VM. `vm_env` sets environment variables in the VM.
    `failure_policy` is what Envoy does once the VM has crashed: FAIL_RELOAD
    (the default, as shipped) starts a new one, FAIL_CLOSED keeps refusing."""
    if isinstance(plugin_config, dict):
        value = json.dumps(plugin_config)
    elif plugin_config is None:
        value = "{}"
    else:
        value = plugin_config
    vm_config: dict[str, Any] = {
        "vm_id": vm_id,
        "runtime": "envoy.wasm.runtime.v8",
        "code": {"local": {"filename": str(wasm)}},
    }
    if vm_env:
        vm_config["environment_variables"] = {"key_values": dict(vm_env)}
    return {
        "name": "envoy.filters.http.wasm",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": {
                "name": plugin,
                "root_id": root_id or plugin,
                "failure_policy": failure_policy,
                "allow_on_headers_stop_iteration": True,
                "configuration": {
                    "@type": "type.googleapis.com/google.protobuf.StringValue",
                    "value": value,
                },
                "vm_config": vm_config,
            },
        },
    }


def listener(
    listen_port: int,
    http_filters: list[dict],
    hcm_extra: Optional[dict] = None,
    *,
    routes: Optional[list[dict]] = None,
    name: str = "main",
) -> dict:
    """One listener on 127.0.0.1 (codec AUTO: HTTP/1.1 and h2c prior knowledge)
    with `http_filters` before the router and `routes` (default: everything
    to the cluster `backend`)."""
    if routes is None:
        routes = [{"match": {"prefix": "/"}, "route": {"cluster": "backend"}}]
    hcm: dict[str, Any] = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "ingress",
        "codec_type": "AUTO",
        "route_config": {
            "name": "local",
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": routes,
                }
            ],
        },
        "http_filters": list(http_filters) + [ROUTER],
    }
    if hcm_extra:
        hcm.update(hcm_extra)
    return {
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen_port}},
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
        ],
    }


def static_cluster(name: str, port: int) -> dict:
    """A STATIC cluster `name` of one endpoint, 127.0.0.1:`port`."""
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "2s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}
            ],
        },
    }


def static_bootstrap(admin_port: int, listeners: list[dict], clusters: list[dict]) -> dict:
    """A bootstrap of static listeners and clusters, with the admin endpoint on 127.0.0.1."""
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }


def bootstrap(
    listen_port: int,
    admin_port: int,
    backend_port: int,
    http_filters: list[dict],
    hcm_extra: Optional[dict] = None,
    lds_path: Optional[Path] = None,
) -> dict:
    """A minimal bootstrap: the listener above and a STATIC cluster `backend`.
    With `lds_path`, the listener comes from that file instead (LDS from the
    filesystem, reloaded when the file is atomically replaced)."""
    if lds_path is None:
        return static_bootstrap(
            admin_port, [listener(listen_port, http_filters, hcm_extra)], [static_cluster("backend", backend_port)]
        )
    cfg = static_bootstrap(admin_port, [], [static_cluster("backend", backend_port)])
    cfg["node"] = {"id": "keygate-e2e", "cluster": "keygate-e2e"}  # required by xDS
    cfg["dynamic_resources"] = {
        "lds_config": {
            "resource_api_version": "V3",
            "path_config_source": {
                "path": str(lds_path),
                "watched_directory": {"path": str(lds_path.parent)},
            },
        }
    }
    return cfg


def lds_document(listen_port: int, http_filters: list[dict], hcm_extra: Optional[dict], version: int) -> dict:
    """The LDS file serving the listener above, at `version`."""
    lst = listener(listen_port, http_filters, hcm_extra)
    lst["@type"] = "type.googleapis.com/envoy.config.listener.v3.Listener"
    return {"version_info": str(version), "resources": [lst]}


# Filter state keygate writes with `"forward_with": "filter_state"`, per
# forwarded header (core/src/policy/mod.rs: IDENTITY_FILTER_STATE,
# ForwardField::filter_state_name).
FILTER_STATE_NAMES = {
    "identity": "keygate_identity",
    "key_id": "keygate_key_id",
    "environment": "keygate_environment",
    "scopes": "keygate_scopes",
}


def credential_header_names(plugin_config: dict) -> list[str]:
    """Every header that can carry a key under `plugin_config` (its top-level
    and its rules' credential sources), lowercase, in order."""
    default = [{"type": "header", "name": "x-api-key"}, {"type": "bearer"}]
    names: list[str] = []
    for sources in [plugin_config.get("credential_sources", default)] + [
        r.get("credential_sources") or [] for r in plugin_config.get("rules", [])
    ]:
        for s in sources:
            n = s["name"].lower() if s["type"] == "header" else "authorization"
            if n not in names:
                names.append(n)
    return names


def filter_state_headers(plugin_config: dict) -> dict:
    """The route fields keygate's `"forward_with": "filter_state"` needs, for
    `plugin_config`: `request_headers_to_remove` (the credential headers unless
    `strip_credentials` is false, the identity header and each forwarded
    header) and `request_headers_to_add` (each of those from keygate's
    filter state). Envoy removes before it adds, and adds nothing for an
    absent filter state."""
    forward = plugin_config.get("forward", {})
    added = [
        (plugin_config.get("identity_header", "x-api-key-id"), "identity"),
        (plugin_config.get("key_id_header", "x-api-key-key-id"), "key_id"),
    ] + [(forward[f], f) for f in ("environment", "scopes") if forward.get(f)]
    remove = credential_header_names(plugin_config) if plugin_config.get("strip_credentials", True) else []
    remove += [h.lower() for h, _ in added]
    return {
        "request_headers_to_remove": remove,
        "request_headers_to_add": [
            {
                "header": {"key": h.lower(), "value": f"%FILTER_STATE(wasm.{FILTER_STATE_NAMES[f]}:PLAIN)%"},
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
            }
            for h, f in added
        ],
    }


def filter_state_route_config(plugin_config: dict, cluster: str = "backend") -> dict:
    """`route_config` (for `hcm_extra`) of the default listener's one route,
    with the header fields of `filter_state_headers`."""
    route = {"match": {"prefix": "/"}, "route": {"cluster": cluster}, **filter_state_headers(plugin_config)}
    return {"route_config": {"name": "local", "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [route]}]}}
