"""The benchmark's child processes: where they are pinned, and every one stopped on the way out.

Started through the harness's `spawn` (killed by the kernel if the benchmark
dies: PR_SET_PDEATHSIG) and kept in a registry that `stop_all_children`
empties on exit, error, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import os
import subprocess
import time
from typing import Any

import harness

from .procfs import CLK_TCK

ENVOY_CORE = "0"
LOADGEN_CORE = "1"
UPSTREAM_CORE = "1"

_CHILDREN: "dict[int, subprocess.Popen]" = {}


def spawn(cmd: list[str], **kw: Any) -> subprocess.Popen:
    """Start `cmd` (see `harness.spawn`) and remember it until it is stopped."""
    p = harness.spawn(cmd, **kw)
    _CHILDREN[p.pid] = p
    return p


def stop_child(p: subprocess.Popen, grace: float = 5.0) -> None:
    """Stop `p` (SIGTERM, SIGKILL after `grace` seconds) and forget it."""
    harness.stop_process(p, grace)
    _CHILDREN.pop(p.pid, None)


def stop_all_children() -> None:
    for p in list(_CHILDREN.values()):
        try:
            stop_child(p, grace=3.0)
        except Exception:  # noqa: BLE001 - best effort on the way out
            pass


def run_measured(cmd: list[str], timeout: float) -> tuple[str, int, float]:
    """Run a load generator; returns (stdout+stderr, its own CPU in clock
    ticks from wait4's rusage, wall seconds)."""
    t0 = time.monotonic()
    p = spawn(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert p.stdout is not None
        out = p.stdout.read().decode("utf-8", "replace")
        # wait4 gives the child's rusage; Popen must not reap it first.
        deadline = time.monotonic() + timeout
        while True:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                p.kill()
                pid, status, ru = os.wait4(p.pid, 0)
                break
            time.sleep(0.005)
        p.returncode = os.waitstatus_to_exitcode(status)
    finally:
        if p.stdout:
            p.stdout.close()
        _CHILDREN.pop(p.pid, None)
    ticks = round((ru.ru_utime + ru.ru_stime) * CLK_TCK)
    return out, ticks, time.monotonic() - t0
