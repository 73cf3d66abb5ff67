"""The probes beside the matrix: start-up time and memory with large key lists, the control plane, and host-call costs."""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Optional

import harness

from .children import UPSTREAM_CORE, spawn, stop_child
from .configs import blob_metadata, key_list, keygate_config, upstream_bootstrap, wasm_filter
from .envoys import Envoy, new_envoy, status_or_zero
from .measure import Bench, Cell, Settings
from .procfs import proc_rss_kb
from .report import fmt
from .summaries import by_round, med


def startup_probe(name: str, filters: list[dict], workdir: Path, envoy_bin: Path, concurrency: int, meta: Optional[dict] = None) -> dict:
    e = new_envoy(name, filters, workdir, envoy_bin, None, concurrency=concurrency, listener_metadata=meta)
    try:
        e.start(timeout=600)
        return probe_row(e)
    finally:
        e.stop()
        try:
            (workdir / f"{name}.json").unlink()
        except OSError:
            pass


def cp_probe(n: int, concurrency: int, workdir: Path, envoy_bin: Path, keygate_cli: Path, wasm: Path) -> dict:
    """`n` keys served by `keygate serve` (default paging) to an Envoy whose
    keygate has no static keys: time from /ready to the first 200 for the
    key listed last (first fetch, every page, compile, publication, adoption
    by the worker's VM), and VmRSS once it is in use."""
    key = harness.new_key()
    entries = key_list(n - 1, []) + [{"id": "bench-last", "sha256": harness.sha256_hex(key)}]
    keys_file = workdir / f"cp-{n}.json"
    keys_file.write_text(json.dumps({"version": 1, "keys": entries}, separators=(",", ":")))
    del entries
    cp_port = harness.free_port()
    log = open(workdir / f"cp-{n}.log", "wb")
    serve = spawn(
        ["taskset", "-c", UPSTREAM_CORE, str(keygate_cli), "serve", "--keys", str(keys_file), "--listen", f"127.0.0.1:{cp_port}"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    e: Optional[Envoy] = None
    try:
        deadline = time.monotonic() + 300
        while status_or_zero(cp_port, "/healthz", None) != 200:
            if serve.poll() is not None or time.monotonic() > deadline:
                raise harness.EnvoyStartError("keygate serve did not start", (workdir / f"cp-{n}.log").read_text()[-2000:], serve.returncode)
            time.sleep(0.1)
        cfg = json.dumps({"control_plane": {"cluster": "keygate_cp", "authority": "keygate-cp", "poll_interval": "1s", "timeout": "10s"}})
        e = new_envoy(f"cp-{n}-c{concurrency}", [wasm_filter("keygate", "keygate", wasm, cfg)], workdir, envoy_bin, None, concurrency=concurrency)
        e.config["static_resources"]["clusters"].append(harness.static_cluster("keygate_cp", cp_port))
        e.start(timeout=600)
        t_ready = time.monotonic()
        first_use = None
        while time.monotonic() - t_ready < 120:
            if status_or_zero(e.port, "/direct", key) == 200:
                first_use = time.monotonic() - t_ready
                break
            time.sleep(0.02)
        time.sleep(0.3)
        return {
            "envoy": e.name,
            "concurrency": concurrency,
            "ready_s": e.ready_s,
            "first_use_s": first_use,
            "rss_kb": proc_rss_kb(e.pid),
            "rss_ready_kb": e.rss_start_kb,
            "list_file_bytes": keys_file.stat().st_size,
        }
    finally:
        if e is not None:
            e.stop()
        stop_child(serve)
        try:
            keys_file.unlink()
        except OSError:
            pass


def startup_probes(
    args: argparse.Namespace,
    envoys: dict[str, Envoy],
    workdir: Path,
    envoy_bin: Path,
    keygate_wasm: Path,
    empty_wasm: Path,
    keygate_cli: Path,
    extra_keys: list[dict],
    kg10: str,
    kg100k: str,
) -> tuple[list[dict], list[dict]]:
    """Time to ready and RSS (0.3 s after ready) with 10, 100k and (full
    mode) 1M keys in the plugin configuration (1M: the lowest RSS of five
    starts), at --concurrency 1 and 2, next to the same JSON given to Envoy
    without keygate: in listener metadata (no wasm at all) and as the
    configuration of the empty wasm filter (Envoy's whole wasm path, nothing
    parsed). Then the same lists through the control
    plane. Envoys of the matrix that are still running are reused."""
    print("startup probes (time to ready, VmRSS) ...", flush=True)
    probes: list[dict] = []
    big = not args.quick and not args.no_1m

    def add(keys: str, what: str, row: dict, cfg_bytes: int) -> None:
        row.update(keys=keys, what=what, plugin_config_bytes=cfg_bytes)
        probes.append(row)
        samples = row.get("rss_kb_samples", [])
        each = f"  lowest of {len(samples)} starts: " + ", ".join(f"{kb / 1024:.0f}" for kb in samples) + " MiB" if len(samples) > 1 else ""
        print(
            f"  {keys:6s} {what:22s} ready {row['ready_s']:6.2f}s  VmRSS {row['rss_kb'] / 1024:8.1f} MiB  "
            f"(plugin config {cfg_bytes / 1e6:.1f} MB){each}",
            flush=True,
        )

    def kg(cfg: str) -> list[dict]:
        return [wasm_filter("keygate", "keygate", keygate_wasm, cfg)]

    def row(name: str, filters: list[dict], conc: int, meta: Optional[dict] = None) -> dict:
        if name in envoys and meta is None:
            return probe_row(envoys[name])
        return startup_probe(f"probe-{name}", filters, workdir, envoy_bin, conc, meta=meta)

    def started(name: str, filters: list[dict], conc: int, starts: int) -> dict:
        """`row` over `starts` fresh starts: the lowest RSS, the median time to
        ready, and every sample. With a 94 MB configuration, Envoy's RSS after
        start holds one more copy of it in some starts and not in others, at c1
        and at c2 alike, so a single start per concurrency (or a median of a
        few) can pair a low c1 with a high c2; the lowest start of each is the
        one without that copy. Three starts per concurrency were not always
        enough to see one without it (run H: 1028, 1031, 1029 MiB at c1, 1075,
        1078, 989 at c2), so 1M keys get five; the medians are kept as a
        cross-check."""
        rows = [row(name, filters, conc) for _ in range(starts)]
        out = dict(rows[0])
        out.update(
            rss_kb=min(r["rss_kb"] for r in rows),
            rss_kb_median=statistics.median(r["rss_kb"] for r in rows),
            ready_s=statistics.median(r["ready_s"] for r in rows),
            rss_kb_samples=[r["rss_kb"] for r in rows],
            ready_s_samples=[r["ready_s"] for r in rows],
        )
        return out

    add("0", "envoy, no filter", row("baseline", [], 1), 0)
    add("0", "empty wasm filter", row("empty-wasm", [wasm_filter("empty", "empty", empty_wasm, "")], 1), 0)
    lists = [("10", kg10), ("100k", kg100k)]
    if big:
        lists.append(("1M", keygate_config(key_list(1_000_000, extra_keys))))
    for label, cfg in lists:
        name = {"10": "keygate-10", "100k": "keygate-100k"}.get(label, "")
        starts = 5 if label == "1M" else 1
        add(label, "keygate c1", started(name or "kg-1m", kg(cfg), 1, starts), len(cfg))
        add(label, "keygate c2", started("keygate-10-c2" if label == "10" else "kg2", kg(cfg), 2, starts), len(cfg))
        add(label, "same JSON, no wasm", row("blob", [], 1, meta=blob_metadata(cfg)), len(cfg))
        if label != "10":
            add(label, "same JSON, empty wasm", row("empty-cfg", [wasm_filter("empty", "empty", empty_wasm, cfg)], 1), len(cfg))
    del lists

    print("control-plane probes (keygate serve, paged; time from /ready to the first 200 for the last key) ...", flush=True)
    cp_rows: list[dict] = []
    for n, label in [(10, "10"), (100_000, "100k")] + ([(1_000_000, "1M")] if big else []):
        for conc in (1,) if args.quick else (1, 2):
            r = cp_probe(n, conc, workdir, envoy_bin, keygate_cli, keygate_wasm)
            r["keys"] = label
            cp_rows.append(r)
            print(
                f"  {label:6s} c{conc}: ready {r['ready_s']:6.2f}s, first use {fmt(r['first_use_s'], '.2f')}s after ready, "
                f"VmRSS {r['rss_kb'] / 1024:8.1f} MiB (list {r['list_file_bytes'] / 1e6:.1f} MB)",
                flush=True,
            )
    return probes, cp_rows


HOST_CALLS = ["header_pairs", "shared_get", "shared_set", "clock", "replace_header", "remove_header", "metric", "filter_state"]
CALLS_PER_REQUEST = 10


def host_call_costs(s: Settings, workdir: Path, envoy_bin: Path, probe_wasm: Path, wrk: str, h2load: str) -> dict:
    """Envoy CPU per call of each host function keygate uses on the request
    path: the probe filter makes 10 calls of one kind per request; the cost
    of a call is (probe - probe making no call) / 10, median over rounds of
    the per-round difference. Same method as the matrix (pinning,
    interleaving, busy samples dropped)."""
    print("host-call probes (10 calls of one kind per request) ...", flush=True)
    kinds = ["nothing"] + HOST_CALLS
    envoys: dict[str, Envoy] = {}
    # Bench counts the CPU of an upstream; this one only idles.
    up_port, up_admin = harness.free_ports(2)
    upstream = Envoy("probe-upstream", upstream_bootstrap(up_port, up_admin), workdir, envoy_bin, cpus=UPSTREAM_CORE, port=up_port, admin_port=up_admin)
    try:
        upstream.start()
        for kind in kinds:
            n = 0 if kind == "nothing" else CALLS_PER_REQUEST
            e = new_envoy(f"probe-{kind}", [wasm_filter("probe", "probe", probe_wasm, f"{kind}:{n}")], workdir, envoy_bin, None)
            e.start()
            envoys[kind] = e
        # A smoke run needs the figures to exist, not to be steady.
        settings = dataclasses.replace(s, rounds=1) if s.quick else s
        bench = Bench(settings, envoys, upstream, {"allowed": None}, wrk, h2load)
        bench.extra_headers = [(f"x-probe-{i}", "v") for i in range(CALLS_PER_REQUEST)]
        cells = [Cell(k, "direct", "allowed", "h1") for k in kinds]
        bench.run(cells)
        per_round = {c.config: by_round(rs, "us_per_req") for c, rs in bench.samples.items()}
        out: dict[str, Any] = {"floor_us_per_req": med(list(per_round["nothing"].values())), "per_call_us": {}}
        for kind in HOST_CALLS:
            diffs = [(per_round[kind][r] - per_round["nothing"][r]) / CALLS_PER_REQUEST for r in per_round[kind] if r in per_round["nothing"]]
            out["per_call_us"][kind] = med(diffs)
        return out
    finally:
        for e in envoys.values():
            e.stop()
        upstream.stop()


def probe_row(e: Envoy) -> dict:
    return {"envoy": e.name, "concurrency": e.concurrency, "ready_s": e.ready_s, "rss_kb": e.rss_start_kb, "bootstrap_bytes": e.config_bytes}
