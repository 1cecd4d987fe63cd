"""What a peer can make the hub hold is bounded: findings 5, 6 and 7 of issue 12.

Against a gateway process, on loopback: client_ids registered by the
thousand stop at ``dashboards.max_known_devices`` (a refused HELLO gets
ERROR RATE_LIMITED, counted, logged once) and devices offline longer than
``forget_after`` make room again; a dashboard's subscriptions stop at
``max_subscriptions``; viewers that never read, while devices come and go or
while they ask for the device listing again and again, are disconnected at
``control_queue_bytes`` instead of growing the gateway's memory; and a
``devices`` reply is a page. Memory is the process's own (``/proc/PID``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time

import aiohttp
import pytest

from tests.devices.support import Client
from tests.resilience.conftest import GatewayFactory
from tests.resilience.support import OPEN, connect_dashboard, connect_device, data_frame
from tests.support.gateway import VIEWER, GatewayProcess
from tests.support.wait import wait_until

pytestmark = pytest.mark.resilience

MB = 1024 * 1024


class _SocketCloser:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    async def aclose(self) -> None:
        self.sock.close()


def _ws_text(body: str) -> bytes:
    """One masked client text frame (an all-zero mask leaves the payload as it is)."""
    data = body.encode()
    if len(data) < 126:
        head = bytes([0x81, 0x80 | len(data)])
    else:
        head = bytes([0x81, 0x80 | 126]) + len(data).to_bytes(2, "big")
    return head + b"\x00\x00\x00\x00" + data


async def stalled_dashboard(gw: GatewayProcess, *requests: str) -> socket.socket:
    """A viewer that completes the upgrade, sends ``requests``, and never reads a byte."""
    loop = asyncio.get_running_loop()
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.setblocking(False)
    OPEN.append(_SocketCloser(s))
    host, port = gw.http_address
    await loop.sock_connect(s, (host, port))
    upgrade = (
        f"GET /ws?token={VIEWER} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    await loop.sock_sendall(s, upgrade.encode() + b"".join(_ws_text(r) for r in requests))
    return s


async def metric(gw: GatewayProcess, name: str, /, **labels: str) -> float:
    return (await gw.metrics()).value(name, **labels)


async def wait_metric(gw: GatewayProcess, value: float, name: str, /, **labels: str) -> None:
    """Until /metrics shows ``name{labels}`` at ``value`` (a gateway without it fails here)."""
    last: list[float] = []

    async def check() -> bool:
        last[:] = [await metric(gw, name, **labels)]
        return last[0] == value

    deadline = time.monotonic() + 20
    while not await check():
        assert time.monotonic() < deadline, f"{name}{labels} is {last}, not {value}"
        await asyncio.sleep(0.1)


async def churn(gw: GatewayProcess, until: asyncio.Event, name: str, ids: int = 200) -> int:
    """Devices connect, say HELLO and close, until ``until``.

    From a set of ``ids`` ids, each used again only once its last session is long gone
    (so no HELLO is a takeover).
    """
    n = 0
    while not until.is_set():
        device = await connect_device(gw, f"{name}-{n % ids}")
        await device.aclose()
        n += 1
    return n


# ---- finding 5: client_ids registered without end ----------------------------------------------


# These tests register many devices from one loopback address with empty sessions
# (HELLO, then close), which is what devices.max_failed_links holds at the door
# (tests/devices/test_tcp_limits.py): off here, so the bound under test is the one hit.
NO_DOOR = {"max_failed_links": 0}


async def test_new_client_ids_stop_at_max_known_devices_and_forgetting_makes_room(
    gateways: GatewayFactory,
) -> None:
    gw = gateways(
        {"dashboards": {"max_known_devices": 20, "forget_after": 1.0}, "devices": NO_DOOR}
    )
    await gw.start()
    for n in range(20):
        device = await connect_device(gw, f"reg-{n}")
        await device.aclose()
    for n in range(20, 30):  # a flood of new ids: each refused, its link closed
        reader, writer = await asyncio.open_connection(*gw.device_address)
        device = Client(reader, writer)
        OPEN.append(device)
        with pytest.raises(AssertionError, match=r"RATE_LIMITED.*max_known_devices"):
            await device.hello(f"reg-{n}")
        await device.closed()
    assert await metric(gw, "iot_device_refused_total", limit="max_known_devices") == 10
    assert await metric(gw, "iot_devices_known") <= 20
    # One warning for the whole flood, not one line per refused HELLO.
    assert gw.stderr().count("max_known_devices") == 1, gw.log_tail()
    # Forgotten once offline for forget_after: room for new devices again.
    await wait_metric(gw, 0, "iot_devices_known")
    assert await metric(gw, "iot_devices_forgotten_total") >= 20
    fresh = await connect_device(gw, "fresh")
    assert await metric(gw, "iot_devices_known") == 1
    await fresh.aclose()
    assert not gw.crashes(), gw.log_tail()


async def test_a_known_device_comes_back_when_the_gateway_is_full(
    gateways: GatewayFactory,
) -> None:
    gw = gateways({"dashboards": {"max_known_devices": 3}})
    await gw.start()
    for n in range(3):
        device = await connect_device(gw, f"k-{n}")
        await device.aclose()
    again = await connect_device(gw, "k-1")  # known: admitted at the bound
    assert await metric(gw, "iot_device_refused_total", limit="max_known_devices") == 0
    await again.aclose()


async def test_devices_replies_come_by_page(gateways: GatewayFactory) -> None:
    gw = gateways({"dashboards": {"devices_page_size": 40}, "devices": NO_DOOR})
    await gw.start()
    for n in range(100):
        device = await connect_device(gw, f"p-{n:03d}")
        await device.aclose()
    async with aiohttp.ClientSession() as http:
        dash = await connect_dashboard(gw, http)
        seen: list[str] = []
        after: str | None = None
        pages = 0
        while True:
            request: dict[str, object] = {"op": "devices", "id": pages}
            if after is not None:
                request["after"] = after
            answer = await dash.request(request, "devices")
            pages += 1
            seen += [e["device"] for e in answer["devices"]]
            assert len(answer["devices"]) <= 40
            after = answer["next"]
            if after is None:
                break
        assert pages == 3
        assert seen == [f"p-{n:03d}" for n in range(100)]


# ---- finding 6: subscriptions without end ------------------------------------------------------


async def test_a_subscription_flood_stops_at_max_subscriptions(gateways: GatewayFactory) -> None:
    gw = gateways()  # the default bound: 1000 targets per dashboard
    await gw.start()
    async with aiohttp.ClientSession() as http:
        dash = await connect_dashboard(gw, http, {"device": "warm-up"})
        # Paced in rounds that the dashboard reads, so only the bound answers.
        rounds, per_round = 100, 1000
        rss_before = gw.rss()
        answers: dict[str, int] = {}
        for r in range(rounds):
            for i in range(per_round):
                await dash.send({"op": "subscribe", "device": f"s-{r}-{i}"})
            for _ in range(per_round):
                msg = await dash.recv()
                key = msg["op"] if msg["op"] != "error" else msg["code"]
                answers[key] = answers.get(key, 0) + 1
        grown = gw.rss() - rss_before
        assert answers == {"subscribed": 999, "too_large": rounds * per_round - 999}
        assert await metric(gw, "iot_refused_total", limit="max_subscriptions") == (
            rounds * per_round - 999
        )
        # 100,000 subscriptions held cost some 40 MB: the bound holds a thousand.
        assert grown < 25 * MB, f"RSS grew {grown / MB:.1f} MB"
        await dash.ws.close()
    # Released with the dashboard: a new one may hold its own thousand.
    async with aiohttp.ClientSession() as http:
        again = await connect_dashboard(gw, http, {"all": True})
        for i in range(999):
            await again.send({"op": "subscribe", "device": f"t-{i}"})
        ops = [(await again.recv())["op"] for _ in range(999)]
        assert set(ops) == {"subscribed"}
        await again.ws.close()


# ---- finding 7 and the listing: dashboards that never read -------------------------------------


async def test_stalled_viewers_under_session_churn_are_let_go(gateways: GatewayFactory) -> None:
    stalled_count = 20
    gw = gateways(
        {
            "dashboards": {"control_queue_bytes": 256 * 1024, "drain_timeout": 300.0},
            "devices": {"max_frames_per_second": 1e6, "rate_burst": 1e6, **NO_DOOR},
        }
    )
    await gw.start()
    async with aiohttp.ClientSession() as http:
        watcher = await connect_dashboard(gw, http, {"device": "still-here"}, token=VIEWER)
        for _ in range(stalled_count):
            await stalled_dashboard(gw, '{"op":"subscribe","all":true}')
        await wait_metric(gw, stalled_count + 1, "iot_dashboards")
        # Telemetry first, to fill the stalled sockets' buffers (megabytes on loopback)
        # at little cost: the presence that follows then waits in their control queues.
        filler = await connect_device(gw, "filler")
        for _ in range(40):
            for seq in range(500):
                filler.send_raw(data_frame(seq))
            await filler.writer.drain()
        await filler.aclose()
        await wait_metric(gw, 20_000, "iot_telemetry_messages_total")
        rss_before = gw.rss()
        stop = asyncio.Event()
        churners = [asyncio.ensure_future(churn(gw, stop, f"churn{k}")) for k in range(3)]

        async def reading() -> None:  # the watcher reads everything, as a page does
            with contextlib.suppress(asyncio.CancelledError):
                while True:
                    await watcher.recv(timeout=3600)
                    watcher.inbox.clear()
                    watcher.seen.clear()

        reader = asyncio.ensure_future(reading())
        try:
            await wait_until(
                lambda: gw.stderr().count("(control_queue_bytes)") >= stalled_count,
                "every stalled viewer closed at control_queue_bytes",
                timeout=45,
            )
        finally:
            stop.set()
            cycles = sum(await asyncio.gather(*churners))
            reader.cancel()
            await reader
        grown = gw.rss() - rss_before
        assert await metric(gw, "iot_dashboards_closed_total", reason="control_queue") == (
            stalled_count
        )
        assert await metric(gw, "iot_dashboards") == 1  # the watcher only
        # Each stalled viewer held at most 256 KiB of presence before it was let go.
        assert grown < 40 * MB, f"RSS grew {grown / MB:.1f} MB over {cycles} sessions"
        # The reading watcher was never held up: it still gets presence at once.
        back = await connect_device(gw, "still-here")
        await watcher.expect("presence", device="still-here", online=True)
        await back.aclose()
        assert await gw.healthy()
    assert not gw.crashes(), gw.log_tail()


async def test_a_viewer_asking_for_the_listing_without_reading_is_let_go(
    gateways: GatewayFactory,
) -> None:
    # The default control_queue_bytes.
    gw = gateways({"dashboards": {"devices_page_size": 100}, "devices": NO_DOOR})
    await gw.start()
    for n in range(300):
        device = await connect_device(gw, f"l-{n:03d}")
        await device.aclose()
    rss_before = gw.rss()
    # 2,000 requests for a 30 KB page: 60 MB of replies if they were all kept.
    ask = _ws_text(json.dumps({"op": "devices"}))
    sock = await stalled_dashboard(gw)
    loop = asyncio.get_running_loop()
    for _ in range(20):
        await loop.sock_sendall(sock, ask * 100)
    await wait_metric(gw, 1, "iot_dashboards_closed_total", reason="control_queue")
    grown = gw.rss() - rss_before
    assert grown < 30 * MB, f"RSS grew {grown / MB:.1f} MB"
    assert await gw.healthy()
    assert not gw.crashes(), gw.log_tail()
