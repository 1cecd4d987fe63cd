"""Measured claim: a dashboard that stopped reading costs the hub's fan-out next to nothing.

Run ``.venv/bin/python -m benchmarks.fanout``. In one process, with no
sockets: a ``Hub`` (in-memory storage) with one dashboard that reads
everything and N that never read, all subscribed to all; telemetry
records are handed to ``Hub.deliver_telemetry`` (what the engine calls for
every message) and the reader's queue is emptied after each one, as its
writer would. Once the stalled queues are full (parked, docs/api.md §3.1
``lagged``), the process CPU time per message is taken over the rest, for
N = 0 and N = ``--stalled``, in alternation, the best of ``--repeat`` each.

``--targets device+all`` subscribes the stalled dashboards to one device
too: such a dashboard stays in the fan-out while parked and is counted by a
flag check, where one subscribed to all alone leaves it (its misses are
counted by the subscription index).

Figures go to the terminal (``--output FILE``: JSON too).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gateway.hub import Hub, HubConfig, LocalEngine, Role, Target, TargetKind
from gateway.hub.messages import ALL
from gateway.storage import MemoryStorage, TelemetryRecord

DATA = {"temperature": 21.5, "humidity": 40.0, "battery": 90}


async def per_message(stalled: int, messages: int, targets: str) -> float:
    """Seconds of process CPU per delivered message with ``stalled`` parked dashboards."""
    storage = MemoryStorage()
    await storage.open()
    hub = Hub(LocalEngine(storage), HubConfig())
    await hub.start()
    try:
        reader = hub.connect_dashboard(Role.VIEWER, "reader")
        await hub.handle(reader, {"op": "subscribe", "all": True})
        for i in range(stalled):
            d = hub.connect_dashboard(Role.VIEWER, f"stalled-{i}")
            hub.subscriptions.subscribe(d, ALL)
            if targets == "device+all":
                hub.subscriptions.subscribe(d, Target(TargetKind.DEVICE, "dev-1"))
        data_json = json.dumps(DATA)
        fill = 2 * hub.config.queue_size  # enough to fill and park every stalled queue
        records = [
            TelemetryRecord(n, "dev-1", "env-sensor", 1_716_200_000_000, n, DATA)
            for n in range(1, fill + messages + 1)
        ]
        for rec in records[:fill]:
            hub.deliver_telemetry(rec, data_json, 0.0)
            reader.take(1000)
        began = time.process_time()
        for rec in records[fill:]:
            hub.deliver_telemetry(rec, data_json, 0.0)
            reader.take(1000)
        return (time.process_time() - began) / messages
    finally:
        await hub.stop()
        await storage.close()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--stalled", type=int, default=50, help="dashboards that never read")
    p.add_argument("--messages", type=int, default=20_000, help="messages timed per run")
    p.add_argument("--repeat", type=int, default=3, help="runs of each; the best is kept")
    p.add_argument("--targets", choices=["all", "device+all"], default="all")
    p.add_argument("--output", type=Path)
    args = p.parse_args(argv)
    best: dict[int, float] = {}
    for _ in range(args.repeat):
        for n in (0, args.stalled):
            t = asyncio.run(per_message(n, args.messages, args.targets))
            best[n] = min(best.get(n, t), t)
    base, attacked = best[0], best[args.stalled]
    print(f"stalled dashboards subscribed to {args.targets}")
    print(f"  0 stalled: {base * 1e6:.2f} us of CPU a message")
    extra = attacked - base
    print(f"  {args.stalled} stalled: {attacked * 1e6:.2f} us a message", end="")
    print(f" (+{extra * 1e6:.2f} us, {extra / max(1, args.stalled) * 1e9:.0f} ns each)")
    if args.output is not None:
        result: dict[str, Any] = {
            "targets": args.targets,
            "stalled": args.stalled,
            "us_per_message": {str(n): round(t * 1e6, 3) for n, t in best.items()},
        }
        args.output.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
