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
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..hub.store import FaultLog
from .mark import read_mark, write_mark
from .readers import _READER_THREADS, SQLiteReaders
from .records import (
    BATCH_INTERVAL,
    BATCH_ROWS,
    COMMAND_LOG_KEEP_S,
    MAX_PENDING_ROWS,
    MAX_QUEUED_COMMANDS,
    MAX_QUEUED_COMMANDS_PER_DEVICE,
    CommandEvent,
    DeviceDeletion,
    DeviceRecord,
    QueuedCommand,
    QueueFull,
    RetentionPolicy,
    StorageClosedError,
    StorageCorrupt,
    StorageError,
    StorageStats,
    StoreHealth,
    TelemetryRecord,
)
from .schema import (
    _COMMAND_COLUMNS,
    _RESERVED_KEY,
    _check_version,
    _connect,
    _corrupt,
    _create_schema,
    _row_to_command,
)
from .writer import SQLiteWriter, _encode, _Item, _Row

# The package's name, as before the split into modules: operators filter on it
# (docs/deployment.md shows its lines).
log = logging.getLogger("gateway.storage")

# Keys go to SQLite as one JSON array (json_each), whatever their number.
_KEYS = "(SELECT value FROM json_each(?))"


class SQLiteStorage(SQLiteWriter, SQLiteReaders):
    """The default `Storage`: one SQLite file in WAL mode, written by one thread.

    Offsets: the `meta` table holds a reserved high-water mark R, and the rule is
    that no offset above the committed R is ever handed out. `open()` reads R,
    starts at R + 1 and commits R := R + offset_block (fsynced) before returning;
    once half of the reservation is used the writer thread commits another block
    in its next transaction. After a crash the next process starts above the
    committed R, hence above every offset handed out live, without writing once
    per offset. Offsets therefore jump by up to `offset_block` across a restart.

    The file is created whole (under another name, then renamed into place), so
    an empty file where the database should be is never one of ours: `open()`
    refuses it with `StorageCorrupt` rather than start again at offset 1.
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
        max_pending_rows: int = MAX_PENDING_ROWS,
        max_queued_commands_per_device: int = MAX_QUEUED_COMMANDS_PER_DEVICE,
        max_queued_commands: int = MAX_QUEUED_COMMANDS,
        command_log_keep_s: float = COMMAND_LOG_KEEP_S,
    ) -> None:
        if not command_log_keep_s > 0:
            raise ValueError(f"command_log_keep_s must be > 0, not {command_log_keep_s}")
        if batch_interval < 0 or batch_rows < 1 or offset_block < 2:
            raise ValueError(
                "SQLiteStorage needs batch_interval >= 0, batch_rows >= 1 and offset_block >= 2"
            )
        if min(max_pending_rows, max_queued_commands_per_device, max_queued_commands) < 1:
            raise ValueError("SQLiteStorage's bounds must be >= 1")
        self.path = Path(path)
        self.retention = retention
        self.batch_interval = batch_interval
        self.batch_rows = batch_rows
        self.offset_block = offset_block
        self.max_pending_rows = max_pending_rows
        self.max_queued_commands_per_device = max_queued_commands_per_device
        self.max_queued_commands = max_queued_commands
        self.command_log_keep_s = command_log_keep_s
        # The high-water mark outside the data dir (mark.py): None, no mark kept.
        # Set before open() by whoever configures it (gateway/app.py).
        self.offset_mark: Path | None = None
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
        self._batch_error: StorageError | None = None  # unreported lost rows
        self._close_deadline = 0.0  # a failing writer gives up its rows then
        self._health = StoreHealth()

        # Offsets: `_next` is touched only by the loop; `_lease_end` (committed R)
        # only by the writer after a commit; `_lease_want` by the loop (to ask for
        # a new block) and read by the writer. Plain int stores are atomic.
        self._next = 0
        self._lease_end = 0
        self._lease_want = 0

        self._writer: threading.Thread | None = None
        self._wconn: sqlite3.Connection | None = None
        self._reopen = False
        self._synchronous_full = False  # the write connection's current setting
        self._counts: dict[str, int] = {}  # rows per device, writer thread only
        self._last_prune = 0.0
        # Rows written since the last retention pass (writer thread only): an
        # idle writer then sleeps until work arrives instead of waking to prune.
        self._dirty = True
        self._retry_at = 0.0
        self._retry_delay = 0.0
        self._faults = FaultLog(log, f"{self.path}: storage batch")
        self._prune_faults = FaultLog(log, f"{self.path}: storage retention pass")
        self._drops = FaultLog(log, f"{self.path}: keeping every row")
        self._dropped_at_bound = 0
        self._dropped_seen = 0
        self._after_commit = []
        # The offline queue's size, by device (writer thread only); None: count
        # again before use (a rolled-back transaction may have changed it).
        self._queued: collections.Counter[str] | None = None
        self._interrupted: list[QueuedCommand] = []
        self._close_task: asyncio.Future[None] | None = None

        self._readers: ThreadPoolExecutor | None = None
        self._local = threading.local()
        self._read_conns: list[sqlite3.Connection] = []
        self._read_lock = threading.Lock()
        self._read_faults = FaultLog(log, f"{self.path}: storage read")

    # ------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        """Create or open the database file, reserve offsets, start the writer thread.

        Raises `StorageCorrupt` for a file that is empty, not a database, or
        too damaged to open; `StorageError` when it cannot be opened at all.
        """
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

    def _create_file(self) -> None:
        """Make a new database whole: built under another name, then linked into place.

        An empty file at ``self.path`` is then never one this code left behind
        (a crash between creating and filling it would leave one).
        """
        draft = self.path.with_name(self.path.name + ".new")
        for suffix in ("", "-wal", "-shm", "-journal"):
            Path(f"{draft}{suffix}").unlink(missing_ok=True)
        conn = _connect(draft, create=True)
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("BEGIN IMMEDIATE")
            _create_schema(conn)
            conn.execute("COMMIT")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            conn.close()  # the last connection: SQLite folds the WAL in and removes it
        with open(draft, "rb") as f:
            os.fsync(f.fileno())
        try:
            os.link(draft, self.path)  # unlike a rename, never replaces a file there
        except FileExistsError:
            pass  # another process made it meanwhile: open that one
        finally:
            draft.unlink(missing_ok=True)
        directory = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def _open_sync(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if not self.path.exists():
                self._create_file()
            elif self.path.is_file() and self.path.stat().st_size == 0:
                raise StorageCorrupt(
                    f"{self.path} is empty (0 bytes). The gateway never leaves an empty "
                    "database, so the file was truncated or replaced: restore it from a "
                    "backup, or move it away to start with no history (offsets then begin "
                    "again at 1, below those dashboards have already seen)"
                )
            # Not created here if it vanished meanwhile: an error, not a fresh start.
            conn = _connect(self.path, create=False)
        except StorageError:
            raise
        except (OSError, sqlite3.Error) as e:
            raise StorageError(f"cannot open the storage database {self.path}: {e}") from e
        try:
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
                # Above the mark kept outside the data dir too: a file restored
                # by hand (a copy) may hold an old reservation (mark.py).
                start = max(reserved, top, read_mark(self.offset_mark)) + 1
                lease_end = start - 1 + self.offset_block
                if self.offset_mark is not None:
                    # Raised before the reservation commits, so it is never below it.
                    try:
                        write_mark(self.offset_mark, lease_end)
                    except OSError as e:
                        raise StorageError(
                            f"cannot write the offset mark {self.offset_mark} "
                            f"(storage.offset_mark): {e.strerror or e}"
                        ) from None
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES (?, ?)"
                    " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (_RESERVED_KEY, lease_end),
                )
                # Commands the last process was writing to their device when it
                # stopped: never written again (the hub reports them).
                interrupted = [
                    _row_to_command(r)
                    for r in conn.execute(
                        f"SELECT {_COMMAND_COLUMNS} FROM commands"
                        " WHERE sending_ms IS NOT NULL ORDER BY key"
                    ).fetchall()
                ]
                if interrupted:
                    conn.execute("DELETE FROM commands WHERE sending_ms IS NOT NULL")
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
            self._queued = self._count_queued(conn)
        except StorageError:
            conn.close()
            raise
        except sqlite3.Error as e:
            conn.close()
            if _corrupt(e):
                raise StorageCorrupt(
                    f"the storage database {self.path} is damaged ({e}): restore it from a "
                    "backup, or recover what it holds with sqlite3's .recover"
                ) from e
            raise StorageError(f"cannot open the storage database {self.path}: {e}") from e
        self._next = start
        self._lease_end = self._lease_want = lease_end
        self._interrupted = interrupted
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
            self._close_deadline = time.monotonic() + self.close_retry
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
        caller's dict are not stored. Past ``max_pending_rows`` rows waiting,
        the row is dropped and counted in ``stats.dropped_rows``.
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

        Raises `StorageError` while the storage is failing (what was appended
        waits for the writer's retry), or if rows were lost since the last flush.
        """
        await self._submit(None, "flush", durable=False)
        self._raise_errors()

    # ------------------------------------------------------------ the offline queue

    def _count_queued(self, conn: sqlite3.Connection) -> collections.Counter[str]:
        return collections.Counter(
            dict(conn.execute("SELECT device, COUNT(*) FROM commands GROUP BY device").fetchall())
        )

    def _queued_counts(self, conn: sqlite3.Connection) -> collections.Counter[str]:
        # Writer thread only.
        if self._queued is None:
            self._queued = self._count_queued(conn)
        return self._queued

    def _commands_stale(self) -> None:
        self._queued = None

    def _forget_queued(self, devices: list[str]) -> None:
        # After the commit of a transaction that deleted these rows (writer thread).
        queued = self._queued
        if queued is not None:
            queued.subtract(devices)
            for device in devices:
                if queued[device] <= 0:
                    del queued[device]

    async def enqueue_command(self, command: QueuedCommand) -> QueuedCommand:
        """Store a command; it is committed and fsynced before this returns.

        Raises `QueueFull` when `max_queued_commands_per_device` commands already
        wait for its device, or `max_queued_commands` in all.
        """
        device = command.device
        params = (
            command.command_id,
            device,
            _encode(command.command),
            command.body,
            command.created_ms,
            command.expires_ms,
            command.gateway_id,
        )

        def insert(conn: sqlite3.Connection) -> int | QueueFull:
            queued = self._queued_counts(conn)
            # Returned, not raised: a refusal must not roll back the batch around it.
            if queued[device] >= self.max_queued_commands_per_device:
                return QueueFull(
                    "max_queued_commands_per_device",
                    f"offline queue full: {queued[device]} commands already wait for "
                    f"{device!r} (storage.max_queued_commands_per_device)",
                )
            total = queued.total()
            if total >= self.max_queued_commands:
                return QueueFull(
                    "max_queued_commands",
                    f"offline queue full: {total} commands already wait for their devices "
                    "(storage.max_queued_commands)",
                )
            cursor = conn.execute(
                "INSERT INTO commands (command_id, device, command, body, created_ms,"
                " expires_ms, gateway_id) VALUES (?, ?, ?, ?, ?, ?, ?)",
                params,
            )
            # Counted now, so the next insert in this transaction sees it; a
            # rollback marks the counts stale (_commands_stale).
            queued[device] += 1
            assert cursor.lastrowid is not None
            return cursor.lastrowid

        key = await self._submit(insert, "enqueue_command", durable=True)
        if isinstance(key, QueueFull):
            raise key
        return dataclasses.replace(command, key=key)

    async def mark_sending(self, keys: Sequence[int]) -> list[int]:
        """Mark waiting commands as being sent; committed and fsynced before this returns."""
        if not keys:
            return []
        wanted = list(keys)

        def mark(conn: sqlite3.Connection) -> list[int]:
            marked = {
                key
                for (key,) in conn.execute(
                    f"UPDATE commands SET sending_ms = ? WHERE key IN {_KEYS}"
                    " AND sending_ms IS NULL RETURNING key",
                    (int(time.time() * 1000), _encode(wanted)),
                ).fetchall()
            }
            return [key for key in wanted if key in marked]

        return await self._submit(mark, "mark_sending", durable=True)

    async def unmark_sending(self, keys: Sequence[int]) -> None:
        """Commands marked but never written wait for their device again (committed)."""
        if not keys:
            return
        encoded = _encode(list(keys))

        def unmark(conn: sqlite3.Connection) -> None:
            conn.execute(f"UPDATE commands SET sending_ms = NULL WHERE key IN {_KEYS}", (encoded,))

        await self._submit(unmark, "unmark_sending", durable=False)

    async def remove_commands(self, keys: Sequence[int]) -> None:
        """Forget commands (unknown keys are ignored); committed, not fsynced, before returning."""
        if not keys:
            return
        encoded = _encode(list(keys))

        def delete(conn: sqlite3.Connection) -> None:
            gone = conn.execute(
                f"DELETE FROM commands WHERE key IN {_KEYS} RETURNING device", (encoded,)
            ).fetchall()
            self._after_commit.append(lambda: self._forget_queued([d for (d,) in gone]))

        await self._submit(delete, "remove_commands", durable=False)

    # ------------------------------------------------------------ the registry

    async def delete_devices(self, devices: Sequence[str]) -> None:
        """Delete devices' registry rows (unknown ones are ignored); committed and fsynced
        before returning.

        It rides the writer's queue like `upsert_device`, so an upsert queued
        before it is deleted too and one queued after it (the device back) stays.
        """
        if not devices:
            return
        encoded = _encode(list(devices))

        def delete(conn: sqlite3.Connection) -> None:
            conn.execute(f"DELETE FROM devices WHERE device IN {_KEYS}", (encoded,))

        await self._submit(delete, "delete_devices", durable=True)

    async def delete_device(self, device: str) -> DeviceDeletion:
        """Delete everything kept of a device: its registry row, history, labels and
        queued commands (returned, oldest first); committed and fsynced before returning.

        Ordered with the rows queued before it (a telemetry row appended before
        the call is deleted too). The command log keeps its commands' statuses.
        """

        def delete(conn: sqlite3.Connection) -> DeviceDeletion:
            telemetry = conn.execute("DELETE FROM telemetry WHERE device = ?", (device,)).rowcount
            rows = conn.execute(
                f"SELECT {_COMMAND_COLUMNS} FROM commands WHERE device = ? ORDER BY key", (device,)
            ).fetchall()
            conn.execute("DELETE FROM commands WHERE device = ?", (device,))
            conn.execute("DELETE FROM labels WHERE device = ?", (device,))
            conn.execute("DELETE FROM devices WHERE device = ?", (device,))
            commands = [_row_to_command(row) for row in rows]

            def committed() -> None:
                self._counts.pop(device, None)
                self._forget_queued([c.device for c in commands])

            self._after_commit.append(committed)
            return DeviceDeletion(telemetry, commands)

        return await self._submit(delete, "delete_device", durable=True)

    async def set_labels(self, device: str, labels: dict[str, Any] | None) -> None:
        """Keep the labels set over the API for ``device`` (None: drop them); committed
        and fsynced before returning."""
        encoded = None if labels is None else _encode(labels)

        def write(conn: sqlite3.Connection) -> None:
            if encoded is None:
                conn.execute("DELETE FROM labels WHERE device = ?", (device,))
            else:
                conn.execute(
                    "INSERT INTO labels (device, labels) VALUES (?, ?)"
                    " ON CONFLICT (device) DO UPDATE SET labels = excluded.labels",
                    (device, encoded),
                )

        await self._submit(write, "set_labels", durable=True)

    def log_command(self, event: CommandEvent) -> None:
        """Queue one command status for the command log's next batch; returns at once.

        Readable by ``command_log`` once committed (``flush()`` to wait).
        """
        self._put(event, "log_command")

    async def interrupted_commands(self) -> list[QueuedCommand]:
        """The commands found marked as being sent at `open()`: returned once."""
        found, self._interrupted = self._interrupted, []
        return found

    async def expire_commands(self, now_ms: int, limit: int = 1000) -> list[QueuedCommand]:
        """Remove and return up to `limit` waiting commands with `expires_ms <= now_ms`.

        Oldest first; a command being sent is not expired (its delivery reports it).
        """

        def expire(conn: sqlite3.Connection) -> list[QueuedCommand]:
            # Select then delete in one write transaction: nothing else writes
            # in between, so the two statements see the same rows.
            rows = conn.execute(
                f"SELECT {_COMMAND_COLUMNS} FROM commands WHERE expires_ms <= ?"
                " AND sending_ms IS NULL ORDER BY key LIMIT ?",
                (now_ms, limit),
            ).fetchall()
            if not rows:
                return []
            expired = [_row_to_command(row) for row in rows]
            conn.execute(
                f"DELETE FROM commands WHERE key IN {_KEYS}",
                (_encode([c.key for c in expired]),),
            )
            self._after_commit.append(lambda: self._forget_queued([c.device for c in expired]))
            return expired

        return await self._submit(expire, "expire_commands", durable=True)

    async def prune(self, now_ms: int | None = None) -> int:
        """Apply the retention policy now (the writer also does it every `prune_interval`).

        Returns the number of telemetry rows removed. `now_ms` defaults to the clock.
        """

        def run(conn: sqlite3.Connection) -> int:
            return self._prune(conn, time.time() * 1000 if now_ms is None else now_ms)

        return await self._submit(run, "prune", durable=False)
