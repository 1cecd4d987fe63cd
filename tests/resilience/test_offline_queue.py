"""The offline command queue under a flood and a long backlog, against a gateway process.

Finding 4 of issue 12: commands for an offline device were queued without
bound (26,020 in 20 s, a 64 KiB ``id`` kept for the TTL), the whole queue was
loaded at once when the device came back, and ACKs over the device's rate
limit were dropped, so commands it had carried out ended as ``timeout``. Now
(docs/api.md §3.1, docs/configuration.md ``[storage]``): the queue is bounded
per device and in all, and past a bound a command is ``rejected``, counted;
an ``id`` over 128 characters is a bad request; a long queue is delivered a
page at a time, with no more commands awaiting their ACK than the device's
``max_inflight_commands``, and each ACK counts. A protocol-group command
reaches every device even when one of them does not read.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import frames
from tests.devices.support import Client
from tests.resilience.conftest import GatewayFactory
from tests.resilience.support import OPEN, Telemetry, connect_dashboard, connect_device
from tests.support.gateway import GatewayProcess
from tests.support.metrics import Metrics
from tests.support.wait import wait_until

pytestmark = pytest.mark.resilience

FAST_COMMANDS = {"commands_per_second": 100_000.0, "max_pending_commands": 1000}


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.get((name, frozenset(labels.items())), 0.0)


async def seen_then_offline(gw: GatewayProcess, *names: str) -> None:
    for name in names:
        device = await connect_device(gw, name)
        await device.aclose()

    async def offline() -> bool:
        listing = (await gw.get_json("/api/devices"))["devices"]
        return not any(d["online"] for d in listing if d["device"] in names)

    await wait_until(offline, f"{names} offline")


async def post(gw: GatewayProcess, device: str, command_id: str | None = None) -> tuple[int, Any]:
    body: dict[str, Any] = {"command": {"name": "reboot"}}
    if command_id is not None:
        body["id"] = command_id
    return await gw.post_json(f"/api/devices/{device}/commands", body)


async def test_the_offline_queue_is_bounded_per_device_and_in_all(
    gateways: GatewayFactory,
) -> None:
    gw = gateways(
        {
            "dashboards": FAST_COMMANDS,
            "storage": {"max_queued_commands_per_device": 3, "max_queued_commands": 5},
        }
    )
    await gw.start()
    await seen_then_offline(gw, "q-a", "q-b", "q-c")
    for _ in range(3):
        assert (await post(gw, "q-a"))[0] == 202
    status, body = await post(gw, "q-a", "over")
    assert status == 400, body
    assert (body["status"], body["id"]) == ("rejected", "over")
    assert "storage.max_queued_commands_per_device" in body["error"]
    for _ in range(2):
        assert (await post(gw, "q-b"))[0] == 202
    status, body = await post(gw, "q-c")
    assert status == 400, body
    assert "storage.max_queued_commands" in body["error"]

    # An id is kept with its queued command: one of 129 characters is refused.
    status, body = await post(gw, "q-c", "x" * 129)
    assert (status, body["code"]) == (400, "bad_request"), body
    metrics = await gw.metrics()
    for reason, n in [
        ("max_queued_commands_per_device", 1),
        ("max_queued_commands", 1),
        ("max_command_id", 1),
    ]:
        assert sample(metrics, "iot_commands_refused_total", reason=reason) == n, reason
    assert sample(metrics, "iot_command_results_total", status="queued") == 5

    # Room again once a device takes its commands.
    device = await connect_device(gw, "q-a")
    for _ in range(3):
        command = await device.expect(frames.Command)
        device.send(frames.Ack(command.seq, 0))
    await device.aclose()
    await seen_then_offline(gw, "q-a")
    assert (await post(gw, "q-c"))[0] == 202
    assert gw.crashes() == [], gw.crashes()[:5]


QUEUED = 400
INFLIGHT = 8


async def test_a_long_queue_goes_at_the_devices_pace_and_every_ack_counts(
    gateways: GatewayFactory,
) -> None:
    gw = gateways({"dashboards": FAST_COMMANDS, "devices": {"max_inflight_commands": INFLIGHT}})
    await gw.start()
    await seen_then_offline(gw, "backlog")
    async with aiohttp.ClientSession() as session:
        dash = await connect_dashboard(gw, session, {"device": "backlog"})
        for start in range(0, QUEUED, 100):
            for i in range(start, start + 100):
                command = {"name": "set_interval", "args": {"seconds": i + 1}}
                await dash.send({"op": "command", "id": i, "device": "backlog", "command": command})
            for i in range(start, start + 100):
                await dash.expect("command_status", id=i, status="queued")
        await dash.ws.close()

    device = await connect_device(gw, "backlog")
    started = time.monotonic()
    got: list[int] = []
    unacked: list[int] = []
    most = 0
    while len(got) < QUEUED:
        msg = await device.recv(timeout=20)
        if not isinstance(msg, frames.Command):
            continue
        got.append(struct.unpack(">H", msg.body[1:3])[0])
        unacked.append(msg.seq)
        most = max(most, len(unacked))
        if len(unacked) == INFLIGHT or len(got) == QUEUED:
            # Answers come in bursts, as a busy device's might: all of them count.
            for seq in unacked:
                device.send(frames.Ack(seq, 0))
            unacked.clear()
    took = time.monotonic() - started
    assert got == list(range(1, QUEUED + 1)), "each once, oldest first"
    assert most == INFLIGHT, "never more awaiting an ACK than the device's allowance"

    async def all_acked() -> bool:
        metrics = await gw.metrics()
        return sample(metrics, "iot_command_results_total", status="acked") == QUEUED

    await wait_until(all_acked, f"{QUEUED} acked")
    metrics = await gw.metrics()
    assert sample(metrics, "iot_command_results_total", status="timeout") == 0
    assert sample(metrics, "iot_rate_limited_frames_total") == 0
    await device.aclose()
    print(f"\n{QUEUED} queued commands delivered in {took:.2f} s ({QUEUED / took:.0f}/s)")
    assert gw.crashes() == [], gw.crashes()[:5]


PING = frames.encode_frame(frames.Ping(0).encode())
# Enough PINGs that their PONGs overflow the kernel's buffers for the link (up
# to tcp_wmem's maximum) and pile up in the gateway, pausing its writes.
WMEM_MAX = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
FLOOD = WMEM_MAX + (1 << 20)
# Long enough that 'the reading device did not wait for the deaf one' holds on
# a busy 2-core machine with a margin.
ACK_TIMEOUT = 8.0


async def deaf_device(gw: GatewayProcess, client_id: str) -> Client:
    """A device that stops reading but keeps sending, until the gateway's writes to it wait."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, gw.device_address)
    reader, writer = await asyncio.open_connection(sock=sock)
    client = Client(reader, writer)
    OPEN.append(client)
    await client.hello(client_id)
    reader._transport.pause_reading()  # type: ignore[attr-defined]
    burst = PING * 10_000
    rounds = FLOOD // len(burst) + 1
    for _ in range(rounds):
        client.send_raw(burst)
        await writer.drain()
    # Until the gateway has read the whole flood: its PONGs now fill the link,
    # and what the test times next does not include working through the PINGs.
    pings = rounds * 10_000

    async def read_all() -> bool:
        # The gateway is busy with the flood (half a million PINGs): on a loaded
        # machine one scrape may wait past its own timeout. That is not the
        # answer yet, only a slow one: ask again until wait_until's bound.
        try:
            metrics = await gw.metrics()
        except (TimeoutError, OSError):
            return False
        return metrics.value("iot_frames_in_total") >= pings

    await wait_until(read_all, f"the gateway to read {pings} PINGs", timeout=120, every=0.25)
    return client


async def test_a_group_command_reaches_the_others_while_one_device_does_not_read(
    gateways: GatewayFactory,
) -> None:
    gw = gateways(
        {
            "dashboards": FAST_COMMANDS,
            "devices": {
                "ack_timeout": ACK_TIMEOUT,
                "max_frames_per_second": 1e9,
                "rate_burst": 1e9,
                # The PONGs it does not read stay below this: it is not closed for it.
                "max_write_buffer": 4 * FLOOD,
            },
        }
    )
    await gw.start()
    async with aiohttp.ClientSession() as session:
        dash = Telemetry(await connect_dashboard(gw, session))
        await deaf_device(gw, "a-deaf")  # first in the group's order
        good = await connect_device(gw, "b-good")
        started = time.monotonic()
        await dash.dash.send(
            {"op": "command", "id": "g", "protocol": "env-sensor", "command": {"name": "reboot"}}
        )
        command = await good.expect(frames.Command, timeout=10)
        took = time.monotonic() - started
        # Before the write to the deaf one gives up: nobody waited for it.
        assert took < ACK_TIMEOUT, f"the reading device waited {took:.1f} s for the deaf one"
        good.send(frames.Ack(command.seq, 0))

        def finals() -> dict[str, dict[str, Any]]:
            return {
                m["device"]: m for m in dash.other if m.get("id") == "g" and m["status"] != "sent"
            }

        # One final status per device.
        await dash.wait_for(lambda: len(finals()) == 2, timeout=30, what="both final statuses")
        assert finals()["b-good"]["status"] == "acked"
        assert finals()["a-deaf"]["status"] == "timeout"
        # Never written: the deaf device's link really could not take it.
        assert finals()["a-deaf"]["error"] == "device not reading"
        await dash.aclose()
    assert gw.crashes() == [], gw.crashes()[:5]
