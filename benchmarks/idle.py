"""Measured claim: what 10,000 idle devices and 100 dashboards cost the gateway.

Run ``.venv/bin/python -m benchmarks.idle`` (``--quick``: 2,000 devices, 20
dashboards, a short window). The devices (a load generator process) connect,
say HELLO, and then only PING, each once per heartbeat interval (30 s, the
WELCOME's), with staggered phases; then the dashboards (another process)
connect and subscribe to all. The gateway's RSS is read before any
connection, with the devices, and with the dashboards too; its CPU over the
window is the cost of idling (PING/PONG, timers, WebSocket heartbeats).

File descriptors: each TCP connection is one descriptor in the gateway and one
in the load generator; the soft limit here (``ulimit -n``) is per process, so
10,000 devices need about 10,150 in the gateway and 10,010 in the load
generator. ``--loadgen-procs`` splits the devices over several processes.

Figures go to the terminal and to ``benchmarks/results/idle.json``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import harness
from benchmarks.e2e import Scenario, Timing, quiet_run

TARGET_RSS = 1 << 30  # 10,000 idle devices under 1 GiB


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    limit = harness.fd_limit()
    need = args.devices // args.loadgen_procs + 200
    if need > limit:
        raise SystemExit(
            f"ulimit -n is {limit}; {args.devices} devices in {args.loadgen_procs} load "
            f"generator process(es) need about {need} each: raise it or use --loadgen-procs"
        )
    sc = Scenario(f"idle D={args.devices} S={args.dashboards}", args.devices, 0.0, args.dashboards)
    timing = Timing(warmup=args.warmup, measure=args.measure, tail=0.0, drain=0.5)
    with tempfile.TemporaryDirectory(prefix="idle-") as tmp:
        run = await quiet_run(
            "gateway",
            args.loop,
            sc,
            timing,
            Path(args.workdir or tmp),
            loadgen_procs=args.loadgen_procs,
            attempts=args.attempts,
            max_noise=args.max_noise,
            ping_interval=args.ping_interval,
            dashboards_after_devices=True,
        )
    devices = run["devices_connected"]
    per_device = run["rss_per_device"]
    per_dashboard = (
        (run["rss_connected"] - run["rss_devices_connected"]) / args.dashboards
        if args.dashboards
        else 0.0
    )
    pings = sum(g["pings"] for g in run["loadgen"])
    pongs = sum(g["pongs"] for g in run["loadgen"])
    summary = {
        "devices": devices,
        "dashboards": args.dashboards,
        "rss_base": run["rss_base"],
        "rss_with_devices": run["rss_devices_connected"],
        "rss_with_all": run["rss_connected"],
        "rss_end": run["rss_end"],
        "rss_per_device": per_device,
        "rss_per_dashboard": per_dashboard,
        "rss_10k_devices_projected": run["rss_base"] + per_device * 10_000,
        "idle_cores": run["server_cpu_per_s"],
        "cpu_us_per_device_second": run["server_cpu_s"] / max(1, devices) / run["window_s"] * 1e6,
        "pings_sent": pings,
        "pongs_received": pongs,
        "connect_s": max(g["connect_s"] for g in run["loadgen"]),
        "other_cores": run["other_cores"],
    }
    return {"settings": vars(args), "summary": summary, "run": run}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--devices", type=int)
    p.add_argument("--dashboards", type=int)
    p.add_argument("--ping-interval", type=float, default=30.0, help="seconds per device")
    p.add_argument("--warmup", type=float)
    p.add_argument("--measure", type=float)
    p.add_argument("--loop", choices=harness.LOOPS, default="uvloop")
    p.add_argument("--loadgen-procs", type=int, default=1)
    p.add_argument("--attempts", type=int, default=2)
    p.add_argument("--max-noise", type=float, default=0.25)
    p.add_argument("--workdir")
    p.add_argument("--output", type=Path)
    args = p.parse_args(argv)
    args.devices = args.devices or (2_000 if args.quick else 10_000)
    args.dashboards = (
        args.dashboards if args.dashboards is not None else (20 if args.quick else 100)
    )
    args.warmup = args.warmup if args.warmup is not None else (1.0 if args.quick else 3.0)
    args.measure = args.measure or (4.0 if args.quick else 15.0)
    started = time.monotonic()
    result = harness.run(main_async(args), "asyncio")
    result["seconds"] = time.monotonic() - started
    s = result["summary"]
    print(
        f"idle: {s['devices']} devices + {s['dashboards']} dashboards on {args.loop}: "
        f"RSS {harness.mib(s['rss_base'])} empty, {harness.mib(s['rss_with_devices'])} with "
        f"devices, {harness.mib(s['rss_with_all'])} with dashboards; "
        f"{s['rss_per_device'] / 1024:.1f} KiB/device, {s['rss_per_dashboard'] / 1024:.1f} "
        f"KiB/dashboard; CPU {s['idle_cores'] * 100:.1f}% of a core "
        f"({s['pings_sent']} PINGs, {s['pongs_received']} PONGs in the run); "
        f"connect {s['connect_s']:.1f} s; others {s['other_cores']:.2f} cores"
    )
    target = s["rss_with_all"] if s["devices"] >= 10_000 else s["rss_10k_devices_projected"]
    print(
        f"target: 10,000 idle devices under 1 GiB RSS: {harness.mib(target)} "
        f"({'met' if target < TARGET_RSS else 'MISSED'}"
        f"{'' if s['devices'] >= 10_000 else ', projected from this run'})"
    )
    out = harness.write_result("idle", result, args.output)
    print(f"results written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
