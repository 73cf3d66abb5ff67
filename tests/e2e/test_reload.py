"""Changing the plugin configuration of a running Envoy (a listener update
through file-based LDS): the new configuration applies, rate-limit buckets
survive it, and an invalid new configuration is refused while the old one
keeps serving."""

from __future__ import annotations

import pytest

from harness import key_entry, new_key, unique_path, xkey

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
