#!/usr/bin/env python3
"""keygate benchmark: what the filter costs inside Envoy, measured against
Envoy with no auth filter, an empty proxy-wasm filter and Envoy's native
api_key_auth + local_ratelimit filters.

Run through scripts/bench.sh (it installs wrk/h2load, Envoy, builds both wasm
modules and passes their paths in the environment). Standard library only.

Method (see bench/README.md for the reasoning):
  * the --concurrency 1 configurations run in one Envoy, a listener (and a
    VM) each, so that the offset a process keeps for its lifetime applies to
    all of them alike (--separate: one Envoy per configuration); the
    --concurrency 2 one runs in an Envoy of its own; Envoy is pinned to core
    0, the load generator (wrk / h2load) and the upstream to core 1;
  * one interleaved run: each measurement cell once per round, the order
    rotated every round, a warm-up right before each sample, medians reported;
  * in full mode, every round on freshly started Envoys, so that no
    configuration keeps one process's offset for the whole run;
  * Envoy CPU per request = utime+stime delta of the Envoy process over the
    sample / requests completed;
  * CPU used by other processes during a sample = busy time in /proc/stat minus
    the CPU of every process this script started; samples where that exceeds
    --busy-threshold % of one core are dropped (and counted).

Nothing here asserts timings: the figures are reported, never judged. It does
fail (exit 2) when a configuration does not behave as benchmarked (e.g. the
native filter not answering 401 without a key), because its figures would
then be meaningless.
"""

from __future__ import annotations

from keygate_bench.cli import run_script

if __name__ == "__main__":
    run_script(__doc__ or "")
