"""The gateway with proposed hot-path fixes patched in, to measure their gain before they land.

Not project code and not a way to run the gateway: each lever below replaces
one function of ``frames``/``gateway`` at import time with the change that
docs/benchmarks.md proposes, then runs ``iot-gateway serve``. The end-to-end
benchmarks run it in the gateway's place::

    BENCH_LEVERS=B \\
    BENCH_GATEWAY_CMD=".venv/bin/python -m benchmarks.levers" \\
    .venv/bin/python -m benchmarks.e2e --systems gateway --scenarios 1

Levers (``BENCH_LEVERS``, comma-separated). A, C, D and E have landed
(and G, the garbage collector's tuning, in ``gateway.cli.tune_gc``) in the
project (see docs/benchmarks.md); these two were measured and not taken:

* ``B``: the frame decoder takes the payload as a slice once the CRC matched,
  instead of a compiled construct parse of the span.
* ``F``: the writer waits ``BENCH_FLUSH_MS`` (default 2) after it wakes up
  before it takes the queue, so that each WebSocket frame carries more messages
  (0 yields to the loop once).
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

LEVERS = set(filter(None, os.environ.get("BENCH_LEVERS", "").split(",")))


def lever_b() -> None:
    from frames import link

    class SliceParser:
        @staticmethod
        def parse(view: memoryview) -> bytes:
            return bytes(view[1:])  # after the length byte: the CRC has matched the span

    link._PAYLOAD_PARSER = SliceParser  # type: ignore[misc]


def lever_f() -> None:
    """Wait ``BENCH_FLUSH_MS`` after a wake-up, so that one frame carries more."""
    import gateway.web.ws

    delay = float(os.environ.get("BENCH_FLUSH_MS", "2")) / 1000

    async def writer(rt: Any, ws: Any, dashboard: Any, request: Any) -> None:
        cfg = rt.config.dashboards
        try:
            while True:
                await dashboard.wait()
                await asyncio.sleep(delay)
                items = dashboard.take(cfg.batch_max_items)
                if not items:
                    if dashboard.closed:
                        return
                    continue
                try:
                    async with asyncio.timeout(cfg.drain_timeout):
                        await ws.send_str("\n".join(items))
                except TimeoutError:
                    rt.metrics.slow_dashboards_closed.inc()
                    if request.transport is not None:
                        request.transport.abort()
                    return
        except (ConnectionError, RuntimeError):
            return

    gateway.web.ws._writer = writer  # type: ignore[assignment]


def main() -> int:
    for name, apply in (
        ("B", lever_b),
        ("F", lever_f),
    ):
        if name in LEVERS:
            apply()
    from gateway.cli import main as gateway_main

    return gateway_main()


if __name__ == "__main__":
    sys.exit(main())
