"""Measured claim: device frames in -> dashboard telemetry out, gateway against bridge + Mosquitto.

Run ``.venv/bin/python -m benchmarks.e2e`` (``--quick`` for a smoke run). For
each scenario (D device connections at R Hz each, S dashboards subscribed to
all) it starts the system under test, then the dashboards process, then the
load generator process(es), all on 127.0.0.1, and measures over a window after
a warm-up:

* delivered telemetry per second (every dashboard counts), and what was lost;
* latency from the device's send (the time inside the env-sensor body, see
  ``benchmarks.stamp``) to the dashboard's receive: p50 / p99 / p99.9;
* CPU seconds per delivered message of the server side (``/proc/PID/stat``
  utime + stime of every thread: the gateway; or the bridge plus Mosquitto);
* RSS before any connection, once connected, and at the end.

Systems: ``gateway`` (``iot-gateway serve``, the project) and ``bridge``
(``benchmarks.bridge`` publishing to our own Mosquitto on a free port), each
on ``uvloop`` and on asyncio's own loop. Then a search for the highest input
rate (D=1,000, S=1) whose p99 stays under 50 ms with nothing lost.

Figures go to the terminal and to ``benchmarks/results/e2e.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks import harness
from benchmarks.harness import Child, Server
from tests.support.gateway import GatewayProcess


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    devices: int
    rate: float  # Hz per device
    dashboards: int

    @property
    def offered(self) -> float:
        """Device frames per second in."""
        return self.devices * self.rate


SCENARIOS = [
    Scenario("D=1000 R=10 S=1", 1000, 10.0, 1),
    Scenario("D=10000 R=1 S=1", 10_000, 1.0, 1),
    Scenario("D=100 R=10 S=50", 100, 10.0, 50),
]
QUICK_SCENARIOS = [
    Scenario("D=1000 R=10 S=1", 1000, 10.0, 1),
    Scenario("D=2000 R=1 S=1", 2000, 1.0, 1),
    Scenario("D=100 R=10 S=10", 100, 10.0, 10),
]
P99_TARGET_MS = 50.0


@dataclass(slots=True)
class Timing:
    warmup: float
    measure: float
    tail: float = 0.5  # sending goes on this long after the window
    drain: float = 1.5  # dashboards keep reading this long after sending stops


async def start_system(
    system: str, loop: str, workdir: Path, config: Mapping[str, Any] | None = None
) -> Server:
    if system == "gateway":
        return await harness.start_gateway(
            workdir, loop=loop, config=config or harness.bench_gateway_config()
        )
    return await harness.start_bridge(workdir, loop=loop)


async def _spawn_dashboards(
    server: Server, count: int, stalled: int, lat_file: Path, workdir: Path
) -> Child:
    if server.http is not None:
        target = f"{server.http[0]}:{server.http[1]}"
        mode = ["--mode", "ws", "--server", target, "--token", server.token]
    else:
        target = f"127.0.0.1:{harness.mosquitto_port(server.extra[0])}"
        mode = ["--mode", "mqtt", "--server", target]
    dash = await harness.spawn(
        "dashboards",
        harness.module(
            "dashboards",
            *mode,
            "--count",
            count,
            "--stalled",
            stalled,
            "--latency-file",
            lat_file,
            "--go-stdin",
        ),
        workdir,
        stdin=True,
    )
    await dash.event("ready", 120)
    return dash


async def _spawn_loadgens(
    server: Server,
    devices: int,
    rate: float,
    procs: int,
    ping_interval: float,
    linger: float,
    workdir: Path,
) -> tuple[list[Child], int]:
    procs = max(1, min(procs, devices))
    gens: list[Child] = []
    for i in range(procs):
        n = devices // procs + (1 if i < devices % procs else 0)
        gens.append(
            await harness.spawn(
                f"loadgen-{i}",
                harness.module(
                    "loadgen",
                    "--gateway",
                    f"{server.devices[0]}:{server.devices[1]}",
                    "--devices",
                    n,
                    "--rate",
                    rate,
                    "--ping-interval",
                    ping_interval,
                    "--prefix",
                    f"p{i}",
                    "--seed",
                    i + 1,
                    "--linger",
                    linger,
                    "--go-stdin",
                ),
                workdir,
                stdin=True,
            )
        )
    welcomed = 0
    for g in gens:
        ready = await g.event("ready", 300)
        welcomed += int(ready["welcomed"])
    return gens, welcomed


async def scrape(server: Server) -> dict[str, float]:
    """The gateway's /metrics, as {"name{labels}": value} (empty for the bridge)."""
    if not isinstance(server.process, GatewayProcess):
        return {}
    return (await server.process.metrics()).flat()


async def run_once(
    system: str,
    loop: str,
    sc: Scenario,
    timing: Timing,
    workdir: Path,
    *,
    loadgen_procs: int = 1,
    config: Mapping[str, Any] | None = None,
    ping_interval: float = 0.0,
    dashboards_after_devices: bool = False,
    stalled: int = 0,
) -> dict[str, Any]:
    """One scenario against one system; every process is stopped before this returns.

    Order: the server, then the dashboards (or the devices first when
    ``dashboards_after_devices``), a warm-up, the measuring window, a drain.
    """
    server = await start_system(system, loop, workdir, config)
    children: list[Child] = []
    lat_file = workdir / "latencies.bin"
    try:
        await asyncio.sleep(0.5)  # let start-up settle before the baseline
        base = harness.sample_all(server.pids)
        dash: Child | None = None
        if not dashboards_after_devices:
            dash = await _spawn_dashboards(server, sc.dashboards, stalled, lat_file, workdir)
            children.append(dash)
        gens, welcomed = await _spawn_loadgens(
            server, sc.devices, sc.rate, loadgen_procs, ping_interval, timing.drain, workdir
        )
        children.extend(gens)
        devices_connected = harness.sample_all(server.pids)
        if dash is None:
            dash = await _spawn_dashboards(server, sc.dashboards, stalled, lat_file, workdir)
            children.append(dash)
        connected = harness.sample_all(server.pids)

        start_at = time.time() + 0.5
        w0 = start_at + timing.warmup
        w1 = w0 + timing.measure
        end_at = w1 + timing.tail
        plan = {
            "start_at": start_at,
            "end_at": end_at,
            "window_start": w0,
            "window_end": w1,
            "stop_at": end_at + timing.drain,
        }
        for c in children:
            await c.send(plan)
        client_pids = [c.pid for c in children]
        await asyncio.sleep(max(0.0, w0 - time.time()))
        everyone_before = harness.all_cpu()
        before = harness.sample_all(server.pids)
        clients_before = harness.sample_all(client_pids)
        rss_series: list[tuple[float, int]] = []
        while time.time() < w1:
            await asyncio.sleep(min(0.5, max(0.0, w1 - time.time())))
            now = harness.sample_all(server.pids)
            rss_series.append((round(time.time() - w0, 2), sum(x.rss for x in now.values())))
        after = harness.sample_all(server.pids)
        clients_after = harness.sample_all(client_pids)
        everyone_after = harness.all_cpu()
        metrics = await scrape(server)
        window = after[server.process.pid].at - before[server.process.pid].at

        done = [await g.event("done", 60 + timing.drain) for g in gens]
        dash_done = await dash.event("done", 60)
        for c in children:
            await c.wait(30)
        latencies = harness.read_latencies([lat_file])
    finally:
        for c in children:
            await c.stop(5)
        await server.stop()

    sent_in_window = sum(d["sent_in_window"] for d in done)
    delivered = int(dash_done["in_window"])
    expected = sent_in_window * sc.dashboards
    server_cpu = harness.cpu_between(before, after)
    per_process_cpu = {
        name: after[pid].cpu - before[pid].cpu
        for name, pid in zip(
            [server.process.name, *(c.name for c in server.extra)], server.pids, strict=True
        )
    }
    others = harness.others_cpu(everyone_before, everyone_after, [*server.pids, *client_pids])
    rss_base = sum(x.rss for x in base.values())
    rss_devices = sum(x.rss for x in devices_connected.values())
    rss_connected = sum(x.rss for x in connected.values())
    rss_end = sum(x.rss for x in after.values())
    connections = welcomed + sc.dashboards + stalled
    return {
        "system": system,
        "loop": loop,
        "scenario": asdict(sc),
        "offered_fps": sc.offered,
        "window_s": window,
        "devices_connected": welcomed,
        "frames_in_per_s": sent_in_window / timing.measure,
        "delivered": delivered,
        "expected": expected,
        "lost": expected - delivered,
        "delivered_per_s": delivered / timing.measure,
        "latency": harness.latency_summary(latencies),
        "server_cpu_s": server_cpu,
        "server_cpu_per_s": server_cpu / window,
        "server_cpu_by_process": per_process_cpu,
        "cpu_us_per_delivered": (server_cpu / delivered * 1e6) if delivered else math.nan,
        "cpu_us_per_frame_in": (server_cpu / sent_in_window * 1e6) if sent_in_window else math.nan,
        "rss_base": rss_base,
        "rss_devices_connected": rss_devices,
        "rss_connected": rss_connected,
        "rss_end": rss_end,
        "rss_peak_in_window": max((r for _, r in rss_series), default=rss_end),
        "rss_series": rss_series,
        "rss_per_connection": (rss_connected - rss_base) / connections if connections else 0,
        "rss_per_device": (rss_devices - rss_base) / welcomed if welcomed else 0,
        # CPU of every other process on the machine (other users' work): the
        # noise under this run's figures, a lower bound.
        "other_cores": others / window,
        "client_cpu_per_s": {
            c.name: (clients_after[c.pid].cpu - clients_before[c.pid].cpu) / window
            for c in children
        },
        "metrics": {
            k: v
            for k, v in metrics.items()
            if k.startswith(("iot_telemetry", "iot_slow", "iot_refused", "iot_frames_in"))
        },
        "loadgen": done,
        "dashboards": dash_done,
    }


async def quiet_run(
    system: str,
    loop: str,
    sc: Scenario,
    timing: Timing,
    workdir: Path,
    *,
    loadgen_procs: int,
    attempts: int,
    max_noise: float,
    **options: Any,
) -> dict[str, Any]:
    """``run_once``, again (up to ``attempts``) while other processes used > ``max_noise`` cores.

    The machine is shared: what others run in the same seconds lands in our
    latencies. The quietest attempt is kept, with its noise figure.
    """
    tried: list[dict[str, Any]] = []
    for attempt in range(attempts):
        run = await run_once(
            system,
            loop,
            sc,
            timing,
            workdir / f"a{attempt}",
            loadgen_procs=loadgen_procs,
            **options,
        )
        print_run(run, prefix="" if run["other_cores"] <= max_noise else "(noisy) ")
        tried.append(run)
        if run["other_cores"] <= max_noise:
            break
    best = min(tried, key=lambda r: r["other_cores"])
    best["attempts"] = len(tried)
    best["noise_of_attempts"] = [r["other_cores"] for r in tried]
    return best


def medians(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (scenario, system, loop): the median of its repeats' key figures."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["scenario"]["name"], r["system"], r["loop"]), []).append(r)
    rows = []
    for (name, system, loop), rs in groups.items():

        def med(get: Any, rs: list[dict[str, Any]] = rs) -> float:
            return float(statistics.median(get(r) for r in rs))

        rows.append(
            {
                "scenario": name,
                "system": system,
                "loop": loop,
                "repeats": len(rs),
                "frames_in_per_s": med(lambda r: r["frames_in_per_s"]),
                "delivered_per_s": med(lambda r: r["delivered_per_s"]),
                "lost": med(lambda r: r["lost"]),
                "p50_ms": med(lambda r: r["latency"]["p50_ms"]),
                "p99_ms": med(lambda r: r["latency"]["p99_ms"]),
                "p99_9_ms": med(lambda r: r["latency"]["p99_9_ms"]),
                "cpu_us_per_delivered": med(lambda r: r["cpu_us_per_delivered"]),
                "server_cores": med(lambda r: r["server_cpu_per_s"]),
                "rss_end": med(lambda r: r["rss_end"]),
                "rss_per_connection": med(lambda r: r["rss_per_connection"]),
                "other_cores": med(lambda r: r["other_cores"]),
            }
        )
    return rows


def ok(run: dict[str, Any]) -> bool:
    """Within the target: p99 under 50 ms and (nearly) nothing lost."""
    p99 = run["latency"]["p99_ms"]
    return (
        run["expected"] > 0
        and run["lost"] <= run["expected"] * 0.001
        and not math.isnan(p99)
        and p99 < P99_TARGET_MS
    )


async def search(
    system: str,
    loop: str,
    timing: Timing,
    workdir: Path,
    *,
    devices: int,
    start: float,
    ceiling: float,
    steps: int,
    loadgen_procs: int,
    attempts: int,
    max_noise: float,
) -> dict[str, Any]:
    """The highest total input rate (frames/s) that is ``ok``: double, then bisect.

    A rate that fails is tried once more; it fails when both runs do.
    """
    tried: list[dict[str, Any]] = []
    good: float | None = None
    bad: float | None = None
    rate = start
    for i in range(steps):
        sc = Scenario(f"search {rate:.0f}/s", devices, rate / devices, 1)
        run = await quiet_run(
            system,
            loop,
            sc,
            timing,
            workdir / f"search-{i}",
            loadgen_procs=loadgen_procs,
            attempts=attempts,
            max_noise=max_noise,
        )
        tried.append(run)
        passed = ok(run)
        if not passed:
            # One stall of a shared machine must not end the search: a rate fails
            # when a second run at it fails too.
            again = await quiet_run(
                system,
                loop,
                sc,
                timing,
                workdir / f"search-{i}-again",
                loadgen_procs=loadgen_procs,
                attempts=attempts,
                max_noise=max_noise,
            )
            tried.append(again)
            passed = ok(again)
            run = again if passed else run
        print_run(run, prefix=f"  search {'ok  ' if passed else 'FAIL'} ")
        if passed:
            good = rate if good is None else max(good, rate)
        else:
            bad = rate if bad is None else min(bad, rate)
        if bad is None:
            if rate >= ceiling:
                break
            rate = min(ceiling, rate * 2)
        elif good is None:
            rate = rate / 2
        else:
            if bad - good <= max(1000.0, good * 0.1):
                break
            rate = (good + bad) / 2
        rate = round(rate / 500) * 500 or 500
    best = max((r for r in tried if ok(r)), key=lambda r: r["frames_in_per_s"], default=None)
    return {
        "system": system,
        "loop": loop,
        "devices": devices,
        "best_ok_offered_fps": good,
        "first_failing_offered_fps": bad,
        "best": best,
        "runs": tried,
    }


def print_run(run: dict[str, Any], prefix: str = "") -> None:
    lat = run["latency"]
    print(
        f"{prefix}{run['system']:<8}{run['loop']:<8}{run['scenario']['name']:<18}"
        f"in {run['frames_in_per_s']:>8,.0f}/s  out {run['delivered_per_s']:>8,.0f}/s  "
        f"lost {run['lost']:>6}  p50 {lat['p50_ms']:>7.2f}  p99 {lat['p99_ms']:>7.2f}  "
        f"p99.9 {lat['p99_9_ms']:>7.2f} ms  cpu {run['cpu_us_per_delivered']:>6.1f} us/msg "
        f"({run['server_cpu_per_s']:.2f} cores)  rss {harness.mib(run['rss_end'])} "
        f"({run['rss_per_connection'] / 1024:.1f} KiB/conn)  others {run['other_cores']:.2f} cores",
        flush=True,
    )


def ratio_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Gateway against bridge + Mosquitto, per scenario and loop (medians of repeats)."""
    out = []
    for g in rows:
        if g["system"] != "gateway":
            continue
        for b in rows:
            if (
                b["system"] == "bridge"
                and b["loop"] == g["loop"]
                and b["scenario"] == g["scenario"]
            ):
                out.append(
                    {
                        "scenario": g["scenario"],
                        "loop": g["loop"],
                        "cpu_ratio": g["cpu_us_per_delivered"] / b["cpu_us_per_delivered"],
                        "p99_ratio": g["p99_ms"] / b["p99_ms"],
                        "mem_per_conn_ratio": (
                            g["rss_per_connection"] / b["rss_per_connection"]
                            if b["rss_per_connection"] > 0
                            else math.nan
                        ),
                    }
                )
    return out


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    scenarios = QUICK_SCENARIOS if args.quick else SCENARIOS
    if args.scenarios:
        wanted = set(args.scenarios.split(","))
        scenarios = [s for i, s in enumerate(scenarios) if str(i + 1) in wanted]
    timing = Timing(
        warmup=args.warmup or (1.0 if args.quick else 3.0),
        measure=args.measure or (3.0 if args.quick else 10.0),
    )
    loops = args.loops.split(",")
    systems = args.systems.split(",")
    if "uvloop" in loops and not harness.uvloop_available():
        print("uvloop is not installed: skipping the uvloop runs", file=sys.stderr)
        loops = [lp for lp in loops if lp != "uvloop"]
    runs: list[dict[str, Any]] = []
    searches: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="e2e-") as tmp:
        work = Path(args.workdir or tmp)
        for si, sc in enumerate(scenarios):
            for loop in loops:
                for system in systems:
                    for rep in range(args.repeats):
                        run = await quiet_run(
                            system,
                            loop,
                            sc,
                            timing,
                            work / f"{si}-{system}-{loop}-{rep}",
                            loadgen_procs=args.loadgen_procs,
                            attempts=args.attempts,
                            max_noise=args.max_noise,
                        )
                        run["repeat"] = rep
                        runs.append(run)
        if not args.no_search:
            search_timing = Timing(
                warmup=args.warmup or (1.0 if args.quick else 2.0),
                measure=args.measure or (3.0 if args.quick else 8.0),
            )
            for loop in loops:
                for system in systems:
                    if system == "bridge" and loop != loops[0]:
                        continue  # one bridge search is enough for the comparison
                    print(f"search: {system} on {loop}", flush=True)
                    searches.append(
                        await search(
                            system,
                            loop,
                            search_timing,
                            work / f"search-{system}-{loop}",
                            devices=1000,
                            start=args.search_start,
                            ceiling=args.search_ceiling,
                            steps=2 if args.quick else args.search_steps,
                            loadgen_procs=args.loadgen_procs,
                            attempts=args.attempts,
                            max_noise=args.max_noise,
                        )
                    )
                    s = searches[-1]
                    print(
                        f"search: {system} on {loop}: best ok {s['best_ok_offered_fps']} "
                        f"frames/s, first failing {s['first_failing_offered_fps']}",
                        flush=True,
                    )
    return {
        "settings": {
            "quick": args.quick,
            "warmup_s": timing.warmup,
            "measure_s": timing.measure,
            "loadgen_procs": args.loadgen_procs,
            "p99_target_ms": P99_TARGET_MS,
        },
        "runs": runs,
        "medians": medians(runs),
        "ratios": ratio_table(medians(runs)),
        "searches": searches,
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="a smoke run (about a minute)")
    p.add_argument("--systems", default="gateway,bridge")
    p.add_argument("--loops", default="uvloop,asyncio")
    p.add_argument("--scenarios", help="comma-separated 1-based indexes (default: all)")
    p.add_argument("--warmup", type=float)
    p.add_argument("--measure", type=float)
    p.add_argument("--loadgen-procs", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1, help="runs per row; the median is kept")
    p.add_argument(
        "--attempts", type=int, default=3, help="tries per run while the machine is busy"
    )
    p.add_argument(
        "--max-noise",
        type=float,
        default=0.25,
        help="cores used by other processes above which a run is tried again",
    )
    p.add_argument("--no-search", action="store_true")
    p.add_argument("--search-start", type=float, default=5000.0)
    p.add_argument("--search-ceiling", type=float, default=80_000.0)
    p.add_argument("--search-steps", type=int, default=6)
    p.add_argument("--workdir", help="keep logs and data here (default: a temp dir)")
    p.add_argument("--output", type=Path)
    args = p.parse_args(argv)
    started = time.monotonic()
    result = harness.run(main_async(args), "asyncio")
    result["seconds"] = time.monotonic() - started
    out = harness.write_result("e2e", result, args.output)
    print(f"whole run {result['seconds']:.0f} s; results written to {out}")
    print("medians:")
    for m in result["medians"]:
        print(
            f"  {m['system']:<8}{m['loop']:<8}{m['scenario']:<18} "
            f"out {m['delivered_per_s']:>8,.0f}/s"
            f"  lost {m['lost']:>6.0f}  p50 {m['p50_ms']:7.2f}  p99 {m['p99_ms']:7.2f}  "
            f"p99.9 {m['p99_9_ms']:7.2f} ms  cpu {m['cpu_us_per_delivered']:6.1f} us/msg  "
            f"rss {harness.mib(m['rss_end'])}  {m['rss_per_connection'] / 1024:.1f} KiB/conn"
        )
    for r in result["ratios"]:
        print(
            f"gateway/bridge {r['scenario']:<18}{r['loop']:<8} cpu/msg {r['cpu_ratio']:.2f}x  "
            f"p99 {r['p99_ratio']:.2f}x  mem/conn {r['mem_per_conn_ratio']:.2f}x"
        )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
