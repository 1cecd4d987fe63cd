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
  first. Calls that must be durable before they return (`enqueue_command`,
  `remove_command`, `expire_commands`) and `flush` barriers ride the same queue,
  so they are ordered with the telemetry before them, and they cut the batch
  window short.
* Reads run on a small pool of reader threads, each with its own read-only
  connection. The database is in WAL mode, so readers never block the writer
  and always see the last committed batch.

What a kill -9 can lose: the telemetry rows and device upserts appended but not
yet committed (at most one batch window, 20 ms by default, plus any backlog the
writer had not caught up with; `stats.pending` counts them). Never a command whose
`enqueue_command` returned, and never an offset: offsets handed out before the
crash are all below the next process's first offset.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import logging
import math
import os
import sqlite3
import threading
import time
import typing
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from frames.errors import FrameGatewayError

__all__ = [
    "DeviceRecord",
    "MemoryStorage",
    "QueuedCommand",
    "RetentionPolicy",
    "SQLiteStorage",
    "Storage",
    "StorageClosedError",
    "StorageError",
    "StorageStats",
    "TelemetryRecord",
]

log = logging.getLogger(__name__)
# One encoder built once: json.dumps with separators builds a new one per call.
_encode = json.JSONEncoder(separators=(",", ":")).encode

_T = TypeVar("_T")


class StorageError(FrameGatewayError):
    """The storage engine failed (cannot open the file, a commit failed, the writer died)."""


class StorageClosedError(StorageError):
    """The storage was used before `open()` or after `close()`: a bug on the caller's side."""


@dataclass(frozen=True, slots=True)
class TelemetryRecord:
    """One stored DATA message, as dashboards receive it (docs/api.md §3)."""

    offset: int  # gateway-wide, strictly increasing, kept across restarts
    device: str
    protocol: str
    ts: int  # unix ms
    seq: int  # the device's message seq
    data: dict[str, Any]  # the decoded JSON telemetry


@dataclass(frozen=True, slots=True)
class QueuedCommand:
    """A command waiting for its (offline) device until `expires_ms`."""

    key: int  # storage row id, assigned by storage; pass 0 when enqueuing
    command_id: str | None  # the dashboard's request id, may be None
    device: str
    command: dict[str, Any]  # the JSON command as given
    body: bytes  # the encoded COMMAND body
    created_ms: int
    expires_ms: int


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    """A device the gateway has seen at least once."""

    device: str
    protocol: str
    transport: str  # "tcp" | "serial"
    first_seen_ms: int
    last_seen_ms: int


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """How much telemetry history to keep: both limits apply."""

    max_per_device: int = 10_000
    max_age_s: float = 7 * 24 * 3600

    def __post_init__(self) -> None:
        if self.max_per_device < 1 or not self.max_age_s > 0:
            raise ValueError(
                "retention needs max_per_device >= 1 and max_age_s > 0, got "
                f"max_per_device={self.max_per_device} max_age_s={self.max_age_s}"
            )


@dataclass(slots=True)
class StorageStats:
    """Counters for /metrics, updated by the engine (the SQLite writer thread).

    `rows_written` and `pending` count telemetry rows and device upserts, the rows
    that are batched; `on_batch`, when set, is called from the writer thread with
    each committed batch's duration in seconds (feed it to a histogram; it must be
    quick and thread-safe).
    """

    batches: int = 0
    rows_written: int = 0
    last_batch_ms: float = 0.0
    max_batch_ms: float = 0.0
    pending: int = 0  # queued rows not yet committed: what a kill -9 would lose now
    pruned_rows: int = 0
    failed_batches: int = 0
    on_batch: Callable[[float], None] | None = field(default=None, repr=False, compare=False)


class Storage(typing.Protocol):
    """What the hub needs from a storage engine; another engine can implement it."""

    stats: StorageStats

    async def open(self) -> None:
        """Open (creating if needed) the store; nothing else may be called before."""
        ...

    async def close(self) -> None:
        """Stop accepting writes, commit everything pending, release the store."""
        ...

    def next_offset(self) -> int:
        """Next gateway-wide offset: strictly increasing, also across restarts and crashes.

        Synchronous and free of I/O, so the hub can call it on the event loop.
        """
        ...

    def append_telemetry(self, record: TelemetryRecord, data_json: str | None = None) -> None:
        """Queue one record for the next batch; never blocks.

        ``data_json``, when given, is ``record.data`` already encoded as JSON
        (the hub encodes it once for the dashboards and the row).
        """
        ...

    async def flush(self) -> None:
        """Return once everything appended before the call is committed."""
        ...

    async def telemetry_since(
        self,
        since: int,
        *,
        until: int | None = None,
        device: str | None = None,
        protocol: str | None = None,
        limit: int = 1000,
    ) -> list[TelemetryRecord]:
        """Committed records with `since < offset <= until`, oldest first, at most `limit`."""
        ...

    async def latest_telemetry(self) -> dict[str, TelemetryRecord]:
        """The newest committed record of each device, by device."""
        ...

    async def enqueue_command(self, command: QueuedCommand) -> QueuedCommand:
        """Store a command durably before returning; returns it with its `key`."""
        ...

    async def pending_commands(self, device: str, now_ms: int) -> list[QueuedCommand]:
        """The device's commands not yet expired at `now_ms`, oldest first."""
        ...

    async def remove_command(self, key: int) -> None:
        """Forget a delivered command (committed before returning)."""
        ...

    async def expire_commands(self, now_ms: int) -> list[QueuedCommand]:
        """Remove and return every command with `expires_ms <= now_ms`, oldest first."""
        ...

    async def upsert_device(self, record: DeviceRecord) -> None:
        """Insert or update a device, keeping the `first_seen_ms` of an existing row."""
        ...

    async def devices(self) -> list[DeviceRecord]:
        """Every device ever seen, by name."""
        ...


# --------------------------------------------------------------------------- SQLite

_SCHEMA_VERSION = 1

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
INSERT INTO devices (device, protocol, transport, first_seen_ms, last_seen_ms)
VALUES (?, ?, ?, ?, ?)
ON CONFLICT (device) DO UPDATE SET
    protocol = excluded.protocol,
    transport = excluded.transport,
    last_seen_ms = excluded.last_seen_ms
"""
_TELEMETRY_COLUMNS = '"offset", device, protocol, ts, seq, data'
_COMMAND_COLUMNS = "key, command_id, device, command, body, created_ms, expires_ms"

# A queued telemetry row, already in INSERT parameter order.
_Row = tuple[int, str, str, int, int, str]

# How long a connection waits for a lock held by another process (a second
# gateway on the same file, an operator's sqlite3 shell) before failing.
_BUSY_TIMEOUT_MS = 5000

_READER_THREADS = 4


@dataclass(slots=True)
class _Op:
    """Work that must run in the writer's transaction and report back to the loop."""

    fn: Callable[[sqlite3.Connection], Any] | None  # None: a flush barrier
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    durable: bool  # commit this transaction with synchronous=FULL


_Item = _Row | DeviceRecord | _Op


def _row_to_telemetry(row: tuple[Any, ...]) -> TelemetryRecord:
    offset, device, protocol, ts, seq, data = row
    return TelemetryRecord(offset, device, protocol, ts, seq, json.loads(data))


def _row_to_command(row: tuple[Any, ...]) -> QueuedCommand:
    key, command_id, device, command, body, created_ms, expires_ms = row
    return QueuedCommand(
        key, command_id, device, json.loads(command), bytes(body), created_ms, expires_ms
    )


def _resolve(future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    # Runs on the loop; the caller may have been cancelled meanwhile.
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


class SQLiteStorage:
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
        retention: RetentionPolicy = RetentionPolicy(),
        batch_interval: float = 0.02,
        batch_rows: int = 500,
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
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > _SCHEMA_VERSION:
                raise StorageError(
                    f"{self.path} has schema version {version}, newer than this gateway's "
                    f"{_SCHEMA_VERSION}: upgrade the gateway or use another --data-dir"
                )
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
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

    # ------------------------------------------------------------ offsets and writes

    def next_offset(self) -> int:
        """Next gateway-wide offset; call it on the event loop thread only.

        Raises `StorageError` rather than hand out an offset above the committed
        reservation, which only happens if the writer has been stalled or dead for
        half an `offset_block` of offsets.
        """
        if self._state != "open":
            raise StorageClosedError(f"{self.path}: next_offset() on a storage that is not open")
        offset = self._next
        lease_end = self._lease_end
        if offset > lease_end:
            # Handing it out anyway could reuse it after a crash (docs/api.md §3).
            why = "died" if self._fatal is not None else "is stalled (see stats.pending)"
            raise StorageError(
                f"{self.path}: offsets above {lease_end} are not reserved yet; "
                f"the storage writer {why}"
            ) from self._fatal
        self._next = offset + 1
        if lease_end - offset < self.offset_block // 2 and self._lease_want <= lease_end:
            # Half the block is used: ask the writer for the next one, in good time.
            with self._cond:
                self._lease_want = offset + self.offset_block
                self._cond.notify()
        return offset

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

    def _put(self, item: _Row | DeviceRecord, what: str) -> None:
        with self._cond:
            self._check_accepting(what)
            if not self._queue:
                self._window_start = time.monotonic()
            self._queue.append(item)
            self.stats.pending += 1
            # Wake the writer only on the transitions it waits for, not per row:
            # the first row opens a batch window, a full batch closes it.
            if len(self._queue) == 1 or len(self._queue) == self.batch_rows:
                self._cond.notify()

    def _check_accepting(self, what: str) -> None:
        # Called with the lock held.
        if self._fatal is not None:
            raise StorageError(f"{self.path}: the storage writer died: {self._fatal!r}") from (
                self._fatal
            )
        if self._state != "open":
            raise StorageClosedError(f"{self.path}: {what}() on a storage that is {self._state}")

    async def _submit(
        self, fn: Callable[[sqlite3.Connection], _T] | None, what: str, *, durable: bool
    ) -> _T:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        with self._cond:
            self._check_accepting(what)
            if not self._queue:
                self._window_start = time.monotonic()
            self._queue.append(_Op(fn, loop, future, durable))
            self._urgent += 1
            self._cond.notify()
        # If the caller is cancelled the work still runs (it may already be
        # committed); only its result is lost.
        return typing.cast(_T, await future)

    async def flush(self) -> None:
        """Return once everything appended before the call is committed.

        Raises `StorageError` if a batch failed since the last flush (its rows are lost).
        """
        await self._submit(None, "flush", durable=False)
        self._raise_errors()

    def _raise_errors(self) -> None:
        with self._cond:
            error, self._batch_error = self._batch_error, None
            fatal = self._fatal
        if error is not None:
            raise error
        if fatal is not None:
            raise StorageError(f"{self.path}: the storage writer died: {fatal!r}") from fatal

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

    # ------------------------------------------------------------ the writer thread

    def _writer_main(self) -> None:
        conn = self._wconn
        assert conn is not None
        try:
            while True:
                chunk, lease_want, last = self._next_chunk()
                if chunk or lease_want > self._lease_end:
                    self._commit(conn, chunk, lease_want)
                if self._dirty and time.monotonic() - self._last_prune >= self.prune_interval:
                    self._prune_guarded(conn)
                if last:
                    break
            try:
                # Leave a tidy file behind: fold the WAL into the database.
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as e:
                log.warning("%s: final checkpoint failed: %s", self.path, e)
        except BaseException as e:
            # Never die silently: record it, fail every caller still waiting, and
            # refuse new work (each call then raises naming this error).
            log.critical("%s: storage writer died", self.path, exc_info=True)
            with self._cond:
                self._fatal = e
                dropped = list(self._queue)
                self._queue.clear()
                self.stats.pending = 0
            failure = StorageError(f"{self.path}: the storage writer died: {e!r}")
            for item in dropped:
                if isinstance(item, _Op):
                    self._report(item, None, failure)
        finally:
            conn.close()

    def _next_chunk(self) -> tuple[list[_Item], int, bool]:
        """Wait for a batch to be due, then take at most `batch_rows` items of it."""
        with self._cond:
            while True:
                closing = self._state != "open"
                if closing or self._urgent or len(self._queue) >= self.batch_rows:
                    break
                if self._queue:
                    # A batch window is open: it ends batch_interval after its first row.
                    timeout = self._window_start + self.batch_interval - time.monotonic()
                elif self._lease_want > self._lease_end:
                    break
                elif self._dirty:
                    # Idle: wake up in time for the retention pass the last rows need.
                    timeout = self._last_prune + self.prune_interval - time.monotonic()
                else:
                    self._cond.wait()
                    continue
                if timeout <= 0:
                    break
                self._cond.wait(timeout)
            chunk: list[_Item] = []
            while self._queue and len(chunk) < self.batch_rows:
                item = self._queue.popleft()
                if isinstance(item, _Op):
                    self._urgent -= 1
                chunk.append(item)
            # What is left keeps its window: it is due when that window ends (at
            # once, if it already has) or when it fills a batch of its own.
            last = closing and not self._queue
            return chunk, self._lease_want, last

    def _set_synchronous(self, conn: sqlite3.Connection, full: bool) -> None:
        # SQLite refuses to change this inside a transaction, so it is set per
        # transaction, before BEGIN, and only when it changes.
        if full != self._synchronous_full:
            conn.execute(f"PRAGMA synchronous = {'FULL' if full else 'NORMAL'}")
            self._synchronous_full = full

    def _commit(self, conn: sqlite3.Connection, chunk: list[_Item], lease_want: int) -> None:
        """Write one chunk as one transaction, then report to whoever waits on it."""
        ops: list[tuple[_Op, Any]] = []
        rows = 0
        extend = lease_want > self._lease_end
        if not extend and all(isinstance(item, _Op) and item.fn is None for item in chunk):
            # Only flush barriers: every earlier chunk is committed already.
            for item in chunk:
                assert isinstance(item, _Op)
                self._report(item, None, None)
            return
        # Durability choice: WAL + synchronous=NORMAL for telemetry (a process
        # crash loses no committed batch; a power cut may lose the last ones).
        # A transaction holding a command change or an offset reservation runs
        # with synchronous=FULL, which fsyncs the WAL at COMMIT: a queued command
        # is on disk, not just in the OS cache, before `queued` is reported.
        durable = extend or any(isinstance(item, _Op) and item.durable for item in chunk)
        started = time.perf_counter()
        try:
            self._set_synchronous(conn, durable)
            conn.execute("BEGIN IMMEDIATE")
            try:
                telemetry: list[_Row] = []
                for item in chunk:
                    if isinstance(item, tuple):
                        telemetry.append(item)
                        continue
                    # Keep the queue's order: rows before an op are written before it.
                    if telemetry:
                        conn.execute(_INSERT_TELEMETRY_BATCH, (_encode(telemetry),))
                        self._count(telemetry)
                        rows += len(telemetry)
                        telemetry = []
                    if isinstance(item, DeviceRecord):
                        conn.execute(
                            _UPSERT_DEVICE,
                            (
                                item.device,
                                item.protocol,
                                item.transport,
                                item.first_seen_ms,
                                item.last_seen_ms,
                            ),
                        )
                        rows += 1
                    else:
                        ops.append((item, item.fn(conn) if item.fn is not None else None))
                if telemetry:
                    conn.execute(_INSERT_TELEMETRY_BATCH, (_encode(telemetry),))
                    self._count(telemetry)
                    rows += len(telemetry)
                if extend:
                    conn.execute(
                        "UPDATE meta SET value = ? WHERE key = ?", (lease_want, _RESERVED_KEY)
                    )
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except Exception as e:
            self._fail_chunk(conn, chunk, e)
            return
        elapsed = time.perf_counter() - started
        if extend:
            self._lease_end = lease_want
        if rows:
            self._dirty = True
        with self._cond:
            self.stats.pending -= sum(1 for item in chunk if not isinstance(item, _Op))
        stats = self.stats
        stats.batches += 1
        stats.rows_written += rows
        stats.last_batch_ms = elapsed * 1000
        stats.max_batch_ms = max(stats.max_batch_ms, stats.last_batch_ms)
        # The hook first, so the metrics are up to date when a flush() returns.
        if stats.on_batch is not None:
            try:
                stats.on_batch(elapsed)
            except Exception:
                log.exception("%s: storage on_batch hook failed", self.path)
        for op, result in ops:
            self._report(op, result, None)

    def _fail_chunk(self, conn: sqlite3.Connection, chunk: list[_Item], e: Exception) -> None:
        # The chunk's rows are lost (retrying a deterministic failure would wedge
        # every later write); say how many, and make the next flush() raise.
        lost = sum(1 for item in chunk if not isinstance(item, _Op))
        log.error("%s: storage batch failed, %d rows lost: %s", self.path, lost, e)
        # Rebuild the per-device counts from the table: the rollback undid ours.
        try:
            self._counts = dict(
                conn.execute("SELECT device, COUNT(*) FROM telemetry GROUP BY device").fetchall()
            )
        except sqlite3.Error:
            log.warning("%s: cannot recount telemetry rows", self.path, exc_info=True)
        error = StorageError(f"{self.path}: a storage batch failed, {lost} rows lost: {e}")
        error.__cause__ = e
        # A flush() in this very chunk reports the loss; otherwise the next one will.
        reported = any(isinstance(item, _Op) and item.fn is None for item in chunk)
        with self._cond:
            self.stats.pending -= lost
            self.stats.failed_batches += 1
            if self._batch_error is None and not reported:
                self._batch_error = error
        for item in chunk:
            if isinstance(item, _Op):
                self._report(item, None, error)

    def _report(self, op: _Op, result: Any, exc: BaseException | None) -> None:
        # RuntimeError: the caller's loop is closed, nobody is waiting any more.
        with contextlib.suppress(RuntimeError):
            op.loop.call_soon_threadsafe(_resolve, op.future, result, exc)

    def _count(self, rows: list[_Row]) -> None:
        counts = self._counts
        for row in rows:
            counts[row[1]] = counts.get(row[1], 0) + 1

    def _prune_guarded(self, conn: sqlite3.Connection) -> None:
        try:
            self._prune(conn, time.time() * 1000)
        except sqlite3.Error as e:
            # Retention failing is not data loss; try again next interval.
            log.error("%s: storage retention pass failed: %s", self.path, e)

    def _prune(self, conn: sqlite3.Connection, now_ms: float) -> int:
        """Apply both retention rules in one transaction (writer thread only)."""
        self._last_prune = time.monotonic()
        self._dirty = False
        cap = self.retention.max_per_device
        over = [(device, n - cap) for device, n in self._counts.items() if n > cap]
        cutoff = math.floor(now_ms - self.retention.max_age_s * 1000)
        own_transaction = not conn.in_transaction
        if own_transaction:
            self._set_synchronous(conn, False)
            conn.execute("BEGIN IMMEDIATE")
        removed: dict[str, int] = collections.Counter()
        try:
            for (device,) in conn.execute(
                "DELETE FROM telemetry WHERE ts < ? RETURNING device", (cutoff,)
            ).fetchall():
                removed[device] += 1
            for device, excess in over:
                # The counts are exact, so only the excess is read, from the oldest
                # end of the (device, offset) index; never the `cap` rows kept.
                excess -= removed[device]  # the age rule may have done it already
                if excess <= 0:
                    continue
                cursor = conn.execute(
                    'DELETE FROM telemetry WHERE "offset" IN (SELECT "offset" FROM telemetry'
                    ' WHERE device = ? ORDER BY "offset" LIMIT ?)',
                    (device, excess),
                )
                removed[device] += cursor.rowcount
            if own_transaction:
                conn.execute("COMMIT")
        except BaseException:
            if own_transaction and conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        # Only now that it is committed (or part of the caller's transaction).
        total = 0
        for device, n in removed.items():
            left = self._counts.get(device, 0) - n
            if left > 0:
                self._counts[device] = left
            else:
                self._counts.pop(device, None)
            total += n
        if total:
            with self._cond:
                self.stats.pruned_rows += total
            log.debug("%s: retention removed %d telemetry rows", self.path, total)
        return total

    # ------------------------------------------------------------ reads

    async def _read(self, fn: Callable[[sqlite3.Connection], _T], what: str) -> _T:
        if self._state != "open" or self._readers is None:
            raise StorageClosedError(f"{self.path}: {what}() on a storage that is {self._state}")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._readers, self._run_read, fn)

    def _run_read(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        # Runs in a reader thread, with that thread's own connection.
        try:
            conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
            if conn is None:
                # check_same_thread=False only so that close() can close it.
                conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
                with self._read_lock:
                    self._read_conns.append(conn)
                self._local.conn = conn
                conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
                conn.execute("PRAGMA query_only = ON")  # a reader never writes by mistake
            # isolation_level=None: each statement is its own read transaction
            # over the latest commit, and fetchall() ends it at once, so a
            # reader never pins an old WAL snapshot.
            return fn(conn)
        except sqlite3.Error as e:
            raise StorageError(f"{self.path}: read failed: {e}") from e

    async def telemetry_since(
        self,
        since: int,
        *,
        until: int | None = None,
        device: str | None = None,
        protocol: str | None = None,
        limit: int = 1000,
    ) -> list[TelemetryRecord]:
        """Committed records with `since < offset <= until`, oldest first, at most `limit`."""
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
        params.append(limit)
        sql = (
            f"SELECT {_TELEMETRY_COLUMNS} FROM telemetry WHERE {' AND '.join(where)}"
            ' ORDER BY "offset" LIMIT ?'
        )

        def query(conn: sqlite3.Connection) -> list[TelemetryRecord]:
            return [_row_to_telemetry(row) for row in conn.execute(sql, params).fetchall()]

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

    async def pending_commands(self, device: str, now_ms: int) -> list[QueuedCommand]:
        """The device's commands not yet expired at `now_ms`, oldest first."""
        sql = (
            f"SELECT {_COMMAND_COLUMNS} FROM commands WHERE device = ? AND expires_ms > ?"
            " ORDER BY key"
        )

        def query(conn: sqlite3.Connection) -> list[QueuedCommand]:
            rows = conn.execute(sql, (device, now_ms)).fetchall()
            return [_row_to_command(row) for row in rows]

        return await self._read(query, "pending_commands")

    async def devices(self) -> list[DeviceRecord]:
        """Every device ever seen (committed upserts), by name."""
        sql = (
            "SELECT device, protocol, transport, first_seen_ms, last_seen_ms FROM devices"
            " ORDER BY device"
        )

        def query(conn: sqlite3.Connection) -> list[DeviceRecord]:
            return [DeviceRecord(*row) for row in conn.execute(sql).fetchall()]

        return await self._read(query, "devices")


# --------------------------------------------------------------------------- memory


class MemoryStorage:
    """An in-memory `Storage` for tests of the routing core: same contract, no disk.

    Everything is "committed" at once; offsets start at 1 and die with the object.
    """

    def __init__(self, *, retention: RetentionPolicy = RetentionPolicy()) -> None:
        self.retention = retention
        self.stats = StorageStats()
        self._open = False
        self._closed = False
        self._next = 1
        self._telemetry: dict[int, TelemetryRecord] = {}
        self._by_device: dict[str, collections.deque[int]] = {}  # offsets, oldest first
        self._commands: dict[int, QueuedCommand] = {}
        self._next_key = 1
        self._devices: dict[str, DeviceRecord] = {}

    def _check(self, what: str) -> None:
        if not self._open or self._closed:
            raise StorageClosedError(f"memory storage: {what}() on a storage that is not open")

    async def open(self) -> None:
        """Start accepting calls."""
        self._open = True

    async def close(self) -> None:
        """Stop accepting calls (nothing to flush)."""
        self._closed = True

    def next_offset(self) -> int:
        """Next offset, strictly increasing for this object's lifetime."""
        self._check("next_offset")
        self._next += 1
        return self._next - 1

    def append_telemetry(self, record: TelemetryRecord, data_json: str | None = None) -> None:
        """Store the record (a copy of its data, as the SQLite engine stores JSON)."""
        self._check("append_telemetry")
        data = json.loads(json.dumps(record.data) if data_json is None else data_json)
        self._telemetry[record.offset] = dataclasses.replace(record, data=data)
        self.stats.rows_written += 1
        mine = self._by_device.setdefault(record.device, collections.deque())
        mine.append(record.offset)
        while len(mine) > self.retention.max_per_device:
            del self._telemetry[mine.popleft()]
            self.stats.pruned_rows += 1

    async def flush(self) -> None:
        """Nothing is ever pending."""
        self._check("flush")

    async def prune(self, now_ms: int | None = None) -> int:
        """Apply the age rule now (the count rule applies on every append)."""
        self._check("prune")
        now = time.time() * 1000 if now_ms is None else now_ms
        cutoff = math.floor(now - self.retention.max_age_s * 1000)
        old = {r.offset for r in self._telemetry.values() if r.ts < cutoff}
        for offset in old:
            del self._telemetry[offset]
        for offsets in self._by_device.values():
            kept = [offset for offset in offsets if offset not in old]
            offsets.clear()
            offsets.extend(kept)
        self.stats.pruned_rows += len(old)
        return len(old)

    async def telemetry_since(
        self,
        since: int,
        *,
        until: int | None = None,
        device: str | None = None,
        protocol: str | None = None,
        limit: int = 1000,
    ) -> list[TelemetryRecord]:
        """Records with `since < offset <= until`, oldest first, at most `limit`."""
        self._check("telemetry_since")
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        found = [
            r
            for r in sorted(self._telemetry.values(), key=lambda r: r.offset)
            if r.offset > since
            and (until is None or r.offset <= until)
            and device in (None, r.device)
            and protocol in (None, r.protocol)
        ]
        return found[:limit]

    async def latest_telemetry(self) -> dict[str, TelemetryRecord]:
        """The newest record of each device."""
        self._check("latest_telemetry")
        latest: dict[str, TelemetryRecord] = {}
        for record in sorted(self._telemetry.values(), key=lambda r: r.offset):
            latest[record.device] = record
        return latest

    async def enqueue_command(self, command: QueuedCommand) -> QueuedCommand:
        """Keep the command; returns it with its key."""
        self._check("enqueue_command")
        stored = dataclasses.replace(command, key=self._next_key)
        self._next_key += 1
        self._commands[stored.key] = stored
        return stored

    async def pending_commands(self, device: str, now_ms: int) -> list[QueuedCommand]:
        """The device's commands not yet expired at `now_ms`, oldest first."""
        self._check("pending_commands")
        return [c for c in self._commands.values() if c.device == device and c.expires_ms > now_ms]

    async def remove_command(self, key: int) -> None:
        """Forget a delivered command."""
        self._check("remove_command")
        self._commands.pop(key, None)

    async def expire_commands(self, now_ms: int) -> list[QueuedCommand]:
        """Remove and return the commands with `expires_ms <= now_ms`, oldest first."""
        self._check("expire_commands")
        expired = [c for c in self._commands.values() if c.expires_ms <= now_ms]
        for command in expired:
            del self._commands[command.key]
        return expired

    async def upsert_device(self, record: DeviceRecord) -> None:
        """Insert or update a device, keeping the first_seen_ms of an existing one."""
        self._check("upsert_device")
        old = self._devices.get(record.device)
        if old is not None:
            record = dataclasses.replace(record, first_seen_ms=old.first_seen_ms)
        self._devices[record.device] = record

    async def devices(self) -> list[DeviceRecord]:
        """Every device ever seen, by name."""
        self._check("devices")
        return sorted(self._devices.values(), key=lambda d: d.device)
