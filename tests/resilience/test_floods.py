"""Connection floods and slow-loris clients on both ports: limits hold, service continues.

Device port (docs/protocol.md §4): ``devices.max_connections`` refuses links
beyond it, the hello timeout closes links that never say HELLO, the frame
timeout abandons a frame that trickles in, and the silence limit closes a
device that sends nothing valid. Dashboards: ``dashboards.max_dashboards``
refuses WebSockets beyond it with HTTP 503. Through all of it a device that
behaves keeps delivering to a dashboard, and /metrics counts what was refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import aiohttp
import pytest

import frames
from tests.resilience.conftest import GatewayFactory
from tests.resilience.support import (
    Steady,
    connect_dashboard,
    connect_device,
    track,
)
from tests.support.gateway import OPERATOR
from tests.support.wait import wait_until

pytestmark = pytest.mark.resilience


async def _close(writers: list[asyncio.StreamWriter]) -> None:
    """Close our ends and wait until they are closed (no socket left to the GC)."""
    for w in writers:
        w.close()
    for w in writers:
        with contextlib.suppress(ConnectionError, OSError):
            await w.wait_closed()


async def _closed_soon(reader: asyncio.StreamReader, timeout: float) -> bool:
    """True if the gateway closes the connection within ``timeout`` (whatever it sent first)."""
    try:
        async with asyncio.timeout(timeout):
            while await reader.read(4096):
                pass
    except TimeoutError:
        return False
    except (ConnectionError, OSError):
        return True
    return True


async def test_device_connection_flood_is_capped(gateways: GatewayFactory) -> None:
    # The flood and the newcomer share 127.0.0.1: the failed-links rule (tested in
    # tests/devices/test_tcp_limits.py) would rightly hold the newcomer, so it is set aside.
    gw = gateways({"devices": {"max_connections": 50, "hello_timeout": 3.0, "max_failed_links": 0}})
    await gw.start()
    flood = 150
    async with aiohttp.ClientSession() as session, Steady(gw, session) as steady:
        conns = await asyncio.gather(
            *(asyncio.open_connection("127.0.0.1", gw.device_port) for _ in range(flood))
        )
        for _, w in conns:
            track(w)
        closed = await asyncio.gather(*(_closed_soon(r, 1.5) for r, _ in conns))
        # The good device holds one of the 50 places: at least 101 are refused at once.
        assert sum(closed) >= flood - 49, sum(closed)
        await steady.flowing()
        m = await gw.metrics()
        assert m.value("iot_device_refused_total", limit="max_connections") >= flood - 49
        # The ones let in never said HELLO: the hello timeout frees their places.
        rest = await asyncio.gather(
            *(_closed_soon(r, 6.0) for (r, _), c in zip(conns, closed, strict=True) if not c)
        )
        assert all(rest)
        await _close([w for _, w in conns])
        newcomer = await connect_device(gw, "newcomer-1")
        await newcomer.aclose()
        await steady.flowing()
    assert gw.crashes() == [], gw.crashes()[:5]


async def test_device_slow_loris_is_closed_by_the_timers(gateways: GatewayFactory) -> None:
    gw = gateways(
        {"devices": {"hello_timeout": 1.0, "heartbeat": 1, "misses": 2, "frame_timeout": 0.5}}
    )
    await gw.start()
    hello = frames.encode_frame(frames.Hello(1, "loris-x", "env-sensor").encode())

    async def trickle_hello() -> bool:
        """Sends a HELLO one byte every 0.3 s: slower than the hello timeout allows."""
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.device_port)
        track(writer)
        watch = asyncio.ensure_future(_closed_soon(reader, 10.0))
        try:
            for byte in hello:
                if watch.done():
                    break
                writer.write(bytes([byte]))
                await asyncio.sleep(0.3)
            return await watch
        except (ConnectionError, OSError):
            return True
        finally:
            watch.cancel()
            await _close([writer])

    async def trickle_frame(i: int) -> bool:
        """Says HELLO, then a frame's header and length, then a byte every 0.3 s, forever."""
        device = await connect_device(gw, f"loris-{i}")
        watch = asyncio.ensure_future(_closed_soon(device.reader, 10.0))
        try:
            device.send_raw(b"\xaa\xaa\xc8")  # a 200-byte payload announced
            while not watch.done():
                device.send_raw(b"\x00")
                await asyncio.sleep(0.3)
            return await watch
        except (ConnectionError, OSError):
            return True
        finally:
            watch.cancel()
            await _close([device.writer])

    async with aiohttp.ClientSession() as session, Steady(gw, session) as steady:
        before = await gw.metrics()
        started = time.monotonic()
        results = await asyncio.gather(
            *(trickle_hello() for _ in range(20)), *(trickle_frame(i) for i in range(10))
        )
        # Every slow client was closed, well within its 10 s watch.
        assert all(results)
        assert time.monotonic() - started < 9.0
        await steady.flowing()
        after = await gw.metrics()
        assert after.value("iot_frame_timeouts_total") > before.value("iot_frame_timeouts_total")
        # Each close is counted by its reason: the 20 silent HELLOs by the hello timer.
        assert after.value("iot_device_links_closed_total", reason="hello_timeout") >= 20
        assert after.value("iot_device_errors_sent_total", code="not_registered") >= 20

        async def only_steady_left() -> bool:
            return (await gw.metrics()).value("iot_device_links") == 1

        await wait_until(only_steady_left, "the slow links gone")
    assert gw.crashes() == [], gw.crashes()[:5]


async def test_dashboard_flood_is_capped(gateways: GatewayFactory) -> None:
    gw = gateways({"dashboards": {"max_dashboards": 20}})
    await gw.start()
    async with aiohttp.ClientSession() as session, Steady(gw, session) as steady:
        # The steady dashboard holds one place; 19 more fit, 21 are refused.
        async def connect() -> aiohttp.ClientWebSocketResponse | int:
            try:
                return await session.ws_connect(f"{gw.url}/ws?token={OPERATOR}")
            except aiohttp.WSServerHandshakeError as e:
                return e.status

        got = await asyncio.gather(*(connect() for _ in range(40)))
        sockets = [g for g in got if not isinstance(g, int)]
        statuses = [g for g in got if isinstance(g, int)]
        assert len(sockets) == 19
        assert statuses == [503] * 21
        await steady.flowing()
        m = await gw.metrics()
        assert m.value("iot_refused_total", limit="max_dashboards") == 21
        for ws in sockets:
            await ws.close()

        async def room_again() -> bool:
            return (await gw.metrics()).value("iot_dashboards") == 1

        await wait_until(room_again, "the flood's dashboards gone")
        late = await connect_dashboard(gw, session)
        await late.ws.close()
        await steady.flowing()
    assert gw.crashes() == [], gw.crashes()[:5]


class SlowHttp:
    """Connections to the HTTP port that send a request's headers a byte every 0.5 s."""

    REQUEST = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 200

    def __init__(self, port: int) -> None:
        self.port = port
        self.stop = asyncio.Event()
        self.writers: list[asyncio.StreamWriter] = []
        self.tasks: list[asyncio.Task[None]] = []

    async def open(self, count: int) -> None:
        for _ in range(count):
            _, writer = await asyncio.open_connection("127.0.0.1", self.port)
            track(writer)
            self.writers.append(writer)
            self.tasks.append(asyncio.ensure_future(self._trickle(writer)))

    async def _trickle(self, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            for byte in self.REQUEST:
                if self.stop.is_set():
                    return
                writer.write(bytes([byte]))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), 0.5)

    async def aclose(self) -> None:
        self.stop.set()
        await asyncio.gather(*self.tasks)
        await _close(self.writers)


async def test_http_slow_loris_leaves_the_service_running(gateways: GatewayFactory) -> None:
    gw = gateways()
    await gw.start()
    slow = SlowHttp(gw.http_port)
    async with aiohttp.ClientSession() as session, Steady(gw, session) as steady:
        fds_before = gw.open_fds()
        await slow.open(200)
        # Everything else is served meanwhile: the page's API, a new dashboard, a new device.
        assert await gw.healthy()
        late = await connect_dashboard(gw, session)
        await late.ws.close()
        newcomer = await connect_device(gw, "newcomer-2")
        await newcomer.aclose()
        await steady.flowing()
        assert gw.open_fds() - fds_before < 260
        await slow.aclose()
    assert gw.crashes() == [], gw.crashes()[:5]


async def test_http_slow_loris_cannot_starve_the_device_port(gateways: GatewayFactory) -> None:
    gw = gateways(fd_limit=256)
    await gw.start()
    slow = SlowHttp(gw.http_port)
    try:
        await slow.open(300)
        async with asyncio.timeout(5):
            device = await connect_device(gw, "after-the-flood")
        await device.aclose()
        assert await gw.healthy()
        # The limits were fitted inside the 256 descriptors, and said so.
        assert "http.max_connections lowered from 1500 to" in gw.log()
        assert "devices.max_connections lowered from 20000 to" in gw.log()
        m = await gw.metrics()
        # Slow clients were closed to make room for newer ones, not let pile up.
        assert m.value("iot_http_idle_closed_total") >= 300 - 40, m.value(
            "iot_http_idle_closed_total"
        )
        assert m.value("iot_http_connections") <= 40
        assert gw.open_fds() < 256 - 32
    finally:
        await slow.aclose()
    assert gw.crashes() == [], gw.crashes()[:5]
