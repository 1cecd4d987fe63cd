"""A lean load generator: D device connections sending env-sensor DATA at R Hz each.

Run by the benchmarks as its own process (``python -m benchmarks.loadgen``).
It speaks the device protocol of docs/protocol.md §3-4 with the project's own
encoder (``frames.encode_frame`` of ``frames.Data``) and the device-side
handshake the simulators and tests share (``simulators.handshake``), one
asyncio Protocol per connection and no task per device, so that one process
can drive 10,000 links.

Every DATA body carries its send time (``benchmarks.stamp``). Sends are spread
evenly: frame k of the whole run is due at ``start + k / (D * R)`` and goes to
device ``k mod D``, so each device sends at R Hz and the devices' phases are
staggered. A device may instead (or also) PING at a fixed interval (idle mode).

Stdout, one JSON object per line: ``{"event":"ready",...}`` once every device
has its WELCOME, ``{"event":"done",...}`` with the counts at the end. The run is
bounded: it ends ``--duration`` seconds after ``--start-at`` plus ``--linger``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import sys
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any, cast

from benchmarks import harness, stamp
from frames import Data, Error, Ping, Pong, Welcome, encode_frame, get_protocol
from simulators.handshake import DeviceHandshake, MessageReader, encode, error_name


class Totals:
    """Counters over every connection of this process."""

    def __init__(self, window: tuple[float, float]) -> None:
        self.window_ns = (int(window[0] * 1e9), int(window[1] * 1e9))
        self.welcomed = 0
        self.failed = 0
        self.lost = 0
        self.sent = 0
        self.sent_in_window = 0
        self.pings = 0
        self.pongs = 0
        self.errors: Counter[str] = Counter()


class Device(asyncio.Protocol):
    """One device connection."""

    def __init__(self, client_id: str, protocol: str, totals: Totals, token: str = "") -> None:
        self.client_id = client_id
        self.protocol = protocol
        self.totals = totals
        self.transport: asyncio.Transport | None = None
        self.reader = MessageReader()
        self.handshake = DeviceHandshake(client_id, protocol, token, next_seq=self._next_seq)
        self.welcome: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.seq = 0

    def _next_seq(self) -> int:
        self.seq = (self.seq + 1) & 0xFF
        return self.seq

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.transport.write(encode(self.handshake.hello()))

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        bad = reader.bad_messages
        for msg in reader.feed(data):
            reply = self.handshake.receive(msg)
            if reply is not None:
                self._write(encode(reply))  # PONG, or HELLO again after NOT_REGISTERED
            if isinstance(msg, Welcome):
                if self.handshake.welcomed and not self.welcome.done():
                    self.welcome.set_result(None)
            elif isinstance(msg, Pong):
                self.totals.pongs += 1
            elif isinstance(msg, Error):
                self.totals.errors[error_name(msg.code)] += 1
        if reader.bad_messages != bad:
            self.totals.errors["undecodable"] += reader.bad_messages - bad

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.totals.lost += 1
        if not self.welcome.done():
            self.welcome.set_exception(ConnectionError(f"{self.client_id}: closed before WELCOME"))

    def _write(self, frame: bytes) -> bool:
        t = self.transport
        if t is None or t.is_closing():
            return False
        t.write(frame)
        return True

    def send_data(self) -> None:
        now = time.time_ns()
        if self._write(encode_frame(Data(self._next_seq(), stamp.body(now)).encode())):
            totals = self.totals
            totals.sent += 1
            # Counted as the dashboards count it: at the stamp's 10 us resolution.
            now -= now % stamp.UNIT_NS
            if totals.window_ns[0] <= now <= totals.window_ns[1]:
                totals.sent_in_window += 1

    def send_ping(self) -> None:
        if self._write(encode_frame(Ping(self._next_seq()).encode())):
            self.totals.pings += 1

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def connect_all(
    host: str,
    port: int,
    ids: Sequence[str],
    protocol: str,
    totals: Totals,
    concurrency: int,
    token: str = "",
) -> list[Device]:
    """Open every connection (HELLO with ``token``), await each WELCOME, ``concurrency`` at once."""
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(concurrency)
    devices: list[Device] = []

    async def one(client_id: str) -> None:
        async with gate:
            try:
                _, dev = await loop.create_connection(
                    lambda: Device(client_id, protocol, totals, token), host, port
                )
                await asyncio.wait_for(dev.welcome, 10.0)
            except (OSError, TimeoutError, ConnectionError):
                totals.failed += 1
                return
            totals.welcomed += 1
            devices.append(dev)

    await asyncio.gather(*(one(i) for i in ids))
    return devices


async def pace(
    devices: Sequence[Device], rate: float, start: float, end: float, ping: bool
) -> float:
    """Send frame k at ``start + k / rate`` (loop time) round-robin until ``end``.

    Returns the largest lag behind schedule seen, in seconds.
    """
    n = len(devices)
    if rate <= 0 or n == 0:
        await asyncio.sleep(max(0.0, end - asyncio.get_running_loop().time()))
        return 0.0
    loop = asyncio.get_running_loop()
    k = 0
    lag = 0.0
    while True:
        now = loop.time()
        if now >= end:
            return lag
        due = int((now - start) * rate) + 1
        if due > k:
            lag = max(lag, now - (start + k / rate))
            for _ in range(due - k):
                dev = devices[k % n]
                if ping:
                    dev.send_ping()
                else:
                    dev.send_data()
                k += 1
        next_at = start + k / rate
        # Ticks of at least 2 ms: libuv counts timers in whole milliseconds and
        # spins on shorter ones.
        await asyncio.sleep(max(0.002, min(next_at - loop.time(), end - loop.time())))


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    host, _, port_text = args.gateway.rpartition(":")
    port = int(port_text)
    # The lean path must be byte for byte what the project's schema builds.
    probe = time.time_ns()
    env_sensor = get_protocol("env-sensor")
    rebuilt = env_sensor.encode_data(env_sensor.decode_data(stamp.body(probe)))
    assert rebuilt == stamp.body(probe), "stamp.body is not a valid env-sensor body"
    totals = Totals((args.window_start or 0.0, args.window_end or 0.0))

    ids = [f"{args.prefix}-{i:05d}" for i in range(args.devices)]
    t0 = time.monotonic()
    devices = await connect_all(host, port, ids, args.protocol, totals, args.concurrency)
    connect_s = time.monotonic() - t0
    print(
        json.dumps(
            {
                "event": "ready",
                "welcomed": totals.welcomed,
                "failed": totals.failed,
                "connect_s": round(connect_s, 3),
            }
        ),
        flush=True,
    )
    loop = asyncio.get_running_loop()
    if args.go_stdin:
        plan = await harness.read_go()
        start_at, end_at = plan["start_at"], plan["end_at"]
        totals.window_ns = (int(plan["window_start"] * 1e9), int(plan["window_end"] * 1e9))
    else:
        start_at = args.start_at or time.time()
        end_at = start_at + args.duration
    start = loop.time() + (start_at - time.time())
    end = loop.time() + (end_at - time.time())
    random.Random(args.seed).shuffle(devices)  # no device is always first in a tick
    tasks = [asyncio.ensure_future(pace(devices, args.devices * args.rate, start, end, False))]
    if args.ping_interval > 0:
        ping_rate = len(devices) / args.ping_interval
        tasks.append(asyncio.ensure_future(pace(devices, ping_rate, start, end, True)))
    lags = await asyncio.gather(*tasks)
    await asyncio.sleep(args.linger)
    for dev in devices:
        dev.close()
    await asyncio.sleep(0.2)  # let the closes go out
    return {
        "event": "done",
        "devices": args.devices,
        "welcomed": totals.welcomed,
        "failed": totals.failed,
        "connect_s": round(connect_s, 3),
        "sent": totals.sent,
        "sent_in_window": totals.sent_in_window,
        "pings": totals.pings,
        "pongs": totals.pongs,
        "lost_before_end": totals.lost - len(devices),
        "max_lag_s": round(max(lags), 4),
        "errors": dict(totals.errors),
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--gateway", required=True, metavar="HOST:PORT")
    p.add_argument("--devices", type=int, default=100)
    p.add_argument("--rate", type=float, default=1.0, help="DATA frames per second per device")
    p.add_argument("--ping-interval", type=float, default=0.0, help="seconds; 0: no PING")
    p.add_argument("--protocol", default="env-sensor")
    p.add_argument("--prefix", default="dev")
    p.add_argument("--start-at", type=float, help="wall time (time.time()) to start sending")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of sending")
    p.add_argument("--window-start", type=float, help="wall time: count sends from here ...")
    p.add_argument("--window-end", type=float, help="... to here")
    p.add_argument("--linger", type=float, default=1.0, help="seconds connected after sending")
    p.add_argument("--concurrency", type=int, default=200, help="connects in flight")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--go-stdin",
        action="store_true",
        help="after ready, read the timing plan (JSON: start_at, end_at, window_*) from stdin",
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
