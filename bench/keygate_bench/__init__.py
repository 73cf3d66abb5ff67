"""keygate's benchmark, a module per concept; `bench/bench.py` is its command line.

The Envoy launcher, ports, keys and configuration builders are the e2e
harness's (`tests/e2e/harness`), put on the import path here.
"""

from __future__ import annotations

import sys
from pathlib import Path

_E2E = str(Path(__file__).resolve().parents[2] / "tests" / "e2e")
if _E2E not in sys.path:
    sys.path.insert(0, _E2E)
