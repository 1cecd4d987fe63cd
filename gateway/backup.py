"""``iot-gateway backup`` and ``iot-gateway restore`` (docs/deployment.md, Backups).

Backup: ``VACUUM INTO`` on a read-only connection, beside the running gateway.
It reads one snapshot in one read transaction, which in WAL mode never blocks
the gateway's writer and is never restarted by its commits. SQLite's online
backup API (``sqlite3 .backup``) starts over whenever another connection
writes, so under steady load it may never finish (issue 17 measured a 171 MB
file at about 1,000 msg/s: ``.backup`` did not finish in 90 s, ``VACUUM INTO``
took 0.73 s). The copy is made under a temporary name with mode 0600 in a
directory created 0700, checked with ``PRAGMA integrity_check``, fsynced and
only then renamed to its name: a backup file that exists is whole.

Restore: refuses while a gateway holds the data dir (``serve`` holds a shared
``flock`` on it, restore needs an exclusive one), then puts the backup in place
with its offset reservation raised above every offset the gateway may have
handed out: the replaced database's, the high-water mark kept outside the data
dir (``storage.offset_mark``) and the wall-clock floor, whichever is highest
(gateway/storage/mark.py says why both).

No aiohttp here: the command line calls it, and tests call it directly.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from .storage import database_high_water, raise_reservation, read_mark, time_floor, write_mark

DB_NAME = "gateway.sqlite3"

# Exit statuses of backup and restore (docs/configuration.md, Exit statuses).
EXIT_CONFIG = 2
EXIT_STORAGE = 3
EXIT_BUSY = 4  # restore: a running gateway holds the data dir; stop it and try again


class BackupError(Exception):
    """Backup or restore failed; the message is one line, ``status`` the exit status."""

    def __init__(self, message: str, status: int = EXIT_STORAGE) -> None:
        super().__init__(message)
        self.status = status


class DataDirBusy(BackupError):
    """The data dir is held: by a running gateway (for restore) or by a restore (for serve)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, EXIT_BUSY)


@contextlib.contextmanager
def hold_data_dir(data_dir: Path, *, exclusive: bool) -> Iterator[None]:
    """Hold an advisory lock on the data dir itself for the block's duration.

    ``serve`` holds it shared for its whole run, ``restore`` exclusive: a restore
    never replaces a database a gateway has open, and a gateway never opens one
    half restored. The kernel lets go when the process dies, kill -9 included,
    so no stale lock file is ever left behind.
    """
    fd = os.open(data_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            if exclusive:
                raise DataDirBusy(
                    f"the data dir {data_dir} is in use by a running gateway: stop it first "
                    "(systemctl stop iot-gateway)"
                ) from None
            raise DataDirBusy(f"the data dir {data_dir} is being restored: wait for it") from None
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


@dataclass(frozen=True, slots=True)
class BackupResult:
    """What ``backup`` made."""

    path: Path
    size: int
    seconds: float
    high_water: int  # the copy's offset high-water mark


def _target(dest: Path, now: datetime, into_dir: bool) -> Path:
    """``dest`` itself, or a dated file in it when it is a directory (or ``into_dir``)."""
    if into_dir or dest.is_dir():
        return dest / f"gateway-{now:%Y%m%dT%H%M%SZ}.sqlite3"
    return dest


def _make_private_dir(directory: Path) -> None:
    """Create ``directory`` and its missing parents with mode 0700 (whatever the umask);
    existing ones are kept as they are."""
    missing = [d for d in (directory, *directory.parents) if not d.exists()]
    try:
        for d in reversed(missing):
            d.mkdir(mode=0o700)
            d.chmod(0o700)
    except OSError as e:
        raise BackupError(f"cannot create the backup directory {directory}: {e.strerror}") from None


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _open_read_only(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None)
    conn.execute("PRAGMA busy_timeout = 10000")
    return conn


def _check_gateway_db(conn: sqlite3.Connection, path: Path) -> int:
    """Integrity-check ``conn`` and return its offset high-water mark (`BackupError` if bad)."""
    try:
        result = [r[0] for r in conn.execute("PRAGMA integrity_check").fetchall()]
        if result != ["ok"]:
            raise BackupError(f"{path} failed PRAGMA integrity_check: {'; '.join(result[:3])}")
        return database_high_water(conn)
    except sqlite3.Error as e:
        raise BackupError(f"{path} is not a gateway database: {e}") from None


def backup(
    data_dir: Path, dest: Path, *, into_dir: bool = False, now: datetime | None = None
) -> BackupResult:
    """Copy the data dir's database to ``dest`` (a file, or a directory for a dated file).

    ``into_dir``: ``dest`` is a directory even if it does not exist yet (the
    command line's trailing ``/``).

    Safe beside a running gateway (see the module's docstring). Never overwrites
    an existing file. Raises `BackupError` (exit status 3) when the database
    cannot be read or the copy cannot be written or fails its check.
    """
    source = data_dir / DB_NAME
    if not source.is_file():
        raise BackupError(f"no database to back up: {source} does not exist (--data-dir?)")
    target = _target(dest, now or datetime.now(UTC), into_dir)
    _make_private_dir(target.parent)
    if target.exists():
        raise BackupError(f"{target} exists already: give another name (backups never overwrite)")
    tmp = target.with_name(f".{target.name}.partial")
    tmp.unlink(missing_ok=True)
    started = time.perf_counter()
    try:
        # Made empty and private first: VACUUM INTO keeps an empty file's mode.
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        conn = _open_read_only(source)
        try:
            conn.execute("VACUUM INTO ?", (str(tmp),))
        finally:
            conn.close()
        copy = _open_read_only(tmp)
        try:
            high_water = _check_gateway_db(copy, tmp)
        finally:
            copy.close()
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o600)
        os.link(tmp, target)  # never replaces a file that appeared meanwhile
        tmp.unlink()
        _fsync_dir(target.parent)
    except sqlite3.Error as e:
        tmp.unlink(missing_ok=True)
        raise BackupError(f"cannot back up {source}: {e}") from None
    except FileExistsError:
        tmp.unlink(missing_ok=True)
        raise BackupError(f"{target} exists already: give another name") from None
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise BackupError(f"cannot write the backup {target}: {e.strerror or e}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return BackupResult(target, target.stat().st_size, time.perf_counter() - started, high_water)


@dataclass(frozen=True, slots=True)
class RestoreResult:
    """What ``restore`` did: the database put in place and where offsets go on from."""

    path: Path
    floor: int  # the next gateway hands out offsets above this
    replaced: Path | None  # where the database it replaced was moved, if there was one
    sources: dict[str, int]  # each bound the floor was taken from, by name


def restore(
    source: Path, data_dir: Path, *, offset_mark: Path | None, now_ns: int | None = None
) -> RestoreResult:
    """Put the backup ``source`` in place as the data dir's database; the gateway must be stopped.

    The database there (if any) is kept beside it as
    ``gateway.sqlite3.replaced-TIMESTAMP``. The restored file's reservation is
    raised to the highest of: the backup's own, the replaced database's, the
    mark in ``offset_mark`` and the wall-clock floor; the mark is then raised to
    it too. Raises `DataDirBusy` (4) while a gateway runs on ``data_dir``,
    `BackupError` (3) for a source that is not a sound gateway database or a
    data dir that cannot be written.
    """
    if not source.is_file():
        raise BackupError(f"the backup {source} does not exist or is not a file")
    try:
        data_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
    except OSError as e:
        raise BackupError(f"cannot create the data dir {data_dir}: {e.strerror}") from None
    with hold_data_dir(data_dir, exclusive=True):
        try:
            conn = _open_read_only(source)
        except sqlite3.Error as e:
            raise BackupError(f"cannot open the backup {source}: {e}") from None
        try:
            backup_mark = _check_gateway_db(conn, source)
        finally:
            conn.close()
        sources = {"backup": backup_mark, "clock": time_floor(now_ns)}
        try:
            sources["mark"] = read_mark(offset_mark)
        except Exception as e:  # StorageError: an unreadable mark must not be skipped silently
            raise BackupError(str(e)) from None
        current = data_dir / DB_NAME
        replaced: Path | None = None
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        if current.exists():
            sources["replaced"] = _fold_and_read(current)
            replaced = current.with_name(f"{DB_NAME}.replaced-{stamp}")
        floor = max(sources.values())
        draft = data_dir / f".{DB_NAME}.restoring"
        try:
            for suffix in ("", "-wal", "-shm", "-journal"):
                Path(f"{draft}{suffix}").unlink(missing_ok=True)
            os.close(os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            src = _open_read_only(source)
            dst = sqlite3.connect(draft, isolation_level=None)
            try:
                src.backup(dst)  # the source is an idle file: the backup API is fine here
                dst.execute("PRAGMA journal_mode = WAL")
                dst.execute("PRAGMA synchronous = FULL")
                raise_reservation(dst, floor)
                dst.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                src.close()
                dst.close()
            with open(draft, "rb") as fh:
                os.fsync(fh.fileno())
            if offset_mark is not None:
                # Before the database: should this stop half-way, the mark is already up.
                write_mark(offset_mark, floor)
            if replaced is not None:
                os.replace(current, replaced)
            for suffix in ("-wal", "-shm"):
                Path(f"{current}{suffix}").unlink(missing_ok=True)
            os.replace(draft, current)
            _fsync_dir(data_dir)
        except sqlite3.Error as e:
            raise BackupError(f"cannot restore {source} into {data_dir}: {e}") from None
        except OSError as e:
            raise BackupError(
                f"cannot restore {source} into {data_dir}: {e.strerror or e}"
            ) from None
        finally:
            for suffix in ("", "-wal", "-shm", "-journal"):
                Path(f"{draft}{suffix}").unlink(missing_ok=True)
    return RestoreResult(current, floor, replaced, sources)


def _fold_and_read(path: Path) -> int:
    """The high-water mark of the database about to be replaced, its WAL folded in first.

    A damaged one is not an error: the mark and the clock still bound it, and
    replacing a damaged database is what restores are for.
    """
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=rw", uri=True, isolation_level=None)
        try:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            return database_high_water(conn)
        finally:
            conn.close()
    except sqlite3.Error:
        return 0
