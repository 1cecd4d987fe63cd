"""Storage faults are loud and heal (gateway/storage/writer.py, docs/api.md §4).

What the writer promises when a transaction fails (a full disk, an I/O error,
a corrupt page): ``health()`` says failing, with the reason, from the first
failure to the next commit; the rows stay queued and are retried, on a fresh
connection, with a growing pause; a call that waited for the failed
transaction (a queued command, a flush) gets ``StorageError`` at once; past
``max_pending_rows`` rows waiting, new rows are dropped and counted; the log
says so when it begins and ends, not once per failed batch; at close it gives
up after ``close_retry``. Most faults here are injected into the writer's
transaction (deterministic, no disk tricks in the test process); one is a real
corrupt page in a real file. tests/resilience/test_storage_faults.py does the
same against a gateway process with a full disk.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.storage import DeviceRecord, QueuedCommand, SQLiteStorage, StorageError
from tests.gateway import storage_support
from tests.gateway.storage_support import (
    NOW_MS,
    OpenSQLite,
    append,
    command,
    page_of,
    raw_rows,
    remove_db,
    swap_page,
)

db_path = storage_support.db_path
open_sqlite = storage_support.open_sqlite

TIMEOUT = 10.0  # a deadline for what should happen within a few retries, never a pause
FULL = "database or disk is full"


class Breaker:
    """Makes the writer's transactions fail, as a full disk would, while ``broken``."""

    def __init__(self, storage: SQLiteStorage, *, rows_only: bool = False) -> None:
        self.broken = threading.Event()
        self.attempts = 0
        real = storage._transaction

        def transaction(chunk: list[Any], lease_want: int, durable: bool) -> Any:
            self.attempts += 1
            has_rows = any(not hasattr(item, "fn") for item in chunk)
            if self.broken.is_set() and (has_rows or not rows_only):
                raise sqlite3.OperationalError(FULL)
            return real(chunk, lease_want, durable)

        storage._transaction = transaction  # type: ignore[method-assign]
        # Quick retries, so a test waits milliseconds for a heal.
        storage.retry_first = 0.01
        storage.retry_max = 0.05


async def until(check: Callable[[], bool], what: str) -> None:
    """Poll the storage's own state (it lives on the writer thread; nothing to await)."""
    async with asyncio.timeout(TIMEOUT):
        while not check():
            await asyncio.sleep(0.005)
    assert check(), what


def log_lines(caplog: pytest.LogCaptureFixture, text: str) -> int:
    return sum(1 for r in caplog.records if text in r.getMessage())


async def test_a_fault_keeps_the_rows_says_failing_and_heals(
    open_sqlite: OpenSQLite, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "gateway.storage")
    storage = await open_sqlite(batch_interval=0.001)
    breaker = Breaker(storage)
    assert storage.health().ok

    breaker.broken.set()
    written = [append(storage, "a", seq=i) for i in range(10)]
    await until(lambda: storage.stats.failed_batches >= 1, "a failed batch")
    health = storage.health()
    assert not health.ok
    assert FULL in (health.failing or "")
    assert health.since_ms > 0
    # Whoever waits for the storage hears at once that it is unavailable.
    with pytest.raises(StorageError, match="storage unavailable"):
        await storage.enqueue_command(command("a", NOW_MS, 60_000))
    with pytest.raises(StorageError, match="storage unavailable"):
        await storage.flush()
    await until(lambda: breaker.attempts >= 6, "several retries")
    assert storage.stats.pending == 10  # nothing lost while it fails
    assert storage.stats.dropped_rows == 0
    # One line when it began, however many batches failed.
    assert log_lines(caplog, "storage batch failed") == 1

    breaker.broken.clear()
    await until(lambda: storage.health().ok, "healed by the writer's own retry")
    await storage.flush()
    assert await storage.telemetry_since(0) == written
    assert storage.stats.pending == 0
    assert log_lines(caplog, "works again") == 1
    # Later work goes on as usual.
    queued = await storage.enqueue_command(command("a", NOW_MS, 60_000))
    assert await storage.pending_commands("a", NOW_MS) == [queued]


async def test_rows_past_max_pending_rows_are_dropped_and_counted(
    open_sqlite: OpenSQLite, caplog: pytest.LogCaptureFixture
) -> None:
    storage = await open_sqlite(batch_interval=0.001, max_pending_rows=5)
    breaker = Breaker(storage)
    breaker.broken.set()
    kept = [append(storage, "a", seq=i) for i in range(5)]
    for i in range(3):
        append(storage, "a", seq=5 + i)  # no room: dropped, never an exception
    assert storage.stats.pending == 5
    assert storage.stats.dropped_rows == 3
    await until(lambda: log_lines(caplog, "rows dropped so far") >= 1, "the drop logged")

    breaker.broken.clear()
    await until(lambda: storage.health().ok, "healed")
    await storage.flush()
    assert await storage.telemetry_since(0) == kept  # the ones queued first, all of them


async def test_commands_are_kept_while_only_the_rows_fail(open_sqlite: OpenSQLite) -> None:
    """A bad page of a telemetry index must not make the command queue unavailable too."""
    storage = await open_sqlite(batch_interval=60.0)  # the rows wait in the queue
    breaker = Breaker(storage, rows_only=True)
    breaker.broken.set()
    rows = [append(storage, "a", seq=i) for i in range(3)]
    queued = await storage.enqueue_command(command("a", NOW_MS, 60_000))  # its own transaction
    assert await storage.pending_commands("a", NOW_MS) == [queued]
    assert not storage.health().ok
    assert storage.stats.pending == 3

    breaker.broken.clear()
    await storage.flush()
    assert await storage.telemetry_since(0) == rows


async def test_close_gives_up_on_a_fault_that_lasts(db_path: Path) -> None:
    storage = SQLiteStorage(db_path, batch_interval=0.001)
    await storage.open()
    breaker = Breaker(storage)
    storage.close_retry = 0.2
    breaker.broken.set()
    for i in range(4):
        append(storage, "a", seq=i)
    with pytest.raises(StorageError, match="4 rows lost"):
        await storage.close()
    assert storage.stats.dropped_rows == 4


async def test_a_corrupt_page_fails_batches_until_repaired_then_heals(
    open_sqlite: OpenSQLite, db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A real fault: garbage over the page every insert needs (an index root).

    SQLite keeps a page it read in its cache; the writer opens a fresh
    connection for each retry, so writing the good page back is enough.
    """
    storage = await open_sqlite()
    before = [append(storage, "a", seq=i) for i in range(3)]
    await storage.close()
    root, page_size = page_of(db_path, "telemetry_protocol")
    good = swap_page(db_path, root, page_size, os.urandom(page_size))

    storage = await open_sqlite(batch_interval=0.001)  # the page is not needed to open
    storage.retry_first = 0.01
    storage.retry_max = 0.05
    during = [append(storage, "a", seq=10 + i) for i in range(5)]
    await until(lambda: storage.stats.failed_batches >= 2, "inserts failing")
    assert "SQLITE_CORRUPT" in (storage.health().failing or "")

    swap_page(db_path, root, page_size, good)  # repaired (a transient read fault, a restore)
    await until(lambda: storage.health().ok, "healed on a fresh connection")
    await storage.flush()
    assert await storage.telemetry_since(0) == before + during
    assert raw_rows(db_path, "PRAGMA integrity_check") == [("ok",)]


async def test_a_failed_read_is_counted_and_raised(open_sqlite: OpenSQLite, db_path: Path) -> None:
    storage = await open_sqlite()
    append(storage, "a")
    await storage.flush()
    remove_db(db_path)  # reads open their connection on first use: this one cannot
    with pytest.raises(StorageError, match="read failed"):
        await storage.telemetry_since(0)
    assert storage.stats.failed_reads == 1


async def test_the_queue_bounds_hold_within_one_transaction(open_sqlite: OpenSQLite) -> None:
    storage = await open_sqlite(max_queued_commands_per_device=2, max_queued_commands=3)
    made: list[QueuedCommand | BaseException] = await asyncio.gather(
        *(storage.enqueue_command(command("a", NOW_MS + i, 60_000)) for i in range(4)),
        return_exceptions=True,
    )
    assert sum(isinstance(m, QueuedCommand) for m in made) == 2
    assert len(await storage.pending_commands("a", NOW_MS)) == 2


async def test_deleting_devices_while_failing_raises_and_keeps_them(
    open_sqlite: OpenSQLite,
) -> None:
    """The hub keeps the names and tries again; nothing is half deleted meanwhile."""
    storage = await open_sqlite(batch_interval=0.001)
    for name in ("a", "b"):
        await storage.upsert_device(DeviceRecord(name, "env-sensor", "tcp", 1, 2))
    await storage.flush()
    breaker = Breaker(storage)
    breaker.broken.set()
    with pytest.raises(StorageError, match="storage unavailable"):
        await storage.delete_devices(["a"])
    assert [d.device for d in await storage.devices()] == ["a", "b"]
    breaker.broken.clear()
    await storage.delete_devices(["a"])  # the hub's next sweep
    assert [d.device for d in await storage.devices()] == ["b"]
    assert storage.health().ok
