"""The Compose demo end to end: `scripts/compose-demo.sh --check` builds its
images from local files (cached in target/compose/), starts Envoy with keygate,
`keygate serve` and the demo backend with envoy/docker-compose.yaml, checks
200, 401, 403, 429 and a key revoked with the CLI inside the control-plane
container, and removes everything it started.

Runs on its own Compose project and free ports, so it does not collide with a
demo someone is running. Skipped only where `docker info` fails."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

import harness
from conftest import report

# A cold run makes the Debian rootfs with debootstrap and builds keygate for
# musl (a few minutes on two cores); a warm one takes about 15 s.
TIMEOUT_S = 1200


def docker_unavailable() -> str | None:
    try:
        out = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        return "docker info failed: docker not found"
    except subprocess.TimeoutExpired:
        return "docker info failed: no answer within 60 s"
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["exit status %d" % out.returncode])[-1]
        return f"docker info failed: {last}"
    return None


def left_behind(kind: str, project: str) -> list[str]:
    """Containers or networks of the Compose project still present."""
    cmd = ["docker", kind, "ls", "-q", "--filter", f"label=com.docker.compose.project={project}"]
    if kind == "container":
        cmd.insert(3, "-a")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True)
    return out.stdout.split()


def test_compose_demo_check(wasm: Path, tmp_path: Path) -> None:
    reason = docker_unavailable()
    if reason:
        pytest.skip(reason)
    project = f"kg-e2e-{secrets.token_hex(4)}"
    port, admin_port, tls_port = harness.free_ports(3)
    env = dict(
        os.environ,
        KEYGATE_WASM=str(wasm),
        KEYGATE_PORT=str(port),
        KEYGATE_ADMIN_PORT=str(admin_port),
        KEYGATE_TLS_PORT=str(tls_port),
        KEYGATE_COMPOSE_PROJECT=project,
    )
    log_path = tmp_path / "compose-demo.log"
    started = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            ["bash", str(harness.REPO_ROOT / "scripts" / "compose-demo.sh"), "--check"],
            cwd=harness.REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            status = proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            # The script's TERM trap removes the stack; give it a minute.
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            status = None
    elapsed = time.monotonic() - started
    out = log_path.read_text()
    tail = "\n".join(out.splitlines()[-60:])
    assert status is not None, f"compose-demo.sh still running after {TIMEOUT_S} s:\n{tail}"
    assert status == 0, f"compose-demo.sh --check exited with {status}:\n{tail}"
    report(f"compose demo: --check passed in {elapsed:.0f} s")

    assert "==> demo check passed" in out
    for line in (
        "ok    alpha via x-api-key",
        "ok    no key -> missing_api_key",
        "ok    alpha on /admin -> insufficient_scope",
        "ok    beta #3 -> rate_limited",
        "ok    revoked with the CLI -> 401",
    ):
        assert line in out, line
    # The curl lines were printed with this run's ports and the CLI in the container.
    assert f"curl -i http://127.0.0.1:{port}/hello" in out
    assert f"-p {project} -f envoy/docker-compose.yaml exec -T control-plane keygate keys revoke my-app" in out
    # Nothing of the project is left.
    assert left_behind("container", project) == []
    assert left_behind("network", project) == []
    # Its configuration and logs are kept on failure only.
    shutil.rmtree(harness.REPO_ROOT / "target" / "compose" / project, ignore_errors=True)
