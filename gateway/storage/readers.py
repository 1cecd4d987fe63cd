"""The read half of `SQLiteStorage`: a small pool of reader threads and the queries.

It has its own module because reads never touch the writer's queue: each reader
thread has its own read-only connection, and WAL mode lets it see the last
committed batch without ever blocking the writer or the event loop.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from ..hub.store import FaultLog
from .records import (
    CommandLog,
    DeviceRecord,
    QueuedCommand,
    StorageClosedError,
    StorageError,
    StorageStats,
    TelemetryRecord,
)
from .schema import (
    _COMMAND_COLUMNS,
    _DEVICE_COLUMNS,
    _TELEMETRY_COLUMNS,
    _connect,
    _row_to_command,
    _row_to_telemetry,
    describe,
)

_READER_THREADS = 4

_T = TypeVar("_T")


class SQLiteReaders:
    """The reader half of `SQLiteStorage` (sqlite.py), which sets up the state below.

    Not an engine on its own: `SQLiteStorage.open()` starts the pool, `close()`
    shuts it down and closes the connections in `_read_conns`.
    """

    path: Path
    stats: StorageStats
    _state: str
    _readers: ThreadPoolExecutor | None
    _local: threading.local
    _read_conns: list[sqlite3.Connection]
    _read_lock: threading.Lock
    _read_faults: FaultLog  # under _read_lock

    async def _read(self, fn: Callable[[sqlite3.Connection], _T], what: str) -> _T:
        if self._state != "open" or self._readers is None:
            raise StorageClosedError(f"{self.path}: {what}() on a storage that is {self._state}")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._readers, self._run_read, fn)

    def _run_read(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        # Runs in a reader thread, with that thread's own connection.
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        try:
            if conn is None:
                # Never creates the file (a vanished one is a fault to report).
                conn = _connect(self.path, create=False)
                with self._read_lock:
                    self._read_conns.append(conn)
                self._local.conn = conn
                conn.execute("PRAGMA query_only = ON")  # a reader never writes by mistake
            # isolation_level=None: each statement is its own read transaction
            # over the latest commit, and fetchall() ends it at once, so a
            # reader never pins an old WAL snapshot.
            return fn(conn)
        except sqlite3.Error as e:
            with self._read_lock:
                self.stats.failed_reads += 1
                # Logged when it begins and then now and then: a caller polling a
                # damaged range must not fill the log; the caller gets the error.
                self._read_faults.failed(describe(e))
                if conn is not None:
                    # A fresh connection next time: SQLite may have cached a bad page.
                    self._local.conn = None
                    if conn in self._read_conns:
                        self._read_conns.remove(conn)
                    conn.close()
            raise StorageError(f"{self.path}: read failed: {describe(e)}") from e

    async def telemetry_since(
        self,
        since: int,
        *,
        until: int | None = None,
        device: str | None = None,
        protocol: str | None = None,
        limit: int = 1000,
        from_ts: int | None = None,
        to_ts: int | None = None,
        newest: bool = False,
    ) -> list[TelemetryRecord]:
        """Committed records with `since < offset <= until` and `from_ts <= ts < to_ts`,
        oldest first, at most `limit`: the oldest such, or with `newest` the newest."""
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        where = ['"offset" > ?']
        params: list[Any] = [since]
        if until is not None:
            where.append('"offset" <= ?')
            params.append(until)
        if device is not None:
            where.append("device = ?")
            params.append(device)
        if protocol is not None:
            where.append("protocol = ?")
            params.append(protocol)
        if from_ts is not None:
            where.append("ts >= ?")
            params.append(from_ts)
        if to_ts is not None:
            where.append("ts < ?")
            params.append(to_ts)
        params.append(limit)
        sql = (
            f"SELECT {_TELEMETRY_COLUMNS} FROM telemetry WHERE {' AND '.join(where)}"
            f' ORDER BY "offset"{" DESC" if newest else ""} LIMIT ?'
        )

        def query(conn: sqlite3.Connection) -> list[TelemetryRecord]:
            found = [_row_to_telemetry(row) for row in conn.execute(sql, params).fetchall()]
            if newest:
                found.reverse()
            return found

        return await self._read(query, "telemetry_since")

    async def latest_telemetry(self) -> dict[str, TelemetryRecord]:
        """The newest committed record of each device, by device."""
        # A skip-scan over the (device, offset) index: one seek per device instead
        # of reading every row, which GROUP BY device would do.
        sql = f"""
            WITH RECURSIVE d(device) AS (
                SELECT MIN(device) FROM telemetry
                UNION ALL
                SELECT (SELECT MIN(device) FROM telemetry WHERE device > d.device)
                FROM d WHERE d.device IS NOT NULL
            )
            SELECT {_TELEMETRY_COLUMNS} FROM telemetry WHERE "offset" IN (
                SELECT (SELECT MAX("offset") FROM telemetry t WHERE t.device = d.device)
                FROM d WHERE d.device IS NOT NULL
            )
        """

        def query(conn: sqlite3.Connection) -> dict[str, TelemetryRecord]:
            records = (_row_to_telemetry(row) for row in conn.execute(sql).fetchall())
            return {record.device: record for record in records}

        return await self._read(query, "latest_telemetry")

    async def pending_commands(
        self, device: str, now_ms: int, *, after: int = 0, limit: int | None = None
    ) -> list[QueuedCommand]:
        """The device's waiting commands with `key > after` not yet expired at `now_ms`.

        Oldest first, at most `limit` (None: all); commands being sent are left out.
        """
        sql = (
            f"SELECT {_COMMAND_COLUMNS} FROM commands WHERE device = ? AND key > ?"
            " AND expires_ms > ? AND sending_ms IS NULL ORDER BY key LIMIT ?"
        )
        params = (device, after, now_ms, -1 if limit is None else limit)

        def query(conn: sqlite3.Connection) -> list[QueuedCommand]:
            return [_row_to_command(row) for row in conn.execute(sql, params).fetchall()]

        return await self._read(query, "pending_commands")

    async def devices(self) -> list[DeviceRecord]:
        """Every device ever seen (committed upserts), by name."""
        sql = f"SELECT {_DEVICE_COLUMNS} FROM devices ORDER BY device"

        def query(conn: sqlite3.Connection) -> list[DeviceRecord]:
            return [DeviceRecord(*row) for row in conn.execute(sql).fetchall()]

        return await self._read(query, "devices")

    async def command_log(self, gateway_id: str) -> CommandLog | None:
        """A command's committed statuses, or None when it is unknown (or no longer kept)."""
        sql = (
            "SELECT gateway_id, request_id, device, status, history FROM command_log"
            " WHERE gateway_id = ?"
        )

        def query(conn: sqlite3.Connection) -> CommandLog | None:
            row = conn.execute(sql, (gateway_id,)).fetchone()
            if row is None:
                return None
            gid, request_id, device, status, history = row
            return CommandLog(
                gid,
                None if request_id is None else json.loads(request_id),
                device,
                status,
                json.loads(history),
            )

        return await self._read(query, "command_log")

    async def labels(self) -> dict[str, dict[str, Any]]:
        """The labels set over the API, by device."""

        def query(conn: sqlite3.Connection) -> dict[str, dict[str, Any]]:
            rows = conn.execute("SELECT device, labels FROM labels").fetchall()
            return {device: json.loads(labels) for device, labels in rows}

        return await self._read(query, "labels")
