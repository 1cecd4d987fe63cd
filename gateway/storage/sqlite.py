"""`SQLiteStorage`, the default engine: one SQLite file in WAL mode.

It has its own module to put the engine together: its settings and state, opening
the file (schema and the first offset lease) and closing it, and the `Storage`
calls, which hand their work to the writer half (writer.py) or the reader half
(readers.py).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import os
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .readers import _READER_THREADS, SQLiteReaders
from .records import (
    BATCH_INTERVAL,
    BATCH_ROWS,
    DeviceRecord,
    QueuedCommand,
    RetentionPolicy,
    StorageClosedError,
    StorageError,
    StorageStats,
    TelemetryRecord,
)
from .schema import (
    _BUSY_TIMEOUT_MS,
    _COMMAND_COLUMNS,
    _RESERVED_KEY,
    _check_version,
    _create_schema,
    _row_to_command,
)
from .writer import SQLiteWriter, _encode, _Item, _Row

# The package's name, as before the split into modules: operators filter on it
# (docs/deployment.md shows its lines).
log = logging.getLogger("gateway.storage")


class SQLiteStorage(SQLiteWriter, SQLiteReaders):
    """The default `Storage`: one SQLite file in WAL mode, written by one thread.

    Offsets: the `meta` table holds a reserved high-water mark R, and the rule is
    that no offset above the committed R is ever handed out. `open()` reads R,
    starts at R + 1 and commits R := R + offset_block (fsynced) before returning;
    once half of the reservation is used the writer thread commits another block
    in its next transaction. After a crash the next process starts above the
    committed R, hence above every offset handed out live, without writing once
    per offset. Offsets therefore jump by up to `offset_block` across a restart.
    """

    #: Retention runs in the writer thread at most this often (seconds).
    prune_interval: float = 1.0

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        # A frozen dataclass, so one shared default is safe; ruff sees that only
        # within the module defining it.
        retention: RetentionPolicy = RetentionPolicy(),  # noqa: B008
        batch_interval: float = BATCH_INTERVAL,
        batch_rows: int = BATCH_ROWS,
        offset_block: int = 1 << 20,
    ) -> None:
        if batch_interval < 0 or batch_rows < 1 or offset_block < 2:
            raise ValueError(
                "SQLiteStorage needs batch_interval >= 0, batch_rows >= 1 and offset_block >= 2"
            )
        self.path = Path(path)
        self.retention = retention
        self.batch_interval = batch_interval
        self.batch_rows = batch_rows
        self.offset_block = offset_block
        self.stats = StorageStats()

        # Everything below the lock is shared between the loop and the writer
        # thread; the lock is only ever held for list bookkeeping, never around
        # SQLite, so taking it on the loop cannot stall the loop.
        self._cond = threading.Condition()
        self._queue: collections.deque[_Item] = collections.deque()
        self._urgent = 0  # ops in the queue: they end the batch window early
        self._window_start = 0.0  # monotonic time the current batch window opened
        self._state = "new"  # new -> open -> closing -> closed
        self._fatal: BaseException | None = None  # the writer thread died of this
        self._batch_error: StorageError | None = None  # unreported failed batch

        # Offsets: `_next` is touched only by the loop; `_lease_end` (committed R)
        # only by the writer after a commit; `_lease_want` by the loop (to ask for
        # a new block) and read by the writer. Plain int stores are atomic.
        self._next = 0
        self._lease_end = 0
        self._lease_want = 0

        self._writer: threading.Thread | None = None
        self._wconn: sqlite3.Connection | None = None
        self._synchronous_full = False  # the write connection's current setting
        self._counts: dict[str, int] = {}  # rows per device, writer thread only
        self._last_prune = 0.0
        # Rows written since the last retention pass (writer thread only): an
        # idle writer then sleeps until work arrives instead of waking to prune.
        self._dirty = True
        self._close_task: asyncio.Future[None] | None = None

        self._readers: ThreadPoolExecutor | None = None
        self._local = threading.local()
        self._read_conns: list[sqlite3.Connection] = []
        self._read_lock = threading.Lock()

    # ------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        """Create or open the database file, reserve offsets, start the writer thread."""
        if self._state != "new":
            raise StorageClosedError(f"{self.path}: open() called twice")
        self._wconn = await asyncio.to_thread(self._open_sync)
        self._readers = ThreadPoolExecutor(
            max_workers=_READER_THREADS, thread_name_prefix="storage-read"
        )
        self._last_prune = time.monotonic()
        # A daemon thread, so a process that never calls close() can still exit;
        # it then loses only what a kill -9 would.
        self._writer = threading.Thread(
            target=self._writer_main, name=f"storage-writer:{self.path.name}", daemon=True
        )
        self._state = "open"
        self._writer.start()
        log.info("storage open: %s, next offset %d", self.path, self._next)

    def _open_sync(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: we issue BEGIN/COMMIT ourselves, so that a batch
            # is exactly one transaction. check_same_thread=False: the connection
            # is made here and handed to the writer thread, which alone uses it.
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except (OSError, sqlite3.Error) as e:
            raise StorageError(f"cannot open the storage database {self.path}: {e}") from e
        try:
            conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode != "wal":
                # E.g. some network file systems: correct but readers block the writer.
                log.warning(
                    "%s: journal_mode is %s, not wal; reads will block writes", self.path, mode
                )
            # The reservation below must survive a power cut too, so it is fsynced.
            conn.execute("PRAGMA synchronous = FULL")
            _check_version(conn, self.path)
            conn.execute("BEGIN IMMEDIATE")
            try:
                _create_schema(conn)
                row = conn.execute("SELECT value FROM meta WHERE key = ?", (_RESERVED_KEY,))
                found = row.fetchone()
                reserved = found[0] if found else 0
                # Belt and braces: rows can never be above R, but a hand-edited or
                # restored file could; never start below a stored offset.
                top = conn.execute('SELECT MAX("offset") FROM telemetry').fetchone()[0] or 0
                start = max(reserved, top) + 1
                lease_end = start - 1 + self.offset_block
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES (?, ?)"
                    " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (_RESERVED_KEY, lease_end),
                )
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            # Telemetry batches may be lost by a power cut (never by a process
            # crash: a commit is in the OS once COMMIT returns), and fsyncing every
            # 20 ms batch would cost more than it saves. Durable work switches to
            # FULL per transaction, see _commit.
            conn.execute("PRAGMA synchronous = NORMAL")
            self._synchronous_full = False
            self._counts = dict(
                conn.execute("SELECT device, COUNT(*) FROM telemetry GROUP BY device").fetchall()
            )
        except StorageError:
            conn.close()
            raise
        except sqlite3.Error as e:
            conn.close()
            raise StorageError(f"cannot open the storage database {self.path}: {e}") from e
        self._next = start
        self._lease_end = self._lease_want = lease_end
        return conn

    async def close(self) -> None:
        """Stop accepting writes, commit everything queued, close connections, join threads.

        Raises `StorageError` if the final commits failed (the data they held is lost).
        """
        if self._close_task is None:
            if self._state == "new":
                self._state = "closed"
                return
            self._close_task = asyncio.ensure_future(self._close())
        # Shielded: a second close(), or a cancelled one, still waits for the same work.
        await asyncio.shield(self._close_task)

    async def _close(self) -> None:
        with self._cond:
            self._state = "closing"
            self._cond.notify()
        writer, readers = self._writer, self._readers
        if writer is not None:
            await asyncio.to_thread(writer.join)
        if readers is not None:
            # Waits for reads in flight; new ones were refused once closing began.
            await asyncio.to_thread(readers.shutdown, True)
        with self._read_lock:
            conns, self._read_conns = self._read_conns, []
        for conn in conns:
            conn.close()
        self._state = "closed"
        log.info("storage closed: %s", self.path)
        self._raise_errors()

    # ------------------------------------------------------------ writes

    def append_telemetry(self, record: TelemetryRecord, data_json: str | None = None) -> None:
        """Queue one record for the writer's next batch; returns at once.

        The data is serialised here (unless ``data_json`` already is), so data
        that is not JSON fails in the caller's hands, and later changes to the
        caller's dict are not stored.
        """
        row: _Row = (
            record.offset,
            record.device,
            record.protocol,
            record.ts,
            record.seq,
            _encode(record.data) if data_json is None else data_json,
        )
        self._put(row, "append_telemetry")

    async def upsert_device(self, record: DeviceRecord) -> None:
        """Queue a device insert/update for the next batch (like telemetry).

        It is visible to `devices()` once that batch is committed; `flush()` to wait.
        """
        self._put(record, "upsert_device")

    async def flush(self) -> None:
        """Return once everything appended before the call is committed.

        Raises `StorageError` if a batch failed since the last flush (its rows are lost).
        """
        await self._submit(None, "flush", durable=False)
        self._raise_errors()

    async def enqueue_command(self, command: QueuedCommand) -> QueuedCommand:
        """Store a command; it is committed and fsynced before this returns."""
        params = (
            command.command_id,
            command.device,
            _encode(command.command),
            command.body,
            command.created_ms,
            command.expires_ms,
        )

        def insert(conn: sqlite3.Connection) -> int:
            cursor = conn.execute(
                "INSERT INTO commands (command_id, device, command, body, created_ms,"
                " expires_ms) VALUES (?, ?, ?, ?, ?, ?)",
                params,
            )
            assert cursor.lastrowid is not None
            return cursor.lastrowid

        key = await self._submit(insert, "enqueue_command", durable=True)
        return dataclasses.replace(command, key=key)

    async def remove_command(self, key: int) -> None:
        """Forget a delivered command (committed before returning; unknown keys are ignored)."""

        def delete(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM commands WHERE key = ?", (key,))

        await self._submit(delete, "remove_command", durable=True)

    async def expire_commands(self, now_ms: int) -> list[QueuedCommand]:
        """Remove and return every command with `expires_ms <= now_ms`, oldest first."""

        def expire(conn: sqlite3.Connection) -> list[QueuedCommand]:
            # Select then delete in one write transaction: nothing else writes
            # in between, so the two statements see the same rows.
            rows = conn.execute(
                f"SELECT {_COMMAND_COLUMNS} FROM commands WHERE expires_ms <= ? ORDER BY key",
                (now_ms,),
            ).fetchall()
            if rows:
                conn.execute("DELETE FROM commands WHERE expires_ms <= ?", (now_ms,))
            return [_row_to_command(row) for row in rows]

        return await self._submit(expire, "expire_commands", durable=True)

    async def prune(self, now_ms: int | None = None) -> int:
        """Apply the retention policy now (the writer also does it every `prune_interval`).

        Returns the number of telemetry rows removed. `now_ms` defaults to the clock.
        """

        def run(conn: sqlite3.Connection) -> int:
            return self._prune(conn, time.time() * 1000 if now_ms is None else now_ms)

        return await self._submit(run, "prune", durable=False)
