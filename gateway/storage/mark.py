"""The offset high-water mark kept outside the data dir, and the wall-clock floor.

Offsets must stay strictly increasing across a restore, whatever the backup's
age (docs/deployment.md, Backups). The database remembers its own reservation,
but a restored file remembers only what it held when the backup was taken. Two
independent bounds cover what it has forgotten:

* the **mark**: a small file (``storage.offset_mark``) that the storage raises to
  each offset block *before* it commits the block, so it is always at or above
  every offset handed out. Kept outside the data dir (beside the backups, say),
  a restore does not replace it and a lost data disk does not take it along;
* the **wall-clock floor**: the current Unix time in microseconds. A restore
  moves the counter at least there, which is above every earlier offset as long
  as fewer offsets were handed out than microseconds have passed since the last
  restore (40 times the 25,000 frames/s the README quotes). It does not help on
  a board without a real-time clock that boots in 1970, which is what the mark is for.

Standard library only, like the rest of the package.
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

from .records import StorageError
from .schema import _RESERVED_KEY


def time_floor(now_ns: int | None = None) -> int:
    """The wall-clock floor of offsets: Unix time in microseconds (below 2**53 until 2255)."""
    return (time.time_ns() if now_ns is None else now_ns) // 1000


def read_mark(path: str | os.PathLike[str] | None) -> int:
    """The high-water mark in ``path``; 0 when no path is configured or the file is not there yet.

    A file that is there but unreadable or not a number is a `StorageError`:
    starting without it could reuse offsets.
    """
    if path is None:
        return 0
    p = Path(path)
    try:
        text = p.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return 0
    except (OSError, UnicodeDecodeError) as e:
        raise StorageError(f"cannot read the offset mark {p} (storage.offset_mark): {e}") from None
    try:
        value = int(text)
    except ValueError:
        raise StorageError(
            f"the offset mark {p} (storage.offset_mark) holds {text[:40]!r}, not a number: "
            "put the highest offset dashboards may have seen in it, or remove it"
        ) from None
    if value < 0:
        raise StorageError(f"the offset mark {p} (storage.offset_mark) is negative: {value}")
    return value


def write_mark(path: str | os.PathLike[str], value: int) -> int:
    """Raise the mark in ``path`` to ``value`` (never lower it); returns the mark now stored.

    Written whole (a temporary file, fsynced, renamed over, directory fsynced),
    mode 0600, so a crash leaves the old mark or the new one, never half of one.
    Raises ``OSError`` when it cannot be written.
    """
    p = Path(path)
    value = max(value, read_mark(p))
    tmp = p.with_name(f".{p.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, f"{value}\n".encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, p)
    directory = os.open(p.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return value


def database_high_water(conn: sqlite3.Connection) -> int:
    """The highest offset a gateway database may have handed out: its reservation or its
    highest stored offset, whichever is higher (0 for a database without either)."""
    reserved = conn.execute("SELECT value FROM meta WHERE key = ?", (_RESERVED_KEY,)).fetchone()
    top = conn.execute('SELECT MAX("offset") FROM telemetry').fetchone()[0]
    return max(int(reserved[0]) if reserved else 0, int(top or 0))


def raise_reservation(conn: sqlite3.Connection, value: int) -> None:
    """Set the database's reservation to ``value`` if it is lower, in one transaction:
    its next start then hands out offsets from above ``value``."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?)"
            " ON CONFLICT (key) DO UPDATE SET value = MAX(value, excluded.value)",
            (_RESERVED_KEY, value),
        )
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
