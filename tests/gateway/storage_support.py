"""Helpers and fixtures shared by the storage tests (tests/gateway/test_storage_*.py).

A test file uses a fixture from here by binding it at module level
(``open_sqlite = storage_support.open_sqlite``), so pytest finds it by name.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.storage import QueuedCommand, SQLiteStorage, Storage, TelemetryRecord

# Command times are arbitrary; telemetry times follow the clock, because the
# writer's own retention pass judges age by the clock.
NOW_MS = 1_700_000_000_000


def clock_ms() -> int:
    return int(time.time() * 1000)


PROJECT_ROOT = Path(__file__).resolve().parents[2]

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


def raw_rows(path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Read the file through a separate, plain connection: what another process would see."""
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


# File surgery on a database, for the fault tests: plain synchronous helpers
# (a test's event loop has nothing else to do meanwhile).


def remove_db(path: Path) -> None:
    """Remove the database file and its WAL and shared-memory files."""
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def file_size(path: Path) -> int:
    """The file's size, -1 if there is none."""
    return path.stat().st_size if path.exists() else -1


def truncate(path: Path) -> None:
    """Leave an empty file at ``path`` (its directory made if needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def page_of(path: Path, index: str) -> tuple[int, int]:
    """The root page number of ``index`` (a table or index name), and the page size."""
    [(root,)] = raw_rows(path, "SELECT rootpage FROM sqlite_master WHERE name = ?", (index,))
    [(page_size,)] = raw_rows(path, "PRAGMA page_size")
    return root, page_size


def swap_page(path: Path, page: int, page_size: int, data: bytes) -> bytes:
    """Write ``data`` over page ``page`` (1-based) of the file; returns what was there."""
    with path.open("r+b") as f:
        f.seek((page - 1) * page_size)
        old = f.read(page_size)
        f.seek((page - 1) * page_size)
        f.write(data)
    return old


class DiskFull:
    """Fails the storage writer's transactions as a full disk does, while ``on``."""

    def __init__(self, storage: SQLiteStorage) -> None:
        self.on = threading.Event()
        real = storage._transaction

        def transaction(chunk: list[Any], lease_want: int, durable: bool) -> Any:
            if self.on.is_set():
                raise sqlite3.OperationalError("database or disk is full")
            return real(chunk, lease_want, durable)

        storage._transaction = transaction  # type: ignore[method-assign]
        storage.retry_first = 0.01
        storage.retry_max = 0.05
