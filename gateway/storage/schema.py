"""The SQLite file: its tables, its schema version, and the SQL both halves run.

It has its own module because the file layout outlives any one release: a data
dir written by this code must open with the next one. A change to `_SCHEMA`
needs a new `_SCHEMA_VERSION` and a migration in `_create_schema`, and
tests/gateway/test_storage_schema.py keeps a frozen copy of each version's
layout to open.

Versions: 1, the first; 2 adds `commands.sending_ms`, set (durably) just before
a queued command is written to its device, so that one being written when the
process died is never written again (docs/deployment.md, "What a crash can lose");
3 adds `commands.gateway_id` (the gateway's command_id of a queued command),
`devices.offline_reason`, the `command_log` table (every command's statuses,
for `GET /api/commands/{id}`) and the `labels` table (labels set over the API).
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from .records import QueuedCommand, StorageError, TelemetryRecord

_SCHEMA_VERSION = 3

# "offset" is quoted everywhere: it is an SQL keyword (LIMIT ... OFFSET).
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;

-- "offset" is the rowid: that is the (offset) index, for free.
CREATE TABLE IF NOT EXISTS telemetry (
    "offset" INTEGER PRIMARY KEY,
    device TEXT NOT NULL,
    protocol TEXT NOT NULL,
    ts INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS telemetry_device ON telemetry (device, "offset");
CREATE INDEX IF NOT EXISTS telemetry_protocol ON telemetry (protocol, "offset");
-- For the age rule of retention, so pruning never scans the whole table.
CREATE INDEX IF NOT EXISTS telemetry_ts ON telemetry (ts);

-- AUTOINCREMENT so that a key is never reused, even after the newest row is removed.
-- sending_ms: unix ms when its delivery began (NULL: waiting). Set and fsynced
-- before the COMMAND is written: a row still set at start-up was being sent
-- when the process died, and is never sent again.
CREATE TABLE IF NOT EXISTS commands (
    key INTEGER PRIMARY KEY AUTOINCREMENT,
    command_id TEXT,
    device TEXT NOT NULL,
    command TEXT NOT NULL,
    body BLOB NOT NULL,
    created_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL,
    sending_ms INTEGER,
    gateway_id TEXT
);
CREATE INDEX IF NOT EXISTS commands_device ON commands (device, key);
CREATE INDEX IF NOT EXISTS commands_expires ON commands (expires_ms);

CREATE TABLE IF NOT EXISTS devices (
    device TEXT PRIMARY KEY,
    protocol TEXT NOT NULL,
    transport TEXT NOT NULL,
    first_seen_ms INTEGER NOT NULL,
    last_seen_ms INTEGER NOT NULL,
    offline_reason TEXT
) WITHOUT ROWID;

-- Every command's statuses, one row per command (the gateway's command_id):
-- request_id is the client's id as JSON (a string or a number), history a JSON
-- array of {"status", "ts", ...}. Rows go once updated_ms is older than the
-- command log's keep time (retention pass).
CREATE TABLE IF NOT EXISTS command_log (
    gateway_id TEXT PRIMARY KEY,
    request_id TEXT,
    device TEXT NOT NULL,
    status TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL,
    history TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS command_log_updated ON command_log (updated_ms);

-- Labels set over the API (docs/api.md §4), a JSON object per device: they
-- override the config file's [labels] field by field.
CREATE TABLE IF NOT EXISTS labels (
    device TEXT PRIMARY KEY,
    labels TEXT NOT NULL
) WITHOUT ROWID;
"""

_RESERVED_KEY = "offset_reserved"

# A batch of rows goes in as one JSON array, unpacked by SQLite's json_each:
# executemany released and retook the GIL for every row, and each retake
# waited for the event-loop thread (measured: 20 against 10 us of writer CPU
# per row, and 25 times the wall time, with a busy thread beside it).
# json_extract of a JSON string gives back its text unchanged.
_INSERT_TELEMETRY_BATCH = """
INSERT INTO telemetry ("offset", device, protocol, ts, seq, data)
SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), json_extract(value, '$[2]'),
       json_extract(value, '$[3]'), json_extract(value, '$[4]'), json_extract(value, '$[5]')
FROM json_each(?)
"""
_UPSERT_DEVICE = """
INSERT INTO devices (device, protocol, transport, first_seen_ms, last_seen_ms, offline_reason)
VALUES (?, ?, ?, ?, ?, ?)
ON CONFLICT (device) DO UPDATE SET
    protocol = excluded.protocol,
    transport = excluded.transport,
    last_seen_ms = excluded.last_seen_ms,
    offline_reason = excluded.offline_reason
"""
# A command's status: the first makes its row, each later one is appended to
# its history (json_insert with $[#] appends to an array). Parameters: the
# status as a JSON object is given twice, once per branch.
_LOG_COMMAND = """
INSERT INTO command_log (gateway_id, request_id, device, status, created_ms, updated_ms, history)
VALUES (?, ?, ?, ?, ?, ?, json_array(json(?)))
ON CONFLICT (gateway_id) DO UPDATE SET
    status = excluded.status,
    updated_ms = excluded.updated_ms,
    history = json_insert(history, '$[#]', json(?))
"""
_TELEMETRY_COLUMNS = '"offset", device, protocol, ts, seq, data'
_COMMAND_COLUMNS = "key, command_id, device, command, body, created_ms, expires_ms, gateway_id"
_DEVICE_COLUMNS = "device, protocol, transport, first_seen_ms, last_seen_ms, offline_reason"

# How long a connection waits for a lock held by another process (a second
# gateway on the same file, an operator's sqlite3 shell) before failing.
_BUSY_TIMEOUT_MS = 5000


def _connect(path: Path, *, create: bool) -> sqlite3.Connection:
    """A connection for our own transactions (isolation_level=None), usable from any thread.

    Without ``create`` a missing file is an error, not a new empty database.
    """
    if create:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    else:
        conn = sqlite3.connect(
            f"{path.resolve().as_uri()}?mode=rw",
            uri=True,
            isolation_level=None,
            check_same_thread=False,
        )
    try:
        conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
    except BaseException:
        conn.close()
        raise
    return conn


def describe(error: BaseException) -> str:
    """One line for an SQLite failure: its message and, when known, SQLite's name for it."""
    name = getattr(error, "sqlite_errorname", None)
    return f"{error} ({name})" if name else f"{error}"


def _corrupt(error: sqlite3.Error) -> bool:
    """True for SQLite's "this is not (or no longer) a database file" errors."""
    return getattr(error, "sqlite_errorname", None) in ("SQLITE_CORRUPT", "SQLITE_NOTADB")


def _check_version(conn: sqlite3.Connection, path: Path) -> None:
    """Refuse a file written by a newer gateway: this one cannot know its layout."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > _SCHEMA_VERSION:
        raise StorageError(
            f"{path} has schema version {version}, newer than this gateway's "
            f"{_SCHEMA_VERSION}: upgrade the gateway or use another --data-dir"
        )


# Each step takes a file from the version before it to its own; run in order,
# inside the opening transaction, from the file's version up.
_MIGRATIONS = {
    2: ["ALTER TABLE commands ADD COLUMN sending_ms INTEGER"],
    # The new tables and index come from _SCHEMA (IF NOT EXISTS) after the steps.
    3: [
        "ALTER TABLE commands ADD COLUMN gateway_id TEXT",
        "ALTER TABLE devices ADD COLUMN offline_reason TEXT",
    ],
}


def _create_schema(conn: sqlite3.Connection) -> None:
    """Create whatever is missing, migrate an older file, stamp the version.

    Inside the opening transaction: a migration that fails leaves the file as it was.
    """
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    fresh = conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0] == 0
    if not fresh and version < _SCHEMA_VERSION:
        for step in range(max(version, 1) + 1, _SCHEMA_VERSION + 1):
            for statement in _MIGRATIONS[step]:
                conn.execute(statement)
    for statement in _SCHEMA.split(";"):
        if statement.strip():
            conn.execute(statement)
    conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")


def _row_to_telemetry(row: tuple[Any, ...]) -> TelemetryRecord:
    offset, device, protocol, ts, seq, data = row
    return TelemetryRecord(offset, device, protocol, ts, seq, json.loads(data))


def _row_to_command(row: tuple[Any, ...]) -> QueuedCommand:
    key, command_id, device, command, body, created_ms, expires_ms, gateway_id = row
    return QueuedCommand(
        key,
        command_id,
        device,
        json.loads(command),
        bytes(body),
        created_ms,
        expires_ms,
        gateway_id,
    )
