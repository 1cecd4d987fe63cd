"""Dashboard clients for the benchmarks: S subscribers to all telemetry, in their own process.

``--mode ws``: the gateway's WebSocket API (docs/api.md §3) with
aiohttp's client: ``{"op":"subscribe","all":true}``, then every frame is split
on newlines. ``--mode mqtt``: the reference pipeline, ``benchmarks.mqtt``'s lean
subscriber on ``telemetry/#`` at QoS 0. Either way each telemetry message's
send time is read from its env-sensor data (``benchmarks.stamp``) and its
latency is kept if it was sent inside the measuring window.

``--stalled K`` adds K WebSocket dashboards that subscribe and then never read
again (a raw socket with a small receive buffer, so the stall reaches the
gateway in milliseconds rather than after megabytes of kernel buffering).

Stdout: ``{"event":"ready"}`` once all are subscribed, ``{"event":"done",...}``
at ``--stop-at``. Latencies (microseconds, int32) go to ``--latency-file``.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import base64
import contextlib
import json
import os
import socket
import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, cast

import aiohttp

from benchmarks import harness, stamp


class Stats:
    """What every reading dashboard of this process saw."""

    def __init__(self, window: tuple[float, float]) -> None:
        self.window_ns = (int(window[0] * 1e9), int(window[1] * 1e9))
        self.latencies = array.array("i")
        self.telemetry = 0
        self.in_window: list[int] = []
        self.lagged = 0
        self.dropped = 0
        self.regressions = 0
        self.other: Counter[str] = Counter()
        self.closed_early = 0
        self.close_codes: Counter[str] = Counter()


class Reader:
    """One reading dashboard's bookkeeping."""

    def __init__(self, index: int, stats: Stats) -> None:
        self.index = index
        self.stats = stats
        self.last_offset = -1
        stats.in_window.append(0)
        self.subscribed = asyncio.get_running_loop().create_future()

    def lines(self, lines: Iterable[str | bytes], received_ns: int) -> None:
        s = self.stats
        w0, w1 = s.window_ns
        lat = s.latencies
        for line in lines:
            obj: dict[str, Any] = json.loads(line)
            op = obj.get("op")
            if op == "telemetry":
                s.telemetry += 1
                offset = obj["offset"]
                if offset <= self.last_offset:
                    s.regressions += 1
                self.last_offset = offset
                sent = stamp.sent_ns(obj["data"], received_ns)
                if w0 <= sent <= w1:
                    s.in_window[self.index] += 1
                    lat.append((received_ns - sent) // 1000)
            elif op == "lagged":
                s.lagged += 1
                s.dropped += int(obj.get("dropped", 0))
            else:
                s.other[str(op)] += 1
                if op == "subscribed" and not self.subscribed.done():
                    self.subscribed.set_result(None)


# ---- WebSocket -------------------------------------------------------------------------------


async def ws_dashboard(
    session: aiohttp.ClientSession, url: str, reader: Reader, subscribed: asyncio.Event
) -> None:
    async with session.ws_connect(url, max_msg_size=0, autoping=True) as ws:
        await ws.send_str(json.dumps({"op": "subscribe", "all": True}))
        watcher = asyncio.ensure_future(_when_subscribed(reader, subscribed))
        try:
            async for msg in ws:
                if msg.type is aiohttp.WSMsgType.TEXT:
                    reader.lines(msg.data.split("\n"), time.time_ns())
        finally:
            watcher.cancel()
        reader.stats.closed_early += 1
        reader.stats.close_codes[str(ws.close_code)] += 1


async def _when_subscribed(reader: Reader, subscribed: asyncio.Event) -> None:
    await reader.subscribed
    subscribed.set()


async def stalled_dashboard(
    host: str, port: int, token: str, rcvbuf: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Handshake, subscribe to all, then stop reading for good.

    The caller must keep the returned stream objects: a StreamWriter closes its
    socket when it is garbage-collected.
    """
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, (host, port))
    reader, writer = await asyncio.open_connection(sock=sock)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            f"GET /ws?token={token} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10.0)
    if b" 101 " not in head.split(b"\r\n", 1)[0]:
        raise ConnectionError(f"no upgrade: {head[:80]!r}")
    writer.write(masked_text(json.dumps({"op": "subscribe", "all": True}).encode()))
    # Read until the reply, so that the subscription is in place before the stall.
    async with asyncio.timeout(10.0):
        seen = b""
        while b'"subscribed"' not in seen:
            seen = seen[-64:] + await reader.read(4096)
    cast(asyncio.Transport, writer.transport).pause_reading()
    return reader, writer


def masked_text(payload: bytes) -> bytes:
    """A client's masked WebSocket text frame (RFC 6455 section 5.2)."""
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        head = bytes((0x81, 0x80 | n))
    elif n < 1 << 16:
        head = bytes((0x81, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x81, 0x80 | 127)) + n.to_bytes(8, "big")
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + body


# ---- MQTT ------------------------------------------------------------------------------------


async def mqtt_dashboard(host: str, port: int, reader: Reader, topic: str) -> Any:
    from benchmarks.mqtt import LeanSubscriber

    loop = asyncio.get_running_loop()

    def on_batch(payloads: list[bytes], received_ns: int) -> None:
        reader.lines(payloads, received_ns)

    _, proto = await loop.create_connection(
        lambda: LeanSubscriber(f"dash-{reader.index}-{os.getpid()}", topic, on_batch), host, port
    )
    await asyncio.wait_for(proto.subscribed, 10.0)
    return proto


# ---- main ------------------------------------------------------------------------------------


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    stats = Stats((args.window_start or 0.0, args.window_end or 1e12))
    host, _, port_text = args.server.rpartition(":")
    port = int(port_text)
    readers = [Reader(i, stats) for i in range(args.count)]
    tasks: list[asyncio.Future[Any]] = []
    mqtt_clients: list[Any] = []
    stalled: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    session: aiohttp.ClientSession | None = None
    try:
        if args.mode == "ws":
            session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
            url = f"http://{host}:{port}/ws?token={args.token}"
            events = []
            for r in readers:
                ev = asyncio.Event()
                events.append(ev)
                tasks.append(asyncio.ensure_future(ws_dashboard(session, url, r, ev)))
            async with asyncio.timeout(30.0):
                for ev, task in zip(events, tasks, strict=True):
                    waiter = asyncio.ensure_future(ev.wait())
                    await asyncio.wait({waiter, task}, return_when=asyncio.FIRST_COMPLETED)
                    waiter.cancel()
                    if task.done():
                        task.result()  # raises what failed
                        raise ConnectionError("a dashboard closed before subscribing")
            for _ in range(args.stalled):
                stalled.append(await stalled_dashboard(host, port, args.token, args.stall_rcvbuf))
        else:
            for r in readers:
                mqtt_clients.append(await mqtt_dashboard(host, port, r, args.topic))
        print(json.dumps({"event": "ready", "dashboards": args.count}), flush=True)
        stop_at = args.stop_at or time.time() + 10
        if args.go_stdin:
            plan = await harness.read_go()
            stop_at = plan["stop_at"]
            stats.window_ns = (int(plan["window_start"] * 1e9), int(plan["window_end"] * 1e9))
        await asyncio.sleep(max(0.0, stop_at - time.time()))
    finally:
        for task in tasks:
            task.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for c in mqtt_clients:
            c.close()
        for _, writer in stalled:
            cast(asyncio.Transport, writer.transport).abort()
        if session is not None:
            await session.close()
    if args.latency_file:
        harness.write_bytes(Path(args.latency_file), stats.latencies.tobytes())
    return {
        "event": "done",
        "dashboards": args.count,
        "stalled": args.stalled,
        "telemetry": stats.telemetry,
        "in_window": sum(stats.in_window),
        "in_window_min": min(stats.in_window, default=0),
        "in_window_max": max(stats.in_window, default=0),
        "lagged": stats.lagged,
        "dropped": stats.dropped,
        "offset_regressions": stats.regressions,
        "closed_early": stats.closed_early,
        "close_codes": dict(stats.close_codes),
        "other_ops": dict(stats.other),
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--mode", choices=["ws", "mqtt"], default="ws")
    p.add_argument("--server", required=True, metavar="HOST:PORT", help="gateway HTTP or broker")
    p.add_argument("--token", default="")
    p.add_argument("--topic", default="telemetry/#")
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--stalled", type=int, default=0, help="dashboards that stop reading")
    p.add_argument("--stall-rcvbuf", type=int, default=4096)
    p.add_argument("--window-start", type=float)
    p.add_argument("--window-end", type=float)
    p.add_argument("--stop-at", type=float, help="wall time to disconnect and report")
    p.add_argument("--latency-file")
    p.add_argument(
        "--go-stdin",
        action="store_true",
        help="after ready, read the timing plan (JSON: stop_at, window_*) from stdin",
    )
    p.add_argument("--loop", choices=harness.LOOPS, default="uvloop")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    result = harness.run(main_async(args), args.loop)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
