"""Summaries of the samples: medians per cell, paired per-round differences and ratios, the JSON summaries."""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import subprocess
from pathlib import Path
from typing import Optional

from .children import ENVOY_CORE, LOADGEN_CORE, UPSTREAM_CORE
from .envoys import Envoy
from .measure import Cell, Settings
from .procfs import cpu_model, loadavg


def med(values: list[Optional[float]]) -> Optional[float]:
    v = [x for x in values if x is not None]
    return statistics.median(v) if v else None


def summarize(samples: dict[Cell, list[dict]]) -> dict[Cell, dict]:
    out: dict[Cell, dict] = {}
    for cell, rs in samples.items():
        clean = [r for r in rs if not r["busy"]]
        use = clean or rs  # if every sample was busy, report them anyway, flagged
        out[cell] = {
            "samples": len(rs),
            "dropped_busy": len(rs) - len(clean),
            "all_busy": not clean,
            "rps": med([r["rps"] for r in use]),
            "us_per_req": med([r["us_per_req"] for r in use]),
            "us_per_req_min": min((r["us_per_req"] for r in use if r["us_per_req"] is not None), default=None),
            "us_per_req_max": max((r["us_per_req"] for r in use if r["us_per_req"] is not None), default=None),
            "p50_us": med([r["p50_us"] for r in use]),
            "p99_us": med([r["p99_us"] for r in use]),
            "p99_us_min": min((r["p99_us"] for r in use if r["p99_us"] is not None), default=None),
            "p99_us_max": max((r["p99_us"] for r in use if r["p99_us"] is not None), default=None),
            "envoy_cpu_pct": med([r["envoy_cpu_pct"] for r in use]),
            "loadgen_cpu_pct": med([r["loadgen_cpu_pct"] for r in use]),
            "other_cpu_pct": med([r["other_cpu_pct"] for r in use]),
            "steal_pct": med([r["steal_pct"] for r in use]),
            "requests_total": sum(r["requests"] for r in use),
            "non2xx_total": sum(r["non2xx"] for r in use),
            "socket_errors_total": sum(r["socket_errors"] for r in use),
            "new_connections_total": sum(r["new_connections"] for r in use),
            "rq_2xx_total": sum(r["rq_2xx"] for r in use),
            "rq_4xx_total": sum(r["rq_4xx"] for r in use),
            "rq_5xx_total": sum(r["rq_5xx"] for r in use),
            "raw": rs,
        }
    return out


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if (a is not None and b) else None


def by_round(raw: list[dict], field: str) -> dict[int, float]:
    """The clean samples' `field`, by round."""
    return {r["round"]: r[field] for r in raw if not r["busy"] and r.get(field) is not None}


def paired_ratio(raw: list[dict], ref_raw: list[dict], field: str = "us_per_req") -> Optional[float]:
    """Median over rounds of (this cell's sample / the reference's sample of
    the same round), clean samples only: slow drift of the machine between
    rounds cancels out."""
    a, b = by_round(raw, field), by_round(ref_raw, field)
    ratios = [a[k] / b[k] for k in a if k in b and b[k]]
    return statistics.median(ratios) if ratios else None


def paired_difference(raw: list[dict], ref_raw: list[dict], field: str = "us_per_req") -> Optional[float]:
    """Median over rounds of (this cell's sample - the reference's sample of
    the same round), clean samples only: what the cell adds to the reference,
    with the machine's drift between rounds taken out."""
    a, b = by_round(raw, field), by_round(ref_raw, field)
    diffs = [a[k] - b[k] for k in a if k in b]
    return statistics.median(diffs) if diffs else None


def result_rows(cells: dict[Cell, dict], order: list[str]) -> list[dict]:
    """One row per (config, route, path, h1|h2), with the c1 latencies and
    the ratios to baseline, empty-wasm and native."""

    def get(config: str, route: str, path: str, kind: str) -> Optional[dict]:
        return cells.get(Cell(config, route, path, kind))

    def pr(c: dict, ref: Optional[dict]) -> Optional[float]:
        if ref is None:
            return None
        return paired_ratio(c["raw"], ref["raw"]) or ratio(c["us_per_req"], ref["us_per_req"])

    rows = []
    for route in ("direct", "proxy"):
        for kind in ("h1", "h2"):
            for path in ("allowed", "401", "429"):
                for config in order:
                    c = get(config, route, path, kind)
                    if c is None:
                        continue
                    base = get("baseline", route, "allowed", kind)
                    empty = get("empty-wasm", route, "allowed", kind)
                    native = get("native", route, path, kind)
                    c1 = get(config, route, path, "c1") if kind == "h1" else None
                    base_c1 = get("baseline", route, "allowed", "c1") if kind == "h1" else None
                    us = c["us_per_req"]
                    rows.append(
                        {
                            "config": config,
                            "route": route,
                            "path": path,
                            "proto": "h2" if kind == "h2" else "http/1.1",
                            **{k: v for k, v in c.items() if k != "raw"},
                            "c1_p50_us": c1["p50_us"] if c1 else None,
                            "c1_p99_us": c1["p99_us"] if c1 else None,
                            "c1_rps": c1["rps"] if c1 else None,
                            # median over rounds of (this c1 p99 - the same
                            # round's baseline c1 p99): the latency one
                            # connection sees added, drift between rounds out
                            "c1_p99_added_over_baseline_paired": paired_difference(c1["raw"], base_c1["raw"], "p99_us")
                            if (c1 and base_c1)
                            else None,
                            "rps_vs_baseline": ratio(c["rps"], base and base["rps"]),
                            # ratios of the medians
                            "us_vs_baseline": ratio(us, base and base["us_per_req"]),
                            "us_vs_empty_wasm": ratio(us, empty and empty["us_per_req"]),
                            "us_vs_native": ratio(us, native and native["us_per_req"]),
                            # medians of the per-round ratios (printed)
                            "us_vs_baseline_paired": pr(c, base),
                            "us_vs_empty_wasm_paired": pr(c, empty),
                            "us_vs_native_paired": pr(c, native),
                            "us_added_over_baseline": (us - base["us_per_req"])
                            if (us is not None and base and base["us_per_req"] is not None)
                            else None,
                            # median of the per-round differences (printed)
                            "us_added_over_empty_wasm_paired": paired_difference(c["raw"], empty["raw"])
                            if empty
                            else None,
                        }
                    )
    return rows


def build_summary(
    s: Settings,
    envoys: dict[str, Envoy],
    cells: dict[Cell, dict],
    dropped: int,
    probes: list[dict],
    rss_end: dict[str, Optional[int]],
    keygate_wasm: Path,
    empty_wasm: Path,
    envoy_bin: Path,
    load_start: str,
    elapsed: float,
) -> dict:
    version = ""
    try:
        version = subprocess.run([str(envoy_bin), "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "mode": "quick" if s.quick else "full",
        "settings": dataclasses.asdict(s),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "cpu_model": cpu_model(), "loadavg_start": load_start, "loadavg_end": loadavg()},
        "envoy_version": version,
        "pinning": {"envoy_under_test": ENVOY_CORE, "load_generator": LOADGEN_CORE, "upstream": UPSTREAM_CORE},
        "wasm_bytes": {"keygate": keygate_wasm.stat().st_size, "empty": empty_wasm.stat().st_size},
        "results": result_rows(cells, list(envoys)),
        "envoys": {
            name: {"concurrency": e.concurrency, "ready_s": e.ready_s, "rss_start_kb": e.rss_start_kb, "rss_end_kb": rss_end.get(name), "bootstrap_bytes": e.config_bytes, "shared_by": e.shared_by}
            for name, e in envoys.items()
        },
        "startup": probes,
        "per_vm_rss_kb": per_vm_estimates(probes),
        "dropped_busy_samples": dropped,
        "cells_without_clean_sample": sum(1 for c in cells.values() if c["all_busy"]),
        "elapsed_s": elapsed,
        "raw_samples": {c.label: v["raw"] for c, v in cells.items()},
    }


def latency_summary(s: Settings, cells: dict[Cell, dict], order: list[str], dropped: int, elapsed: float) -> dict:
    """The --latency-only figures: per configuration and route, the medians
    of the one-connection p50 and p99, their spread over the rounds, and the
    median over rounds of the difference from the same round's baseline."""
    rows = []
    for route in ("direct", "proxy"):
        base = cells.get(Cell("baseline", route, "allowed", "c1"))
        for config in order:
            c = cells.get(Cell(config, route, "allowed", "c1"))
            if c is None:
                continue
            rows.append(
                {
                    "config": config,
                    "route": route,
                    "samples": c["samples"],
                    "dropped_busy": c["dropped_busy"],
                    "rps": c["rps"],
                    "p50_us": c["p50_us"],
                    "p99_us": c["p99_us"],
                    "p99_us_min": c["p99_us_min"],
                    "p99_us_max": c["p99_us_max"],
                    "p50_added_over_baseline_paired": paired_difference(c["raw"], base["raw"], "p50_us") if base else None,
                    "p99_added_over_baseline_paired": paired_difference(c["raw"], base["raw"], "p99_us") if base else None,
                }
            )
    return {
        "mode": "latency-only",
        "settings": dataclasses.asdict(s),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "cpu_model": cpu_model(), "loadavg_end": loadavg()},
        "results": rows,
        "dropped_busy_samples": dropped,
        "elapsed_s": elapsed,
        "raw_samples": {c.label: v["raw"] for c, v in cells.items()},
    }


def per_vm_estimates(probes: list[dict]) -> dict[str, float]:
    """VmRSS(c2) - VmRSS(c1) per list size, in KiB: what one more worker
    thread with its own keygate VM costs."""
    by = {(p["keys"], p["what"]): p["rss_kb"] for p in probes}
    out = {}
    for keys in ("10", "100k", "1M"):
        if (keys, "keygate c1") in by and (keys, "keygate c2") in by:
            out[keys] = by[(keys, "keygate c2")] - by[(keys, "keygate c1")]
    return out


def per_vm_cp(rows: list[dict]) -> dict[str, float]:
    """VmRSS(c2) - VmRSS(c1) with the list in use, per list size, in KiB."""
    by = {(r["keys"], r["concurrency"]): r["rss_kb"] for r in rows}
    return {k: by[(k, 2)] - by[(k, 1)] for k in ("10", "100k", "1M") if (k, 1) in by and (k, 2) in by}
