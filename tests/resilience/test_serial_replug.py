"""A serial link (a real pseudo-terminal) unplugged and replugged under traffic, twice.

The gateway is given a symlink we control as its port (``--serial
LINK,client_id=...,protocol=env-sensor``), as a user gives it
``/dev/serial/by-id/...``. Unplugging removes the link and closes the pty (the
gateway's end of it dies); replugging opens a new pty behind the same link
name. The device must go offline, come back online by itself with its
telemetry flowing again, while a TCP device's telemetry never stops, and
``iot_serial_reconnects`` must count the reopenings.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import tty
from pathlib import Path

import aiohttp
import pytest

from tests.resilience.conftest import GatewayFactory
from tests.resilience.support import (
    Telemetry,
    connect_dashboard,
    connect_device,
    data_frame,
    stream,
)
from tests.support.wait import wait_until

pytestmark = pytest.mark.resilience

SERIAL_ID = "serial-1"
TCP_ID = "tcp-alongside"


class Pty:
    """A pseudo-terminal whose master end plays the device: DATA every 20 ms."""

    def __init__(self, link: Path) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)
        os.set_blocking(self.master, False)
        link.unlink(missing_ok=True)
        link.symlink_to(os.ttyname(self.slave))
        self.link = link
        self.stop = asyncio.Event()
        self.task = asyncio.ensure_future(self._talk())

    async def _talk(self) -> None:
        seq = 0
        while not self.stop.is_set():
            seq += 1
            # A port nobody reads fills up: the bytes are lost, as on a real UART.
            with contextlib.suppress(BlockingIOError, OSError):
                os.write(self.master, data_frame(seq))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), 0.02)

    async def unplug(self) -> None:
        self.stop.set()
        await self.task
        self.link.unlink(missing_ok=True)
        for fd in (self.master, self.slave):
            with contextlib.suppress(OSError):
                os.close(fd)


def presence(watcher: Telemetry, online: bool) -> int:
    return sum(
        1
        for m in watcher.other
        if m.get("op") == "presence" and m.get("device") == SERIAL_ID and m["online"] is online
    )


async def test_serial_unplug_replug_under_traffic(gateways: GatewayFactory, tmp_path: Path) -> None:
    link = tmp_path / "ttyBENCH0"
    pty = Pty(link)
    gw = gateways(args=["--serial", f"{link},client_id={SERIAL_ID},protocol=env-sensor"])
    await gw.start()
    async with aiohttp.ClientSession() as session:
        watcher = Telemetry(await connect_dashboard(gw, session))
        tcp = await connect_device(gw, TCP_ID)
        stop = asyncio.Event()
        tcp_task = asyncio.ensure_future(stream(tcp, 20.0, stop, []))
        await watcher.wait_for(lambda: watcher.count(SERIAL_ID) >= 10, 20)
        for _ in range(2):
            # Counted from now: the first online presence may predate the subscription.
            offline_before = presence(watcher, False)
            online_before = presence(watcher, True)
            await pty.unplug()

            def went_offline(n: int = offline_before) -> bool:
                return presence(watcher, False) > n

            await watcher.wait_for(went_offline, 15)
            unplugged_at = time.monotonic()

            def tcp_flows(t: float = unplugged_at) -> bool:
                return watcher.count(TCP_ID, t) >= 5

            await watcher.wait_for(tcp_flows, 10)  # the TCP device does not notice
            pty = Pty(link)
            replugged_at = time.monotonic()

            def back_online(n: int = online_before) -> bool:
                return presence(watcher, True) > n

            def serial_flows(t: float = replugged_at) -> bool:
                return watcher.count(SERIAL_ID, t) >= 10

            await watcher.wait_for(back_online, 30)
            await watcher.wait_for(serial_flows, 30)

        async def reconnects_counted() -> bool:
            return (await gw.metrics()).value("iot_serial_reconnects_total") >= 2

        await wait_until(reconnects_counted, "iot_serial_reconnects_total >= 2")
        stop.set()
        await tcp_task
        await tcp.aclose()
        await watcher.aclose()
    await pty.unplug()
    assert gw.crashes() == [], gw.crashes()[:5]
