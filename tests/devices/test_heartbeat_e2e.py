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
from devices import CloseReason, DeviceOffline
from devices.config import HeartbeatOverrides
from tests.devices.support import ENV_DATA, Gateway, GatewayFactory


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
