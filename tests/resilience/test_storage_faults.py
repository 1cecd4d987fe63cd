"""Real storage faults under a gateway process: loud while they last, healed after.

Finding 9 of issue 12: with a full disk or corrupt pages ``/healthz`` stayed
``ok``, failed batches were not on ``/metrics``, a POST command got a
plain-text 500, a WebSocket command closed the operator's socket, and the log
repeated itself every second. Now (docs/api.md §4): ``/healthz`` answers 503
``degraded`` naming the fault, ``/metrics`` counts it, a command that needs
the storage gets a JSON answer, the log says when it began and when it
ended, and once the fault clears the writer catches up on its own, keeping
the telemetry accepted meanwhile.

The full disk is made two ways: RLIMIT_FSIZE lowered on the running process
(any machine; writes fail with EFBIG, which SQLite reports as an I/O error),
and a small tmpfs filled up (ENOSPC, "database or disk is full"; needs
permission to mount, skipped otherwise). Finding 13: an empty database file
is an error with its own exit status, never a fresh start.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.gateway.storage_support import page_of, swap_page, truncate
from tests.resilience.conftest import GatewayFactory
from tests.resilience.support import Telemetry, connect_dashboard, connect_device, stream
from tests.support.gateway import GatewayProcess
from tests.support.metrics import Metrics
from tests.support.wait import WaitTimeout, wait_until

pytestmark = pytest.mark.resilience

# Quick retries and a short expiry pass, so a fault and its end show in seconds.
CONFIG: dict[str, Any] = {"dashboards": {"expiry_interval": 0.2}}
RATE = 20.0  # Hz, the streaming device


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.get((name, frozenset(labels.items())), 0.0)


async def health(gw: GatewayProcess) -> tuple[int, Any]:
    return await asyncio.to_thread(gw.request_sync, "GET", "/healthz")


async def until_degraded(gw: GatewayProcess, words: str) -> dict[str, Any]:
    """Wait for ``/healthz`` to say 503 degraded with ``words`` in the storage's error."""
    seen: list[Any] = []

    async def degraded() -> bool:
        status, body = await health(gw)
        seen[:] = [status, body]
        return status == 503 and words in str(body.get("storage", {}).get("error"))

    try:
        await wait_until(degraded, f"/healthz 503 degraded ({words})", timeout=20)
    except WaitTimeout as e:
        raise AssertionError(f"{e}; the last answer was {seen}") from None
    body: dict[str, Any] = seen[1]
    assert body["status"] == "degraded"
    assert body["storage"]["status"] == "failing"
    assert body["storage"]["since"] > 0
    return body


async def until_healthy(gw: GatewayProcess) -> None:
    async def healthy() -> bool:
        status, body = await health(gw)
        return status == 200 and body["status"] == "ok"

    await wait_until(healthy, "/healthz 200 ok again", timeout=20)


async def offline_device(gw: GatewayProcess, name: str) -> None:
    """A device the gateway has seen, offline now: commands for it need the storage."""
    device = await connect_device(gw, name)
    await device.aclose()

    async def offline() -> bool:
        return not (await gw.get_json(f"/api/devices/{name}"))["online"]

    await wait_until(offline, f"{name} offline")


async def answers_while_failing(gw: GatewayProcess, dash: Telemetry, device: str) -> None:
    """A POST command and a WebSocket command each get a JSON answer; the socket stays."""
    status, body = await gw.post_json(
        f"/api/devices/{device}/commands", {"command": {"name": "reboot"}, "id": "h"}
    )
    assert status == 503, body
    assert body["code"] == "storage_unavailable", body
    await dash.dash.send({"op": "command", "id": "w", "device": device, "command": {"hex": "02"}})
    await dash.wait_for(
        lambda: any(m.get("id") == "w" for m in dash.other), what="the command's status"
    )
    [answer] = [m for m in dash.other if m.get("id") == "w"]
    assert answer["status"] == "rejected", answer
    assert answer["error"].startswith("storage unavailable"), answer
    await dash.dash.send({"op": "devices", "id": "still-here"})
    await dash.wait_for(
        lambda: any(m.get("id") == "still-here" for m in dash.other), what="a devices reply"
    )


async def kept_after_healing(gw: GatewayProcess, name: str, offsets: list[int]) -> None:
    """Telemetry dashboards saw during the fault is in the history once it heals."""
    assert offsets, "no telemetry reached the dashboard during the fault"
    stored = set(await gw.stored_offsets(name))
    lost = sorted(set(offsets) - stored)
    assert not lost, f"{len(lost)} of {len(offsets)} offsets lost, first {lost[:5]}"


async def test_a_full_disk_by_rlimit_is_degraded_answered_and_heals(
    gateways: GatewayFactory,
) -> None:
    gw = gateways(CONFIG)
    await gw.start()
    stop = asyncio.Event()
    async with aiohttp.ClientSession() as session:
        watcher = Telemetry(await connect_dashboard(gw, session))
        await offline_device(gw, "sleepy")
        streamer = await connect_device(gw, "full-1")
        task = asyncio.ensure_future(stream(streamer, RATE, stop, []))
        try:
            await watcher.wait_for(lambda: watcher.count("full-1") >= 5)
            _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
            # Every write at an offset past 1 byte fails (EFBIG): the disk is "full".
            resource.prlimit(gw.pid, resource.RLIMIT_FSIZE, (1, hard))
            before = len(watcher.offsets("full-1"))
            # SQLite says "disk I/O error" or "database or disk is full", by the write.
            body = await until_degraded(gw, "disk")
            metrics = await gw.metrics()
            assert sample(metrics, "iot_storage_failing") == 1
            assert sample(metrics, "iot_storage_failed_batches_total") >= 1
            await answers_while_failing(gw, watcher, "sleepy")
            # Dashboards still get live telemetry meanwhile.
            await watcher.wait_for(lambda: len(watcher.offsets("full-1")) >= before + 10)
            during = watcher.offsets("full-1")[before:]
            assert body["devices_online"] == 1

            resource.prlimit(gw.pid, resource.RLIMIT_FSIZE, (hard, hard))
            await until_healthy(gw)
            metrics = await gw.metrics()
            assert sample(metrics, "iot_storage_failing") == 0
            assert sample(metrics, "iot_storage_dropped_rows_total") == 0
            assert sample(metrics, "iot_commands_refused_total", reason="storage_unavailable") == 2
            await kept_after_healing(gw, "full-1", during)
            status, queued = await gw.post_json(
                "/api/devices/sleepy/commands", {"command": {"name": "reboot"}}
            )
            assert (status, queued["status"]) == (202, "queued")
        finally:
            stop.set()
            await task
            await streamer.aclose()
            await watcher.aclose()
    assert gw.crashes() == [], gw.crashes()[:5]


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs to put a data dir on (skipped where mounting is not allowed)."""
    where = tmp_path / "gw0" / "gateway-data"
    where.mkdir(parents=True)
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(where)],
            check=True,
            capture_output=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"cannot mount a tmpfs here: {e}")
    try:
        yield where
    finally:
        # Lazily: a gateway a failing test left running still holds its files.
        subprocess.run(["umount", "-l", str(where)], check=False, timeout=10)


def fill(directory: Path) -> Path:
    """Fill the file system of ``directory`` up with a dummy file; returns it."""
    dummy = directory / "dummy"
    with dummy.open("wb") as f, contextlib.suppress(OSError):
        while True:  # until ENOSPC
            f.write(b"\0" * 65536)
            f.flush()
    return dummy


async def test_a_full_tmpfs_is_degraded_logged_once_and_heals(
    small_tmpfs: Path, gateways: GatewayFactory
) -> None:
    gw = gateways(CONFIG)
    assert gw.data_dir == small_tmpfs
    await gw.start()
    stop = asyncio.Event()
    async with aiohttp.ClientSession() as session:
        watcher = Telemetry(await connect_dashboard(gw, session))
        await offline_device(gw, "sleepy")
        streamer = await connect_device(gw, "full-2")
        task = asyncio.ensure_future(stream(streamer, RATE, stop, []))
        try:
            await watcher.wait_for(lambda: watcher.count("full-2") >= 5)
            dummy = await asyncio.to_thread(fill, small_tmpfs)
            before = len(watcher.offsets("full-2"))
            await until_degraded(gw, "database or disk is full")
            await answers_while_failing(gw, watcher, "sleepy")

            async def many_failures() -> bool:
                return sample(await gw.metrics(), "iot_storage_failed_batches_total") >= 6

            # Failing for a while, each retry a failed batch: still one line in the log.
            await wait_until(many_failures, "several failed batches", timeout=20)
            during = watcher.offsets("full-2")[before:]
            assert gw.stderr().count("storage batch failed") == 1, gw.log_tail()
            assert gw.stderr().count("command expiry failed") <= 1, gw.log_tail()

            await asyncio.to_thread(dummy.unlink)  # the operator makes room
            await until_healthy(gw)
            assert "storage batch works again" in gw.stderr()
            await kept_after_healing(gw, "full-2", during)
        finally:
            stop.set()
            await task
            await streamer.aclose()
            await watcher.aclose()
            await gw.kill()
    assert gw.crashes() == [], gw.crashes()[:5]


async def test_corrupt_pages_are_degraded_and_heal_when_repaired(
    gateways: GatewayFactory,
) -> None:
    """Garbage over the page every new row's index entry goes to, in a stopped gateway's file.

    It starts (the page is not needed to open), says so as soon as telemetry
    comes, still keeps commands (another table), and heals once the page is good.
    """
    gw = gateways(CONFIG)
    await gw.start()
    device = await connect_device(gw, "bad-pages")
    await device.aclose()
    assert (await gw.stop()).code == 0
    db = gw.data_dir / "gateway.sqlite3"
    root, page_size = await asyncio.to_thread(page_of, db, "telemetry_protocol")
    good = await asyncio.to_thread(swap_page, db, root, page_size, os.urandom(page_size))

    await gw.start()
    stop = asyncio.Event()
    async with aiohttp.ClientSession() as session:
        watcher = Telemetry(await connect_dashboard(gw, session))
        await offline_device(gw, "sleepy")
        streamer = await connect_device(gw, "bad-pages")
        task = asyncio.ensure_future(stream(streamer, RATE, stop, []))
        try:
            await until_degraded(gw, "malformed")
            before = len(watcher.offsets("bad-pages"))
            metrics = await gw.metrics()
            assert sample(metrics, "iot_storage_failed_batches_total") >= 1
            # Commands live elsewhere in the file: they are still kept.
            status, body = await gw.post_json(
                "/api/devices/sleepy/commands", {"command": {"name": "reboot"}}
            )
            assert (status, body["status"]) == (202, "queued"), body
            await watcher.wait_for(lambda: len(watcher.offsets("bad-pages")) >= before + 10)
            during = watcher.offsets("bad-pages")[before:]

            await asyncio.to_thread(swap_page, db, root, page_size, good)
            await until_healthy(gw)
            await kept_after_healing(gw, "bad-pages", during)
        finally:
            stop.set()
            await task
            await streamer.aclose()
            await watcher.aclose()
    assert gw.crashes() == [], gw.crashes()[:5]


async def test_an_empty_database_file_stops_the_start_with_its_own_status(
    gateways: GatewayFactory,
) -> None:
    """Finding 13: it started afresh, with offsets from 1 again."""
    gw = gateways()
    db = gw.data_dir / "gateway.sqlite3"
    await asyncio.to_thread(truncate, db)
    gw.launch()
    gone = await gw.wait_exit(30)
    assert gone.code == 3, gone  # docs/configuration.md, Exit statuses: storage
    assert str(db) in gone.stderr
    assert "empty" in gone.stderr
    assert "Traceback" not in gone.stderr
    assert await asyncio.to_thread(lambda: db.stat().st_size) == 0
