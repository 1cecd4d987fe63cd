"""The storage contract's issue-13 calls, held for both engines: deleting a
device, labels, the command log, and history by time range or newest first
(gateway/hub/store.py). Real SQLite files in tmp_path and the in-memory twin."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Protocol

import pytest

from gateway.storage import (
    CommandEvent,
    DeviceRecord,
    MemoryStorage,
    RetentionPolicy,
    SQLiteStorage,
    Storage,
)
from tests.gateway.storage_support import NOW_MS, append, command


class MakeStorage(Protocol):
    def __call__(self, retention: RetentionPolicy | None = None) -> Awaitable[Storage]: ...


@pytest.fixture(params=["sqlite", "memory"])
async def make_storage(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[MakeStorage]:
    opened: list[Storage] = []

    async def make(retention: RetentionPolicy | None = None) -> Storage:
        retention = retention or RetentionPolicy()
        storage: Storage
        if request.param == "sqlite":
            storage = SQLiteStorage(tmp_path / f"g{len(opened)}.sqlite3", retention=retention)
        else:
            storage = MemoryStorage(retention=retention)
        await storage.open()
        opened.append(storage)
        return storage

    yield make
    for storage in opened:
        await storage.close()


async def test_delete_device_takes_history_commands_labels_and_row(
    make_storage: MakeStorage,
) -> None:
    s = await make_storage()
    kept = [append(s, "b", ts=NOW_MS + i) for i in range(2)]
    for i in range(3):
        append(s, "a", ts=NOW_MS + i)
    await s.upsert_device(DeviceRecord("a", "env-sensor", "tcp", NOW_MS, NOW_MS))
    await s.upsert_device(DeviceRecord("b", "env-sensor", "tcp", NOW_MS, NOW_MS))
    queued = [await s.enqueue_command(command("a", NOW_MS + i, 60_000)) for i in range(2)]
    other = await s.enqueue_command(command("b", NOW_MS, 60_000))
    await s.set_labels("a", {"name": "A", "location": None, "channels": None})
    await s.flush()

    deletion = await s.delete_device("a")
    assert deletion.telemetry == 3
    assert deletion.commands == queued  # oldest first, as they were queued
    assert await s.telemetry_since(0) == kept
    assert await s.pending_commands("a", NOW_MS) == []
    assert await s.pending_commands("b", NOW_MS) == [other]
    assert await s.labels() == {}
    await s.flush()
    assert [d.device for d in await s.devices()] == ["b"]
    assert (await s.delete_device("ghost")).commands == []


async def test_rows_queued_before_a_delete_go_with_it_and_retention_counts_stay_right(
    make_storage: MakeStorage,
) -> None:
    # Rows, the delete and new rows in one writer batch: retention must count
    # only the rows after the delete, or it would cut the device's new history.
    s = await make_storage(RetentionPolicy(max_per_device=3))
    for _ in range(3):
        append(s, "a")
    await s.delete_device("a")
    after = [append(s, "a") for _ in range(2)]
    await s.flush()
    prune = getattr(s, "prune", None)
    assert prune is not None
    assert await prune() == 0
    assert await s.telemetry_since(0, device="a") == after


async def test_labels_are_kept_replaced_and_dropped(make_storage: MakeStorage) -> None:
    s = await make_storage()
    assert await s.labels() == {}
    first = {"name": "Greenhouse", "location": "North", "channels": ["pump", "fan"]}
    await s.set_labels("a", first)
    await s.set_labels("b", {"name": "B", "location": None, "channels": None})
    first["name"] = "changed by the caller afterwards"
    got = await s.labels()
    assert got["a"]["name"] == "Greenhouse"
    await s.set_labels("a", {"name": None, "location": "South", "channels": None})
    assert (await s.labels())["a"] == {"name": None, "location": "South", "channels": None}
    await s.set_labels("b", None)
    assert set(await s.labels()) == {"a"}


async def test_the_command_log_appends_each_status(make_storage: MakeStorage) -> None:
    s = await make_storage()
    assert await s.command_log("nope") is None
    s.log_command(CommandEvent("g1", 7, "a", "queued", NOW_MS, {}))
    s.log_command(CommandEvent("g2", "x", "b", "rejected", NOW_MS, {"error": "why"}))
    s.log_command(CommandEvent("g1", 7, "a", "sent", NOW_MS + 5, {}))
    s.log_command(
        CommandEvent("g1", 7, "a", "nacked", NOW_MS + 9, {"code": 2, "message": "bad argument"})
    )
    await s.flush()
    one = await s.command_log("g1")
    assert one is not None
    assert (one.gateway_id, one.request_id, one.device, one.status) == ("g1", 7, "a", "nacked")
    assert one.history == [
        {"status": "queued", "ts": NOW_MS},
        {"status": "sent", "ts": NOW_MS + 5},
        {"status": "nacked", "ts": NOW_MS + 9, "code": 2, "message": "bad argument"},
    ]
    two = await s.command_log("g2")
    assert two is not None
    assert (two.request_id, two.history) == (
        "x",
        [{"status": "rejected", "ts": NOW_MS, "error": "why"}],
    )


async def test_history_by_time_range_and_newest_first(make_storage: MakeStorage) -> None:
    s = await make_storage()
    rows = [append(s, "a", ts=NOW_MS + 10 * i, seq=i) for i in range(8)]
    append(s, "b", ts=NOW_MS + 15)
    await s.flush()
    between = await s.telemetry_since(0, device="a", from_ts=NOW_MS + 20, to_ts=NOW_MS + 50)
    assert between == rows[2:5]
    assert await s.telemetry_since(0, device="a", limit=3, newest=True) == rows[5:8]
    assert (
        await s.telemetry_since(0, device="a", limit=2, newest=True, to_ts=NOW_MS + 40) == rows[2:4]
    )
    assert await s.telemetry_since(rows[5].offset, device="a", from_ts=NOW_MS) == rows[6:]
    assert await s.telemetry_since(0, device="a", limit=0, newest=True) == []


async def test_the_command_log_forgets_commands_a_day_after_their_last_status(
    tmp_path: Path,
) -> None:
    s = SQLiteStorage(tmp_path / "g.sqlite3", command_log_keep_s=60)
    await s.open()
    try:
        s.log_command(CommandEvent("old", None, "a", "acked", NOW_MS, {}))
        s.log_command(CommandEvent("new", None, "a", "queued", NOW_MS, {}))
        s.log_command(CommandEvent("new", None, "a", "sent", NOW_MS + 50_000, {}))
        await s.flush()
        await s.prune(NOW_MS + 61_000)
        assert await s.command_log("old") is None
        assert await s.command_log("new") is not None  # its last status is 11 s old
    finally:
        await s.close()
    with pytest.raises(ValueError, match="command_log_keep_s"):
        SQLiteStorage(tmp_path / "h.sqlite3", command_log_keep_s=0)
