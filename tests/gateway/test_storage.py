"""The hub's storage layer: the contract every engine keeps, and what SQLite adds.

Behavioural checks run against both engines (real SQLite files in tmp_path, and
the in-memory twin the routing-core tests use); durability, crash, retention
timing and event-loop checks run against SQLite only. Nothing sleeps to wait for
the writer: tests await `flush()` or a call that is committed when it returns.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.storage import (
    DeviceRecord,
    MemoryStorage,
    QueuedCommand,
    RetentionPolicy,
    SQLiteStorage,
    Storage,
    StorageClosedError,
    StorageError,
    TelemetryRecord,
)

# Command times are arbitrary; telemetry times follow the clock, because the
# writer's own retention pass judges age by the clock.
NOW_MS = 1_700_000_000_000


def clock_ms() -> int:
    return int(time.time() * 1000)


PROJECT_ROOT = Path(__file__).resolve().parents[2]


class MakeStorage(Protocol):
    def __call__(self, retention: RetentionPolicy | None = None) -> Awaitable[Storage]: ...


@pytest.fixture(params=["sqlite", "memory"])
async def make_storage(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[MakeStorage]:
    """Opens engines of the parametrized kind; closes them all after the test."""
    opened: list[Storage] = []

    async def make(retention: RetentionPolicy | None = None) -> Storage:
        retention = retention or RetentionPolicy()
        storage: Storage
        if request.param == "sqlite":
            path = tmp_path / "data" / f"gateway{len(opened)}.sqlite3"
            storage = SQLiteStorage(path, retention=retention)
        else:
            storage = MemoryStorage(retention=retention)
        await storage.open()
        opened.append(storage)
        return storage

    yield make
    for storage in opened:
        await storage.close()


OpenSQLite = Callable[..., Awaitable[SQLiteStorage]]


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    # The parent does not exist yet: open() must create it.
    return tmp_path / "data-dir" / "gateway.sqlite3"


@pytest.fixture
async def open_sqlite(db_path: Path) -> AsyncIterator[OpenSQLite]:
    """Opens SQLite engines on db_path (or another path); closes them all after the test."""
    opened: list[SQLiteStorage] = []

    async def make(path: Path | None = None, **kwargs: Any) -> SQLiteStorage:
        storage = SQLiteStorage(path or db_path, **kwargs)
        await storage.open()
        opened.append(storage)
        return storage

    yield make
    for storage in reversed(opened):
        await storage.close()


def append(
    storage: Storage,
    device: str = "dev-a",
    protocol: str = "env-sensor",
    *,
    ts: int | None = None,
    seq: int = 0,
    data: dict[str, Any] | None = None,
) -> TelemetryRecord:
    """Append one record under a fresh offset and return it."""
    offset = storage.next_offset()
    when = clock_ms() if ts is None else ts
    record = TelemetryRecord(offset, device, protocol, when, seq, data or {"n": offset})
    storage.append_telemetry(record)
    return record


def command(device: str, created_ms: int, ttl_ms: int, name: str = "reboot") -> QueuedCommand:
    return QueuedCommand(
        key=0,
        command_id=f"c-{device}-{created_ms}",
        device=device,
        command={"name": name},
        body=bytes([2, created_ms % 256]),
        created_ms=created_ms,
        expires_ms=created_ms + ttl_ms,
    )


async def prune(storage: Storage, now_ms: int | None = None) -> None:
    # prune() is an engine extra, not part of the Storage protocol.
    assert isinstance(storage, SQLiteStorage | MemoryStorage)
    await storage.prune(now_ms)


def raw_rows(path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Read the file through a separate, plain connection: what another process would see."""
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


# --------------------------------------------------------------- both engines


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

    await storage.remove_command(second.key)
    await storage.remove_command(second.key)  # twice is harmless
    assert await storage.pending_commands("a", NOW_MS) == [third]
    assert await storage.pending_commands("b", NOW_MS) == [other]
    assert await storage.expire_commands(NOW_MS + 10**9) == [other, third]
    assert await storage.pending_commands("a", 0) == []


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


# --------------------------------------------------------------- SQLite: durability


async def test_enqueue_is_committed_before_it_returns(
    open_sqlite: OpenSQLite, db_path: Path
) -> None:
    # A long batch window: only the command's own durable commit can explain the row.
    storage = await open_sqlite(batch_interval=60.0)
    queued = await storage.enqueue_command(command("a", NOW_MS, 1000))
    assert raw_rows(db_path, "SELECT key, device, command FROM commands") == [
        (queued.key, "a", '{"name":"reboot"}')
    ]
    await storage.remove_command(queued.key)
    assert raw_rows(db_path, "SELECT key FROM commands") == []


async def test_close_flushes_everything(open_sqlite: OpenSQLite, db_path: Path) -> None:
    # The batch window is far longer than the test: close() must not wait it out.
    storage = await open_sqlite(batch_interval=60.0, batch_rows=500)
    written = [append(storage, f"d{i % 3}", seq=i % 256) for i in range(1234)]
    await storage.upsert_device(DeviceRecord("d0", "env-sensor", "tcp", 1, 2))
    await storage.close()
    assert storage.stats.pending == 0
    assert raw_rows(db_path, "SELECT COUNT(*) FROM telemetry") == [(1234,)]
    assert raw_rows(db_path, "SELECT device FROM devices") == [("d0",)]

    reopened = await open_sqlite()
    assert await reopened.telemetry_since(0, limit=10_000) == written
    assert await reopened.devices() == [DeviceRecord("d0", "env-sensor", "tcp", 1, 2)]


async def test_history_and_commands_survive_a_restart(open_sqlite: OpenSQLite) -> None:
    storage = await open_sqlite()
    record = append(storage, "a")
    queued = await storage.enqueue_command(command("a", NOW_MS, 60_000))
    await storage.close()

    reopened = await open_sqlite()
    assert await reopened.telemetry_since(0) == [record]
    assert await reopened.latest_telemetry() == {"a": record}
    assert await reopened.pending_commands("a", NOW_MS) == [queued]
    again = await reopened.enqueue_command(command("a", NOW_MS + 1, 60_000))
    assert again.key > queued.key


async def test_offsets_increase_across_close_and_reopen(open_sqlite: OpenSQLite) -> None:
    seen: list[int] = []
    for _ in range(3):
        storage = await open_sqlite(offset_block=1000)
        seen += [append(storage).offset for _ in range(10)]
        seen += [storage.next_offset() for _ in range(5)]  # handed out, never stored
        await storage.close()
    assert seen == sorted(seen)
    assert len(set(seen)) == len(seen)


async def test_no_offset_is_handed_out_above_the_committed_reservation(
    open_sqlite: OpenSQLite, db_path: Path
) -> None:
    # A tiny block so the writer must extend the reservation many times.
    storage = await open_sqlite(offset_block=8)
    handed = []
    for i in range(200):
        handed.append(append(storage, seq=i % 256).offset)
        (reserved,) = raw_rows(db_path, "SELECT value FROM meta WHERE key = 'offset_reserved'")
        # The rule that makes a crash safe: whatever is live is already covered on disk.
        assert handed[-1] <= reserved[0]
        if i % 3 == 0:
            await storage.flush()  # lets the writer commit the next block
    assert handed == sorted(set(handed))


async def test_crash_like_reopen_gives_bigger_offsets(open_sqlite: OpenSQLite) -> None:
    crashed = await open_sqlite(offset_block=16, batch_interval=60.0)
    written = []
    for i in range(100):
        written.append(append(crashed, seq=i % 256))
        if i % 7 == 0:
            await crashed.flush()  # the last one after i == 98
    handed = [r.offset for r in written] + [crashed.next_offset() for _ in range(3)]

    # The first engine is never closed: a second one opens the same file, as a
    # restarted process would.
    survivor = await open_sqlite()
    fresh = [survivor.next_offset() for _ in range(20)]
    assert min(fresh) > max(handed)
    assert fresh == sorted(set(fresh))
    # Committed batches are there; the row appended after the last commit is not.
    assert await survivor.telemetry_since(0) == written[:99]


async def test_kill_9_loses_no_command_and_no_offset(
    db_path: Path, open_sqlite: OpenSQLite
) -> None:
    child = f"""
import asyncio, json, os, signal, sys, time
sys.path.insert(0, {str(PROJECT_ROOT)!r})
from gateway.storage import QueuedCommand, SQLiteStorage, TelemetryRecord

async def main() -> None:
    s = SQLiteStorage(sys.argv[1], offset_block=64)
    await s.open()
    handed = []
    now = int(time.time() * 1000)
    for i in range(300):
        handed.append(s.next_offset())
        s.append_telemetry(TelemetryRecord(handed[-1], "d", "p", now, i % 256, {{"i": i}}))
        if i % 10 == 9:
            await s.flush()
    cmd = QueuedCommand(0, "c1", "d", {{"name": "reboot"}}, b"\\x02", 0, 2**62)
    key = (await s.enqueue_command(cmd)).key
    for i in range(20):  # appended after the last commit: may be lost
        handed.append(s.next_offset())
        s.append_telemetry(TelemetryRecord(handed[-1], "d", "p", now, 0, {{}}))
    print(json.dumps({{"committed": handed[299], "handed": max(handed), "key": key}}), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

asyncio.run(main())
"""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", child, str(db_path), stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    assert proc.returncode == -9
    report = json.loads(out)

    storage = await open_sqlite()
    assert storage.next_offset() > report["handed"]
    committed = await storage.telemetry_since(0, until=report["committed"], limit=10_000)
    assert len(committed) == 300
    [queued] = await storage.pending_commands("d", 0)
    assert queued.key == report["key"]


# --------------------------------------------------------------- SQLite: the writer


async def test_retention_runs_in_the_writer_without_being_asked(open_sqlite: OpenSQLite) -> None:
    storage = await open_sqlite(retention=RetentionPolicy(max_per_device=3))
    storage.prune_interval = 0.0  # every batch, for the test
    written = [append(storage, "a") for _ in range(10)]
    await storage.flush()
    # The pass runs right after the batch commit; the next flush queues behind it.
    await storage.flush()
    assert await storage.telemetry_since(0) == written[-3:]
    assert storage.stats.pruned_rows == 7


async def test_a_failed_batch_is_surfaced_and_the_writer_goes_on(
    open_sqlite: OpenSQLite, caplog: pytest.LogCaptureFixture
) -> None:
    storage = await open_sqlite(batch_interval=60.0)  # both rows in one batch, for sure
    record = append(storage)
    storage.append_telemetry(record)  # the same offset again: the batch cannot commit
    with pytest.raises(StorageError, match="2 rows lost"):
        await storage.flush()
    assert "storage batch failed" in caplog.text
    assert storage.stats.failed_batches == 1
    assert storage.stats.pending == 0

    after = append(storage)
    await storage.flush()  # reported once, and later batches commit again
    assert await storage.telemetry_since(0) == [after]


async def test_stats_and_batch_hook(open_sqlite: OpenSQLite) -> None:
    # Full batches commit at once; the last 50 rows wait for the flush.
    storage = await open_sqlite(batch_rows=100, batch_interval=60.0)
    durations: list[float] = []
    storage.stats.on_batch = durations.append
    for _ in range(250):
        append(storage)
    assert storage.stats.pending >= 50
    await storage.flush()
    stats = storage.stats
    assert stats.pending == 0
    assert stats.rows_written == 250
    assert stats.batches == 3
    assert len(durations) == stats.batches
    assert stats.max_batch_ms >= stats.last_batch_ms > 0
    assert max(durations) * 1000 == pytest.approx(stats.max_batch_ms)


async def test_unopenable_path_is_an_error_naming_it(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the data dir should be")
    with pytest.raises(StorageError, match="not-a-dir"):
        await SQLiteStorage(blocker / "gateway.sqlite3").open()

    garbage = tmp_path / "garbage.sqlite3"
    garbage.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StorageError, match=re.escape(str(garbage))):
        await SQLiteStorage(garbage).open()

    with pytest.raises(StorageError, match=str(tmp_path.name)):
        await SQLiteStorage(tmp_path).open()  # a directory


async def test_the_event_loop_is_never_blocked(open_sqlite: OpenSQLite) -> None:
    """A lag check, not a speed test: the loop keeps ticking through a write burst."""
    storage = await open_sqlite()
    stop = asyncio.Event()

    async def ticker() -> float:
        worst = 0.0
        while not stop.is_set():
            before = time.perf_counter()
            await asyncio.sleep(0.001)
            worst = max(worst, time.perf_counter() - before - 0.001)
        return worst

    lag = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    rows = 50_000
    started = time.perf_counter()
    for start in range(0, rows, 500):
        for i in range(start, start + 500):
            append(storage, f"dev-{i % 50}", seq=i % 256, data={"temperature_c": 21.5, "i": i})
        await asyncio.sleep(0)  # the producer yields as a real hub does between frames
    await storage.flush()
    elapsed = time.perf_counter() - started
    stop.set()
    max_lag = await lag
    assert storage.stats.rows_written == rows
    print(f"\n{rows / elapsed:,.0f} rows/s, max loop lag {max_lag * 1000:.1f} ms")
    assert max_lag < 0.5


async def test_reads_during_a_write_burst_see_a_committed_prefix(open_sqlite: OpenSQLite) -> None:
    # Batches commit in queue order, so any read is a prefix of what was appended:
    # what makes a replay followed by live messages gap-free.
    storage = await open_sqlite(batch_rows=100)
    written: list[TelemetryRecord] = []
    for _ in range(20):
        written += [append(storage, seq=i) for i in range(250)]
        seen = await storage.telemetry_since(0, limit=10_000)
        assert seen == written[: len(seen)]
    await storage.flush()
    assert await storage.telemetry_since(0, limit=10_000) == written


async def test_reads_do_not_wait_for_the_batch_window(open_sqlite: OpenSQLite) -> None:
    # Reads see committed rows only; an uncommitted batch is not waited for.
    storage = await open_sqlite(batch_interval=60.0)
    append(storage)
    assert await asyncio.wait_for(storage.telemetry_since(0), 5) == []
    await storage.flush()
    assert len(await storage.telemetry_since(0)) == 1


async def test_storage_file_layout_uses_wal(open_sqlite: OpenSQLite, db_path: Path) -> None:
    storage = await open_sqlite()
    append(storage)
    await storage.close()
    assert raw_rows(db_path, "PRAGMA journal_mode") == [("wal",)]
    indexes = {name for (name,) in raw_rows(db_path, "SELECT name FROM sqlite_master")}
    assert {"telemetry_device", "telemetry_protocol", "commands_device"} <= indexes


JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()  # quotes, backslashes, control characters, any plane
)
JSON_DATA = st.dictionaries(
    st.text(max_size=8),
    st.recursive(
        JSON_SCALARS,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner),
        max_leaves=12,
    ),
    max_size=6,
)


@settings(max_examples=25, deadline=None)
@given(batch=st.lists(st.tuples(JSON_DATA, st.booleans()), min_size=1, max_size=40))
def test_any_json_data_comes_back_as_it_went_in(
    tmp_path_factory: pytest.TempPathFactory, batch: list[tuple[dict[str, Any], bool]]
) -> None:
    """A batch goes into SQLite as one JSON array (json_each): nothing is altered on the way.

    Half the rows come with their data already encoded, as the hub hands it
    over (non-ASCII kept), half are encoded by the storage.
    """
    path = tmp_path_factory.mktemp("json") / "gateway.sqlite3"

    async def roundtrip() -> None:
        storage = SQLiteStorage(path)
        await storage.open()
        try:
            for i, (data, pre_encoded) in enumerate(batch):
                record = TelemetryRecord(
                    storage.next_offset(), f"d-{i}", "p", NOW_MS, i % 256, data
                )
                text = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
                storage.append_telemetry(record, text if pre_encoded else None)
            await storage.flush()
            stored = await storage.telemetry_since(0, limit=1000)
        finally:
            await storage.close()
        assert [r.data for r in stored] == [data for data, _ in batch]
        assert [r.seq for r in stored] == [i % 256 for i in range(len(batch))]

    asyncio.run(roundtrip())
