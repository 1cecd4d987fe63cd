"""``iot-gateway backup`` and ``restore`` beside a real gateway under load (issue 17).

docs/deployment.md, Backups, and docs/configuration.md, Command-line flags:
a backup taken at about 1,000 msg/s finishes and passes ``PRAGMA
integrity_check``, with mode 0600 in a directory made 0700; a restore refuses a
data dir a running gateway holds, and after the restore of an old backup every
offset handed out is above every offset handed out before, from the clock, or
from the mark kept outside the data dir when the clock says 1970.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.backup import DB_NAME, BackupError, DataDirBusy, hold_data_dir, restore
from gateway.storage import read_mark
from tests.deploy.support import gateway_config
from tests.support.gateway import OPERATOR, ROOT, GatewayProcess
from tests.support.wait import wait_until_sync

DEVICES, RATE = 50, 20.0  # 1,000 msg/s from the simulators


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def received(gw: GatewayProcess) -> float:
    return gw.metrics_sync().value("iot_telemetry_messages_total")


def offsets(db: Path) -> tuple[int, int]:
    """(highest stored offset, reservation) of a stopped gateway's database."""
    with sqlite3.connect(db) as conn:
        top = conn.execute('SELECT MAX("offset") FROM telemetry').fetchone()[0]
        reserved = conn.execute("SELECT value FROM meta WHERE key = 'offset_reserved'").fetchone()
    return int(top), int(reserved[0])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("backups")


@pytest.fixture(scope="module")
def loaded(workdir: Path) -> Iterator[GatewayProcess]:
    """The deployed config's gateway with 1,000 msg/s of simulated devices."""
    (workdir / "backups").mkdir(mode=0o700)
    gw = GatewayProcess(
        workdir, gateway_config(workdir / "backups" / "offset-mark"), token=OPERATOR
    )
    gw.start_sync()
    load = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway.cli",
            "simulate",
            "--gateway",
            f"127.0.0.1:{gw.device_port}",
            "--devices",
            str(DEVICES),
            "--rate",
            str(RATE),
            "--protocol",
            "env-sensor",
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield gw
    finally:
        load.terminate()
        load.wait(timeout=20)
        if gw.running:
            exit = gw.stop_sync()
            assert exit.code == 0, exit


def test_backup_under_load_finishes_and_passes_integrity_check(
    loaded: GatewayProcess, workdir: Path
) -> None:
    wait_until_sync(lambda: received(loaded) >= 5000, "5,000 messages stored", timeout=60)
    before = received(loaded)
    started = time.monotonic()
    done = cli("backup", str(workdir / "new" / "daily") + "/", "--data-dir", str(loaded.data_dir))
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    assert elapsed < 60, elapsed
    (made,) = (workdir / "new" / "daily").iterdir()
    assert made.name.startswith("gateway-")
    assert made.suffix == ".sqlite3"
    assert stat.S_IMODE((workdir / "new").stat().st_mode) == 0o700
    assert stat.S_IMODE((workdir / "new" / "daily").stat().st_mode) == 0o700
    assert stat.S_IMODE(made.stat().st_mode) == 0o600
    assert str(made) in done.stdout
    with sqlite3.connect(made) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        rows = conn.execute("SELECT COUNT(*) FROM telemetry").fetchone()[0]
    assert rows >= 4000
    # The gateway kept going meanwhile.
    wait_until_sync(lambda: received(loaded) > before + 1000, "telemetry after the backup")
    # A backup never overwrites.
    again = cli("backup", str(made), "--data-dir", str(loaded.data_dir))
    assert again.returncode == 3
    assert "exists already" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1


def test_restore_of_an_old_backup_keeps_offsets_strictly_increasing(
    loaded: GatewayProcess, workdir: Path
) -> None:
    (old,) = (workdir / "new" / "daily").iterdir()
    # More telemetry after the backup: offsets dashboards have seen.
    seen = received(loaded)
    wait_until_sync(lambda: received(loaded) > seen + 3000, "more telemetry", timeout=60)
    busy = cli("restore", str(old), "--data-dir", str(loaded.data_dir))
    assert busy.returncode == 4, busy.stderr
    assert "in use by a running gateway" in busy.stderr
    exit = loaded.stop_sync()
    assert exit.code == 0, exit
    top, reserved = offsets(loaded.data_dir / DB_NAME)
    mark = read_mark(workdir / "backups" / "offset-mark")
    assert mark >= reserved >= top  # the mark outside the data dir bounds every offset
    config = workdir / "gateway.toml"
    assert config.exists()  # written by GatewayProcess: the deployed config, on loopback
    done = cli("restore", str(old), "--config", str(config), "--data-dir", str(loaded.data_dir))
    assert done.returncode == 0, done.stderr
    assert "offsets go on above" in done.stdout
    replaced = list(loaded.data_dir.glob(f"{DB_NAME}.replaced-*"))
    assert len(replaced) == 1
    loaded.start_sync()
    restored_at = received(loaded)
    wait_until_sync(lambda: received(loaded) > restored_at + 500, "telemetry after the restore")
    exit = loaded.stop_sync()
    assert exit.code == 0, exit
    with sqlite3.connect(loaded.data_dir / DB_NAME) as conn:
        backed_up = conn.execute(
            'SELECT MAX("offset") FROM telemetry WHERE "offset" <= ?', (top,)
        ).fetchone()[0]
        new = conn.execute(
            'SELECT MIN("offset"), COUNT(*) FROM telemetry WHERE "offset" > ?', (backed_up,)
        ).fetchone()
    assert new[1] >= 500
    assert new[0] > top, (new, top)
    loaded.start_sync()  # for the module fixture's clean stop


def _database(path: Path, offsets: range) -> None:
    """A small gateway database with telemetry at ``offsets`` (the storage's own schema)."""
    import asyncio

    from gateway.storage import SQLiteStorage

    async def make() -> None:
        storage = SQLiteStorage(path)
        await storage.open()
        await storage.close()

    asyncio.run(make())
    with sqlite3.connect(path) as conn:
        conn.executemany(
            'INSERT INTO telemetry ("offset", device, protocol, ts, seq, data)'
            " VALUES (?, 'd', 'env-sensor', 0, 0, '{}')",
            [(o,) for o in offsets],
        )


def test_a_lost_data_dir_and_a_1970_clock_still_start_above_the_mark(tmp_path: Path) -> None:
    backup = tmp_path / "old.sqlite3"
    _database(backup, range(1, 100))
    mark = tmp_path / "elsewhere" / "offset-mark"
    mark.parent.mkdir()
    mark.write_text("5000000\n")  # what the lost gateway had reserved
    data = tmp_path / "new-disk" / "data"
    done = restore(backup, data, offset_mark=mark, now_ns=0)  # no real-time clock
    assert done.floor == 5_000_000
    assert done.sources["clock"] == 0
    assert done.replaced is None
    _top, reserved = offsets(data / DB_NAME)
    assert reserved == 5_000_000
    assert read_mark(mark) == 5_000_000
    assert stat.S_IMODE((data / DB_NAME).stat().st_mode) == 0o600


def test_the_clock_floor_alone_is_above_a_counting_gateway(tmp_path: Path) -> None:
    backup = tmp_path / "old.sqlite3"
    _database(backup, range(1, 10))
    current = tmp_path / "data"
    current.mkdir()
    _database(current / DB_NAME, range(1, 3_000_000, 1000))
    done = restore(backup, current, offset_mark=None)
    assert done.floor == done.sources["clock"] > 2_999_001
    assert done.floor == pytest.approx(time.time() * 1e6, rel=1e-3)
    assert done.sources["replaced"] >= 2_999_001


def test_restore_refuses_what_is_not_a_sound_gateway_database(tmp_path: Path) -> None:
    junk = tmp_path / "junk.sqlite3"
    junk.write_bytes(b"not a database at all" * 100)
    with pytest.raises(BackupError, match=r"not a gateway database|cannot open") as e:
        restore(junk, tmp_path / "data", offset_mark=None)
    assert e.value.status == 3
    missing = cli("restore", str(tmp_path / "nope.sqlite3"), "--data-dir", str(tmp_path / "d"))
    assert missing.returncode == 3
    assert "does not exist" in missing.stderr
    nothing = cli("backup", str(tmp_path / "b") + "/", "--data-dir", str(tmp_path / "empty"))
    assert nothing.returncode == 3
    assert "no database to back up" in nothing.stderr


def test_serve_refuses_a_data_dir_being_restored(tmp_path: Path) -> None:
    gw = GatewayProcess(tmp_path, token=OPERATOR)
    gw.data_dir.mkdir()
    with hold_data_dir(gw.data_dir, exclusive=True):
        gw.launch()
        exit = gw.wait_exit_sync(30)
    assert exit.code == 3, exit
    assert "is being restored" in exit.stderr
    with (
        hold_data_dir(gw.data_dir, exclusive=False),
        pytest.raises(DataDirBusy),
        hold_data_dir(gw.data_dir, exclusive=True),
    ):
        pass


def test_a_mark_that_is_not_a_number_stops_the_start(tmp_path: Path) -> None:
    mark = tmp_path / "offset-mark"
    mark.write_text("garbage")
    gw = GatewayProcess(tmp_path, {"storage": {"offset_mark": str(mark)}}, token=OPERATOR)
    gw.launch()
    exit = gw.wait_exit_sync(30)
    assert exit.code == 3, exit
    assert "not a number" in exit.stderr
    assert os.path.exists(mark)
