"""How the storage writer inserts a batch of telemetry: ``executemany`` against one ``json_each``.

Run ``.venv/bin/python -m benchmarks.sqlite_batch`` (``--rows`` to change the count).

The gateway's SQLite writer is a thread beside the event loop. Each row that
``executemany`` steps releases the GIL and takes it back; with the loop thread
busy, every take-back waits for it. Inserting a whole batch as one JSON array
unpacked by SQLite's ``json_each`` takes the GIL once per batch. Both are
measured on the same rows and schema as ``SQLiteStorage`` (WAL,
synchronous=NORMAL, 500 rows a transaction), alone and with a second thread
spinning in Python (the event loop's stand-in): the writer thread's CPU per
row, the wall time per row, and how fast the spinning thread ran meanwhile.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks import harness
from benchmarks.codec import machine
from gateway.storage.schema import _INSERT_TELEMETRY_BATCH

_encode = json.JSONEncoder(separators=(",", ":")).encode
_INSERT_ONE = (
    'INSERT INTO telemetry ("offset", device, protocol, ts, seq, data) VALUES (?, ?, ?, ?, ?, ?)'
)
Row = tuple[int, str, str, int, int, str]


def _open(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute(
        'CREATE TABLE telemetry ("offset" INTEGER PRIMARY KEY, device TEXT NOT NULL, '
        "protocol TEXT NOT NULL, ts INTEGER NOT NULL, seq INTEGER NOT NULL, data TEXT NOT NULL)"
    )
    conn.execute('CREATE INDEX telemetry_device ON telemetry (device, "offset")')
    return conn


def run(way: str, rows: list[Row], busy: bool, work: Path) -> dict[str, float]:
    """Insert ``rows`` in batches of 500 one ``way``; figures per row."""
    conn = _open(work / f"{way}-{busy}.sqlite3")
    stop = threading.Event()
    spins = [0]

    def spin() -> None:
        while not stop.is_set():
            spins[0] += 1

    spinner = threading.Thread(target=spin) if busy else None
    if spinner is not None:
        spinner.start()
    cpu0, wall0 = time.thread_time(), time.perf_counter()
    for k in range(0, len(rows), 500):
        batch = rows[k : k + 500]
        conn.execute("BEGIN IMMEDIATE")
        if way == "executemany":
            conn.executemany(_INSERT_ONE, batch)
        else:
            conn.execute(_INSERT_TELEMETRY_BATCH, (_encode(batch),))
        conn.execute("COMMIT")
    cpu, wall = time.thread_time() - cpu0, time.perf_counter() - wall0
    stop.set()
    if spinner is not None:
        spinner.join()
    count = conn.execute("SELECT count(*) FROM telemetry").fetchone()[0]
    conn.close()
    assert count == len(rows), count
    return {
        "writer_cpu_us_per_row": cpu / len(rows) * 1e6,
        "wall_us_per_row": wall / len(rows) * 1e6,
        "spinner_mloops_per_s": spins[0] / wall / 1e6,
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--rows", type=int, default=100_000)
    args = p.parse_args(argv)
    data = '{"temperature_c":21.5,"humidity_pct":40.25,"battery_pct":97}'
    rows: list[Row] = [
        (i, f"dev-{i % 1000:05d}", "env-sensor", 1_700_000_000_000 + i, i % 256, data)
        for i in range(1, args.rows + 1)
    ]
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="sqlite-batch-") as tmp:
        for busy in (False, True):
            for way in ("executemany", "json_each"):
                name = f"{way}, {'a busy thread beside it' if busy else 'alone'}"
                results[name] = r = run(way, rows, busy, Path(tmp))
                print(
                    f"{name:42s} writer CPU {r['writer_cpu_us_per_row']:6.2f} us/row, "
                    f"wall {r['wall_us_per_row']:8.2f} us/row"
                    + (f", spinner {r['spinner_mloops_per_s']:.1f} M loops/s" if busy else "")
                )
    path = harness.RESULTS / "sqlite_batch.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine(), "rows": args.rows, **results}, indent=2))
    print(f"results written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
