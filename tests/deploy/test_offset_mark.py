"""The offset mark outside the data dir (``storage.offset_mark``, gateway/storage/mark.py).

It is raised before each block of offsets is reserved, so it is never below an
offset handed out; every start begins above it, so a database copied into
place by hand cannot hand out old offsets either.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from gateway.storage import SQLiteStorage, StorageError, read_mark, write_mark
from tests.gateway.storage_support import append


def reserved(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return int(
            conn.execute("SELECT value FROM meta WHERE key = 'offset_reserved'").fetchone()[0]
        )


async def test_the_mark_is_never_below_an_offset_handed_out(tmp_path: Path) -> None:
    mark = tmp_path / "elsewhere" / "offset-mark"
    mark.parent.mkdir()
    storage = SQLiteStorage(tmp_path / "data" / "gateway.sqlite3", offset_block=8)
    storage.offset_mark = mark
    await storage.open()
    try:
        for i in range(100):
            offset = append(storage, seq=i % 256).offset
            assert offset <= read_mark(mark)
            if i % 3 == 0:
                await storage.flush()  # lets the writer reserve the next block
    finally:
        await storage.close()
    assert read_mark(mark) >= reserved(tmp_path / "data" / "gateway.sqlite3") >= 100


async def test_a_start_begins_above_the_mark_whatever_the_database_says(tmp_path: Path) -> None:
    db = tmp_path / "data" / "gateway.sqlite3"
    first = SQLiteStorage(db)
    await first.open()
    await first.close()  # a database that reserved offsets 1..2**20 only
    mark = tmp_path / "offset-mark"
    write_mark(mark, 50_000_000)
    storage = SQLiteStorage(db)
    storage.offset_mark = mark
    await storage.open()
    try:
        assert storage.next_offset() == 50_000_001
    finally:
        await storage.close()
    assert read_mark(mark) == 50_000_000 + storage.offset_block


def test_the_mark_is_only_ever_raised(tmp_path: Path) -> None:
    mark = tmp_path / "offset-mark"
    assert read_mark(mark) == 0
    assert write_mark(mark, 10) == 10
    assert write_mark(mark, 5) == 10
    assert read_mark(mark) == 10
    assert (mark.stat().st_mode & 0o777) == 0o600
    assert read_mark(None) == 0


async def test_an_unwritable_mark_stops_the_open_with_a_storage_error(tmp_path: Path) -> None:
    storage = SQLiteStorage(tmp_path / "data" / "gateway.sqlite3")
    storage.offset_mark = tmp_path / "no-such-dir" / "offset-mark"
    with pytest.raises(StorageError, match=r"cannot write the offset mark .*storage\.offset_mark"):
        await storage.open()
