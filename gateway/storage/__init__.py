"""Durable state of the hub: telemetry history, the gateway-wide offset, the offline
command queue and the device registry (docs/api.md §3-4).

It exists so that the hub can say "nothing is lost across a restart" without ever
waiting on a disk from the event loop. The hub codes against the small `Storage`
protocol; `SQLiteStorage` is the default engine and `MemoryStorage` its in-memory
twin for routing-core tests.

How `SQLiteStorage` keeps SQLite off the event loop:

* One writer thread owns the only write connection. `append_telemetry` and
  `upsert_device` only put a row on its queue; the thread commits what has
  gathered every `batch_interval` seconds or `batch_rows` rows, whichever comes
  first. Calls that must be committed before they return (`enqueue_command`,
  `mark_sending`, `remove_commands`, `expire_commands`, `delete_devices`) and
  `flush` barriers ride the same queue, so they are ordered with the telemetry
  and registry rows before them, and they cut the batch window short.
* Reads run on a small pool of reader threads, each with its own read-only
  connection. The database is in WAL mode, so readers never block the writer
  and always see the last committed batch.

What a kill -9 can lose (docs/deployment.md, "What a crash can lose"): the
telemetry rows and device upserts appended but not yet committed (at most one
batch window, 20 ms by default, plus any backlog the writer had not caught up
with; `stats.pending` counts them). Never a command whose `enqueue_command`
returned, and never an offset: offsets handed out before the crash are all
below the next process's first offset. A command marked as being sent
(`mark_sending`) when the process died is never handed out again: the next
`open()` takes it out of the queue and `interrupted_commands()` returns it.

Faults are loud and heal: a failed transaction (a full disk, an I/O error, a
corrupt page) makes `health()` report the storage failing until the writer's
next commit; the writer retries the rows with a growing pause on a fresh
connection, and nothing already queued is lost while the fault lasts (past
`max_pending_rows` rows waiting, new ones are dropped and counted). An empty
or unreadable database file is `StorageCorrupt` at `open()`, never a fresh start.

The parts, one job each (importers use this package, never the parts):

* `records`: the values that cross the seam (records, retention, stats, errors);
* `base`: the `Storage` protocol, the seam itself;
* `schema`: the SQLite file layout, its version, and the SQL statements;
* `writer`: the write queue and the writer thread (batching, commits, offset
  leases, retention);
* `readers`: the reader threads and the queries;
* `sqlite`: `SQLiteStorage`, the engine assembled from the two halves above;
* `mark`: the offset high-water mark outside the data dir and the wall-clock floor
  that `iot-gateway restore` and every start use;
* `memory`: `MemoryStorage`.

The package imports nothing from the gateway around it (no aiohttp, no hub): only
the standard library and `frames.errors` for the error base.
"""

from __future__ import annotations

from .base import Storage
from .mark import database_high_water, raise_reservation, read_mark, time_floor, write_mark
from .memory import MemoryStorage
from .records import (
    CommandEvent,
    CommandLog,
    DeviceDeletion,
    DeviceRecord,
    QueuedCommand,
    QueueFull,
    RetentionPolicy,
    StorageClosedError,
    StorageConfig,
    StorageCorrupt,
    StorageError,
    StorageStats,
    StoreHealth,
    TelemetryRecord,
)
from .sqlite import SQLiteStorage

__all__ = [
    "CommandEvent",
    "CommandLog",
    "DeviceDeletion",
    "DeviceRecord",
    "MemoryStorage",
    "QueueFull",
    "QueuedCommand",
    "RetentionPolicy",
    "SQLiteStorage",
    "Storage",
    "StorageClosedError",
    "StorageConfig",
    "StorageCorrupt",
    "StorageError",
    "StorageStats",
    "StoreHealth",
    "TelemetryRecord",
    "database_high_water",
    "raise_reservation",
    "read_mark",
    "time_floor",
    "write_mark",
]
