"""The SQLite readers (gateway/storage/readers.py): what a read sees while the writer writes.

Reads run on their own threads and connections and see committed batches only:
never a torn batch, and never waiting for an open batch window.
"""

from __future__ import annotations

import asyncio

from gateway.storage import TelemetryRecord
from tests.gateway import storage_support
from tests.gateway.storage_support import OpenSQLite, append

# Fixtures shared by the storage test files: pytest finds them by these names.
db_path = storage_support.db_path
open_sqlite = storage_support.open_sqlite


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
