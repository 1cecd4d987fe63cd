"""The storage contract (gateway/storage/base.py) that every engine keeps.

Behavioural checks run against both engines: real SQLite files in tmp_path, and
the in-memory twin (gateway/storage/memory.py) that the routing-core tests use.
Nothing sleeps to wait for the writer: tests await `flush()` or a call that is
committed when it returns.
"""

from __future__ import annotations

import ast
import dataclasses
import sys
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any, Protocol

import pytest

from gateway.storage import (
    DeviceRecord,
    MemoryStorage,
    QueuedCommand,
    QueueFull,
    RetentionPolicy,
    SQLiteStorage,
    Storage,
    StorageClosedError,
    StorageError,
    TelemetryRecord,
)
from tests.gateway.storage_support import NOW_MS, PROJECT_ROOT, append, clock_ms, command


class MakeStorage(Protocol):
    def __call__(
        self, retention: RetentionPolicy | None = None, **bounds: int
    ) -> Awaitable[Storage]: ...


@pytest.fixture(params=["sqlite", "memory"])
async def make_storage(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[MakeStorage]:
    """Opens engines of the parametrized kind; closes them all after the test."""
    opened: list[Storage] = []

    async def make(retention: RetentionPolicy | None = None, **bounds: int) -> Storage:
        retention = retention or RetentionPolicy()
        storage: Storage
        if request.param == "sqlite":
            path = tmp_path / "data" / f"gateway{len(opened)}.sqlite3"
            storage = SQLiteStorage(path, retention=retention, **bounds)
        else:
            storage = MemoryStorage(retention=retention, **bounds)
        await storage.open()
        opened.append(storage)
        return storage

    yield make
    for storage in opened:
        await storage.close()


async def restarted(storage: Storage) -> Storage:
    """The same store as the next process finds it (SQLite: a kill -9 then reopen)."""
    if isinstance(storage, MemoryStorage):
        again: Storage = storage.restart()
    else:
        assert isinstance(storage, SQLiteStorage)
        # Commands are committed when their call returns: a second engine on the
        # file sees what a new process would, without closing this one.
        again = SQLiteStorage(storage.path)
    await again.open()
    return again


async def prune(storage: Storage, now_ms: int | None = None) -> None:
    # prune() is an engine extra, not part of the Storage protocol.
    assert isinstance(storage, SQLiteStorage | MemoryStorage)
    await storage.prune(now_ms)


async def test_telemetry_since_filters_bounds_and_orders(make_storage: MakeStorage) -> None:
    storage = await make_storage()
    written = [
        append(storage, device, protocol, seq=i, data={"i": i, "nested": {"x": [1, 2]}})
        for i, (device, protocol) in enumerate(
            [("a", "env-sensor"), ("b", "relay-4"), ("a", "env-sensor"), ("c", "relay-4")] * 5
        )
    ]
    await storage.flush()
    offsets = [r.offset for r in written]
    assert offsets == sorted(offsets)
    assert len(set(offsets)) == len(offsets)

    assert await storage.telemetry_since(0) == written
    assert await storage.telemetry_since(offsets[4]) == written[5:]
    assert await storage.telemetry_since(offsets[-1]) == []
    assert await storage.telemetry_since(0, until=offsets[3]) == written[:4]
    assert await storage.telemetry_since(offsets[1], until=offsets[3]) == written[2:4]
    assert await storage.telemetry_since(0, limit=3) == written[:3]
    assert await storage.telemetry_since(0, limit=0) == []
    assert await storage.telemetry_since(0, device="a") == [r for r in written if r.device == "a"]
    relay = [r for r in written if r.protocol == "relay-4"]
    assert await storage.telemetry_since(0, protocol="relay-4") == relay
    assert await storage.telemetry_since(relay[2].offset, protocol="relay-4", limit=2) == relay[3:5]
    assert await storage.telemetry_since(0, device="b", protocol="env-sensor") == []
    assert await storage.telemetry_since(0, device="nobody") == []
    with pytest.raises(ValueError, match="limit"):
        await storage.telemetry_since(0, limit=-1)


async def test_latest_telemetry_is_the_newest_record_per_device(
    make_storage: MakeStorage,
) -> None:
    storage = await make_storage()
    assert await storage.latest_telemetry() == {}
    newest: dict[str, TelemetryRecord] = {}
    for i in range(30):
        record = append(storage, f"dev-{i % 7}", seq=i)
        newest[record.device] = record
    await storage.flush()
    assert await storage.latest_telemetry() == newest


async def test_stored_data_is_a_copy_of_the_json(make_storage: MakeStorage) -> None:
    storage = await make_storage()
    data: dict[str, Any] = {"channels": [True, False]}
    append(storage, data=data)
    data["channels"].append(True)  # the caller reuses its dict afterwards
    await storage.flush()
    [stored] = await storage.telemetry_since(0)
    assert stored.data == {"channels": [True, False]}


async def test_retention_keeps_the_newest_rows_per_device(make_storage: MakeStorage) -> None:
    storage = await make_storage(RetentionPolicy(max_per_device=5))
    a = [append(storage, "a", seq=i) for i in range(12)]
    b = [append(storage, "b", seq=i) for i in range(3)]
    await storage.flush()
    await prune(storage)
    assert await storage.telemetry_since(0, device="a") == a[-5:]
    assert await storage.telemetry_since(0, device="b") == b
    assert storage.stats.pruned_rows == 7


async def test_retention_removes_rows_older_than_max_age(make_storage: MakeStorage) -> None:
    storage = await make_storage(RetentionPolicy(max_age_s=60))
    now = clock_ms()
    old = [append(storage, device, ts=now - 61_000) for device in ("a", "b")]
    fresh = [append(storage, device, ts=now - 30_000) for device in ("a", "b")]
    await storage.flush()
    await prune(storage, now)
    assert await storage.telemetry_since(0) == fresh
    assert old[0] not in await storage.telemetry_since(0)
    assert storage.stats.pruned_rows == 2


async def test_command_queue_pending_expire_remove(make_storage: MakeStorage) -> None:
    storage = await make_storage()
    first = await storage.enqueue_command(command("a", NOW_MS, ttl_ms=1000))
    second = await storage.enqueue_command(command("a", NOW_MS + 10, ttl_ms=60_000))
    other = await storage.enqueue_command(command("b", NOW_MS + 20, ttl_ms=5000))
    third = await storage.enqueue_command(command("a", NOW_MS + 30, ttl_ms=60_000, name="x"))
    assert 0 < first.key < second.key < other.key < third.key
    assert first == dataclasses.replace(command("a", NOW_MS, ttl_ms=1000), key=first.key)

    # Oldest first; an expired command is not pending even before it is expired.
    assert await storage.pending_commands("a", NOW_MS) == [first, second, third]
    assert await storage.pending_commands("a", NOW_MS + 1000) == [second, third]
    assert await storage.pending_commands("nobody", NOW_MS) == []

    assert await storage.expire_commands(NOW_MS + 999) == []
    assert await storage.expire_commands(NOW_MS + 1000) == [first]
    assert await storage.expire_commands(NOW_MS + 1000) == []
    assert await storage.pending_commands("a", NOW_MS) == [second, third]

    await storage.remove_commands([second.key])
    await storage.remove_commands([second.key, 10**9])  # twice, or unknown, is harmless
    assert await storage.pending_commands("a", NOW_MS) == [third]
    assert await storage.pending_commands("b", NOW_MS) == [other]
    assert await storage.expire_commands(NOW_MS + 10**9) == [other, third]
    assert await storage.pending_commands("a", 0) == []


async def test_pending_commands_come_a_page_at_a_time(make_storage: MakeStorage) -> None:
    storage = await make_storage()
    queued = [await storage.enqueue_command(command("a", NOW_MS + i, 60_000)) for i in range(7)]
    await storage.enqueue_command(command("b", NOW_MS, 60_000))
    pages: list[list[QueuedCommand]] = []
    after = 0
    while page := await storage.pending_commands("a", NOW_MS, after=after, limit=3):
        pages.append(page)
        after = page[-1].key
    assert [len(p) for p in pages] == [3, 3, 1]
    assert [c for p in pages for c in p] == queued


async def test_commands_being_sent_are_neither_pending_nor_expired(
    make_storage: MakeStorage,
) -> None:
    storage = await make_storage()
    first, second, third = [
        await storage.enqueue_command(command("a", NOW_MS + i, 1000)) for i in range(3)
    ]
    # Marking returns the keys still queued, in the order asked.
    assert await storage.mark_sending([third.key, first.key, 10**9]) == [third.key, first.key]
    assert await storage.mark_sending([first.key]) == []  # already being sent
    assert await storage.pending_commands("a", NOW_MS) == [second]
    # Its delivery reports it: expiry leaves it alone.
    assert await storage.expire_commands(NOW_MS + 10**6) == [second]
    await storage.unmark_sending([third.key])  # never written: it waits again
    assert await storage.pending_commands("a", 0) == [third]
    await storage.remove_commands([first.key])
    assert await storage.mark_sending([first.key]) == []


async def test_commands_being_sent_at_a_crash_are_interrupted_once(
    make_storage: MakeStorage,
) -> None:
    storage = await make_storage()
    sending, done, waiting = [
        await storage.enqueue_command(command("a", NOW_MS + i, 60_000)) for i in range(3)
    ]
    assert await storage.mark_sending([sending.key, done.key]) == [sending.key, done.key]
    await storage.remove_commands([done.key])  # written, and forgotten
    assert await storage.interrupted_commands() == []

    again = await restarted(storage)
    try:
        # Out of the queue for good; handed over once, to be reported.
        assert await again.interrupted_commands() == [sending]
        assert await again.interrupted_commands() == []
        assert await again.pending_commands("a", NOW_MS) == [waiting]
        assert await again.mark_sending([sending.key]) == []
    finally:
        await again.close()


async def test_the_offline_queue_is_bounded_per_device_and_in_all(
    make_storage: MakeStorage,
) -> None:
    storage = await make_storage(max_queued_commands_per_device=2, max_queued_commands=3)
    await storage.enqueue_command(command("a", NOW_MS, 60_000))
    kept = await storage.enqueue_command(command("a", NOW_MS + 1, 60_000))
    with pytest.raises(QueueFull, match="max_queued_commands_per_device") as full:
        await storage.enqueue_command(command("a", NOW_MS + 2, 60_000))
    assert full.value.limit == "max_queued_commands_per_device"
    assert "2 commands already wait for 'a'" in str(full.value)
    await storage.enqueue_command(command("b", NOW_MS, 60_000))
    with pytest.raises(QueueFull) as full:
        await storage.enqueue_command(command("c", NOW_MS, 60_000))
    assert full.value.limit == "max_queued_commands"
    assert len(await storage.pending_commands("c", 0)) == 0

    # Room again once commands leave the queue (delivered or expired).
    await storage.remove_commands([kept.key])
    await storage.enqueue_command(command("a", NOW_MS + 3, 60_000))
    assert len(await storage.expire_commands(NOW_MS + 10**6)) == 3
    await storage.enqueue_command(command("c", NOW_MS, 60_000))


async def test_expiry_takes_at_most_limit_at_a_time(make_storage: MakeStorage) -> None:
    storage = await make_storage()
    queued = [await storage.enqueue_command(command("a", NOW_MS + i, 10)) for i in range(5)]
    assert await storage.expire_commands(NOW_MS + 10**6, limit=2) == queued[:2]
    assert await storage.expire_commands(NOW_MS + 10**6, limit=2) == queued[2:4]
    assert await storage.expire_commands(NOW_MS + 10**6, limit=2) == queued[4:]


async def test_a_well_store_says_so(make_storage: MakeStorage) -> None:
    storage = await make_storage()
    assert storage.health().ok
    assert storage.health().failing is None


async def test_the_memory_twin_can_fail_like_a_disk() -> None:
    storage = MemoryStorage()
    await storage.open()
    storage.fault = "disk full"
    assert storage.health().failing == "disk full"
    with pytest.raises(StorageError, match="storage unavailable: disk full"):
        await storage.enqueue_command(command("a", NOW_MS, 1000))
    with pytest.raises(StorageError):
        await storage.flush()
    storage.fault = None
    assert storage.health().ok
    await storage.enqueue_command(command("a", NOW_MS, 1000))


async def test_upsert_device_keeps_first_seen(make_storage: MakeStorage) -> None:
    storage = await make_storage()
    await storage.upsert_device(DeviceRecord("b", "relay-4", "serial", 50, 60))
    await storage.upsert_device(DeviceRecord("a", "env-sensor", "tcp", 100, 100))
    await storage.upsert_device(DeviceRecord("a", "relay-4", "serial", 200, 300))
    await storage.flush()
    assert await storage.devices() == [
        DeviceRecord("a", "relay-4", "serial", 100, 300),
        DeviceRecord("b", "relay-4", "serial", 50, 60),
    ]


async def test_deleted_devices_are_gone_for_good_and_come_back_new(
    make_storage: MakeStorage,
) -> None:
    """The hub forgets devices (dashboards.forget_after): their rows must not come back."""
    storage = await make_storage()
    for name in ("a", "b", "c"):
        await storage.upsert_device(DeviceRecord(name, "env-sensor", "tcp", 10, 20))
    # Queued behind the upserts, not yet committed: the delete is ordered after them.
    await storage.delete_devices(["a", "c", "never-seen"])
    await storage.delete_devices([])
    assert [d.device for d in await storage.devices()] == ["b"]
    # Durable when the call returns: the next process does not load them.
    again = await restarted(storage)
    try:
        assert [d.device for d in await again.devices()] == ["b"]
    finally:
        await again.close()
    # A device deleted then seen again is a new one: its first_seen is new too.
    await storage.upsert_device(DeviceRecord("a", "relay-4", "tcp", 500, 600))
    await storage.flush()
    assert [(d.device, d.first_seen_ms) for d in await storage.devices()] == [
        ("a", 500),
        ("b", 10),
    ]


async def test_calls_after_close_are_refused(make_storage: MakeStorage) -> None:
    storage = await make_storage()
    append(storage)
    await storage.close()
    await storage.close()  # idempotent
    with pytest.raises(StorageClosedError, match="append_telemetry"):
        storage.append_telemetry(TelemetryRecord(10**9, "a", "p", NOW_MS, 0, {}))
    with pytest.raises(StorageClosedError):
        storage.next_offset()
    with pytest.raises(StorageClosedError):
        await storage.flush()
    with pytest.raises(StorageClosedError):
        await storage.enqueue_command(command("a", NOW_MS, 1000))
    with pytest.raises(StorageClosedError):
        await storage.telemetry_since(0)


def test_retention_policy_refuses_limits_that_keep_nothing() -> None:
    assert RetentionPolicy(max_per_device=1, max_age_s=0.5).max_per_device == 1
    for bad in ({"max_per_device": 0}, {"max_age_s": 0}, {"max_age_s": float("nan")}):
        with pytest.raises(ValueError, match="retention needs"):
            RetentionPolicy(**bad)


def test_the_package_imports_nothing_from_the_gateway_around_it() -> None:
    # The storage layer stands alone (no aiohttp, config or web layer): the
    # standard library, its own modules, the gateway-wide error base, and the
    # hub's seam it implements (docs/architecture.md).
    outside_stdlib = {"frames.errors", "gateway.hub.records", "gateway.hub.store"}
    for path in sorted((PROJECT_ROOT / "gateway" / "storage").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                stdlib = name.split(".")[0] in sys.stdlib_module_names
                assert stdlib or name in outside_stdlib, f"{path.name} imports {name}"
