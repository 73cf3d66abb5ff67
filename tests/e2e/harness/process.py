"""Envoy processes: the command line, a start that dies with its parent, readiness and stopping.

Used by the suite's `Envoy` and by the benchmark's.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Sequence, Union


def _load_prctl() -> Any:
    """libc's prctl, resolved here in the parent: the child must not import
    anything between fork and exec."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl()
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Ask Linux to SIGKILL the child if this process dies without cleanup."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, int(signal.SIGKILL))


def spawn(cmd: Sequence[str], **kw: Any) -> subprocess.Popen:
    """Start `cmd` with no stdin, killed by the kernel if this process dies
    (PR_SET_PDEATHSIG, on Linux). `kw` goes to Popen."""
    return subprocess.Popen(
        list(cmd),
        stdin=subprocess.DEVNULL,
        preexec_fn=_die_with_parent if _PRCTL is not None else None,
        **kw,
    )


def stop_process(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited after `grace` seconds."""
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        except ProcessLookupError:
            pass


def envoy_command(
    binary: Union[str, Path],
    config: Union[str, Path],
    *,
    concurrency: int,
    log_level: str,
    log_path: Union[str, Path],
    extra: Sequence[str] = (),
) -> list[str]:
    """Envoy's command line: the bootstrap, workers, log level and log file, then `extra` flags."""
    cmd = [str(binary), "-c", str(config), "--concurrency", str(concurrency)]
    return cmd + ["-l", log_level, "--log-path", str(log_path), *extra]


def admin_ready(admin_port: int) -> bool:
    """Whether the admin endpoint answers /ready with 200 LIVE."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/ready", timeout=1) as r:
            return r.status == 200 and r.read().strip() == b"LIVE"
    except (urllib.error.URLError, OSError, ConnectionError):
        return False


def wait_ready(proc: subprocess.Popen, admin_port: int, timeout: float, interval: float = 0.05) -> str:
    """Poll until Envoy is ready: "ready", "exited" (the process ended
    first) or "timeout" (still starting after `timeout` seconds)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return "exited"
        if admin_ready(admin_port):
            return "ready"
        time.sleep(interval)
    return "timeout"
