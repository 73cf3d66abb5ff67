"""Any static web server can be keygate's control plane: nginx (Debian's
package) serving a keys.json file, polled by Envoy with If-None-Match. A
new file is picked up within a poll or two; unchanged polls cost a 304."""

from __future__ import annotations

import json
import os
import re
import secrets
from pathlib import Path

import pytest

import harness
from conftest import report
from test_control_plane import cp_config, start_envoy  # noqa: F401 (fixture)
from test_remote_fetch import ModuleServer, find_nginx


def write_list(path: Path, version: int, keys: dict[str, str]) -> None:
    """The key list as keygate serve writes it, replaced atomically."""
    doc = {"version": version, "keys": [{"id": i, "sha256": harness.sha256_hex(k)} for i, k in keys.items()]}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)


def test_nginx_serving_keys_json_is_a_control_plane(start_envoy, tmp_path: Path) -> None:  # noqa: F811
    nginx = find_nginx()
    if nginx is None:
        pytest.skip("nginx could not be installed from Debian's packages")
    root = tmp_path / "www"
    root.mkdir()
    first, second = "kg_static_" + secrets.token_hex(10), "kg_static_" + secrets.token_hex(10)
    keys = root / "keys.json"
    write_list(keys, 1, {"first": first})
    with ModuleServer(nginx, root, harness.free_port(), tmp_path / "nginx", probe="keys.json") as server:
        envoy = start_envoy(cp_config(path="/keys.json", poll_interval="500ms", timeout="1s"), server.port)
        get = lambda key: envoy.request("GET", harness.unique_path("static"), [harness.xkey(key)]).status  # noqa: E731
        assert harness.wait_until(lambda: get(first) == 200, timeout=10)
        assert get(second) == 401
        # Unchanged polls: nginx answers If-None-Match with 304.
        assert harness.wait_until(lambda: " 304 " in server.access_log.read_text(), timeout=5)
        write_list(keys, 2, {"second": second})
        assert harness.wait_until(lambda: get(second) == 200, timeout=5)
        assert get(first) == 401
        log = server.access_log.read_text()
    statuses = re.findall(r'"GET /keys.json HTTP/1.1" (\d{3})', log)
    report(f"static control plane (nginx): {len(statuses)} polls, {statuses.count('304')} answered 304 unchanged")
    assert statuses.count("200") >= 2 and statuses.count("304") >= 1, statuses
