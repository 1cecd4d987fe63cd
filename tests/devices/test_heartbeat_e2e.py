"""Heartbeat overrides end to end: real loopback TCP, the asyncio adapter and the registry.

The rules (device > serial port > protocol > global) are checked exactly on a
fake clock in test_core_heartbeat.py; here one device reporting slower than
the global heartbeat stays online through real time while another, with no
override, goes silent.
"""

from __future__ import annotations

import asyncio
import time

import frames
from devices import CloseReason, DeviceOffline, SerialPortConfig
from devices.config import HeartbeatOverrides
from tests.devices.support import ENV_DATA, Gateway, GatewayFactory
from tests.devices.test_serial_links import FAST, Pty, new_pty, ptys, start_link

__all__ = ["ptys"]  # the fixture, used by name


async def test_a_protocol_override_keeps_a_slow_reporter_online(
    make_gateway: GatewayFactory,
) -> None:
    # Global: offline after 1 s of silence. env-sensor: after 3 s.
    gw: Gateway = await make_gateway(
        heartbeat=1,
        misses=1,
        heartbeat_overrides=HeartbeatOverrides(protocols={"env-sensor": 3}),
    )
    slow = await gw.connect()
    other = await gw.connect()
    assert (await slow.hello("battery-1", "env-sensor")).heartbeat == 3
    started = time.monotonic()
    assert (await other.hello("relay-1", "relay-4")).heartbeat == 1
    # The relay says nothing more: offline about 1 s later.
    gone = await gw.sink.offline("relay-1")
    assert gone.reason is CloseReason.SILENT
    # The sensor reports every 1.5 s, slower than the global 1 s, and stays online.
    for seq in range(3):
        await asyncio.sleep(1.5)  # the device's own reporting period, not a wait for an event
        slow.send(frames.Data(seq, ENV_DATA))
    await gw.sink.wait_for(
        lambda e: getattr(e, "client_id", None) == "battery-1" and getattr(e, "seq", -1) == 2
    )
    assert gw.manager.is_online("battery-1")
    assert not any(
        isinstance(e, DeviceOffline) and e.info.client_id == "battery-1" for e in gw.sink.events
    )
    assert time.monotonic() - started > 4.0  # well past the global 1 s
    # Then silent: offline after its own 3 s.
    last = time.monotonic()
    off = await gw.sink.offline("battery-1")
    assert off.reason is CloseReason.SILENT
    assert time.monotonic() - last > 2.0


async def test_a_serial_ports_heartbeat_reaches_the_device_over_a_real_pty(
    ptys: list[Pty],
) -> None:
    # The port's 2 s wins over env-sensor's 5 s; the global is 1 s.
    pty = new_pty(ptys)
    config = SerialPortConfig(pty.path, heartbeat=2, backoff=FAST)
    link, sink = await start_link(
        config,
        heartbeat=1,
        misses=1,
        heartbeat_overrides=HeartbeatOverrides(protocols={"env-sensor": 5}),
    )
    try:
        await asyncio.wait_for(link.opened.wait(), 10)
        pty.send(frames.Hello(1, "port-1", "env-sensor", ""))
        welcome = await pty.recv()
        assert isinstance(welcome, frames.Welcome)
        assert welcome.heartbeat == 2
        online_at = time.monotonic()
        await sink.online("port-1")
        off = await sink.offline("port-1")  # silent for 1 x 2 s
        assert off.reason is CloseReason.SILENT
        assert time.monotonic() - online_at > 1.5  # not the global 1 s
    finally:
        await link.stop()
