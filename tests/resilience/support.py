"""Helpers for the resilience suite: raw devices and dashboards against a gateway process.

The gateway itself runs in a child process (``tests.support.gateway``) so
that a crash is a dead process, kill -9 is real, and its memory and file
descriptors are its own (``/proc/PID``). What is here is the suite's own:
clients that a failing test may leave open, which the autouse fixture in
``conftest.py`` closes, and a dashboard reader that timestamps arrivals.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any, Protocol

import aiohttp

import frames
from tests.devices.support import Client
from tests.gateway.support import Dash
from tests.support.gateway import OPERATOR, GatewayProcess
from tests.support.wait import wait_until


class Closable(Protocol):
    async def aclose(self) -> None: ...


# What tests open (device clients, dashboard readers): the autouse fixture in
# conftest.py closes whatever a failing test left open, so that one failure
# does not leak sockets into the next test's warnings.
OPEN: list[Closable] = []


async def close_open() -> None:
    """Close the clients a test left in ``OPEN`` (it failed half way), quietly."""
    while OPEN:
        with contextlib.suppress(Exception):
            await OPEN.pop().aclose()


async def connect_device(
    gw: GatewayProcess, client_id: str, protocol: str = "env-sensor"
) -> Client:
    """A raw TCP device past its HELLO/WELCOME on ``gw``'s device port."""
    reader, writer = await asyncio.open_connection(*gw.device_address)
    client = Client(reader, writer)
    OPEN.append(client)
    await client.hello(client_id, protocol)
    return client


async def connect_dashboard(
    gw: GatewayProcess,
    session: aiohttp.ClientSession,
    *targets: dict[str, Any],
    token: str = OPERATOR,
) -> Dash:
    """A dashboard past its welcome, subscribed to each target (to all if none)."""
    ws = await session.ws_connect(f"{gw.url}/ws?token={token}", max_msg_size=0)
    dash = Dash(ws)
    OPEN.append(_WsCloser(ws))
    await dash.expect("welcome")
    for target in targets or ({"all": True},):
        await dash.request({"op": "subscribe", **target}, "subscribed")
    return dash


class _WsCloser:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws

    async def aclose(self) -> None:
        await self.ws.close()


class _WriterCloser:
    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer

    async def aclose(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()


def track(writer: asyncio.StreamWriter) -> asyncio.StreamWriter:
    """Have the autouse fixture close ``writer`` if the test does not."""
    OPEN.append(_WriterCloser(writer))
    return writer


def data_frame(seq: int, temperature: float = 21.5) -> bytes:
    """An env-sensor DATA frame."""
    body = frames.get_protocol("env-sensor").encode_data(
        {"temperature_c": temperature, "humidity_pct": 40.0, "battery_pct": 90}
    )
    return frames.encode_frame(frames.Data(seq & 0xFF, body).encode())


async def stream(client: Client, rate: float, stop: asyncio.Event, sent: list[float]) -> None:
    """Send DATA at ``rate`` Hz until ``stop``; append each send's time to ``sent``."""
    seq = 0
    period = 1.0 / rate
    while not stop.is_set():
        seq += 1
        client.send_raw(data_frame(seq))
        sent.append(time.monotonic())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), period)


class Telemetry:
    """Reads a dashboard in the background: offsets and arrival times per device."""

    def __init__(self, dash: Dash) -> None:
        self.dash = dash
        self.by_device: dict[str, list[tuple[int, float]]] = {}
        self.other: list[dict[str, Any]] = []
        self.gaps: list[float] = []
        self.last_at: float | None = None
        self._changed = asyncio.Event()
        self.task = asyncio.ensure_future(self._run())
        OPEN.append(self)

    async def _run(self) -> None:
        with contextlib.suppress(EOFError, asyncio.CancelledError):
            while True:
                msg = await self.dash.recv(timeout=3600)
                now = time.monotonic()
                if msg.get("op") == "telemetry":
                    if self.last_at is not None:
                        self.gaps.append(now - self.last_at)
                    self.last_at = now
                    self.by_device.setdefault(msg["device"], []).append((msg["offset"], now))
                else:
                    self.other.append(msg)
                self._changed.set()

    def count(self, device: str, since: float = 0.0) -> int:
        return sum(1 for _, at in self.by_device.get(device, []) if at >= since)

    def offsets(self, device: str | None = None) -> list[int]:
        if device is not None:
            return [o for o, _ in self.by_device.get(device, [])]
        return sorted(o for rows in self.by_device.values() for o, _ in rows)

    async def wait_for(
        self,
        predicate: Callable[[], bool],
        timeout: float = 15.0,
        what: str = "telemetry on the dashboard",
    ) -> None:
        """Until ``predicate()`` holds, checked on each message the dashboard receives."""

        def check() -> bool:
            if predicate():
                return True
            if self.task.done():
                raise AssertionError(f"the dashboard closed while waiting for {what}")
            return False

        await wait_until(check, what, timeout=timeout, changed=self._changed)

    async def aclose(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        await self.dash.ws.close()


GOOD = "steady-1"


class Steady:
    """One well-behaved device streaming at 20 Hz to one dashboard, for the whole test."""

    def __init__(self, gw: GatewayProcess, session: aiohttp.ClientSession) -> None:
        self.gw = gw
        self.session = session
        self.stop = asyncio.Event()
        self.sent: list[float] = []

    async def __aenter__(self) -> Steady:
        self.watcher = Telemetry(await connect_dashboard(self.gw, self.session, {"device": GOOD}))
        self.device = await connect_device(self.gw, GOOD)
        self.task = asyncio.ensure_future(stream(self.device, 20.0, self.stop, self.sent))
        await self.watcher.wait_for(lambda: self.watcher.count(GOOD) >= 3)
        return self

    async def flowing(self, seconds: float = 1.0) -> None:
        """New telemetry arrives: at least a few messages within ``seconds``."""
        since = time.monotonic()
        await self.watcher.wait_for(lambda: self.watcher.count(GOOD, since) >= 3, seconds + 5)

    async def all_arrived(self) -> list[float]:
        """Stop sending; every frame sent reaches the dashboard. Their delays, in order."""
        self.stop.set()
        await self.task
        n = len(self.sent)
        await self.watcher.wait_for(lambda: self.watcher.count(GOOD) >= n, 20, "every frame")
        arrived = [at for _, at in self.watcher.by_device[GOOD]]
        assert len(arrived) == n, (len(arrived), n)
        return [a - s for s, a in zip(self.sent, arrived, strict=True)]

    async def __aexit__(self, *exc: object) -> None:
        self.stop.set()
        await self.task
        await self.device.aclose()
        await self.watcher.aclose()
