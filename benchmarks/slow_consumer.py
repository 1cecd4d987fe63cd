"""Measured claim: one dashboard that stops reading costs the other dashboards nothing much.

Run ``.venv/bin/python -m benchmarks.slow_consumer`` (``--quick`` for a short
run). D devices at R Hz feed the gateway; 10 dashboards read everything. In the
``stalled`` runs an eleventh dashboard subscribes to all and then never reads
again (``benchmarks.dashboards --stalled``: a raw socket with a 4 KiB receive
buffer, so that the gateway feels the stall at once). The runs alternate
(baseline, stalled, baseline, ...) and the medians are compared:

* the 10 readers' p99 latency, stalled over baseline (target: within 1.2x);
* what they received (nothing may be lost for them);
* the gateway's RSS over the window (bounded: the stalled dashboard's queue
  is capped at ``dashboards.queue_size`` messages, the rest is dropped and
  counted in ``iot_telemetry_dropped``).

Figures go to the terminal and to ``benchmarks/results/slow_consumer.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import harness
from benchmarks.e2e import Scenario, Timing, quiet_run

TARGET_RATIO = 1.2


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    sc = Scenario(
        f"D={args.devices} R={args.rate:g} S={args.readers}", args.devices, args.rate, args.readers
    )
    timing = Timing(warmup=args.warmup, measure=args.measure)
    config = harness.bench_gateway_config()
    if args.drain_timeout is not None:
        config["dashboards"]["drain_timeout"] = args.drain_timeout
    runs: dict[str, list[dict[str, Any]]] = {"baseline": [], "stalled": []}
    with tempfile.TemporaryDirectory(prefix="slow-") as tmp:
        work = Path(args.workdir or tmp)
        for rep in range(args.repeats):
            for kind in ("baseline", "stalled"):
                run = await quiet_run(
                    "gateway",
                    args.loop,
                    sc,
                    timing,
                    work / f"{kind}-{rep}",
                    loadgen_procs=1,
                    attempts=args.attempts,
                    max_noise=args.max_noise,
                    config=config,
                    stalled=1 if kind == "stalled" else 0,
                )
                runs[kind].append(run)
                m = run["metrics"]
                print(
                    f"  {kind:<9} readers p99 {run['latency']['p99_ms']:.2f} ms, lost "
                    f"{run['lost']}, RSS peak {harness.mib(run['rss_peak_in_window'])}, "
                    f"dropped {m.get('iot_telemetry_dropped_total', 0):.0f}, "
                    f"others {run['other_cores']:.2f} cores",
                    flush=True,
                )

    def med(kind: str, get: Any) -> float:
        return float(statistics.median(get(r) for r in runs[kind]))

    summary: dict[str, Any] = {}
    for kind in runs:
        summary[kind] = {
            "p50_ms": med(kind, lambda r: r["latency"]["p50_ms"]),
            "p99_ms": med(kind, lambda r: r["latency"]["p99_ms"]),
            "p99_9_ms": med(kind, lambda r: r["latency"]["p99_9_ms"]),
            "delivered_per_s": med(kind, lambda r: r["delivered_per_s"]),
            "lost": med(kind, lambda r: r["lost"]),
            "rss_peak": med(kind, lambda r: r["rss_peak_in_window"]),
            "rss_growth_in_window": med(
                kind, lambda r: r["rss_series"][-1][1] - r["rss_series"][0][1]
            ),
            "dropped_for_slow": med(
                kind, lambda r: r["metrics"].get("iot_telemetry_dropped_total", 0.0)
            ),
            "slow_closed": med(
                kind, lambda r: r["metrics"].get("iot_slow_dashboards_closed_total", 0.0)
            ),
            "server_cores": med(kind, lambda r: r["server_cpu_per_s"]),
            "other_cores": med(kind, lambda r: r["other_cores"]),
        }
    summary["p99_ratio"] = summary["stalled"]["p99_ms"] / summary["baseline"]["p99_ms"]
    return {"settings": vars(args), "summary": summary, "runs": runs}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--devices", type=int, default=100)
    p.add_argument("--rate", type=float, default=50.0, help="Hz per device")
    p.add_argument("--readers", type=int, default=10)
    p.add_argument("--repeats", type=int)
    p.add_argument("--warmup", type=float)
    p.add_argument("--measure", type=float)
    p.add_argument("--drain-timeout", type=float, help="gateway dashboards.drain_timeout")
    p.add_argument("--loop", choices=harness.LOOPS, default="uvloop")
    p.add_argument("--attempts", type=int, default=2)
    p.add_argument("--max-noise", type=float, default=0.25)
    p.add_argument("--workdir")
    p.add_argument("--output", type=Path)
    args = p.parse_args(argv)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.warmup = args.warmup if args.warmup is not None else (1.0 if args.quick else 2.0)
    args.measure = args.measure or (4.0 if args.quick else 15.0)
    started = time.monotonic()
    result = harness.run(main_async(args), "asyncio")
    result["seconds"] = time.monotonic() - started
    s = result["summary"]
    for kind in ("baseline", "stalled"):
        k = s[kind]
        print(
            f"{kind:<9} (median of {args.repeats}): readers p50 {k['p50_ms']:.2f} p99 "
            f"{k['p99_ms']:.2f} p99.9 {k['p99_9_ms']:.2f} ms, {k['delivered_per_s']:,.0f} "
            f"deliveries/s, lost {k['lost']:.0f}; gateway RSS peak {harness.mib(k['rss_peak'])}, "
            f"growth in window {k['rss_growth_in_window'] / 1024:.0f} KiB, dropped for the slow "
            f"one {k['dropped_for_slow']:.0f}"
        )
    print(
        f"target: readers' p99 with a stalled dashboard within {TARGET_RATIO}x: "
        f"{s['p99_ratio']:.2f}x ({'met' if s['p99_ratio'] <= TARGET_RATIO else 'MISSED'})"
    )
    out = harness.write_result("slow_consumer", result, args.output)
    print(f"results written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
