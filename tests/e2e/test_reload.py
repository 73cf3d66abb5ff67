"""Changing the plugin configuration of a running Envoy (a listener update
through file-based LDS): the new configuration applies, rate-limit buckets
survive it, and an invalid new configuration is refused while the old one
keeps serving."""

from __future__ import annotations

import re
import time

import pytest

from harness import key_entry, new_key, unique_path, wait_until, xkey

K1 = new_key()
K2 = new_key()
SLOW = {"requests_per_second": 0.01, "burst": 2}  # 2 at once, then one per 100 s

CONFIG_A = {"keys": [key_entry("k1", K1, SLOW)]}
CONFIG_B = {"keys": [key_entry("k1", K1, SLOW), key_entry("k2", K2)]}


@pytest.fixture(scope="module")
def dyn(envoy_factory):
    return envoy_factory(CONFIG_A, dynamic_listener=True)


def status(envoy, key):
    # A fresh connection each time: after a listener update, existing
    # connections drain on the old filter chain.
    return envoy.request("GET", unique_path(), [xkey(key)]).status


def test_reload_applies_new_keys_and_keeps_buckets(dyn, backend):
    assert [status(dyn, K1) for _ in range(3)] == [200, 200, 429]
    assert status(dyn, K2) == 401

    dyn.reconfigure(CONFIG_B)

    assert status(dyn, K2) == 200, "new configuration not in effect"
    r = dyn.request("GET", unique_path(), [xkey(K1)])
    assert r.status == 429, f"bucket was reset by the reload: {r}"
    assert int(r.header("retry-after")) > 60


def test_invalid_reload_is_refused_and_old_config_serves(dyn):
    with pytest.raises(RuntimeError, match="rejected"):
        dyn.reconfigure({"keys": [{"id": "bad", "sha256": "not-hex"}]})
    assert "keygate: invalid configuration: keys[0].sha256" in dyn.log_text()
    assert status(dyn, K2) == 200
    assert status(dyn, K1) == 429


def test_reload_frees_the_old_compiled_configuration(envoy_fn):
    """The compiled form that the VMs share is kept for a while (1 s here,
    through the VM environment), and the next publication after that frees
    it: the old configuration, loaded again once its filter chain has
    drained, is compiled afresh instead of adopted."""
    envoy = envoy_fn(
        CONFIG_A,
        dynamic_listener=True,
        drain_time_s=1,
        component_log_level="wasm:debug",
        vm_env={"KEYGATE_SHARE_KEEP_S": "1"},
    )
    time.sleep(1.5)  # CONFIG_A's entry is past its keep period
    envoy.reconfigure(CONFIG_B)  # publishing CONFIG_B frees it
    assert status(envoy, K2) == 200
    # A filter-chain-only update drains the old chain in place (1 s here);
    # until it is gone, loading CONFIG_A again would reuse its root contexts.
    time.sleep(1.5)
    wait_until(lambda: envoy.stats().get("listener_manager.total_filter_chains_draining") == "0", timeout=15)
    envoy.reconfigure(CONFIG_A)
    assert status(envoy, K2) == 401
    envoy.stop()  # flush the log
    events = re.findall(
        r"configuration loaded: (\d) keys, (compiled|adopted)|(freed 1 shared compiled configuration)", envoy.log_text()
    )
    freed_at = next(i for i, e in enumerate(events) if e[2])
    before, after = events[:freed_at], events[freed_at + 1 :]
    assert before.count(("1", "compiled", "")) == 1, events
    # Compiled again, and not adopted by every VM as it would be if kept. (A
    # worker can load the new chain while the main thread is still compiling
    # it; then it compiles too.)
    assert after.count(("1", "compiled", "")) >= 1, events


def test_entries_within_their_keep_period_are_adopted_after_a_reload(envoy_fn):
    """With the default keep period (a minute), switching back to a
    configuration loaded moments ago adopts its compiled form."""
    envoy = envoy_fn(CONFIG_A, dynamic_listener=True, drain_time_s=1)
    envoy.reconfigure(CONFIG_B)
    time.sleep(1.5)
    wait_until(lambda: envoy.stats().get("listener_manager.total_filter_chains_draining") == "0", timeout=15)
    envoy.reconfigure(CONFIG_A)
    assert status(envoy, K2) == 401
    envoy.stop()  # flush the log
    one_key = re.findall(r"configuration loaded: 1 keys, (compiled|adopted)", envoy.log_text())
    assert one_key.count("compiled") == 1, one_key
    assert one_key.count("adopted") >= 3, one_key


def test_counts_made_just_before_a_reload_are_not_lost(envoy_fn):
    """Each VM hands its counts to Envoy once a second; a root context that
    goes away (here: its filter chain replaced and drained at once) hands
    over what it counted since its last second, so a reload loses no count."""
    envoy = envoy_fn(CONFIG_B, dynamic_listener=True, drain_time_s=0)
    time.sleep(1.2)  # the start-up check's counts arrive first
    before = envoy.counter("keygate.allowed")
    for _ in range(7):
        assert status(envoy, K2) == 200
    envoy.reconfigure(CONFIG_A)  # within the same second, most of the time
    assert status(envoy, K2) == 401
    assert wait_until(lambda: envoy.counter("keygate.allowed") - before == 7, timeout=5), envoy.counter(
        "keygate.allowed"
    ) - before


def test_raising_a_blocked_keys_limit_unblocks_it_within_the_new_window(envoy_fn):
    """A key blocked for 1000 s whose limit is then raised to 100/s (burst
    100) is served again within the new limit's window (1 s), not after the
    old limit's debt; its 429s meanwhile say so."""
    blocked = {"requests_per_second": 0.001, "burst": 1}
    envoy = envoy_fn({"keys": [key_entry("k1", K1, blocked)]}, dynamic_listener=True)
    assert [status(envoy, K1) for _ in range(2)] == [200, 429]
    envoy.reconfigure({"keys": [key_entry("k1", K1, {"requests_per_second": 100, "burst": 100})]})
    t0 = time.monotonic()
    r = envoy.request("GET", unique_path(), [xkey(K1)])
    if r.status == 429:
        assert int(r.header("retry-after")) <= 1, r
    assert wait_until(lambda: status(envoy, K1) == 200, timeout=3, interval=0.05)
    assert time.monotonic() - t0 < 2.5
    # The bucket refills at the new rate: a window later, a burst of 50 passes.
    time.sleep(1.1)
    assert [status(envoy, K1) for _ in range(50)].count(200) == 50
