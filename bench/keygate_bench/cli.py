"""The command line: arguments, the inputs scripts/bench.sh passes, and one function per mode."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import harness

from .children import UPSTREAM_CORE, spawn, stop_all_children, stop_child
from .configs import CP_CLUSTER, DIRECT_ONLY, NO_AUTH, SHADOW, USAGE_CONTROL_PLANE, huge_limits, key_list, keygate_config, native_filters, upstream_bootstrap, wasm_filter
from .envoys import Envoy, http_status, new_envoy, shared_envoy, status_or_zero, stop_envoys
from .measure import Bench, Cell, Settings
from .probes import host_call_costs, startup_probes
from .procfs import cpu_model, loadavg, proc_rss_kb
from .report import print_host_calls, print_latency, print_report, print_startup, render, save
from .summaries import build_summary, latency_summary, per_vm_cp, per_vm_estimates, summarize


def parse_args(description: str, argv: Optional[list[str]] = None) -> argparse.Namespace:
    """bench.py's options (`description` is its --help text)."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 rounds of short samples, no 1M-key probe (< 3 min)")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--duration", type=int, help="seconds per sample")
    ap.add_argument("--busy-threshold", type=float, default=20.0, help="%% of one core used by others above which a sample is dropped")
    ap.add_argument("--out", default=str(harness.REPO_ROOT / "target" / "bench"))
    ap.add_argument("--no-1m", action="store_true", help="skip the 1M-key startup probes in full mode")
    ap.add_argument("--host-calls", action="store_true", help="only the host-call probes (writes host_calls.json)")
    ap.add_argument("--startup-only", action="store_true", help="only the start-up, memory and control-plane probes (writes startup.json)")
    ap.add_argument(
        "--latency-only",
        action="store_true",
        help="only the one-connection latency of the allowed path, --concurrency 1 configurations, 11 rounds unless --rounds (writes latency.json)",
    )
    ap.add_argument("--separate", action="store_true", help="one Envoy per configuration instead of one for all the --concurrency 1 ones")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (bootstraps, logs)")
    ap.add_argument("--render", metavar="SUMMARY_JSON", help="only print the tables of an earlier run's summary.json")
    return ap.parse_args(argv)


def settings_for(args: argparse.Namespace) -> Settings:
    """Rounds, durations and load shapes for the mode asked for."""
    q = args.quick
    return Settings(
        quick=q,
        rounds=args.rounds or (2 if q else 11 if args.latency_only else 5),
        duration_s=args.duration or (1 if q else 5),
        c1_duration_s=1 if q else 3,
        warmup="200ms" if q else "1000ms",
        connections=32,
        h2_connections=8,
        h2_streams=16,
        busy_threshold_pct=args.busy_threshold,
        retries=0 if q else 1,
    )


@dataclasses.dataclass
class Inputs:
    """What scripts/bench.sh builds and finds, passed in the environment."""

    envoy_bin: Path
    keygate_wasm: Path
    empty_wasm: Path
    empty_trimmed: Optional[Path]  # the empty filter exporting only what keygate exports
    keygate_cli: Path
    probe_wasm: Path
    wrk: str
    h2load: str

    @classmethod
    def from_env(cls) -> "Inputs":
        trimmed = os.environ.get("BENCH_EMPTY_TRIMMED_WASM")
        return cls(
            envoy_bin=Path(os.environ["BENCH_ENVOY"]),
            keygate_wasm=Path(os.environ["BENCH_KEYGATE_WASM"]),
            empty_wasm=Path(os.environ["BENCH_EMPTY_WASM"]),
            empty_trimmed=Path(trimmed) if trimmed else None,
            keygate_cli=Path(os.environ["BENCH_KEYGATE_CLI"]),
            probe_wasm=Path(os.environ["BENCH_PROBE_WASM"]),
            wrk=os.environ.get("BENCH_WRK", "wrk"),
            h2load=os.environ.get("BENCH_H2LOAD", "h2load"),
        )


@dataclasses.dataclass
class Keys:
    """The run's keys: one allowed, one limited to a single token, and the key lists built around them."""

    allowed: str
    limited: str
    entries: list[dict]  # the allowed and the limited key's records
    kg10: str  # keygate configuration with 10 keys
    kg100k: str  # and with 100,000
    kg10_shadow: str  # 10 keys in shadow mode
    kg10_usage: str  # 10 keys, usage reported to a control plane every second
    kg10_fs: str  # 10 keys, identity forwarded through filter state
    kg10_consumer: str  # 10 keys, the allowed key belonging to a consumer
    kg10_4limits: str  # 10 keys, the allowed key with four named limits
    native: list[tuple[str, str]]  # (id, key) for the native filter

    @classmethod
    def make(cls) -> "Keys":
        allowed, limited = harness.new_key(), harness.new_key()
        entries = [
            {"id": "bench-allowed", "sha256": harness.sha256_hex(allowed)},
            {"id": "bench-limited", "sha256": harness.sha256_hex(limited), "rate_limit": {"requests_per_second": 0.001, "burst": 1}},
        ]
        return cls(
            allowed=allowed,
            limited=limited,
            entries=entries,
            kg10=keygate_config(key_list(10, entries)),
            kg100k=keygate_config(key_list(100_000, entries)),
            kg10_shadow=keygate_config(key_list(10, entries), mode="shadow"),
            kg10_usage=keygate_config(key_list(10, entries), control_plane=USAGE_CONTROL_PLANE),
            kg10_fs=keygate_config(key_list(10, entries), forward_with="filter_state"),
            kg10_consumer=keygate_config(key_list(10, [{**entries[0], "consumer": "bench-team"}, entries[1]])),
            kg10_4limits=keygate_config(key_list(10, [{**entries[0], "rate_limits": huge_limits(4)}, entries[1]])),
            native=[("bench-allowed", allowed)] + [(f"k{i}", harness.new_key()) for i in range(8)],
        )


def config_defs(inputs: Inputs, keys: Keys, latency_only: bool) -> list[tuple[str, list[dict], int]]:
    """(name, HTTP filters, --concurrency) of each configuration measured.
    Each wasm filter has a vm_id of its own (its name), so that the
    configurations can share one Envoy without sharing a VM."""
    defs: list[tuple[str, list[dict], int]] = [
        ("baseline", [], 1),
        ("empty-wasm", [wasm_filter("empty", "empty", inputs.empty_wasm, "")], 1),
    ]
    if inputs.empty_trimmed is not None:
        defs.append(("empty-trimmed", [wasm_filter("empty-trimmed", "empty", inputs.empty_trimmed, "")], 1))
    defs += [
        ("native", native_filters(keys.native, ("bench-limited", keys.limited)), 1),
        ("keygate-10", [wasm_filter("keygate", "keygate", inputs.keygate_wasm, keys.kg10)], 1),
        ("keygate-100k", [wasm_filter("keygate-100k", "keygate", inputs.keygate_wasm, keys.kg100k)], 1),
        ("keygate-10-c2", [wasm_filter("keygate", "keygate", inputs.keygate_wasm, keys.kg10)], 2),
        ("keygate-10-shadow", [wasm_filter("keygate-shadow", "keygate", inputs.keygate_wasm, keys.kg10_shadow)], 1),
        ("keygate-10-usage", [wasm_filter("keygate-usage", "keygate", inputs.keygate_wasm, keys.kg10_usage)], 1),
        ("keygate-10-fs", [wasm_filter("keygate-fs", "keygate", inputs.keygate_wasm, keys.kg10_fs)], 1),
        ("keygate-10-consumer", [wasm_filter("keygate-consumer", "keygate", inputs.keygate_wasm, keys.kg10_consumer)], 1),
        ("keygate-10-4limits", [wasm_filter("keygate-4limits", "keygate", inputs.keygate_wasm, keys.kg10_4limits)], 1),
    ]
    if latency_only:
        # One connection sees every configuration's latency through the
        # same scheduler noise; more rounds of the c1 cells alone, paired
        # per round against the baseline, separate the two.
        defs = [d for d in defs if d[2] == 1 and d[0] not in DIRECT_ONLY]
    return defs


# --quick measures HTTP/2 only for these (no target reads an HTTP/2 figure),
# which keeps the smoke run of scripts/test.sh under four minutes.
H2_QUICK = ("baseline", "empty-wasm", "native", "keygate-10")


def matrix_cells(names: list[str], latency_only: bool, quick: bool = False) -> list[Cell]:
    """Every cell measured once per round."""
    cells: list[Cell] = []
    for name in names:
        auth = name not in NO_AUTH
        if name in DIRECT_ONLY:
            cells += [Cell(name, "direct", "allowed", "h1"), Cell(name, "direct", "allowed", "c1")]
            continue
        for route in ("direct", "proxy"):
            if latency_only:
                cells.append(Cell(name, route, "allowed", "c1"))
                continue
            cells.append(Cell(name, route, "allowed", "h1"))
            if not quick or name in H2_QUICK:
                cells.append(Cell(name, route, "allowed", "h2"))
            cells.append(Cell(name, route, "allowed", "c1"))
        if auth and not latency_only:  # denials never reach the upstream: the direct route suffices
            cells += [Cell(name, "direct", "401", "h1"), Cell(name, "direct", "429", "h1")]
    return cells


class Run:
    """One invocation: its settings, inputs, keys, work directory and the Envoys it started."""

    def __init__(self, args: argparse.Namespace, inputs: Inputs, out_dir: Path):
        self.args = args
        self.s = settings_for(args)
        self.inputs = inputs
        self.out_dir = out_dir
        self.workdir = Path(tempfile.mkdtemp(prefix="run-", dir=out_dir))
        self.t_begin = time.monotonic()
        self.load_start = loadavg()
        self.envoys: dict[str, Envoy] = {}
        self.upstream: Optional[Envoy] = None
        self.control_plane: Optional[Any] = None  # keygate serve, for keygate-10-usage
        self.cp_port = 0
        self.defs: list[tuple[str, list[dict], int]] = []
        self.keys: Keys

    def close(self) -> None:
        """Stop everything started; remove the work directory unless --keep."""
        stop_envoys(self.envoys)
        if self.upstream is not None:
            self.upstream.stop()
        if self.control_plane is not None:
            stop_child(self.control_plane)
        stop_all_children()
        if not self.args.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def host_calls(self) -> dict:
        i = self.inputs
        return host_call_costs(self.s, self.workdir, i.envoy_bin, i.probe_wasm, i.wrk, i.h2load)

    def startup(self, envoys: dict[str, Envoy]) -> tuple[list[dict], list[dict]]:
        i, k = self.inputs, self.keys
        return startup_probes(
            self.args, envoys, self.workdir, i.envoy_bin, i.keygate_wasm, i.empty_wasm, i.keygate_cli, k.entries, k.kg10, k.kg100k
        )

    def run_host_calls(self) -> int:
        hc = self.host_calls()
        print_host_calls(hc)
        save(self.out_dir / "host_calls.json", hc)
        return 0

    def run_startup_only(self) -> int:
        probes, cp_rows = self.startup({})
        i = self.inputs
        sm = {
            "mode": "startup-only",
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "cpu_model": cpu_model()},
            "wasm_bytes": {"keygate": i.keygate_wasm.stat().st_size, "empty": i.empty_wasm.stat().st_size},
            "startup": probes,
            "per_vm_rss_kb": per_vm_estimates(probes),
            "control_plane": cp_rows,
            "per_vm_rss_kb_control_plane": per_vm_cp(cp_rows),
        }
        print_startup(sm)
        save(self.out_dir / "startup.json", sm)
        return 0

    def start_envoys(self, report: bool) -> list[str]:
        """The Envoys (one for the --concurrency 1 configurations unless
        --separate), each configuration checked on its routes and paths
        (which spends the limited key's token); the problems found."""
        assert self.upstream is not None
        up_port, envoy_bin = self.upstream.port, self.inputs.envoy_bin
        shared = [(name, filters) for name, filters, conc in self.defs if conc == 1 and not self.args.separate]
        clusters = [harness.static_cluster(CP_CLUSTER, self.cp_port)] if self.cp_port else []
        if shared:
            self.envoys.update(shared_envoy("shared-c1", shared, self.workdir, envoy_bin, up_port, clusters))
        for name, filters, conc in self.defs:
            if name not in self.envoys:
                self.envoys[name] = new_envoy(name, filters, self.workdir, envoy_bin, up_port, concurrency=conc, clusters=clusters).start()
        for name, e in self.envoys.items():
            if report:
                where = f", one process for {e.shared_by}" if e.shared_by > 1 else ""
                print(f"  {name:14s} ready in {e.ready_s:.2f}s, VmRSS {e.rss_start_kb / 1024:.1f} MiB (port {e.port}{where})", flush=True)
        problems = []
        for name, e in self.envoys.items():
            problems += self.check(name, e)
        for p in problems:
            print("CHECK FAILED: " + p, file=sys.stderr)
        return problems

    def check(self, name: str, e: Envoy) -> list[str]:
        """Whether `name` answers as benchmarked: a valid key 200 on both
        routes, no key 401 (200 without auth), the limited key 200 then 429
        (in shadow mode, 200: refused in the report, forwarded)."""
        problems = []
        auth = name not in NO_AUTH
        refused = (200, 200) if name in SHADOW else (401, 429)
        for route in ("direct", "proxy"):
            got = http_status(e.port, f"/{route}", self.keys.allowed)
            if got != 200:
                problems.append(f"{name} /{route} with a valid key: {got}, expected 200")
        got = http_status(e.port, "/direct", None)
        if got != (refused[0] if auth else 200):
            problems.append(f"{name}: no key gave {got}, expected {refused[0] if auth else 200}")
        if auth:
            first = http_status(e.port, "/direct", self.keys.limited)
            second = http_status(e.port, "/direct", self.keys.limited)
            if (first, second) != (200, refused[1]):
                problems.append(f"{name}: limited key gave {first} then {second}, expected 200 then {refused[1]}")
        return problems

    def start_control_plane(self) -> None:
        """`keygate serve` with an empty list, on the upstream's core, for
        the usage configuration's reports."""
        keys = self.workdir / "cp-usage.json"
        keys.write_text('{"version":1,"keys":[]}')
        self.cp_port = harness.free_port()
        log = open(self.workdir / "cp-usage.log", "wb")
        cmd = [str(self.inputs.keygate_cli), "serve", "--keys", str(keys), "--listen", f"127.0.0.1:{self.cp_port}"]
        self.control_plane = spawn(["taskset", "-c", UPSTREAM_CORE, *cmd], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 60
        while status_or_zero(self.cp_port, "/healthz", None) != 200:
            if self.control_plane.poll() is not None or time.monotonic() > deadline:
                raise harness.EnvoyStartError("keygate serve did not start", (self.workdir / "cp-usage.log").read_text()[-2000:], self.control_plane.returncode)
            time.sleep(0.1)

    def print_usage_reported(self) -> None:
        """What the usage configuration reported: its allowed key's requests
        as the control plane recorded them (proof that reporting ran)."""
        path = self.workdir / "cp-usage.usage.json"
        time.sleep(2.5)  # the last report
        try:
            rec = json.loads(path.read_text())["keys"].get("bench-allowed", {})
        except (OSError, ValueError, KeyError):
            rec = {}
        print(f"  usage reported by keygate-10-usage: bench-allowed {rec.get('requests', 0)} requests", flush=True)

    def restart_envoys(self) -> list[str]:
        stop_envoys(self.envoys)
        self.envoys.clear()
        return self.start_envoys(report=False)

    def measure(self) -> Optional[Bench]:
        """The interleaved run over every cell; None if a configuration
        failed its checks. Every round runs on freshly started Envoys: one
        Envoy process is not like another (one module measured 31.5 and 37.9
        us in two Envoys over the same 9 rounds), so a configuration kept in
        one process for the whole run would carry that process's offset;
        with the configurations sharing a process, the offset is common to
        them within a round, and a new one each round. The quick mode, a
        smoke check, keeps its Envoys to stay under 3 minutes."""
        q, s = self.s.quick, self.s
        cells = matrix_cells(list(self.envoys), self.args.latency_only, self.s.quick)
        print(f"measuring {len(cells)} cells x {s.rounds} rounds ...", flush=True)
        paths = {"allowed": self.keys.allowed, "401": None, "429": self.keys.limited}
        bench = Bench(s, self.envoys, self.upstream, paths, self.inputs.wrk, self.inputs.h2load)
        bench.prime("300ms" if q else "2000ms")
        for rnd in range(s.rounds):
            if rnd > 0 and not q:
                if self.restart_envoys():
                    return None
                bench.prime("500ms")
            bench.run(cells, rnd, 1)
        return bench

    def run_matrix(self) -> int:
        """The configurations under load (or, with --latency-only, at one
        connection), then host calls and start-up probes; the full report."""
        i = self.inputs
        print("starting envoys ...", flush=True)
        up_port, up_admin = harness.free_ports(2)
        self.upstream = Envoy("upstream", upstream_bootstrap(up_port, up_admin), self.workdir, i.envoy_bin, cpus=UPSTREAM_CORE, port=up_port, admin_port=up_admin)
        self.upstream.start()
        self.defs = config_defs(i, self.keys, self.args.latency_only)
        self.start_control_plane()
        if self.start_envoys(report=True):
            return 2
        print("  checks: valid key 200, no key 401, limited key 200 then 429 (auth configs; 200 in shadow) - ok", flush=True)
        bench = self.measure()
        if bench is None:
            return 2
        cells = summarize(bench.samples)
        self.print_usage_reported()
        rss_end = {name: proc_rss_kb(e.pid) for name, e in self.envoys.items()}
        stop_envoys(self.envoys)
        self.upstream.stop()
        if self.args.latency_only:
            lat = latency_summary(self.s, cells, list(self.envoys), bench.dropped, time.monotonic() - self.t_begin)
            print_latency(lat)
            save(self.out_dir / "latency.json", lat)
            return 0

        hc = self.host_calls()
        # A shared process says nothing about one configuration's start-up.
        probes, cp_rows = self.startup({name: e for name, e in self.envoys.items() if e.shared_by == 1})
        sm = build_summary(
            self.s, self.envoys, cells, bench.dropped, probes, rss_end, i.keygate_wasm, i.empty_wasm, i.envoy_bin,
            self.load_start, time.monotonic() - self.t_begin,
        )  # fmt: skip
        if i.empty_trimmed is not None:
            sm["wasm_bytes"]["empty_trimmed"] = i.empty_trimmed.stat().st_size
        sm["control_plane"] = cp_rows
        sm["host_calls"] = hc
        sm["per_vm_rss_kb_control_plane"] = per_vm_cp(cp_rows)
        print_report(sm)
        save(self.out_dir / "summary.json", sm)
        return 0


def main(description: str, argv: Optional[list[str]] = None) -> int:
    """bench.py: run the mode the arguments ask for; 0 when it ran, 2 when a configuration failed its checks."""
    args = parse_args(description, argv)
    if args.render:
        return render(Path(args.render))
    inputs = Inputs.from_env()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    run = Run(args, inputs, out_dir)
    s = run.s
    print(f"mode: {'quick' if s.quick else 'full'}, {s.rounds} rounds, {s.duration_s}s samples; loadavg {run.load_start}", flush=True)
    try:
        run.keys = Keys.make()
        if args.host_calls:
            return run.run_host_calls()
        if args.startup_only:
            return run.run_startup_only()
        return run.run_matrix()
    finally:
        run.close()


def _on_term(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def run_script(description: str) -> None:
    """The script's entry: SIGTERM and SIGHUP stop every child on the way out, Ctrl-C too."""
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGHUP, _on_term)
    try:
        sys.exit(main(description))
    except KeyboardInterrupt:
        stop_all_children()
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
