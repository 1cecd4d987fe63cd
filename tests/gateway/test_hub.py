"""The routing core without sockets: queues, drops, lagged notices, routing, replay seam."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from devices import (
    CloseReason,
    DeviceInfo,
    DeviceOffline,
    DeviceOnline,
    DeviceTelemetry,
    Transport,
)
from gateway.hub import (
    Dashboard,
    Hub,
    HubConfig,
    LocalEngine,
    Role,
    dumps,
    telemetry_message,
    telemetry_text,
)
from gateway.storage import MemoryStorage, TelemetryRecord


def info(client_id: str, protocol: str = "env-sensor", session: str = "s1") -> DeviceInfo:
    return DeviceInfo(client_id, protocol, Transport.TCP, "127.0.0.1:1", session, 0)


def telemetry(client_id: str, seq: int, protocol: str = "env-sensor") -> DeviceTelemetry:
    return DeviceTelemetry(client_id, protocol, seq, {"n": seq}, int(time.time() * 1000), 0.0)


def drain(d: Dashboard) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    while batch := d.take(1000):
        out += [json.loads(t) for t in batch]
    return out


@pytest.fixture
async def hub() -> AsyncIterator[Hub]:
    storage = MemoryStorage()
    await storage.open()
    h = Hub(LocalEngine(storage), HubConfig(queue_size=8))
    await h.start()
    yield h
    await h.stop()
    await storage.close()


async def test_full_queue_drops_oldest_telemetry_never_control(hub: Hub) -> None:
    d = hub.connect_dashboard(Role.VIEWER, "x")
    await hub.handle(d, {"op": "subscribe", "all": True})
    hub.device_event(DeviceOnline(info("a")))
    for i in range(20):
        hub.device_event(telemetry("a", i))
    hub.device_event(DeviceOffline(info("a"), CloseReason.SILENT))
    got = drain(d)
    ops = [m["op"] for m in got]
    # The lagged notice comes first, where the gap is; control messages all stay.
    assert ops[0] == "lagged"
    assert ops.count("subscribed") == 1
    assert ops.count("presence") == 2
    seqs = [m["seq"] for m in got if m["op"] == "telemetry"]
    assert seqs == list(range(12, 20))  # the 8 newest
    lagged = got[0]
    assert lagged["dropped"] == 12
    first_kept = next(m for m in got if m["op"] == "telemetry")
    assert lagged["resume_from"] < first_kept["offset"]
    assert d.telemetry_queued == 0


async def test_one_lagged_notice_per_gap(hub: Hub) -> None:
    d = hub.connect_dashboard(Role.VIEWER, "x")
    await hub.handle(d, {"op": "subscribe", "all": True})
    hub.device_event(DeviceOnline(info("a")))
    for i in range(30):
        hub.device_event(telemetry("a", i))
    first = drain(d)
    assert [m["op"] for m in first].count("lagged") == 1
    for i in range(3):
        hub.device_event(telemetry("a", 100 + i))
    assert [m["op"] for m in drain(d)] == ["telemetry"] * 3


async def test_fan_out_reaches_each_dashboard_once(hub: Hub) -> None:
    both = hub.connect_dashboard(Role.VIEWER, "x")
    await hub.handle(both, {"op": "subscribe", "all": True})
    await hub.handle(both, {"op": "subscribe", "device": "a"})
    await hub.handle(both, {"op": "subscribe", "protocol": "env-sensor"})
    other = hub.connect_dashboard(Role.VIEWER, "y")
    await hub.handle(other, {"op": "subscribe", "protocol": "relay-4"})
    hub.device_event(DeviceOnline(info("a")))
    hub.device_event(telemetry("a", 1))
    assert [m["op"] for m in drain(both)].count("telemetry") == 1
    assert [m for m in drain(other) if m["op"] == "telemetry"] == []


async def test_the_same_text_goes_to_every_dashboard(hub: Hub) -> None:
    ds = [hub.connect_dashboard(Role.VIEWER, str(i)) for i in range(3)]
    for d in ds:
        await hub.handle(d, {"op": "subscribe", "all": True})
        d.take(10)
    hub.device_event(telemetry("a", 1))
    texts = [d.queue[0][2] for d in ds]
    assert texts[0] is texts[1] is texts[2]  # encoded once


async def test_takeover_offline_of_old_session_is_ignored(hub: Hub) -> None:
    d = hub.connect_dashboard(Role.VIEWER, "x")
    await hub.handle(d, {"op": "subscribe", "all": True})
    hub.device_event(DeviceOnline(info("a", session="old")))
    hub.device_event(DeviceOnline(info("a", session="new")))
    hub.device_event(DeviceOffline(info("a", session="old"), CloseReason.REPLACED))
    assert hub.devices["a"].online
    assert hub.devices["a"].session == "new"
    presence = [m for m in drain(d) if m["op"] == "presence"]
    assert [p["online"] for p in presence] == [True, True]


async def test_disconnect_forgets_subscriptions(hub: Hub) -> None:
    d = hub.connect_dashboard(Role.VIEWER, "x")
    await hub.handle(d, {"op": "subscribe", "device": "a"})
    drain(d)
    hub.disconnect_dashboard(d)
    assert hub.subscriptions.is_empty()
    assert d.closed
    hub.device_event(telemetry("a", 1))
    assert not d.queue


async def test_replay_then_live_without_gap_or_duplicate(hub: Hub) -> None:
    hub.device_event(DeviceOnline(info("a")))
    for i in range(5):
        hub.device_event(telemetry("a", i))
    d = hub.connect_dashboard(Role.VIEWER, "x")
    got: list[dict[str, Any]] = []

    async def writer() -> None:  # what the web layer's writer does: drain as it can
        while not d.closed:
            await d.wait()
            got.extend(m for m in map(json.loads, d.take(3)) if m["op"] == "telemetry")

    drainer = asyncio.create_task(writer())
    replay = asyncio.create_task(hub.handle(d, {"op": "subscribe", "device": "a", "since": 0}))
    while not d.held.active:
        await asyncio.sleep(0)
    hub.device_event(telemetry("a", 5))  # live, during the replay: held until it ends
    await replay
    hub.device_event(telemetry("a", 6))
    while len(got) < 7:
        await asyncio.sleep(0)
    d.close()
    await drainer
    assert [m["seq"] for m in got] == list(range(7))
    offsets = [m["offset"] for m in got]
    assert offsets == sorted(set(offsets))


async def test_replay_since_skips_older(hub: Hub) -> None:
    hub.config = HubConfig(queue_size=64)  # room for the whole replay without a writer
    for i in range(6):
        hub.device_event(telemetry("a", i))
    d = hub.connect_dashboard(Role.VIEWER, "x")
    await hub.handle(d, {"op": "subscribe", "all": True, "since": 0})
    all_offsets = [m["offset"] for m in drain(d) if m["op"] == "telemetry"]
    e = hub.connect_dashboard(Role.VIEWER, "y")
    await hub.handle(e, {"op": "subscribe", "all": True, "since": all_offsets[2]})
    assert [m["offset"] for m in drain(e) if m["op"] == "telemetry"] == all_offsets[3:]


async def test_max_dashboards_refused() -> None:
    storage = MemoryStorage()
    await storage.open()
    h = Hub(LocalEngine(storage), HubConfig(max_dashboards=1))
    h.connect_dashboard(Role.VIEWER, "a")
    from gateway.hub import Refused

    with pytest.raises(Refused, match="max_dashboards"):
        h.connect_dashboard(Role.VIEWER, "b")
    await storage.close()


@given(
    device=st.text(min_size=1, max_size=64),
    protocol=st.text(min_size=1, max_size=32),
    offset=st.integers(1, 2**63 - 1),
    ts=st.integers(0, 2**53),
    seq=st.integers(0, 255),
    data=st.dictionaries(
        st.text(max_size=8),
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
        max_size=6,
    ),
)
def test_telemetry_text_is_the_message_encoded_whole(
    device: str, protocol: str, offset: int, ts: int, seq: int, data: dict[str, Any]
) -> None:
    """The hub encodes the data once and builds the message around it: same bytes on the wire."""
    rec = TelemetryRecord(offset, device, protocol, ts, seq, data)
    text = telemetry_text(rec, dumps(data))
    assert text == dumps(telemetry_message(rec))
    assert json.loads(text)["data"] == json.loads(dumps(data))
