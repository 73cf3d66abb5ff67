"""The printed tables: the matrix, latency, start-up and memory, host calls; and re-rendering a summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from .measure import Cell
from .summaries import result_rows, summarize


def save(path: Path, summary: dict) -> None:
    """Write a summary as indented JSON and say where."""
    path.write_text(json.dumps(summary, indent=2))
    print(f"  summary: {path}")


def fmt(v: Optional[float], spec: str = ".1f", scale: float = 1.0) -> str:
    return "-" if v is None else format(v * scale, spec)


def fmt_lat(us: Optional[float]) -> str:
    if us is None:
        return "-"
    return f"{us:.0f}us" if us < 1000 else f"{us / 1000:.2f}ms"


def print_host_calls(hc: dict) -> None:
    print()
    print("== host calls: Envoy CPU per call (10 calls per request, minus the probe making none) ==")
    print(f"  probe filter making no call: {fmt(hc['floor_us_per_req'])} us/req")
    for kind, us in hc["per_call_us"].items():
        print(f"  {kind:16s} {fmt(us, '.2f'):>6s} us")


def print_startup(sm: dict, header: bool = True) -> None:
    if header:
        print()
        print("== memory and startup ==")
    probes = sm["startup"]
    plain = next((p["rss_kb"] for p in probes if p["what"] == "envoy, no filter"), None)
    print(f"  {'keys':6s} {'what':22s} {'ready':>8s} {'VmRSS MiB':>10s} {'+MiB/plain':>10s} {'plugin MB':>10s}")
    for p in probes:
        extra = (p["rss_kb"] - plain) / 1024 if plain else None
        print(f"  {p['keys']:6s} {p['what']:22s} {p['ready_s']:7.2f}s {p['rss_kb'] / 1024:10.1f} {fmt(extra, '+.1f'):>10s} {p['plugin_config_bytes'] / 1e6:10.1f}")
    medians = {(p["keys"], p["what"]): p["rss_kb_median"] for p in probes if "rss_kb_median" in p}
    for k, v in sm["per_vm_rss_kb"].items():
        c1, c2 = medians.get((k, "keygate c1")), medians.get((k, "keygate c2"))
        also = f" (medians of the starts: {(c2 - c1) / 1024:+.1f} MiB)" if c1 is not None and c2 is not None else ""
        print(f"  one more worker (and its keygate VM) with {k} keys in the plugin configuration: VmRSS c2 - c1 = {v / 1024:.1f} MiB{also}")
    print("  control plane (keygate serve, default paging):")
    for r in sm.get("control_plane", []):
        print(
            f"    {r['keys']:6s} c{r['concurrency']}: first use {fmt(r['first_use_s'], '.2f')}s after /ready, "
            f"VmRSS {r['rss_kb'] / 1024:.1f} MiB (at ready {r['rss_ready_kb'] / 1024:.1f})"
        )
    for k, v in sm.get("per_vm_rss_kb_control_plane", {}).items():
        print(f"    one more worker with {k} keys from the control plane: VmRSS c2 - c1 = {v / 1024:.1f} MiB")
    w = sm["wasm_bytes"]
    trimmed = f" ({w['empty_trimmed']} with its exports trimmed)" if "empty_trimmed" in w else ""
    print(f"  keygate.wasm (release): {w['keygate']} bytes; empty filter: {w['empty']} bytes{trimmed}")


def print_latency(lat: dict) -> None:
    s = lat["settings"]
    print()
    print(f"== one-connection latency, allowed path ({s['rounds']} rounds x {s['c1_duration_s']}s, wrk -c1 -t1, medians) ==")
    print("   +p50/+p99 = median over rounds of this configuration's figure minus the same round's baseline.")
    hdr = f"{'config':14s} {'route':6s} {'RPS':>7s} {'p50':>8s} {'+p50':>6s} {'p99':>8s} {'+p99':>6s} {'p99 min':>8s} {'p99 max':>8s} {'n/drop':>6s}"
    print(hdr)
    print("-" * len(hdr))
    for r in lat["results"]:
        print(
            f"{r['config']:14s} {r['route']:6s} {fmt(r['rps'], '.0f'):>7s} {fmt_lat(r['p50_us']):>8s} "
            f"{fmt(r['p50_added_over_baseline_paired'], '+.0f'):>6s} {fmt_lat(r['p99_us']):>8s} "
            f"{fmt(r['p99_added_over_baseline_paired'], '+.0f'):>6s} {fmt_lat(r['p99_us_min']):>8s} {fmt_lat(r['p99_us_max']):>8s} "
            f"{r['samples']:>3d}/{r['dropped_busy']:<2d}"
        )
    print(f"  samples dropped as busy: {lat['dropped_busy_samples']}; total {lat['elapsed_s']:.0f}s")


def print_report(sm: dict) -> None:
    s = sm["settings"]
    print()
    print(f"== keygate benchmark ({sm['mode']}: {s['rounds']} rounds x {s['duration_s']}s samples, medians; "
          f"Envoy --concurrency 1 on core 0 unless -c2; wrk/h2load and upstream on core 1) ==")
    print("   us/req = median Envoy CPU (utime+stime) per request; +us/b = us/req minus baseline's.")
    print("   x-ratios = median over rounds of us/req divided by the same round's reference: xbase/xempty = baseline/")
    print("   empty-wasm allowed path, xnative = native's same path. p50/p99: wrk -c32 (load) and -c1 -t1 (c1).")
    print("   env% = Envoy CPU in % of one core during the sample; n/drop = samples taken / dropped as busy; * = no clean sample.")
    print("   +us/e = median over rounds of us/req minus the same round's empty-wasm allowed path (the floor every wasm filter pays).")
    print("   +c1p99 = median over rounds of c1 p99 minus the same round's baseline c1 p99 (µs; --latency-only measures it with more rounds).")
    hdr = f"{'config':14s} {'route':6s} {'path':7s} {'proto':5s} {'RPS':>8s} {'rps/b':>5s} {'us/req':>7s} {'+us/b':>6s} {'+us/e':>6s} {'xbase':>5s} {'xempty':>6s} {'xnativ':>6s} {'p50':>8s} {'p99':>8s} {'c1 p50':>8s} {'c1 p99':>8s} {'+c1p99':>6s} {'env%':>4s} {'n/drop':>6s}"
    print(hdr)
    print("-" * len(hdr))
    last = None
    for r in sm["results"]:
        group = (r["route"], r["proto"])
        if last is not None and group != last:
            print()
        last = group
        flag = "*" if r["all_busy"] else ""
        print(
            f"{r['config']:14s} {r['route']:6s} {r['path']:7s} {('h2' if r['proto'] == 'h2' else 'h1'):5s} "
            f"{fmt(r['rps'], '.0f'):>8s} {fmt(r['rps_vs_baseline'], '.2f'):>5s} {fmt(r['us_per_req']) + flag:>7s} "
            f"{fmt(r['us_added_over_baseline'], '+.1f'):>6s} {fmt(r.get('us_added_over_empty_wasm_paired'), '+.1f'):>6s} "
            f"{fmt(r['us_vs_baseline_paired'], '.2f'):>5s} "
            f"{fmt(r['us_vs_empty_wasm_paired'], '.2f'):>6s} {fmt(r['us_vs_native_paired'], '.2f'):>6s} "
            f"{fmt_lat(r['p50_us']):>8s} {fmt_lat(r['p99_us']):>8s} {fmt_lat(r['c1_p50_us']):>8s} {fmt_lat(r['c1_p99_us']):>8s} "
            f"{fmt(r.get('c1_p99_added_over_baseline_paired'), '+.0f'):>6s} {fmt(r['envoy_cpu_pct'], '.0f'):>4s} {r['samples']:>3d}/{r['dropped_busy']:<2d}"
        )
    print_targets(sm)
    print()
    print("== memory and startup ==")
    for name, e in sm["envoys"].items():
        print(
            f"  {name:14s} VmRSS after start {e['rss_start_kb'] / 1024:7.1f} MiB, after the run "
            f"{fmt((e['rss_end_kb'] or 0) / 1024):>7s} MiB, ready in {e['ready_s']:.2f}s"
            + (f" (one process for {e['shared_by']} configurations)" if e.get("shared_by", 1) > 1 else "")
        )
    print_startup(sm, header=False)
    if "host_calls" in sm:
        print_host_calls(sm["host_calls"])
    print(
        f"  samples dropped as busy (others > {s['busy_threshold_pct']:.0f}% of a core): {sm['dropped_busy_samples']}; "
        f"cells with no clean sample (marked *): {sm['cells_without_clean_sample']}"
    )
    m = sm["machine"]
    print(f"  loadavg at start {m['loadavg_start']}, at end {m['loadavg_end']}; total {sm['elapsed_s']:.0f}s")


def _paired(sm: dict, a: str, b: str, field: str = "us_per_req", op=lambda x, y: x - y) -> Optional[float]:
    """Median over rounds of op(a's field, b's field) for two cells
    (`config/route/path/kind`) measured in the same round."""
    raw = sm["raw_samples"]
    by_a = {r["round"]: r[field] for r in raw.get(a, []) if r.get(field) is not None}
    by_b = {r["round"]: r[field] for r in raw.get(b, []) if r.get(field) is not None}
    vals = sorted(op(by_a[k], by_b[k]) for k in by_a if k in by_b)
    if not vals:
        return None
    mid = len(vals) // 2
    return vals[mid] if len(vals) % 2 else (vals[mid - 1] + vals[mid]) / 2


def print_targets(sm: dict) -> None:
    """The performance issue's targets, each figure paired per round."""
    kgs = [c for c in ("keygate-10", "keygate-100k", "keygate-10-fs") if f"{c}/direct/allowed/h1" in sm["raw_samples"]]
    if not kgs:
        return
    rounds = sm["settings"]["rounds"]

    def each(f) -> str:
        return ", ".join(f"{c} {f(c)}" for c in kgs)

    print()
    print(f"== targets (paired per round, medians over {rounds} rounds; direct route, HTTP/1.1 unless noted) ==")
    print("  own work over the empty filter, allowed (goal <= 5 us): "
          + each(lambda c: fmt(_paired(sm, f"{c}/direct/allowed/h1", "empty-wasm/direct/allowed/h1"), "+.1f")))
    print("  c1 p99 over no filter (goal <= +50 us): "
          + each(lambda c: fmt(_paired(sm, f"{c}/direct/allowed/c1", "baseline/direct/allowed/c1", "p99_us"), "+.0f"))
          + "; proxied: "
          + each(lambda c: fmt(_paired(sm, f"{c}/proxy/allowed/c1", "baseline/proxy/allowed/c1", "p99_us"), "+.0f")))
    print("  c1 CPU per request over the empty filter: "
          + each(lambda c: fmt(_paired(sm, f"{c}/direct/allowed/c1", "empty-wasm/direct/allowed/c1"), "+.1f"))
          + "; proxied: "
          + each(lambda c: fmt(_paired(sm, f"{c}/proxy/allowed/c1", "empty-wasm/proxy/allowed/c1"), "+.1f")))
    ratio = lambda x, y: x / y  # noqa: E731
    print("  proxied allowed RPS / native's (goal >= 0.90): "
          + each(lambda c: fmt(_paired(sm, f"{c}/proxy/allowed/h1", "native/proxy/allowed/h1", "rps", ratio), ".2f"))
          + "; native / baseline "
          + fmt(_paired(sm, "native/proxy/allowed/h1", "baseline/proxy/allowed/h1", "rps", ratio), ".2f"))
    for path in ("401", "429"):
        print(f"  {path} minus allowed (goal < 0): "
              + each(lambda c: fmt(_paired(sm, f"{c}/direct/{path}/h1", f"{c}/direct/allowed/h1"), "+.1f")))
    if "keygate-10-shadow/direct/401/h1" in sm["raw_samples"]:
        print("  shadow minus enforce (goal <= 0): "
              + ", ".join(f"{p} {fmt(_paired(sm, f'keygate-10-shadow/direct/{p}/h1', f'keygate-10/direct/{p}/h1'), '+.1f')}" for p in ("401", "429")))
    if "keygate-10-4limits/direct/allowed/h1" in sm["raw_samples"]:
        per = _paired(sm, "keygate-10-4limits/direct/allowed/h1", "keygate-10/direct/allowed/h1")
        print(f"  each extra named limit (goal <= +1 us): {fmt(per and per / 3, '+.2f')} (four limits {fmt(per, '+.1f')} over one)")
    if "keygate-10-consumer/direct/allowed/h1" in sm["raw_samples"]:
        print("  consumer key over a plain key: "
              + fmt(_paired(sm, "keygate-10-consumer/direct/allowed/h1", "keygate-10/direct/allowed/h1"), "+.1f"))
    print(f"  keygate.wasm: {sm['wasm_bytes']['keygate']} bytes (goal < 512 KB)")


def render(path: Path) -> int:
    """Print the tables of an earlier run again, recomputing the derived
    figures from its raw samples (and writing them back)."""
    sm = json.loads(path.read_text())
    samples = {Cell(*label.split("/")): rs for label, rs in sm["raw_samples"].items()}
    cells = summarize(samples)
    order = list(sm["envoys"])
    sm["results"] = result_rows(cells, order)
    sm["cells_without_clean_sample"] = sum(1 for c in cells.values() if c["all_busy"])
    print_report(sm)
    save(path, sm)
    return 0
