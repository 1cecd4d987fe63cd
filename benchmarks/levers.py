"""The gateway with proposed hot-path fixes patched in, to measure their gain before they land.

Not project code and not a way to run the gateway: each lever below replaces
one function of ``frames``/``gateway`` at import time with the change that
docs/benchmarks.md proposes, then runs ``iot-gateway serve``. The end-to-end
benchmarks run it in the gateway's place::

    BENCH_LEVERS=A,B,C,D,E \\
    BENCH_GATEWAY_CMD=".venv/bin/python -m benchmarks.levers" \\
    .venv/bin/python -m benchmarks.e2e --systems gateway --scenarios 1

Levers (``BENCH_LEVERS``, comma-separated):

* ``A``: env-sensor DATA decoded with one ``struct.unpack`` instead of a construct
  ``Struct.parse`` (same JSON out; any other body size still goes to construct,
  so its errors are unchanged).
* ``B``: the frame decoder takes the payload as a slice once the CRC matched,
  instead of a compiled construct parse of the span.
* ``C``: one ``json.JSONEncoder`` built once for the hub's ``dumps``, instead of
  one per call.
* ``D``: the in-gateway latency histogram observed for 1 message in 64.
* ``E``: the dashboard writer bounds its send with ``asyncio.timeout`` instead of
  ``asyncio.wait_for`` (no task created per frame sent).
* ``F``: as ``E``, and the writer waits ``BENCH_FLUSH_MS`` (default 2) after it wakes
  up before it takes the queue, so that each WebSocket frame carries more messages
  (0 yields to the loop once).

Delete this file once the levers worth having are in the project.
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
import sys
from typing import Any

LEVERS = set(filter(None, os.environ.get("BENCH_LEVERS", "").split(",")))


def lever_a() -> None:
    from frames import protocols

    unpack = struct.Struct(">hHB").unpack
    construct_decode = protocols.ENV_SENSOR.decode_data

    def decode_data(body: bytes) -> dict[str, Any]:
        if len(body) != 5:
            return construct_decode(body)
        t, h, b = unpack(body)
        return {"temperature_c": t / 100, "humidity_pct": h / 100, "battery_pct": b}

    protocols.ENV_SENSOR.decode_data = decode_data  # type: ignore[method-assign]


def lever_b() -> None:
    from frames import link

    class SliceParser:
        @staticmethod
        def parse(view: memoryview) -> bytes:
            return bytes(view[1:])  # after the length byte: the CRC has matched the span

    link._PAYLOAD_PARSER = SliceParser  # type: ignore[misc]


def lever_c() -> None:
    import gateway.hub

    encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode

    def dumps(obj: dict[str, Any]) -> str:
        return encode(obj)

    gateway.hub.dumps = dumps


def lever_d() -> None:
    from gateway.metrics import Metrics

    observe = Metrics.observe_pipeline
    count = [0]

    def sampled(self: Metrics, seconds: float) -> None:
        count[0] += 1
        if not count[0] & 63:
            observe(self, seconds)

    Metrics.observe_pipeline = sampled  # type: ignore[method-assign]


def lever_e() -> None:
    import gateway.app

    async def writer(rt: Any, ws: Any, dashboard: Any, request: Any) -> None:
        cfg = rt.config.dashboards
        try:
            while True:
                await dashboard.wait()
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

    gateway.app._writer = writer


def lever_f() -> None:
    """On top of E: wait ``BENCH_FLUSH_MS`` after a wake-up, so that one frame carries more."""
    import gateway.app

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

    gateway.app._writer = writer


def main() -> int:
    for name, apply in (
        ("A", lever_a),
        ("B", lever_b),
        ("C", lever_c),
        ("D", lever_d),
        ("E", lever_e),
        ("F", lever_f),
    ):
        if name in LEVERS:
            apply()
    from gateway.cli import main as gateway_main

    return gateway_main()


if __name__ == "__main__":
    sys.exit(main())
