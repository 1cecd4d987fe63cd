"""The SQLite file (gateway/storage/schema.py): its layout, its version, and that a
data dir written by an earlier gateway still opens.

`V1_SCHEMA`, `V2_SCHEMA` and `V3_SCHEMA` are versions 1 to 3 of the file,
frozen. A change to the schema must bump `_SCHEMA_VERSION` and migrate: then
add the new version beside these, keep the tests opening a file of each older
version, and point the layout test at the new version. Version 2 added
`commands.sending_ms` (a command being written to its device when the process
died is never written again); version 3 added `commands.gateway_id`,
`devices.offline_reason`, and the `command_log` and `labels` tables.
"""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from gateway.storage import (
    CommandEvent,
    DeviceRecord,
    QueuedCommand,
    SQLiteStorage,
    StorageError,
    TelemetryRecord,
)
from tests.gateway import storage_support
from tests.gateway.storage_support import NOW_MS, OpenSQLite, append, command, raw_rows

# Fixtures shared by the storage test files: pytest finds them by these names.
db_path = storage_support.db_path
open_sqlite = storage_support.open_sqlite

# Never edit: this is what every version-1 data dir holds.
V1_SCHEMA = """
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
CREATE TABLE IF NOT EXISTS commands (
    key INTEGER PRIMARY KEY AUTOINCREMENT,
    command_id TEXT,
    device TEXT NOT NULL,
    command TEXT NOT NULL,
    body BLOB NOT NULL,
    created_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS commands_device ON commands (device, key);
CREATE INDEX IF NOT EXISTS commands_expires ON commands (expires_ms);

CREATE TABLE IF NOT EXISTS devices (
    device TEXT PRIMARY KEY,
    protocol TEXT NOT NULL,
    transport TEXT NOT NULL,
    first_seen_ms INTEGER NOT NULL,
    last_seen_ms INTEGER NOT NULL
) WITHOUT ROWID;
"""
# Never edit: this is what every version-2 data dir holds (written fresh).
V2_SCHEMA = V1_SCHEMA.replace(
    "    expires_ms INTEGER NOT NULL\n);",
    "    expires_ms INTEGER NOT NULL,\n    sending_ms INTEGER\n);",
)
assert V2_SCHEMA != V1_SCHEMA
# Never edit: this is what every version-3 data dir holds (written fresh).
V3_SCHEMA = (
    V2_SCHEMA.replace(
        "    sending_ms INTEGER\n);",
        "    sending_ms INTEGER,\n    gateway_id TEXT\n);",
    ).replace(
        "    last_seen_ms INTEGER NOT NULL\n) WITHOUT ROWID;",
        "    last_seen_ms INTEGER NOT NULL,\n    offline_reason TEXT\n) WITHOUT ROWID;",
    )
    + """
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
)
assert "gateway_id TEXT" in V3_SCHEMA
assert "offline_reason TEXT" in V3_SCHEMA
V1_RESERVED = 5000  # meta.offset_reserved: the next process starts above it
V1_TELEMETRY = [
    TelemetryRecord(10, "a", "env-sensor", NOW_MS, 1, {"temperature_c": 21.5}),
    TelemetryRecord(11, "b", "relay-4", NOW_MS + 1, 2, {"channels": [True, False]}),
    TelemetryRecord(4000, "a", "env-sensor", NOW_MS + 2, 3, {"name": "caf\u00e9 \u2603"}),
]
V1_COMMAND = QueuedCommand(7, "c-1", "b", {"name": "set", "on": True}, b"\x02\x01", NOW_MS, 2**62)
V1_DEVICES = [
    DeviceRecord("a", "env-sensor", "tcp", NOW_MS - 100, NOW_MS + 2),
    DeviceRecord("b", "relay-4", "serial", NOW_MS - 50, NOW_MS + 1),
]


def write_v1_data_dir(path: Path, commands: list[QueuedCommand] | None = None) -> None:
    """A data dir as a version-1 gateway leaves it, written with plain sqlite3."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.executescript(V1_SCHEMA)
        conn.execute("PRAGMA user_version = 1")
        conn.execute("INSERT INTO meta (key, value) VALUES ('offset_reserved', ?)", (V1_RESERVED,))
        for r in V1_TELEMETRY:
            conn.execute(
                'INSERT INTO telemetry ("offset", device, protocol, ts, seq, data)'
                " VALUES (?, ?, ?, ?, ?, ?)",
                (r.offset, r.device, r.protocol, r.ts, r.seq, json.dumps(r.data)),
            )
        for c in commands or [V1_COMMAND]:
            conn.execute(
                "INSERT INTO commands (key, command_id, device, command, body, created_ms,"
                " expires_ms) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    c.key,
                    c.command_id,
                    c.device,
                    json.dumps(c.command),
                    c.body,
                    c.created_ms,
                    c.expires_ms,
                ),
            )
        for d in V1_DEVICES:
            conn.execute(
                "INSERT INTO devices VALUES (?, ?, ?, ?, ?)",
                (d.device, d.protocol, d.transport, d.first_seen_ms, d.last_seen_ms),
            )
    finally:
        conn.close()


def write_v2_schema(path: Path) -> None:
    """An empty version-2 file, as the frozen schema says."""
    write_schema(path, V2_SCHEMA, 2)


def write_schema(path: Path, schema: str, version: int) -> None:
    """An empty file of a frozen schema version."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.executescript(schema)
        conn.execute(f"PRAGMA user_version = {version}")
    finally:
        conn.close()


V2_COMMAND = QueuedCommand(4, "c-2", "a", {"name": "reboot"}, b"\x02", NOW_MS, 2**62)


def write_v2_data_dir(path: Path) -> None:
    """A data dir as a version-2 gateway leaves it: the v1 content, a command being sent."""
    write_v2_schema(path)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("INSERT INTO meta (key, value) VALUES ('offset_reserved', ?)", (V1_RESERVED,))
        for r in V1_TELEMETRY:
            conn.execute(
                'INSERT INTO telemetry ("offset", device, protocol, ts, seq, data)'
                " VALUES (?, ?, ?, ?, ?, ?)",
                (r.offset, r.device, r.protocol, r.ts, r.seq, json.dumps(r.data)),
            )
        for c, sending in ((V2_COMMAND, None), (V1_COMMAND, NOW_MS)):
            conn.execute(
                "INSERT INTO commands (key, command_id, device, command, body, created_ms,"
                " expires_ms, sending_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    c.key,
                    c.command_id,
                    c.device,
                    json.dumps(c.command),
                    c.body,
                    c.created_ms,
                    c.expires_ms,
                    sending,
                ),
            )
        for d in V1_DEVICES:
            conn.execute(
                "INSERT INTO devices VALUES (?, ?, ?, ?, ?)",
                (d.device, d.protocol, d.transport, d.first_seen_ms, d.last_seen_ms),
            )
    finally:
        conn.close()


def columns(path: Path, table: str) -> list[tuple[Any, ...]]:
    """Name, type, not-null, default and primary-key place of each column, in order."""
    return [row[1:] for row in raw_rows(path, f"PRAGMA table_info({table})")]


def layout(path: Path) -> list[tuple[Any, ...]]:
    """Tables and indexes with their SQL (whitespace folded), and the schema version."""
    rows = raw_rows(path, "SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY name")
    folded = [(*row[:3], re.sub(r"\s+", " ", row[3] or "")) for row in rows]
    return [*folded, *raw_rows(path, "PRAGMA user_version")]


async def test_storage_file_layout_uses_wal(open_sqlite: OpenSQLite, db_path: Path) -> None:
    storage = await open_sqlite()
    append(storage)
    await storage.close()
    assert raw_rows(db_path, "PRAGMA journal_mode") == [("wal",)]
    indexes = {name for (name,) in raw_rows(db_path, "SELECT name FROM sqlite_master")}
    assert {"telemetry_device", "telemetry_protocol", "commands_device"} <= indexes


async def test_a_version_1_data_dir_opens(open_sqlite: OpenSQLite, db_path: Path) -> None:
    write_v1_data_dir(db_path)
    storage = await open_sqlite()
    assert await storage.telemetry_since(0) == V1_TELEMETRY
    assert await storage.latest_telemetry() == {"a": V1_TELEMETRY[2], "b": V1_TELEMETRY[1]}
    assert await storage.pending_commands("b", NOW_MS) == [V1_COMMAND]
    assert await storage.devices() == V1_DEVICES

    # It goes on where the file left off: offsets above its reservation, new keys.
    record = append(storage, "a")
    assert record.offset > V1_RESERVED
    queued = await storage.enqueue_command(command("b", NOW_MS, 60_000))
    assert queued.key > V1_COMMAND.key
    await storage.close()
    assert raw_rows(db_path, "PRAGMA user_version") == [(3,)]  # upgraded in place
    assert raw_rows(db_path, 'SELECT MAX("offset") FROM telemetry') == [(record.offset,)]


async def test_a_version_1_queue_upgrades_to_the_current_version_with_every_command(
    open_sqlite: OpenSQLite, db_path: Path, tmp_path: Path
) -> None:
    queue = [
        QueuedCommand(k, f"c-{k}", device, {"hex": f"{k:02x}"}, bytes([k]), NOW_MS + k, 2**62)
        for k, device in [(3, "a"), (5, "b"), (8, "a"), (9, "a")]
    ]
    write_v1_data_dir(db_path, queue)
    storage = await open_sqlite()
    # Every command kept, with its key, waiting (none was being sent under version 1).
    assert await storage.interrupted_commands() == []
    assert await storage.pending_commands("a", NOW_MS) == [queue[0], queue[2], queue[3]]
    assert await storage.pending_commands("b", NOW_MS) == [queue[1]]
    # And the new column works on them.
    assert await storage.mark_sending([8, 3]) == [8, 3]
    assert await storage.pending_commands("a", NOW_MS) == [queue[3]]
    await storage.close()

    frozen = tmp_path / "frozen" / "v3.sqlite3"
    write_schema(frozen, V3_SCHEMA, 3)
    assert columns(db_path, "commands") == columns(frozen, "commands")
    assert raw_rows(db_path, "PRAGMA user_version") == [(3,)]

    # Reopened: the two marked ones were being sent when it stopped.
    again = await open_sqlite()
    assert [c.key for c in await again.interrupted_commands()] == [3, 8]
    assert await again.pending_commands("a", NOW_MS) == [queue[3]]


async def test_a_version_2_data_dir_upgrades_to_version_3_keeping_everything(
    open_sqlite: OpenSQLite, db_path: Path, tmp_path: Path
) -> None:
    write_v2_data_dir(db_path)
    storage = await open_sqlite()
    # The command marked as being sent under version 2 is interrupted, once; the
    # waiting one is still queued, with no gateway command_id (it had none).
    assert await storage.interrupted_commands() == [V1_COMMAND]
    assert await storage.pending_commands("a", NOW_MS) == [V2_COMMAND]
    assert V2_COMMAND.gateway_id is None
    assert await storage.telemetry_since(0) == V1_TELEMETRY
    # Registry rows come back with no offline reason (version 2 kept none).
    assert await storage.devices() == V1_DEVICES
    assert all(d.offline_reason is None for d in await storage.devices())
    # The new tables work on the upgraded file.
    await storage.set_labels("a", {"name": "Greenhouse", "location": None, "channels": None})
    assert await storage.labels() == {
        "a": {"name": "Greenhouse", "location": None, "channels": None}
    }
    storage.log_command(CommandEvent("g1", "h1", "a", "queued", NOW_MS, {}))
    await storage.flush()
    found = await storage.command_log("g1")
    assert found is not None
    assert found.history == [{"status": "queued", "ts": NOW_MS}]
    await storage.upsert_device(
        DeviceRecord("a", "env-sensor", "tcp", NOW_MS, NOW_MS + 5, "closed")
    )
    await storage.flush()
    assert (await storage.devices())[0].offline_reason == "closed"
    await storage.close()

    assert raw_rows(db_path, "PRAGMA user_version") == [(3,)]
    frozen = tmp_path / "frozen" / "v3.sqlite3"
    write_schema(frozen, V3_SCHEMA, 3)
    for table in ("commands", "devices", "command_log", "labels", "telemetry", "meta"):
        assert columns(db_path, table) == columns(frozen, table), table


async def test_a_data_dir_written_now_has_the_version_3_layout(
    open_sqlite: OpenSQLite, db_path: Path, tmp_path: Path
) -> None:
    # Reopening what this code writes is test_close_flushes_everything and
    # test_history_and_commands_survive_a_restart; this pins the layout, so a
    # schema change cannot slip in without a new version.
    storage = await open_sqlite()
    append(storage)
    await storage.close()
    frozen = tmp_path / "frozen" / "v3.sqlite3"
    write_schema(frozen, V3_SCHEMA, 3)
    assert layout(db_path) == layout(frozen)


async def test_a_newer_schema_version_is_refused(db_path: Path) -> None:
    write_v1_data_dir(db_path)
    conn = sqlite3.connect(db_path)
    conn.execute("PRAGMA user_version = 4")
    conn.close()
    with pytest.raises(StorageError, match=r"schema version 4, newer than this gateway's 3"):
        await SQLiteStorage(db_path).open()
    assert raw_rows(db_path, "PRAGMA user_version") == [(4,)]  # left as it was
