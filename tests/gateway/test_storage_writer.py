"""The SQLite writer (gateway/storage/writer.py): durability, offsets, batches.

What the one writer thread promises: a queued command is committed before its
call returns, no offset is ever handed out twice, even across a crash or a
kill -9 (docs/deployment.md, "What a crash can lose"), retention runs without
being asked, a failed batch is reported, and the event loop never waits for it.
Nothing sleeps to wait for the writer: tests await `flush()` or a call that is
committed when it returns.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.storage import RetentionPolicy, SQLiteStorage, StorageError, TelemetryRecord
from tests.gateway import storage_support
from tests.gateway.storage_support import (
    NOW_MS,
    PROJECT_ROOT,
    OpenSQLite,
    append,
    command,
    raw_rows,
)

# Fixtures shared by the storage test files: pytest finds them by these names.
db_path = storage_support.db_path
open_sqlite = storage_support.open_sqlite

# --------------------------------------------------------------- durability and offsets


async def test_enqueue_is_committed_before_it_returns(
    open_sqlite: OpenSQLite, db_path: Path
) -> None:
    # A long batch window: only the command's own durable commit can explain the row.
    storage = await open_sqlite(batch_interval=60.0)
    queued = await storage.enqueue_command(command("a", NOW_MS, 1000))
    assert raw_rows(db_path, "SELECT key, device, command FROM commands") == [
        (queued.key, "a", '{"name":"reboot"}')
    ]
    await storage.remove_commands([queued.key])
    assert raw_rows(db_path, "SELECT key FROM commands") == []


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


# --------------------------------------------------------------- the writer thread


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
