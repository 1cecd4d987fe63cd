"""The SQLite engine's lifecycle (gateway/storage/sqlite.py): open, close, reopen.

Closing commits everything queued, a reopened file has all of it, and a path
that cannot hold a database is an error naming it. A new database is made
whole before it takes its name, so an empty file there was never the
gateway's: it is `StorageCorrupt`, not a fresh start at offset 1.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gateway.storage import DeviceRecord, SQLiteStorage, StorageCorrupt, StorageError
from tests.gateway import storage_support
from tests.gateway.storage_support import (
    NOW_MS,
    OpenSQLite,
    append,
    command,
    file_size,
    raw_rows,
    remove_db,
    truncate,
)

# Fixtures shared by the storage test files: pytest finds them by these names.
db_path = storage_support.db_path
open_sqlite = storage_support.open_sqlite


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


async def test_an_empty_database_file_is_refused_not_started_afresh(
    open_sqlite: OpenSQLite, db_path: Path
) -> None:
    storage = await open_sqlite()
    seen = append(storage).offset
    await storage.close()
    remove_db(db_path)
    truncate(db_path)  # truncated, or replaced by an empty file

    with pytest.raises(StorageCorrupt) as refused:
        await SQLiteStorage(db_path).open()
    message = str(refused.value)
    assert str(db_path) in message
    assert "empty" in message
    assert "backup" in message
    assert file_size(db_path) == 0  # left for the operator, not overwritten
    assert seen > 0


async def test_a_new_database_is_made_whole_before_it_takes_its_name(
    open_sqlite: OpenSQLite, db_path: Path
) -> None:
    # A draft left by a start that died half way is not in the way.
    draft = db_path.with_name(db_path.name + ".new")
    truncate(draft)
    storage = await open_sqlite()
    assert file_size(db_path) > 0
    assert file_size(draft) == -1
    assert raw_rows(db_path, "PRAGMA user_version") == [(3,)]
    assert raw_rows(db_path, "PRAGMA journal_mode") == [("wal",)]
    assert append(storage).offset == 1


async def test_a_file_that_is_not_a_database_is_corrupt(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.sqlite3"
    garbage.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StorageCorrupt, match=re.escape(str(garbage))):
        await SQLiteStorage(garbage).open()
