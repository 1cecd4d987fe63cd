"""Helpers and fixtures shared by the storage tests (tests/gateway/test_storage_*.py).

A test file uses a fixture from here by binding it at module level
(``open_sqlite = storage_support.open_sqlite``), so pytest finds it by name.
"""

from __future__ import annotations

import sqlite3
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
