"""``iot-gateway backup`` (``VACUUM INTO``) against SQLite's online backup API, under write load.

Run ``.venv/bin/python -m benchmarks.backup_load`` (``--rows``, ``--rate``,
``--repeats``, ``--limit`` to change it).

A gateway database is filled with ``--rows`` telemetry rows (the storage's own
schema), then a separate process commits ``--rate`` rows a second to it in
20 ms batches, as the gateway's writer does under that load. Meanwhile, in
the same run, each way of copying it is timed:

* ``ours``: ``gateway.backup.backup``, i.e. ``VACUUM INTO`` on a read-only
  connection, the integrity check and the fsync included;
* ``online-api``: SQLite's online backup API in steps of 100 pages, as
  ``sqlite3 DB ".backup FILE"`` does (Python's ``Connection.backup``). It
  starts over whenever another connection writes, so it is given up after
  ``--limit`` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from gateway.backup import DB_NAME, backup
from gateway.storage import SQLiteStorage


def _fill(path: Path, rows: int) -> None:
    async def make() -> None:
        storage = SQLiteStorage(path)
        await storage.open()
        await storage.close()

    asyncio.run(make())
    data = '{"temperature_c": 21.5, "humidity_pct": 40.2, "battery_pct": 90}'
    with sqlite3.connect(path) as conn:
        for start in range(1, rows + 1, 50_000):
            conn.executemany(
                'INSERT INTO telemetry ("offset", device, protocol, ts, seq, data)'
                " VALUES (?, ?, 'env-sensor', ?, ?, ?)",
                (
                    (o, f"sim-{o % 50}", o, o, data)
                    for o in range(start, min(start + 50_000, rows + 1))
                ),
            )


def _writer(path: str, rate: float, start: int, stop: multiprocessing.synchronize.Event) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    per_batch = max(1, round(rate * 0.02))
    offset = start
    next_at = time.monotonic()
    while not stop.is_set():
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            'INSERT INTO telemetry ("offset", device, protocol, ts, seq, data)'
            " VALUES (?, ?, 'env-sensor', ?, ?, '{}')",
            [(o, f"sim-{o % 50}", o, o) for o in range(offset, offset + per_batch)],
        )
        conn.execute("COMMIT")
        offset += per_batch
        next_at += 0.02
        time.sleep(max(0.0, next_at - time.monotonic()))
    conn.close()


def _online_api(source: Path, dest: Path, limit: float) -> float | None:
    """Seconds the online backup API took, or None when it did not finish within ``limit``."""
    started = time.perf_counter()
    src = sqlite3.connect(source)
    dst = sqlite3.connect(dest)

    def progress(status: int, remaining: int, total: int) -> None:
        if time.perf_counter() - started > limit:
            raise TimeoutError

    try:
        src.backup(dst, pages=100, progress=progress)
    except TimeoutError:
        return None
    finally:
        src.close()
        dst.close()
    return time.perf_counter() - started


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000, help="rows before the load starts")
    p.add_argument("--rate", type=float, default=1000.0, help="rows a second written meanwhile")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--limit", type=float, default=60.0, help="give the online API up after S s")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="backup-bench-") as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        db = data / DB_NAME
        _fill(db, args.rows)
        size = db.stat().st_size
        stop = multiprocessing.Event()
        writer = multiprocessing.Process(
            target=_writer, args=(str(db), args.rate, args.rows + 1, stop), daemon=True
        )
        writer.start()
        ours: list[float] = []
        theirs: list[float | None] = []
        try:
            time.sleep(1.0)  # the load is steady before the first copy
            for i in range(args.repeats):
                made = backup(data, Path(tmp) / "ours" / f"copy-{i}.sqlite3")
                ours.append(made.seconds)
                theirs.append(_online_api(db, Path(tmp) / f"api-{i}.sqlite3", args.limit))
        finally:
            stop.set()
            writer.join(timeout=10)
    done = [t for t in theirs if t is not None]
    print(f"database {size / 1e6:.0f} MB ({args.rows} rows), load {args.rate:.0f} rows/s")
    print(f"{'':12} {'median s':>10} {'runs':>24}")
    print(f"{'ours':12} {statistics.median(ours):10.2f} {' '.join(f'{t:.2f}' for t in ours):>24}")
    runs = " ".join("-" if t is None else f"{t:.2f}" for t in theirs)
    median = (
        f"{statistics.median(done):10.2f}"
        if len(done) == len(theirs)
        else f"{'>' + str(int(args.limit)):>10}"
    )
    print(f"{'online-api':12} {median} {runs:>24}")
    print(
        f"online-api unfinished after {args.limit:.0f} s: "
        f"{len(theirs) - len(done)} of {len(theirs)}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
