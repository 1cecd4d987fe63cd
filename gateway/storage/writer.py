"""The write half of `SQLiteStorage`: the queue the event loop fills, and the one
thread that drains it into transactions.

It has its own module because everything SQLite writes goes through here, on a
thread of its own: the batching window (`batch_interval` / `batch_rows`), the
commits and their durability, the offset lease blocks, failed batches, and the
retention passes. The loop side only appends to a deque under a lock that is
never held around SQLite, so it cannot stall the loop.

A failed transaction (a full disk, an I/O error, a corrupt page) is a fault,
not a loss: its rows go back to the head of the queue and the writer retries
them with a growing pause (up to `retry_max`), on a freshly opened connection
(a page SQLite cached while it was bad would otherwise stay bad). The storage
reports itself failing (`health()`) from the first failure to the next commit.
Calls waiting for that transaction (a queued command, a flush) fail at once
with `StorageError`: their callers answer "storage unavailable". While it
fails, rows pile up in the queue up to `max_pending_rows`; past that, new rows
are dropped and counted (`stats.dropped_rows`), never the ones already queued.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import json
import logging
import math
import sqlite3
import threading
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ..hub.store import FaultLog
from .mark import write_mark
from .records import (
    CommandEvent,
    DeviceRecord,
    RetentionPolicy,
    StorageClosedError,
    StorageError,
    StorageStats,
    StoreHealth,
)
from .schema import (
    _INSERT_TELEMETRY_BATCH,
    _LOG_COMMAND,
    _RESERVED_KEY,
    _UPSERT_DEVICE,
    _connect,
    describe,
)

# The package's name, as before the split into modules: operators filter on it
# (docs/deployment.md shows its lines).
log = logging.getLogger("gateway.storage")
# One encoder built once: json.dumps with separators builds a new one per call.
_encode = json.JSONEncoder(separators=(",", ":")).encode

_T = TypeVar("_T")

# A queued telemetry row, already in INSERT parameter order.
_Row = tuple[int, str, str, int, int, str]


@dataclass(slots=True)
class _Op:
    """Work that must run in the writer's transaction and report back to the loop."""

    fn: Callable[[sqlite3.Connection], Any] | None  # None: a flush barrier
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    durable: bool  # commit this transaction with synchronous=FULL


_Item = _Row | DeviceRecord | CommandEvent | _Op


_WELL = StoreHealth()


def _resolve(future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    # Runs on the loop; the caller may have been cancelled meanwhile.
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


class SQLiteWriter:
    """The writer half of `SQLiteStorage` (sqlite.py), which sets up the state below.

    Not an engine on its own: `SQLiteStorage.__init__` creates every attribute
    declared here, and `open()` starts `_writer_main` on its thread.
    """

    path: Path
    retention: RetentionPolicy
    batch_interval: float
    batch_rows: int
    offset_block: int
    offset_mark: Path | None
    max_pending_rows: int
    stats: StorageStats
    prune_interval: float
    command_log_keep_s: float

    #: After a failed transaction the writer waits this long before retrying,
    #: doubling up to `retry_max` while it keeps failing (seconds).
    retry_first: float = 0.05
    retry_max: float = 2.0
    #: At close, a failing writer keeps retrying this long before it gives up
    #: the rows still queued (seconds).
    close_retry: float = 2.0

    # Shared between the loop and the writer thread, under `_cond`.
    _cond: threading.Condition
    _queue: collections.deque[_Item]
    _urgent: int
    _window_start: float
    _state: str
    _fatal: BaseException | None
    _batch_error: StorageError | None
    _close_deadline: float

    # Offsets (see SQLiteStorage.__init__ for who touches which).
    _next: int
    _lease_end: int
    _lease_want: int

    # Set by the writer thread, read anywhere: one object, replaced whole.
    _health: StoreHealth

    # The writer thread's own.
    _wconn: sqlite3.Connection | None
    _reopen: bool  # open a fresh connection before the next transaction
    _synchronous_full: bool
    _counts: dict[str, int]
    _last_prune: float
    _dirty: bool
    _retry_at: float  # monotonic time of the next retry after a failure; 0: none due
    _retry_delay: float
    _faults: FaultLog
    _prune_faults: FaultLog
    _drops: FaultLog  # rows dropped at max_pending_rows
    _dropped_at_bound: int  # those rows (under _cond)
    _dropped_seen: int  # of them, logged so far (writer thread)
    # Run after the transaction an op ran in commits (ops register them).
    _after_commit: list[Callable[[], None]]

    # ------------------------------------------------------------ offsets

    def next_offset(self) -> int:
        """Next gateway-wide offset; call it on the event loop thread only.

        Raises `StorageError` rather than hand out an offset above the committed
        reservation, which only happens if the writer has been stalled, failing
        or dead for half an `offset_block` of offsets.
        """
        if self._state != "open":
            raise StorageClosedError(f"{self.path}: next_offset() on a storage that is not open")
        offset = self._next
        lease_end = self._lease_end
        if offset > lease_end:
            # Handing it out anyway could reuse it after a crash (docs/api.md §3).
            why = "died" if self._fatal is not None else "is stalled or failing (see health())"
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

    def health(self) -> StoreHealth:
        """Failing from a failed transaction until the next commit, or for good if the
        writer died; a plain read, cheap enough for every ``/healthz``."""
        fatal = self._fatal
        if fatal is not None:
            return StoreHealth(f"the storage writer died: {fatal!r}", self._health.since_ms)
        return self._health

    # ------------------------------------------------------------ the queue (event loop side)

    def _put(self, item: _Row | DeviceRecord | CommandEvent, what: str) -> None:
        with self._cond:
            self._check_accepting(what)
            if self.stats.pending >= self.max_pending_rows:
                # The writer is this far behind (a failing disk): keep what is
                # queued, count what is not (the writer logs it).
                self.stats.dropped_rows += 1
                self._dropped_at_bound += 1
                return
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

    def _raise_errors(self) -> None:
        with self._cond:
            error, self._batch_error = self._batch_error, None
            fatal = self._fatal
        if error is not None:
            raise error
        if fatal is not None:
            raise StorageError(f"{self.path}: the storage writer died: {fatal!r}") from fatal

    # ------------------------------------------------------------ the writer thread

    def _writer_main(self) -> None:
        try:
            while True:
                chunk, lease_want, last = self._next_chunk()
                if chunk or lease_want > self._lease_end:
                    self._commit(chunk, lease_want)
                if (
                    self._dirty
                    and self._retry_at == 0
                    and time.monotonic() - self._last_prune >= self.prune_interval
                ):
                    self._prune_guarded()
                if self._dropped_at_bound != self._dropped_seen:
                    self._dropped_seen = self._dropped_at_bound
                    self._drops.failed(
                        f"{self._dropped_seen} rows dropped so far: {self.max_pending_rows} "
                        "rows (max_pending_rows) already waited for the writer"
                    )
                if last and not self._queue:  # a failed chunk went back to the queue
                    break
            if self._wconn is not None and not self._reopen:
                try:
                    # Leave a tidy file behind: fold the WAL into the database.
                    self._wconn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                except sqlite3.Error as e:
                    log.warning("%s: final checkpoint failed: %s", self.path, e)
        except BaseException as e:
            # Never die silently: record it, fail every caller still waiting, and
            # refuse new work (each call then raises naming this error).
            log.critical("%s: storage writer died", self.path, exc_info=True)
            with self._cond:
                self._fatal = e
                left = list(self._queue)
                self._queue.clear()
                self.stats.pending = 0
            failure = StorageError(f"{self.path}: the storage writer died: {e!r}")
            for item in left:
                if isinstance(item, _Op):
                    self._report(item, None, failure)
        finally:
            if self._wconn is not None:
                with contextlib.suppress(sqlite3.Error):
                    self._wconn.close()
                self._wconn = None

    def _next_chunk(self) -> tuple[list[_Item], int, bool]:
        """Wait for a batch to be due, then take at most `batch_rows` items of it."""
        with self._cond:
            while True:
                closing = self._state != "open"
                now = time.monotonic()
                # Failing: wait for the retry (an op cuts it short: its caller
                # waits for an answer). Closing waits too, up to close_retry.
                end = self._retry_at if not closing else min(self._retry_at, self._close_deadline)
                if end > now and not self._urgent:
                    self._cond.wait(end - now)
                    continue
                if closing or self._urgent or len(self._queue) >= self.batch_rows:
                    break
                if self._queue:
                    # A batch window is open: it ends batch_interval after its first row.
                    timeout = self._window_start + self.batch_interval - now
                elif self._lease_want > self._lease_end:
                    break
                elif self._dirty:
                    # Idle: wake up in time for the retention pass the last rows need.
                    timeout = self._last_prune + self.prune_interval - now
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

    def _connection(self) -> sqlite3.Connection:
        """The write connection, opened afresh after a failure (writer thread only)."""
        if self._wconn is not None and not self._reopen:
            return self._wconn
        if self._wconn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._wconn.close()
            self._wconn = None
        # Never creates the file: a data dir emptied under a running gateway is
        # a fault to report, not a fresh start.
        self._wconn = _connect(self.path, create=False)
        self._synchronous_full = True  # SQLite's default: the next NORMAL is set
        self._reopen = False
        return self._wconn

    def _set_synchronous(self, conn: sqlite3.Connection, full: bool) -> None:
        # SQLite refuses to change this inside a transaction, so it is set per
        # transaction, before BEGIN, and only when it changes.
        if full != self._synchronous_full:
            conn.execute(f"PRAGMA synchronous = {'FULL' if full else 'NORMAL'}")
            self._synchronous_full = full

    def _commit(self, chunk: list[_Item], lease_want: int) -> None:
        """Write one chunk as one transaction, then report to whoever waits on it."""
        extend = lease_want > self._lease_end
        if not extend and all(isinstance(item, _Op) and item.fn is None for item in chunk):
            # Only flush barriers: every earlier chunk is committed already.
            for item in chunk:
                assert isinstance(item, _Op)
                self._report(item, None, None)
            return
        # Durability choice: WAL + synchronous=NORMAL for telemetry (a process
        # crash loses no committed batch; a power cut may lose the last ones).
        # A transaction holding a durable command change or an offset reservation
        # runs with synchronous=FULL, which fsyncs the WAL at COMMIT: a queued
        # command is on disk, not just in the OS cache, before `queued` is reported.
        durable = extend or any(isinstance(item, _Op) and item.durable for item in chunk)
        started = time.perf_counter()
        try:
            ops, rows, _ = self._transaction(chunk, lease_want if extend else 0, durable)
        except sqlite3.IntegrityError as e:
            # A row that can never be written (a bug, or a hand-edited file):
            # retrying would wedge every later write, so this chunk's rows are lost.
            self._drop_chunk(chunk, e)
            return
        except Exception as e:
            self._chunk_failed(chunk, e)
            return
        elapsed = time.perf_counter() - started
        if extend:
            self._lease_end = lease_want
        if rows:
            self._dirty = True
        with self._cond:
            self.stats.pending -= sum(1 for item in chunk if not isinstance(item, _Op))
        self._healed()
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

    def _transaction(
        self, chunk: list[_Item], lease_want: int, durable: bool
    ) -> tuple[list[tuple[_Op, Any]], int, list[list[_Row]]]:
        """Run ``chunk`` in one transaction (and reserve offsets up to ``lease_want``, if
        not 0): the ops with their results, the rows written, the telemetry batches."""
        conn = self._connection()
        self._set_synchronous(conn, durable)
        ops: list[tuple[_Op, Any]] = []
        batches: list[list[_Row]] = []
        rows = 0
        self._after_commit = []
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
                    batches.append(telemetry)
                    # Counted after the commit, in queue order with the ops'
                    # own actions (a device deleted after these rows).
                    self._after_commit.append(functools.partial(self._count, telemetry))
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
                            item.offline_reason,
                        ),
                    )
                    rows += 1
                elif isinstance(item, CommandEvent):
                    entry = _encode({"status": item.status, "ts": item.ts, **item.extra})
                    conn.execute(
                        _LOG_COMMAND,
                        (
                            item.gateway_id,
                            None if item.request_id is None else _encode(item.request_id),
                            item.device,
                            item.status,
                            item.ts,
                            item.ts,
                            entry,
                            entry,
                        ),
                    )
                    rows += 1
                else:
                    ops.append((item, item.fn(conn) if item.fn is not None else None))
            if telemetry:
                conn.execute(_INSERT_TELEMETRY_BATCH, (_encode(telemetry),))
                batches.append(telemetry)
                self._after_commit.append(functools.partial(self._count, telemetry))
                rows += len(telemetry)
            if lease_want:
                if self.offset_mark is not None:
                    # The mark outside the data dir first (mark.py): if it cannot be
                    # written, the block is not reserved and the chunk is retried.
                    write_mark(self.offset_mark, lease_want)
                conn.execute("UPDATE meta SET value = ? WHERE key = ?", (lease_want, _RESERVED_KEY))
            conn.execute("COMMIT")
        except BaseException:
            self._after_commit = []
            with contextlib.suppress(sqlite3.Error):
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            raise
        after, self._after_commit = self._after_commit, []
        for action in after:
            action()
        return ops, rows, batches

    def _chunk_failed(self, chunk: list[_Item], error: Exception) -> None:
        """A fault: the rows go back to the head of the queue for a retry, the ops fail."""
        self._reopen = True
        self._commands_stale()
        reason = describe(error)
        # Before any caller hears of it: whoever is told "unavailable" finds the
        # storage failing when it asks why.
        if self._health.failing is None:
            self._health = StoreHealth(reason, int(time.time() * 1000))
        elif self._health.failing != reason:
            self._health = StoreHealth(reason, self._health.since_ms)
        rows = [item for item in chunk if not isinstance(item, _Op)]
        ops = [item for item in chunk if isinstance(item, _Op)]
        work = [op for op in ops if op.fn is not None]
        if rows and work:
            # The rows may be what fails (a bad page of a telemetry index): give
            # the waiting calls (a queued command) their own transaction first.
            try:
                done, _, _ = self._transaction(list(work), 0, True)
            except Exception:
                self._reopen = True
                self._commands_stale()
            else:
                for op, result in done:
                    self._report(op, result, None)
                ops = [op for op in ops if op.fn is None]
        failure = StorageError(f"{self.path}: storage unavailable: {reason}")
        failure.__cause__ = error
        for op in ops:
            self._report(op, None, failure)
        now = time.monotonic()
        give_up = self._state != "open" and now >= self._close_deadline
        with self._cond:
            self.stats.failed_batches += 1
            if give_up:
                # Closing, and it still fails: what is queued cannot be kept.
                lost = self.stats.pending
                dropped = [item for item in self._queue if isinstance(item, _Op)]
                self._queue.clear()
                self._urgent = 0
                self.stats.pending = 0
                self.stats.dropped_rows += lost
                if self._batch_error is None:
                    self._batch_error = StorageError(
                        f"{self.path}: storage failing at close, {lost} rows lost: {reason}"
                    )
            else:
                dropped = []
                self._queue.extendleft(reversed(rows))
                self._window_start = now
            self._retry_delay = min(self.retry_max, max(self.retry_first, self._retry_delay * 2))
            self._retry_at = now + self._retry_delay
        for op in dropped:
            self._report(op, None, failure)
        self._faults.failed(reason)
        if give_up:
            log.error("%s: storage still failing at close, %d rows lost", self.path, lost)

    def _healed(self) -> None:
        """A transaction committed: whatever failed before works again."""
        if self._retry_at == 0 and self._health.failing is None:
            return
        with self._cond:
            self._retry_at = 0
            self._retry_delay = 0.0
        self._health = _WELL
        self._faults.ok()
        self._drops.ok()

    def _drop_chunk(self, chunk: list[_Item], e: Exception) -> None:
        # The chunk's rows are lost; say how many, and make the next flush() raise.
        lost = sum(1 for item in chunk if not isinstance(item, _Op))
        log.error("%s: storage batch failed, %d rows lost: %s", self.path, lost, e)
        self._commands_stale()
        error = StorageError(f"{self.path}: a storage batch failed, {lost} rows lost: {e}")
        error.__cause__ = e
        # A flush() in this very chunk reports the loss; otherwise the next one will.
        reported = any(isinstance(item, _Op) and item.fn is None for item in chunk)
        with self._cond:
            self.stats.pending -= lost
            self.stats.failed_batches += 1
            self.stats.dropped_rows += lost
            if self._batch_error is None and not reported:
                self._batch_error = error
        for item in chunk:
            if isinstance(item, _Op):
                self._report(item, None, error)

    def _commands_stale(self) -> None:
        """The rolled-back transaction may have held queue changes: recount (sqlite.py)."""

    def _report(self, op: _Op, result: Any, exc: BaseException | None) -> None:
        # RuntimeError: the caller's loop is closed, nobody is waiting any more.
        with contextlib.suppress(RuntimeError):
            op.loop.call_soon_threadsafe(_resolve, op.future, result, exc)

    def _count(self, rows: list[_Row]) -> None:
        counts = self._counts
        for row in rows:
            counts[row[1]] = counts.get(row[1], 0) + 1

    def _prune_guarded(self) -> None:
        try:
            self._prune(self._connection(), time.time() * 1000)
        except sqlite3.Error as e:
            # Retention failing is not data loss; try again next interval.
            self._reopen = True
            self._last_prune = time.monotonic()
            self._prune_faults.failed(describe(e))
        else:
            self._prune_faults.ok()

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
            # The command log keeps each command for command_log_keep_s after its last status.
            conn.execute(
                "DELETE FROM command_log WHERE updated_ms < ?",
                (math.floor(now_ms - self.command_log_keep_s * 1000),),
            )
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
