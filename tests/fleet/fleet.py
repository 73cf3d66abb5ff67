"""keygate across a fleet: three Envoys, each in a network namespace of its
own, polling one `keygate serve`. Measures revocation propagation, a
partition (with `stale_policy` serve and fail_closed), a control-plane
restart under traffic, the bytes a key change costs the fleet, and what
`keygate serve` spends answering 1,000 unchanged polls per second of a
100k-key list; then, if given, runs the fleet-limit measurement.

Run through `scripts/fleet.sh [--quick]`, which builds what this needs. As
root (network namespaces). Progress goes to stderr; stdout gets exactly one
line, a JSON object with every figure and the outcome of every check. The
exit status is 1 when a behavioural check failed (figures against their
goals are reported, never judged: a shared machine is noisy).

Everything it starts dies with it (PR_SET_PDEATHSIG), and the namespaces
and links are removed on the way out, also on an error, SIGINT or SIGTERM;
`--teardown RUN_ID` removes those of a run that was killed outright.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
from nodes import ControlPlane, FleetEnvoy, new_workdir, plugin_config, wait, write_list  # noqa: E402
from topology import Topology, teardown  # noqa: E402

POLL_S = 1.0
TIMEOUT_S = 0.5
MAX_STALENESS_S = 4.0
# One poll: the wait for the next poll, a callout that may still be timing
# out against the cut link, and the other worker's adopting tick (a quarter
# of the poll), plus scheduling slack on a loaded machine.
TICK_S = POLL_S / 4
ONE_POLL_S = POLL_S + TIMEOUT_S + TICK_S + 0.5
# The fields the fleet-limit measurement (--limit-script) prints.
LIMIT_FIELDS = ("fleet_admitted", "fleet_bound", "local_admitted", "local_bound")


def say(msg: str) -> None:
    print(f"fleet: {msg}", file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


class Fleet:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.quick = args.quick
        self.work = Path(args.workdir) if args.workdir else new_workdir()
        self.work.mkdir(parents=True, exist_ok=True)
        self.topo = Topology(args.run_id, args.envoys)
        self.keygate = Path(args.keygate)
        self.keys = self.work / "keys.json"
        self.envoys: list[FleetEnvoy] = []
        self.cp: Optional[ControlPlane] = None
        self.extra_cp: list[ControlPlane] = []
        self.result: dict[str, Any] = {}
        self.checks: dict[str, bool] = {}
        self.created: dict[str, str] = {}

    # -- helpers -------------------------------------------------------------

    def cli(self, *a: str) -> str:
        out = subprocess.run([str(self.keygate), *a], capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise RuntimeError(f"keygate {a[0]} {a[1] if len(a) > 1 else ''}: {out.stderr.strip()}")
        return out.stdout.strip()

    def create(self, key_id: str) -> str:
        self.created[key_id] = self.cli("keys", "create", "--id", key_id, "--file", str(self.keys))
        return self.created[key_id]

    def revoke(self, key_id: str) -> None:
        self.cli("keys", "revoke", key_id, "--file", str(self.keys))

    def check(self, name: str, ok: bool, detail: Any = None) -> bool:
        self.checks[name] = bool(ok)
        say(f"{'ok  ' if ok else 'FAIL'} {name}" + (f" ({detail})" if detail is not None else ""))
        return ok

    def free_port(self, address: str) -> int:
        with socket.socket() as s:
            s.bind((address, 0))
            return s.getsockname()[1]

    def all_status(self, key: str, envoys: Optional[list[FleetEnvoy]] = None) -> list[int]:
        return [e.status(key) for e in (envoys or self.envoys)]

    # -- set-up and tear-down -----------------------------------------------

    def up(self) -> None:
        say(f"topology: {len(self.topo.nodes)} network namespaces on bridge {self.topo.bridge}, work dir {self.work}")
        self.topo.up()
        write_list(self.keys, self.args.filler_keys, "filler")
        self.create("good")
        port = self.free_port(self.topo.cp_address)
        self.cp = ControlPlane(self.keygate, self.keys, self.topo.cp_address, port, self.work).start()
        policies = ["serve"] * (len(self.topo.nodes) - 1) + ["fail_closed"]
        for node, policy in zip(self.topo.nodes, policies):
            cfg = plugin_config(policy, f"{POLL_S}s", f"{int(TIMEOUT_S * 1000)}ms", f"{MAX_STALENESS_S}s")
            self.envoys.append(
                FleetEnvoy(node, Path(self.args.envoy), Path(self.args.wasm), cfg, self.topo.cp_address, port, self.work, self.args.concurrency)
            )
        # Started one after the other: two cores compile three Wasm modules.
        for e in self.envoys:
            e.start()
        good = self.created["good"]
        if not wait(lambda: self.all_status(good) == [200] * len(self.envoys), timeout=30):
            raise RuntimeError(f"the fleet never accepted the first list: {self.all_status(good)}")
        self.result["topology"] = {
            "envoys": [{"name": e.node.name, "address": e.address, "stale_policy": e.config["control_plane"]["stale_policy"]} for e in self.envoys],
            "control_plane": f"{self.topo.cp_address}:{port}",
            "workers_per_envoy": self.args.concurrency,
            "poll_interval_s": POLL_S,
            "max_staleness_s": MAX_STALENESS_S,
            "list_keys": self.args.filler_keys,
            "keygate_cli": self.keygate.parent.name,
        }
        say(f"fleet up: {', '.join(f'{e.node.name}@{e.address}' for e in self.envoys)}, control plane {self.topo.cp_address}:{port}")

    def down(self) -> None:
        for e in self.envoys:
            e.stop()
        for cp in [self.cp, *self.extra_cp]:
            if cp is not None:
                cp.stop()
        removed = self.topo.down()
        say(f"torn down: {' '.join(removed) or 'nothing left'}")
        if self.args.keep:
            say(f"kept {self.work}")
        else:
            shutil.rmtree(self.work, ignore_errors=True)

    # -- propagation ----------------------------------------------------------

    def propagation(self, trials: int, per_envoy: int = 3) -> None:
        """Revoke a key with the CLI; the time until every connection to every
        Envoy (`per_envoy` each, so both workers) has seen 401."""
        ids = [f"trial-{i}" for i in range(trials)]
        for i in ids:
            self.create(i)
        for i in ids:
            if not wait(lambda: self.all_status(self.created[i]) == [200] * len(self.envoys), timeout=15):
                raise RuntimeError(f"{i} never accepted: {self.all_status(self.created[i])}")
        latencies: list[float] = []
        for n, key_id in enumerate(ids):
            key = self.created[key_id]
            started = threading.Event()
            t0 = [0.0]
            firsts: list[float] = []
            deadline = time.monotonic() + 15

            def watch(envoy: FleetEnvoy) -> None:
                conn = envoy.connect()
                try:
                    path = harness.unique_path("rev")
                    while time.monotonic() < deadline:
                        status = conn.request("GET", path, [harness.xkey(key)]).status
                        if started.is_set() and status == 401:
                            firsts.append(time.monotonic() - t0[0])
                            return
                        time.sleep(0.02)
                finally:
                    conn.close()

            threads = [threading.Thread(target=watch, args=(e,)) for e in self.envoys for _ in range(per_envoy)]
            for t in threads:
                t.start()
            # A random phase against the poll, so the trials sample the whole cycle.
            time.sleep(0.1 + random.random() * POLL_S)
            t0[0] = time.monotonic()
            started.set()
            self.revoke(key_id)
            for t in threads:
                t.join()
            if len(firsts) != len(threads):
                self.check("propagation_every_envoy_401", False, f"{key_id}: {len(firsts)}/{len(threads)} connections saw 401")
                return
            latencies.append(max(firsts))
            say(f"propagation trial {n + 1}/{trials}: {max(firsts):.3f} s")
        p50, p99 = statistics.median(latencies), percentile(latencies, 0.99)
        self.result["propagation"] = {
            "trials": trials,
            "p50_s": round(p50, 3),
            "p99_s": round(p99, 3),
            "max_s": round(max(latencies), 3),
            "goal_p99_le_2s": p99 <= 2.0,
        }
        self.check("propagation_every_envoy_401", True, f"p50 {p50:.3f} s, p99 {p99:.3f} s over {trials} trials")

    # -- partition -------------------------------------------------------------

    def sample(self, envoys: list[FleetEnvoy], keys: list[str], seconds: float, every: float = 0.2) -> dict[str, dict[int, int]]:
        """Status counts per Envoy over `seconds` (at least one round), for each of `keys` in turn."""
        counts: dict[str, dict[int, int]] = {e.node.name: {} for e in envoys}
        end = time.monotonic() + seconds
        while True:
            for e in envoys:
                for k in keys:
                    s = e.status(k)
                    counts[e.node.name][s] = counts[e.node.name].get(s, 0) + 1
            if time.monotonic() + every >= end:
                return counts
            time.sleep(every)

    def partition(self, victim: FleetEnvoy, hold: float) -> dict[str, Any]:
        """Cuts `victim` off the control plane, revokes a key meanwhile, holds
        for `hold` seconds, reconnects, and reports what each side saw."""
        policy = victim.config["control_plane"]["stale_policy"]
        others = [e for e in self.envoys if e is not victim]
        good = self.created["good"]
        moved_id = f"partition-{victim.node.name}"
        moved = self.create(moved_id)
        if not wait(lambda: self.all_status(moved) == [200] * len(self.envoys), timeout=10):
            raise RuntimeError(f"{moved_id} never accepted")
        failed_before = victim.stat("keygate.control_plane.fetch_failed")
        self.topo.cut(victim.node)
        cut_at = time.monotonic()
        say(f"partition: {victim.node.name} ({policy}) cut off the control plane")
        out: dict[str, Any] = {"envoy": victim.node.name, "stale_policy": policy}
        try:
            self.revoke(moved_id)
            gauge_first = victim.stat("keygate.control_plane.seconds_since_last_good_fetch")
            # Until max_staleness (less a poll and a timeout of margin: the
            # last good fetch may be that much older than the cut), the last
            # good list: the key revoked after the cut still works there.
            before = MAX_STALENESS_S - POLL_S - TIMEOUT_S - 0.5 - (time.monotonic() - cut_at)
            seen_before = self.sample([victim], [good, moved], before)[victim.node.name]
            out["victim_statuses_before_max_staleness"] = seen_before
            others_got_it = wait(lambda: self.all_status(moved, others) == [401] * len(others), timeout=ONE_POLL_S + 1)
            out["others_applied_change_s"] = round(time.monotonic() - cut_at, 3)
            others_seen = self.sample(others, [good], 0.4)
            first_503: Optional[float] = None
            if policy == "fail_closed":
                if wait(lambda: victim.status(good) == 503, timeout=MAX_STALENESS_S + 2 * ONE_POLL_S):
                    first_503 = time.monotonic() - cut_at
                    # Each worker judges staleness at its own tick (a quarter
                    # of the poll): the other may pass requests that long more.
                    time.sleep(TICK_S + 0.1)
            rest = max(0.0, hold - (time.monotonic() - cut_at))
            seen_after = self.sample([victim], [good], rest)[victim.node.name]
            out["victim_statuses_after_max_staleness"] = seen_after
            gauge_last = victim.stat("keygate.control_plane.seconds_since_last_good_fetch")
            failed_during = victim.stat("keygate.control_plane.fetch_failed") - failed_before
            for name, c in self.sample(others, [good], 0.4).items():
                for s, k in c.items():
                    others_seen[name][s] = others_seen[name].get(s, 0) + k
        finally:
            self.topo.reconnect(victim.node)
        back_at = time.monotonic()
        caught_up = wait(lambda: victim.status(moved) == 401 and victim.status(good) == 200, timeout=ONE_POLL_S + 3, interval=0.02)
        catch_up_s = time.monotonic() - back_at
        gauge_after = victim.stat("keygate.control_plane.seconds_since_last_good_fetch")
        out.update(
            held_s=round(back_at - cut_at, 2),
            seconds_since_last_good_fetch={"early": gauge_first, "late": gauge_last, "after_reconnect": gauge_after},
            fetch_failed_during=failed_during,
            first_503_after_s=None if first_503 is None else round(first_503, 2),
            catch_up_s=round(catch_up_s, 3) if caught_up else None,
            others_statuses=others_seen,
        )
        n = victim.node.name
        self.check(f"partition_{n}_others_applied_change", others_got_it, out["others_applied_change_s"])
        self.check(f"partition_{n}_serves_last_good_list", set(seen_before) == {200}, seen_before)
        self.check(f"partition_{n}_staleness_gauge_grows", gauge_last >= gauge_first + 2 and gauge_last >= hold - POLL_S - 1, (gauge_first, gauge_last))
        self.check(f"partition_{n}_fetches_fail", failed_during > 0, failed_during)
        if policy == "fail_closed":
            in_time = first_503 is not None and MAX_STALENESS_S - POLL_S - TICK_S <= first_503 <= MAX_STALENESS_S + ONE_POLL_S
            self.check(f"partition_{n}_fail_closed_503_after_max_staleness", in_time, first_503)
            self.check(f"partition_{n}_fail_closed_stays_503", set(seen_after) <= {503}, seen_after)
        else:
            self.check(f"partition_{n}_serve_keeps_200_past_max_staleness", set(seen_after) == {200}, seen_after)
        self.check(f"partition_{n}_catches_up_within_one_poll", caught_up and catch_up_s <= ONE_POLL_S, round(catch_up_s, 3))
        self.check(f"partition_{n}_others_unaffected", all(set(c) == {200} for c in others_seen.values()), others_seen)
        return out

    # -- control-plane restart ------------------------------------------------

    def restart_under_traffic(self, seconds: float, rps_per_connection: int = 25) -> None:
        good = self.created["good"]
        statuses: dict[str, dict[str, int]] = {e.node.name: {} for e in self.envoys}
        lock = threading.Lock()
        end = time.monotonic() + seconds

        def traffic(e: FleetEnvoy) -> None:
            conn = e.connect()
            try:
                path = harness.unique_path("restart")
                while time.monotonic() < end:
                    try:
                        s = str(conn.request("GET", path, [harness.xkey(good)]).status)
                    except OSError as err:
                        s = f"error:{type(err).__name__}"
                        conn = e.connect()
                    with lock:
                        statuses[e.node.name][s] = statuses[e.node.name].get(s, 0) + 1
                    time.sleep(1.0 / rps_per_connection)
            finally:
                conn.close()

        # Two connections per Envoy, so that both workers serve traffic.
        threads = [threading.Thread(target=traffic, args=(e,)) for e in self.envoys for _ in range(2)]
        for t in threads:
            t.start()
        assert self.cp is not None
        time.sleep(min(1.5, seconds / 4))
        failed_before = sum(e.stat("keygate.control_plane.fetch_failed") for e in self.envoys)
        t0 = time.monotonic()
        self.cp.stop()
        stopped = time.monotonic()
        # Down for a poll interval, as a restarted container or host would
        # be, so that every Envoy has polls fail meanwhile.
        time.sleep(POLL_S)
        self.cp.start()
        down_s = time.monotonic() - stopped
        say(f"restart: control plane down {down_s:.2f} s (stop took {stopped - t0:.2f} s)")
        for t in threads:
            t.join()
        failed = sum(e.stat("keygate.control_plane.fetch_failed") for e in self.envoys) - failed_before
        total = sum(sum(c.values()) for c in statuses.values())
        refused = sum(n for c in statuses.values() for s, n in c.items() if s != "200")
        # The restarted control plane is in use: a change made now reaches all.
        key = self.create("after-restart")
        took = wait(lambda: self.all_status(key) == [200] * len(self.envoys), timeout=ONE_POLL_S + 2)
        self.result["restart"] = {
            "requests": total,
            "non_200": refused,
            "control_plane_down_s": round(down_s, 2),
            "fetch_failed_during": failed,
            "statuses": statuses,
        }
        self.check("restart_fetches_failed_meanwhile", failed > 0, failed)
        self.check("restart_no_request_refused", refused == 0 and total > 0, f"{refused} of {total}")
        self.check("restart_new_control_plane_serves_changes", took)

    # -- bytes per change -------------------------------------------------------

    def bytes_per_change(self, window: float) -> None:
        """Bytes the control-plane cluster of each Envoy received in `window`
        after a key change, less the same window without one (the 304s)."""
        rx = "cluster.keygate_control_plane.upstream_cx_rx_bytes_total"
        key_id = "bytes-probe"
        self.create(key_id)
        wait(lambda: self.all_status(self.created[key_id]) == [200] * len(self.envoys), timeout=10)
        time.sleep(POLL_S)
        a = [e.stat(rx) for e in self.envoys]
        time.sleep(window)
        b = [e.stat(rx) for e in self.envoys]
        self.revoke(key_id)
        time.sleep(window)
        c = [e.stat(rx) for e in self.envoys]
        per_envoy = [(c[i] - b[i]) - (b[i] - a[i]) for i in range(len(a))]
        body = self.list_body(self.topo.cp_address, self.cp.port if self.cp else 0)
        # A cheaper form (not implemented): only what changed since the
        # version an Envoy holds, here the one revoked record.
        listed = json.loads(self.keys.read_text())
        record = next(k for k in listed["keys"] if k["id"] == key_id)
        delta = {"version": listed["version"], "since": listed["version"] - 1, "changed": [record], "removed": []}
        self.result["bytes_per_change"] = {
            "list_keys": self.args.filler_keys + len(self.created),
            "list_body_bytes": len(body),
            "per_envoy": per_envoy,
            "fleet_total": sum(per_envoy),
            "envoys": len(self.envoys),
            "delta_body_bytes": len(json.dumps(delta, separators=(",", ":"))),
        }
        self.check("bytes_per_change_measured", all(p > 0 for p in per_envoy), per_envoy)

    @staticmethod
    def list_body(address: str, port: int, path: str = "/v1/keys") -> bytes:
        conn = harness.RawConnection(port, host=address, timeout=30)
        try:
            return conn.request("GET", path, []).body
        finally:
            conn.close()

    # -- control-plane cost ------------------------------------------------------

    def cost(self, seconds: int, rate: int, clients: int, keys: int) -> None:
        """`keygate serve` of a `keys`-key list answering `rate` polls per
        second with the list's ETag (304s) from h2load; its CPU from /proc."""
        big = self.work / "big.json"
        write_list(big, keys, "k")
        port = self.free_port(self.topo.host_address)
        cp = ControlPlane(self.keygate, big, self.topo.host_address, port, self.work)
        self.extra_cp.append(cp)
        cp.start()
        try:
            conn = harness.RawConnection(port, host=self.topo.host_address, timeout=30)
            first = conn.request("GET", "/v1/keys", [])
            etag = first.header("etag") or ""
            pages = [first.body]
            nxt = json.loads(first.body).get("next")
            while nxt:
                r = conn.request("GET", nxt, [("if-match", etag)])
                pages.append(r.body)
                nxt = json.loads(r.body).get("next")
            conn.close()
            whole = b"".join(pages)
            # h2load's clients poll in step (every client's timer starts at
            # once), so a single h2load sends its clients' polls in one burst.
            # Envoys poll at random phases: `procs` h2loads, started a
            # fraction of a period apart, spread the polls over the period.
            procs = 20
            warmup = 2
            per_client = max(1, rate // clients)
            period = 1.0 / per_client
            logs = [self.work / f"h2load-{i}.log" for i in range(procs)]
            cmds = [
                [
                    "h2load", "--h1", "-t", "1", "-c", str(clients // procs), "--rps", str(per_client),
                    "-D", f"{seconds + warmup}s", "-H", f"if-none-match: {etag}", "--log-file", str(log),
                    f"http://{self.topo.host_address}:{port}/v1/keys",
                ]
                for log in logs
            ]  # fmt: skip
            # The fleet's Envoys are not part of this: stopped, for a quieter machine.
            for e in self.envoys:
                e.stop()
            load_before = os.getloadavg()[0]
            t0, epoch0 = time.monotonic(), time.time()
            running = []
            for i, cmd in enumerate(cmds):
                time.sleep(max(0.0, t0 + i * period / procs - time.monotonic()))
                running.append(harness.spawn(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
            # Measured: from the end of the warm-up (every connection made,
            # every h2load started) for `seconds`.
            time.sleep(max(0.0, t0 + warmup - time.monotonic()))
            cpu0, m0 = cp.cpu_seconds(), time.monotonic()
            time.sleep(max(0.0, m0 + seconds - 0.5 - time.monotonic()))
            cpu1, m1 = cp.cpu_seconds(), time.monotonic()
            outs = [(p.communicate(timeout=seconds + warmup + 60), p.returncode) for p in running]
            for (_, err), rc in outs:
                if rc != 0:
                    raise RuntimeError(f"h2load failed: {err[-1000:]}")
            measured_from_us = (epoch0 + warmup) * 1e6
            lat_us, codes, starts = [], {}, []
            # Where the slow polls (over 5 ms) come from: per 100 ms window
            # holding any, how many of the h2load processes had one. A stall
            # of the server slows the polls of every process in flight; a
            # stall of one load generator, only its own.
            slow_by_window: dict[int, set[int]] = {}
            for i, log in enumerate(logs):
                for line in log.read_text().splitlines():
                    parts = line.split("\t")
                    if len(parts) >= 3 and int(parts[0]) >= measured_from_us:
                        codes[parts[1]] = codes.get(parts[1], 0) + 1
                        lat_us.append(int(parts[2]))
                        starts.append(int(parts[0]))
                        if int(parts[2]) > 5000:
                            slow_by_window.setdefault(int(parts[0]) // 100_000, set()).add(i)
            spread = sorted(len(v) for v in slow_by_window.values())
            n = len(lat_us)
            cores = (cpu1 - cpu0) / (m1 - m0)
            p99_ms = percentile([u / 1000 for u in lat_us], 0.99) if lat_us else None
            self.result["control_plane_cost"] = {
                "keys": keys,
                "pages": len(pages),
                "list_bytes": len(whole),
                "list_bytes_gzip": len(gzip.compress(whole, 6)),
                "polls": n,
                "polls_per_s": round(n / max(1e-6, (max(starts) - min(starts)) / 1e6), 1) if starts else 0,
                "clients": clients,
                "h2load_processes": procs,
                "load_average_1m_before": round(load_before, 2),
                "warm_up_s": warmup,
                "seconds": round(m1 - m0, 2),
                "statuses": codes,
                "cpu_cores": round(cores, 4),
                "p50_ms": round(statistics.median(lat_us) / 1000, 3) if lat_us else None,
                "p99_ms": None if p99_ms is None else round(p99_ms, 3),
                "slow_polls_over_5ms": sum(1 for u in lat_us if u > 5000),
                "slow_windows_100ms": len(spread),
                "h2load_processes_slow_per_window": {"median": spread[len(spread) // 2], "max": spread[-1]} if spread else None,
                "goal_cpu_le_0_25_core": cores <= 0.25,
                "goal_p99_le_5ms": p99_ms is not None and p99_ms <= 5.0,
            }
            say(f"cost: {n} polls in {seconds} s, {cores:.3f} cores, p99 {p99_ms} ms, statuses {codes}")
            self.check("cost_all_polls_304", n > 0 and set(codes) == {"304"}, codes)
        finally:
            cp.stop()

    # -- fleet-wide limits (another script) ----------------------------------------

    def fleet_limits(self) -> None:
        fields = LIMIT_FIELDS
        script = self.args.limit_script
        if not script or not Path(script).exists():
            self.result.update({f: None for f in fields})
            self.result["fleet_limit_reason"] = f"no fleet-limit measurement in this tree ({script or 'none given'})"
            return
        cmd = ["bash", script] + (["--quick"] if self.quick else [])
        say(f"fleet limits: {' '.join(cmd)}")
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
        sys.stderr.write(out.stderr[-4000:])
        last = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
        try:
            measured = json.loads(last)
        except json.JSONDecodeError:
            measured = None
        if out.returncode != 0 or not isinstance(measured, dict):
            self.result.update({f: None for f in fields})
            self.result["fleet_limit_reason"] = f"{script} failed (exit {out.returncode})"
            self.check("fleet_limits_ran", False, out.returncode)
            return
        self.result["fleet_limits"] = measured
        self.result.update({f: measured.get(f) for f in fields})
        self.check("fleet_limits_ran", True)


def run(args: argparse.Namespace) -> int:
    fleet = Fleet(args)
    quick = args.quick
    started = time.monotonic()

    def on_term(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    error: Optional[str] = None
    try:
        fleet.up()
        steps: list[tuple[str, Callable[[], Any]]] = [
            ("propagation", lambda: fleet.propagation(5 if quick else 20)),
            ("partition", lambda: fleet.result.update(partition=[
                fleet.partition(fleet.envoys[0], MAX_STALENESS_S + 2), fleet.partition(fleet.envoys[-1], MAX_STALENESS_S + 2)
            ])),
            ("restart", lambda: fleet.restart_under_traffic(6 if quick else 10)),
            ("bytes", lambda: fleet.bytes_per_change(2.0 if quick else 3.0)),
            ("cost", lambda: fleet.cost(5 if quick else 20, 1000, 200, 100_000)),
        ]  # fmt: skip
        for name, step in steps:
            if args.steps and name not in args.steps.split(","):
                continue
            say(f"--- {name}")
            step()
    except KeyboardInterrupt as e:
        error = f"interrupted ({e})"
    except Exception as e:  # noqa: BLE001 - reported in the JSON line, then exit 1
        error = f"{type(e).__name__}: {e}"
        say(f"error: {error}")
    finally:
        fleet.down()
    if error is None:
        fleet.fleet_limits()
    else:
        fleet.result.update({f: None for f in LIMIT_FIELDS}, fleet_limit_reason="not run: the fleet run failed first")
    r = fleet.result
    prop, costs = r.get("propagation", {}), r.get("control_plane_cost", {})
    line = {
        "quick": quick,
        "propagation_p50_s": prop.get("p50_s"),
        "propagation_p99_s": prop.get("p99_s"),
        "partition_ok": all(v for k, v in fleet.checks.items() if k.startswith("partition_")) if "partition" in r else None,
        "restart_non_200": r.get("restart", {}).get("non_200"),
        "control_plane_cpu_cores": costs.get("cpu_cores"),
        "control_plane_p99_ms": costs.get("p99_ms"),
        "bytes_per_change_fleet": r.get("bytes_per_change", {}).get("fleet_total"),
        "bytes_per_change_per_envoy": max(r["bytes_per_change"]["per_envoy"]) if "bytes_per_change" in r else None,
        "list_bytes_100k_keys": costs.get("list_bytes"),
        **{k: r.get(k) for k in LIMIT_FIELDS},
        **({"fleet_limit_reason": r["fleet_limit_reason"]} if "fleet_limit_reason" in r else {}),
        "goals": {
            "propagation_p99_le_2s": prop.get("goal_p99_le_2s"),
            "control_plane_cpu_le_0_25_core": costs.get("goal_cpu_le_0_25_core"),
            "control_plane_p99_le_5ms": costs.get("goal_p99_le_5ms"),
        },
        "checks": fleet.checks,
        "behaviour_ok": error is None and bool(fleet.checks) and all(fleet.checks.values()),
        "error": error,
        "seconds": round(time.monotonic() - started, 1),
        "details": r,
    }
    print(json.dumps(line, separators=(",", ":")), flush=True)
    return 0 if line["behaviour_ok"] else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the short version (CI)")
    p.add_argument("--run-id", default=f"{random.randrange(16**4):04x}", help="names the namespaces and links (hex, ≤ 6)")
    p.add_argument("--teardown", action="store_true", help="only remove what run --run-id left behind")
    p.add_argument("--keygate", help="the keygate CLI binary")
    p.add_argument("--envoy", default=None, help="Envoy binary (default: the one in .venv)")
    p.add_argument("--wasm", default=str(harness.DEFAULT_WASM))
    p.add_argument("--envoys", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=2, help="workers per Envoy")
    p.add_argument("--filler-keys", type=int, default=1000, help="keys in the fleet's list besides the test's own")
    p.add_argument("--limit-script", default=None, help="fleet-limit measurement to run and merge, if it exists")
    p.add_argument("--steps", default="", help="only these steps, comma-separated: propagation,partition,restart,bytes,cost")
    p.add_argument("--workdir", default=None, help="work directory (default: a new one under the temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, configurations)")
    args = p.parse_args()
    if args.teardown:
        say(f"removed: {' '.join(teardown(args.run_id)) or 'nothing'}")
        return 0
    if not args.keygate:
        p.error("--keygate is required")
    if args.envoys < 3:
        p.error("a fleet is at least three Envoys")
    args.envoy = args.envoy or str(harness.envoy_binary())
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
