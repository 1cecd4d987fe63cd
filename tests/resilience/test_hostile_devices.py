"""Hostile and faulty devices against a gateway process (docs/protocol.md §4, issue 12).

A connection that never says HELLO and floods valid frames, reconnecting; two
connections fighting over one client_id; a device that stops reading but
keeps its link, then resets. Through each a well-behaved device keeps
delivering every frame to a dashboard, ``/healthz`` keeps answering, each
bound is counted on ``/metrics``, and nothing crashes. And the device port
can listen on its own address.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import statistics
import struct
import time
from pathlib import Path

import aiohttp
import pytest

import frames
from tests.devices.support import Client
from tests.resilience.conftest import GatewayFactory
from tests.resilience.support import (
    OPEN,
    Steady,
    connect_dashboard,
    connect_device,
    track,
)
from tests.support.gateway import GatewayProcess
from tests.support.wait import wait_until

pytestmark = pytest.mark.resilience

PING = frames.encode_frame(frames.Ping(1).encode())
MALFORMED = frames.encode_frame(b"\x10")  # a message with no seq: ERROR MALFORMED


async def healthz_latencies(gw: GatewayProcess, stop: asyncio.Event) -> list[float]:
    """Seconds each ``/healthz`` took, asked twice a second until ``stop``."""
    took: list[float] = []
    while not stop.is_set():
        started = time.monotonic()
        assert await gw.healthy()
        took.append(time.monotonic() - started)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.5)
    return took


async def test_a_flood_before_hello_is_closed_at_its_budget_and_costs_others_nothing(
    gateways: GatewayFactory,
) -> None:
    gw = gateways()
    await gw.start()
    flood = PING * 10_000  # 70 KB of valid frames per write, and never a HELLO
    connections: list[float] = []  # how long each flooding connection lasted

    async def flooder(stop: asyncio.Event) -> None:
        while not stop.is_set():
            reader, writer = await asyncio.open_connection(*gw.device_address)
            track(writer)
            opened = time.monotonic()
            with contextlib.suppress(ConnectionError, OSError):
                async with asyncio.timeout(10):
                    while True:
                        writer.write(flood)
                        await writer.drain()
                        if reader.at_eof() or not await _read_some(reader):
                            break
            connections.append(time.monotonic() - opened)
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async with aiohttp.ClientSession() as session, Steady(gw, session) as steady:
        stop = asyncio.Event()
        health = asyncio.ensure_future(healthz_latencies(gw, stop))
        flooding = asyncio.ensure_future(flooder(stop))
        await asyncio.sleep(4.0)  # the time under test: four seconds of flood
        stop.set()
        await flooding
        took = await health
        delays = await steady.all_arrived()
    assert len(connections) >= 3, connections
    assert max(connections) < 5.0, connections  # each closed at its budget, at once
    m = await gw.metrics()
    # Each one is closed at its budget, or, once the address failed
    # devices.max_failed_links times, held unread until it may try again.
    budget = m.value("iot_device_links_closed_total", reason="hello_budget")
    held = m.value("iot_device_refused_total", limit="max_failed_links")
    assert budget >= 20, (budget, held)
    assert held >= 1, (budget, held)
    assert budget + held >= len(connections) - 1
    # The real device's frames all arrived, and soon; /healthz kept answering.
    assert statistics.median(delays) < 0.5, sorted(delays)[-5:]
    assert statistics.median(took) < 0.5, took
    assert gw.crashes() == [], gw.crashes()[:5]


async def _read_some(reader: asyncio.StreamReader) -> bool:
    """Read what the gateway sent (PONGs, then its ERROR); False once it closed."""
    try:
        data = await asyncio.wait_for(reader.read(65536), 0.05)
    except TimeoutError:
        return True
    return bool(data)


async def test_a_takeover_storm_is_bounded_and_logs_a_few_lines(
    gateways: GatewayFactory,
) -> None:
    gw = gateways({"devices": {"max_takeovers": 10, "churn_window": 60.0}})
    await gw.start()
    attempts = [0]

    async def fighter(stop: asyncio.Event) -> None:
        while not stop.is_set():
            reader, writer = await asyncio.open_connection(*gw.device_address)
            track(writer)
            attempts[0] += 1
            client = Client(reader, writer)
            client.send(frames.Hello(1, "contested", "env-sensor", ""))
            # Hold it until the gateway closes it (REPLACED, RATE_LIMITED), then again.
            closed = asyncio.ensure_future(client.closed(timeout=60))
            stopped = asyncio.ensure_future(stop.wait())
            await asyncio.wait([closed, stopped], return_when=asyncio.FIRST_COMPLETED)
            closed.cancel()
            stopped.cancel()
            await client.aclose()

    async with aiohttp.ClientSession() as session, Steady(gw, session) as steady:
        stop = asyncio.Event()
        fighters = [asyncio.ensure_future(fighter(stop)) for _ in range(2)]
        await asyncio.sleep(3.0)  # the time under test
        stop.set()
        await asyncio.gather(*fighters)
        await steady.all_arrived()
    m = await gw.metrics()
    # A storm, not a skirmish: past max_takeovers, and past max_failed_links too
    # (each replaced session is empty: it sent nothing after its HELLO).
    assert attempts[0] >= 20, attempts
    assert m.value("iot_device_replaced_total") <= 10
    # Refused HELLOs, and, once the address failed devices.max_failed_links
    # times, connections held at the door.
    refused = m.value("iot_device_refused_total", limit="max_takeovers")
    held = m.value("iot_device_refused_total", limit="max_failed_links")
    assert refused + held >= attempts[0] - 12, (refused, held, attempts)
    lines = [line for line in gw.stderr().splitlines() if "contested" in line]
    assert len(lines) <= 8, lines
    assert gw.crashes() == [], gw.crashes()[:5]


def tcp_wmem_max() -> int:
    """The most the OS buffers for one TCP socket's sends (Linux), in bytes."""
    return int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])


async def tight_device(gw: GatewayProcess, client_id: str) -> tuple[Client, socket.socket]:
    """A device past its HELLO whose socket buffers little (it fills fast once not read)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, gw.device_address)
    reader, writer = await asyncio.open_connection(sock=sock)
    client = Client(reader, writer)
    OPEN.append(client)
    await client.hello(client_id)
    return client, sock


async def test_a_device_that_stops_reading_holds_up_nobody_and_may_reset(
    gateways: GatewayFactory,
) -> None:
    gw = gateways(
        {
            "devices": {
                "ack_timeout": 1.0,
                "max_frames_per_second": 1e6,
                "rate_burst": 1e6,
                "max_write_buffer": 16 * 1024 * 1024,
            }
        }
    )
    await gw.start()
    async with aiohttp.ClientSession() as session:
        dash = await connect_dashboard(gw, session)
        deaf, sock = await tight_device(gw, "deaf")
        other = await connect_device(gw, "other")
        # It stops reading, and keeps talking: what the gateway answers piles up for it,
        # past the OS's send buffer (up to tcp_wmem's maximum on loopback) into the
        # gateway's own, below devices.max_write_buffer. A malformed frame is answered
        # with an ERROR nine times its size, which fills it fast.
        deaf.reader._transport.pause_reading()  # type: ignore[attr-defined]
        wmem_max = tcp_wmem_max()
        answer = 56  # bytes of ERROR MALFORMED for each 6-byte frame below
        for _ in range((wmem_max + 512 * 1024) // answer // 1000 + 1):
            deaf.send_raw(MALFORMED * 1000)
            await deaf.writer.drain()

        async def backed_up() -> bool:
            m = await gw.metrics()
            return m.value("iot_frames_in_total") >= (wmem_max + 512 * 1024) // answer

        await wait_until(backed_up, "the gateway's answers to the deaf device backed up")
        # A command to it fails alone, in about ack_timeout; the WebSocket answers meanwhile.
        await dash.send(
            {"op": "command", "id": "c1", "device": "deaf", "command": {"name": "reboot"}}
        )
        await dash.send({"op": "devices"})
        await dash.expect("devices", timeout=5)
        status = await dash.expect("command_status", timeout=10, id="c1", status="timeout")
        assert status["error"] == "device not reading"
        # The other device is not held up.
        await dash.send(
            {"op": "command", "id": "c2", "device": "other", "command": {"name": "reboot"}}
        )
        await dash.expect("command_status", timeout=5, id="c2", status="sent")
        command = await other.expect(frames.Command)
        other.send(frames.Ack(command.seq, 0))
        await dash.expect("command_status", timeout=5, id="c2", status="acked")
        # An HTTP command to it answers in time too, as JSON.
        started = time.monotonic()
        code, body = await gw.post_json("/api/devices/deaf/commands", {"command": {"hex": "02"}})
        assert time.monotonic() - started < 5.0
        assert code == 202, body
        # Then the device resets while a command waits for room: nothing escapes.
        waiting = asyncio.ensure_future(
            gw.post_json("/api/devices/deaf/commands", {"command": {"hex": "02"}})
        )
        await asyncio.sleep(0.2)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        deaf.writer.transport.abort()
        code, body = await asyncio.wait_for(waiting, 10)
        assert code == 202, body
        assert isinstance(body, dict), body

        async def offline() -> bool:
            return not (await gw.get_json("/api/devices/deaf"))["online"]

        await wait_until(offline, "the reset device offline")
        await dash.send({"op": "devices"})
        await dash.expect("devices", timeout=5)
    m = await gw.metrics()
    assert m.value("iot_device_commands_not_written_total", reason="not_reading") >= 2
    assert gw.crashes() == [], gw.crashes()[:5]


async def test_the_device_port_listens_on_its_own_address(gateways: GatewayFactory) -> None:
    # 127.0.0.2 is loopback too (127.0.0.0/8): devices without a token are welcome.
    gw = gateways(args=["--device-host", "127.0.0.2"])
    await gw.start()
    assert gw.http_address[0] == "127.0.0.1"
    assert gw.device_address[0] == "127.0.0.2"
    device = await connect_device(gw, "on-its-own")
    await device.aclose()
    port = gw.device_address[1]
    assert (
        f"device port 127.0.0.2:{port} is loopback only: devices without a token are accepted"
        in gw.stderr()
    )
