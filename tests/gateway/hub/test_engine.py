"""gateway.hub.engine.LocalEngine: the single-node engine behind the hub's one seam.

Pins what the hub relies on: ``publish_telemetry`` hands out strictly
increasing offsets, keeps the row (readable by ``history`` after ``flush``)
and delivers it to the sink with ``data_json`` the compact JSON of the data;
``publish_presence`` delivers at once and keeps the device record
(``known_devices`` once the engine and storage are flushed); ``seam()`` is
above every offset delivered before it and below every one after; a single
node lists itself alone and forwards no command. Run against the in-memory
storage and the SQLite one, whose writes are batched off the loop.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from devices import DeviceTelemetry
from gateway.hub import LocalEngine, Presence
from gateway.storage import (
    DeviceRecord,
    MemoryStorage,
    QueuedCommand,
    SQLiteStorage,
    Storage,
    StorageError,
    TelemetryRecord,
)


class Sink:
    """An EngineSink that keeps what it is given."""

    def __init__(self) -> None:
        self.telemetry: list[tuple[TelemetryRecord, str, float]] = []
        self.presence: list[Presence] = []

    def deliver_telemetry(self, record: TelemetryRecord, data_json: str, received: float) -> None:
        self.telemetry.append((record, data_json, received))

    def deliver_presence(self, presence: Presence) -> None:
        self.presence.append(presence)


def event(
    device: str, seq: int, data: dict[str, Any], protocol: str = "env-sensor", received: float = 0.0
) -> DeviceTelemetry:
    return DeviceTelemetry(device, protocol, seq, data, int(time.time() * 1000), received)


@pytest.fixture(params=["memory", "sqlite"])
async def storage(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Storage]:
    s: Storage = (
        MemoryStorage() if request.param == "memory" else SQLiteStorage(tmp_path / "g.sqlite3")
    )
    await s.open()
    yield s
    await s.close()


@pytest.fixture
async def engine(storage: Storage) -> AsyncIterator[LocalEngine]:
    e = LocalEngine(storage)
    yield e
    await e.close()


@pytest.fixture
async def sink(engine: LocalEngine) -> Sink:
    s = Sink()
    await engine.open(s)
    return s


async def test_offsets_are_strictly_increasing(engine: LocalEngine, sink: Sink) -> None:
    for seq in range(20):
        engine.publish_telemetry(event("ab"[seq % 2], seq, {"n": seq}))
    offsets = [r.offset for r, _, _ in sink.telemetry]
    assert len(offsets) == 20
    assert all(a < b for a, b in itertools.pairwise(offsets))


async def test_delivery_carries_the_event_and_its_data_as_compact_json(
    engine: LocalEngine, sink: Sink
) -> None:
    data = {"temperature_c": 21.86, "name": "é", "nested": {"list": [1, 2.5, None, True]}}
    ev = event("sim-1", 4, data, received=123.25)
    engine.publish_telemetry(ev)
    [(record, data_json, received)] = sink.telemetry
    assert (record.device, record.protocol, record.ts, record.seq) == (
        "sim-1",
        "env-sensor",
        ev.ts,
        4,
    )
    assert record.data == data
    assert data_json == json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    assert data_json == '{"temperature_c":21.86,"name":"é","nested":{"list":[1,2.5,null,true]}}'
    assert received == 123.25


async def test_published_rows_are_readable_by_history_after_flush(
    engine: LocalEngine, sink: Sink
) -> None:
    for seq in range(6):
        engine.publish_telemetry(
            event("ab"[seq % 2], seq, {"n": seq}, protocol=["env-sensor", "relay-4"][seq % 2])
        )
    await engine.flush()
    delivered = [r for r, _, _ in sink.telemetry]
    assert await engine.history(0, limit=100) == delivered
    assert await engine.history(0, device="a") == delivered[0::2]
    assert await engine.history(0, protocol="relay-4") == delivered[1::2]
    third = delivered[2].offset
    assert await engine.history(third) == delivered[3:]
    assert await engine.history(0, until=third) == delivered[:3]
    assert await engine.history(0, limit=2) == delivered[:2]


async def test_latest_is_the_newest_row_of_each_device(engine: LocalEngine, sink: Sink) -> None:
    for seq in range(5):
        engine.publish_telemetry(event("ab"[seq % 2], seq, {"n": seq}))
    await engine.flush()
    latest = await engine.latest()
    delivered = [r for r, _, _ in sink.telemetry]
    assert latest == {"a": delivered[4], "b": delivered[3]}


async def test_telemetry_is_kept_even_with_no_sink(storage: Storage) -> None:
    engine = LocalEngine(storage)
    engine.publish_telemetry(event("a", 1, {"n": 1}))  # before open: nobody to deliver to
    sink = Sink()
    await engine.open(sink)
    engine.publish_telemetry(event("a", 2, {"n": 2}))
    await engine.close()
    engine.publish_telemetry(event("a", 3, {"n": 3}))  # after close: kept, not delivered
    await engine.flush()
    assert [r.seq for r, _, _ in sink.telemetry] == [2]
    assert [r.seq for r in await engine.history(0)] == [1, 2, 3]


async def test_seam_is_above_every_delivered_offset_and_below_later_ones(
    engine: LocalEngine, sink: Sink
) -> None:
    for seq in range(5):
        engine.publish_telemetry(event("a", seq, {"n": seq}))
    seam = engine.seam()
    assert all(r.offset < seam for r, _, _ in sink.telemetry)
    engine.publish_telemetry(event("a", 5, {"n": 5}))
    assert sink.telemetry[-1][0].offset > seam
    assert engine.seam() > sink.telemetry[-1][0].offset


async def test_presence_is_delivered_at_once_and_the_record_kept(
    storage: Storage, engine: LocalEngine, sink: Sink
) -> None:
    up = Presence("a", "env-sensor", True, 1000, "connected")
    engine.publish_presence(up, DeviceRecord("a", "env-sensor", "tcp", 1000, 1000))
    assert sink.presence == [up]  # synchronously: nothing to await
    down = Presence("a", "env-sensor", False, 2000, "closed")
    engine.publish_presence(down, DeviceRecord("a", "env-sensor", "tcp", 1000, 2000))
    engine.publish_presence(
        Presence("b", "relay-4", True, 1500, "connected"),
        DeviceRecord("b", "relay-4", "serial", 1500, 1500),
    )
    assert [p.device for p in sink.presence] == ["a", "a", "b"]
    assert sink.presence[1] == down
    await engine.close()  # hands every registry row over to the storage
    await storage.flush()
    assert await engine.known_devices() == [
        DeviceRecord("a", "env-sensor", "tcp", 1000, 2000),
        DeviceRecord("b", "relay-4", "serial", 1500, 1500),
    ]


async def test_remember_keeps_the_record_now(storage: Storage, engine: LocalEngine) -> None:
    await engine.remember(DeviceRecord("a", "env-sensor", "tcp", 100, 200))
    await engine.remember(DeviceRecord("a", "env-sensor", "tcp", 300, 400))
    await storage.flush()
    # The first sighting is kept; the last one moves on.
    assert await engine.known_devices() == [DeviceRecord("a", "env-sensor", "tcp", 100, 400)]


async def test_the_offline_command_queue_passes_through(engine: LocalEngine) -> None:
    cmd = QueuedCommand(0, "c1", "a", {"hex": "02"}, b"\x02", 1000, 5000)
    first = await engine.enqueue_command(cmd)
    second = await engine.enqueue_command(
        QueuedCommand(0, None, "a", {"hex": "03"}, b"\x03", 1001, 9000)
    )
    assert first.key != second.key
    assert (first.command_id, first.body, first.expires_ms) == ("c1", b"\x02", 5000)
    assert [c.key for c in await engine.pending_commands("a", 2000)] == [first.key, second.key]
    assert await engine.pending_commands("b", 2000) == []
    assert [c.key for c in await engine.expire_commands(6000)] == [first.key]
    third = await engine.enqueue_command(QueuedCommand(0, None, "a", {}, b"\x04", 1002, 9000))
    assert await engine.pending_commands("a", 2000, after=second.key) == [third]
    assert await engine.pending_commands("a", 2000, limit=1) == [second]
    assert await engine.mark_sending([second.key, third.key]) == [second.key, third.key]
    assert await engine.pending_commands("a", 2000) == []
    await engine.unmark_sending([third.key])
    await engine.remove_commands([second.key])
    assert await engine.pending_commands("a", 2000) == [third]
    assert await engine.interrupted_commands() == []
    assert engine.health().ok


async def test_telemetry_the_storage_cannot_keep_still_reaches_dashboards(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A storage whose writer is gone: dashboards still get the message; logged once."""
    storage = MemoryStorage()
    await storage.open()
    engine = LocalEngine(storage)
    sink = Sink()
    await engine.open(sink)

    def broken(record: TelemetryRecord, data_json: str | None = None) -> None:
        raise StorageError("the storage writer died")

    storage.append_telemetry = broken  # type: ignore[method-assign]
    for seq in range(5):
        engine.publish_telemetry(event("a", seq, {"n": seq}))
    assert [r.seq for r, _, _ in sink.telemetry] == [0, 1, 2, 3, 4]
    assert caplog.text.count("keeping telemetry failed") == 1

    # No offset at all (closed, or the reservation ran out): dropped and counted.
    await storage.close()
    engine.publish_telemetry(event("a", 9, {}))
    assert len(sink.telemetry) == 5
    assert engine.unsequenced == 1


async def test_a_single_node_lists_itself_alone(storage: Storage) -> None:
    assert LocalEngine(storage).nodes() == ["local"]
    named = LocalEngine(storage, node="n1")
    assert named.node == "n1"
    assert named.nodes() == ["n1"]


async def test_forward_command_has_nowhere_to_go(engine: LocalEngine) -> None:
    replies: list[dict[str, Any]] = []
    assert await engine.forward_command("a", b"\x02", replies.append) is None
    assert replies == []
