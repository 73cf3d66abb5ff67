"""Shared fixtures for the keygate end-to-end suite.

Envoy instances are expensive-ish (a V8 compile of the filter each), so test
modules start one per plugin configuration with module-scoped fixtures built
on `envoy_factory`.
"""

from __future__ import annotations

import os
import textwrap
from typing import Any, Callable

import pytest

import harness

# Lines added by tests (e.g. the concurrency figures) and shown in the summary.
SUMMARY_LINES: list[str] = []


def report(line: str) -> None:
    """Print a line now (visible with -s) and again in the terminal summary."""
    print(line)
    SUMMARY_LINES.append(line)


# Outcomes of the documented cases of each profile (tests marked
# @pytest.mark.profile(name, case)), shown per profile in the summary.
PROFILE_CASES: dict[str, list[tuple[str, str]]] = {}
# Optional heading per profile (e.g. its product and seed files), set by the test module.
PROFILE_TITLES: dict[str, str] = {}


def pytest_configure(config: Any) -> None:
    config.addinivalue_line(
        "markers", "profile(name, case): a documented case of envoy/profiles/<name>.json (summarised per profile)"
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: Any, call: Any) -> Any:
    outcome = yield
    rep = outcome.get_result()
    marker = item.get_closest_marker("profile")
    if marker is None:
        return
    if rep.when == "call" or (rep.when == "setup" and not rep.passed):
        name, case = marker.args[0], marker.args[1] if len(marker.args) > 1 else item.name
        callspec = getattr(item, "callspec", None)
        if callspec is not None:
            case = f"{case} [{callspec.id}]"
        PROFILE_CASES.setdefault(name, []).append((case, rep.outcome))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if SUMMARY_LINES:
        terminalreporter.section("keygate e2e figures")
        for line in SUMMARY_LINES:
            terminalreporter.write_line(line)
    if PROFILE_CASES:
        terminalreporter.section("keygate profiles: documented cases in real Envoy")
        for name, cases in sorted(PROFILE_CASES.items()):
            passed = sum(1 for _, o in cases if o == "passed")
            title = f"{name} ({PROFILE_TITLES[name]})" if name in PROFILE_TITLES else name
            terminalreporter.write_line(f"{title}: {passed}/{len(cases)} cases passed")
            bad = [f"{c} ({o})" for c, o in cases if o != "passed"]
            if bad:
                terminalreporter.write_line("  NOT passed: " + "; ".join(bad))
            # One entry per case, parametrized variants counted: "label (x3)".
            counts: dict[str, int] = {}
            for c, o in cases:
                if o == "passed":
                    label = c.split(" [", 1)[0]
                    counts[label] = counts.get(label, 0) + 1
            text = "; ".join(f"{label} (x{n})" if n > 1 else label for label, n in counts.items())
            for line in textwrap.wrap(text, width=118, initial_indent="  ", subsequent_indent="  "):
                terminalreporter.write_line(line)


def _wasm_or_skip() -> None:
    path = harness.wasm_path()
    if path.exists():
        return
    msg = f"{path} not built (cargo build --release --target wasm32-wasip1 -p keygate)"
    if os.environ.get("KEYGATE_REQUIRE_WASM") == "1":
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture(scope="session")
def backend() -> Any:
    with harness.Backend() as b:
        yield b


@pytest.fixture(scope="session")
def wasm() -> Any:
    _wasm_or_skip()
    return harness.wasm_path()


def _factory(request: pytest.FixtureRequest, backend: harness.Backend) -> Callable[..., harness.Envoy]:
    made: list[harness.Envoy] = []

    def make(plugin_config: Any = None, *, start: bool = True, **kw: Any) -> harness.Envoy:
        if kw.get("with_wasm", True):
            _wasm_or_skip()
        e = harness.Envoy(backend.port, plugin_config, **kw)
        made.append(e)
        if start:
            e.start()
        return e

    def finish() -> None:
        for e in made:
            e.stop()
            # Keep the work directory (config + log) only when asked to.
            if os.environ.get("KEYGATE_E2E_KEEP") != "1":
                e.cleanup()

    request.addfinalizer(finish)
    return make


@pytest.fixture(scope="module")
def envoy_factory(request: pytest.FixtureRequest, backend: harness.Backend) -> Callable[..., harness.Envoy]:
    """make(plugin_config, **Envoy kwargs) -> a started Envoy, stopped after the module."""
    return _factory(request, backend)


@pytest.fixture
def envoy_fn(request: pytest.FixtureRequest, backend: harness.Backend) -> Callable[..., harness.Envoy]:
    """Like envoy_factory, but the Envoys are stopped after the test."""
    return _factory(request, backend)
