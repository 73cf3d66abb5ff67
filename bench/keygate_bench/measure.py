"""The interleaved measurement: cells, settings and the runner that samples each cell once per round."""

from __future__ import annotations

import dataclasses
import time
from typing import Optional

from .children import LOADGEN_CORE, run_measured
from .envoys import Envoy
from .loadgen import parse_h2load, parse_wrk
from .procfs import CLK_TCK, proc_cpu_ticks, steal_ticks, system_busy_ticks


@dataclasses.dataclass(frozen=True)
class Cell:
    config: str  # Envoy under test
    route: str  # direct | proxy
    path: str  # allowed | 401 | 429
    kind: str  # h1 (wrk, many connections) | h2 (h2load) | c1 (wrk, one connection)

    @property
    def label(self) -> str:
        return f"{self.config}/{self.route}/{self.path}/{self.kind}"


@dataclasses.dataclass
class Settings:
    quick: bool
    rounds: int
    duration_s: int  # wrk/h2load main duration
    c1_duration_s: int
    warmup: str  # h2load -D value for warm-ups (h2load wants a unit: 200ms)
    connections: int
    h2_connections: int
    h2_streams: int
    busy_threshold_pct: float
    retries: int


class Bench:
    def __init__(self, s: Settings, envoys: dict[str, Envoy], upstream: Optional[Envoy], keys: dict[str, Optional[str]], wrk: str, h2load: str):
        self.s = s
        self.envoys = envoys
        self.upstream = upstream
        self.keys = keys  # path -> x-api-key value (None: no header)
        self.wrk = wrk
        self.h2load = h2load
        self.dropped = 0
        self.samples: dict[Cell, list[dict]] = {}
        self.extra_headers: list[tuple[str, str]] = []

    def our_ticks(self) -> int:
        # A set: with compare.py --shared-envoy, several builds are one process.
        pids = {e.pid for e in self.envoys.values()} | ({self.upstream.pid} if self.upstream else set())
        return sum(proc_cpu_ticks(p) for p in pids)

    def _headers(self, path: str) -> list[str]:
        key = self.keys[path]
        extra = [h for name, value in self.extra_headers for h in ("-H", f"{name}: {value}")]
        return (["-H", f"x-api-key: {key}"] if key is not None else []) + extra

    def warmup(self, cell: Cell, url: str) -> None:
        cmd = ["taskset", "-c", LOADGEN_CORE, self.h2load, "-t1", "-D", self.s.warmup]
        if cell.kind == "h2":
            cmd += ["-c", str(self.s.h2_connections), "-m", str(self.s.h2_streams)]
        else:
            cmd += ["--h1", "-c", "1" if cell.kind == "c1" else str(self.s.connections)]
        out, _, _ = run_measured(cmd + self._headers(cell.path) + [url], timeout=60)
        if "finished in" not in out:
            raise RuntimeError(f"warm-up failed for {cell.label}:\n{out[-2000:]}")

    def sample(self, cell: Cell) -> dict:
        env = self.envoys[cell.config]
        url = f"http://127.0.0.1:{env.port}/{cell.route}"
        self.warmup(cell, url)
        if cell.kind == "h2":
            cmd = [
                "taskset", "-c", LOADGEN_CORE, self.h2load, "-t1",
                "-c", str(self.s.h2_connections), "-m", str(self.s.h2_streams),
                "-D", str(self.s.duration_s),
            ]  # fmt: skip
            parse = parse_h2load
        else:
            c = 1 if cell.kind == "c1" else self.s.connections
            d = self.s.c1_duration_s if cell.kind == "c1" else self.s.duration_s
            cmd = ["taskset", "-c", LOADGEN_CORE, self.wrk, "-t1", f"-c{c}", f"-d{d}s", "--latency"]
            parse = parse_wrk
        cmd += self._headers(cell.path) + [url]
        st0 = env.stats(r"^http\.ingress\.downstream_(cx_total|rq_[245]xx)$")
        steal0, sys0, ours0, env0 = steal_ticks(), system_busy_ticks(), self.our_ticks(), proc_cpu_ticks(env.pid)
        out, lg_ticks, wall = run_measured(cmd, timeout=60 + 3 * self.s.duration_s)
        steal1, sys1, ours1, env1 = steal_ticks(), system_busy_ticks(), self.our_ticks(), proc_cpu_ticks(env.pid)
        st1 = env.stats(r"^http\.ingress\.downstream_(cx_total|rq_[245]xx)$")
        r = parse(out)
        env_ticks = env1 - env0
        other_ticks = (sys1 - sys0) - (ours1 - ours0) - lg_ticks
        r.update(
            wall_s=wall,
            envoy_cpu_pct=100.0 * env_ticks / CLK_TCK / wall,
            loadgen_cpu_pct=100.0 * lg_ticks / CLK_TCK / wall,
            other_cpu_pct=100.0 * max(other_ticks, 0) / CLK_TCK / wall,
            other_cpu_pct_signed=100.0 * other_ticks / CLK_TCK / wall,
            steal_pct=100.0 * (steal1 - steal0) / CLK_TCK / wall,
            us_per_req=(env_ticks / CLK_TCK * 1e6 / r["requests"]) if r["requests"] else None,
            new_connections=st1.get("http.ingress.downstream_cx_total", 0) - st0.get("http.ingress.downstream_cx_total", 0),
            rq_2xx=st1.get("http.ingress.downstream_rq_2xx", 0) - st0.get("http.ingress.downstream_rq_2xx", 0),
            rq_4xx=st1.get("http.ingress.downstream_rq_4xx", 0) - st0.get("http.ingress.downstream_rq_4xx", 0),
            rq_5xx=st1.get("http.ingress.downstream_rq_5xx", 0) - st0.get("http.ingress.downstream_rq_5xx", 0),
        )
        r["busy"] = r["other_cpu_pct"] > self.s.busy_threshold_pct
        return r

    def prime(self, duration: str) -> None:
        """Load every Envoy once before round 1 (V8 tier-up of the wasm
        code, upstream connection pools), so that the first sample of a
        configuration is not its first traffic."""
        for name, env in self.envoys.items():
            for route in ("direct", "proxy"):
                cmd = ["taskset", "-c", LOADGEN_CORE, self.h2load, "-t1", "--h1", "-c", str(self.s.connections), "-D", duration]
                out, _, _ = run_measured(cmd + self._headers("allowed") + [f"http://127.0.0.1:{env.port}/{route}"], timeout=60)
                if "finished in" not in out:
                    raise RuntimeError(f"priming {name} failed:\n{out[-2000:]}")

    def run(self, cells: list[Cell], first: int = 0, count: Optional[int] = None) -> None:
        """Rounds `first` to `first + count` (default: all of them) of the
        interleaved run; the order rotates by the round's number, so a run
        split into blocks (fresh Envoys for each) rotates as one would."""
        n = len(cells)
        step = max(1, n // self.s.rounds)
        t_start = time.monotonic()
        last = self.s.rounds if count is None else min(self.s.rounds, first + count)
        for rnd in range(first, last):
            order = cells[(rnd * step) % n :] + cells[: (rnd * step) % n]
            for i, cell in enumerate(order):
                for attempt in range(self.s.retries + 1):
                    r = self.sample(cell)
                    r["round"] = rnd
                    if r["busy"]:
                        self.dropped += 1
                    self.samples.setdefault(cell, []).append(r)
                    if not r["busy"]:
                        break
                    time.sleep(0.5)
                flag = " BUSY(dropped)" if r["busy"] else ""
                us = f"{r['us_per_req']:.1f}" if r["us_per_req"] is not None else "-"
                print(
                    f"  [{rnd + 1}/{self.s.rounds} {i + 1:2d}/{n}] {cell.label:38s} "
                    f"{r['rps']:9.0f} rps  {us:>6s} us/req  envoy {r['envoy_cpu_pct']:5.1f}%  "
                    f"loadgen {r['loadgen_cpu_pct']:5.1f}%  other {r['other_cpu_pct']:5.1f}%  steal {r['steal_pct']:4.1f}%{flag}",
                    flush=True,
                )
        print(f"  measured in {time.monotonic() - t_start:.0f}s, {self.dropped} sample(s) dropped as busy", flush=True)
