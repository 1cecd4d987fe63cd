"""Each simulator fault against a real gateway: it survives, counts, and delivers."""

from __future__ import annotations

import asyncio

import pytest

from frames.backoff import BackoffPolicy
from gateway.app import Runtime
from simulators import DeviceSpec, Faults, TcpDevice
from tests.gateway.conftest import AppFactory
from tests.gateway.support import runtime_of
from tests.support.wait import wait_until

FAST = BackoffPolicy(base=0.05, cap=0.2)
# Gateway and device counters have no event of their own: polled, in process, often.
POLL_EVERY = 0.01


def telemetry_count(rt: Runtime) -> int:
    return rt.metrics.telemetry_in


async def run_device(
    rt: Runtime, faults: Faults, *, frames: int = 40, token: str = "", rate: float = 100.0
) -> TcpDevice:
    """Run one faulty device until it has sent ``frames`` DATA, then stop it and wait
    until the gateway has seen its link close (so every byte sent has been read)."""
    host, port = rt.device_server.address
    dev = TcpDevice(
        DeviceSpec("faulty-1", rate=rate, seed=7, token=token, faults=faults),
        host,
        port,
        backoff=FAST,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(dev.run(stop))
    await wait_until(
        lambda: dev.model.counters.data_sent >= frames,
        f"{frames} DATA sent",
        timeout=20,
        every=POLL_EVERY,
    )
    stop.set()
    await asyncio.wait_for(task, 20)
    await wait_until(
        lambda: not rt.manager.links, "the device link closed", timeout=20, every=POLL_EVERY
    )
    return dev


@pytest.fixture
async def rt(make_app: AppFactory) -> Runtime:
    client = await make_app(devices={"max_frames_per_second": 10_000, "rate_burst": 10_000})
    return runtime_of(client)


async def test_split_frames_all_delivered(rt: Runtime) -> None:
    dev = await run_device(rt, Faults(split=True))
    assert dev.injector.counters.splits > 0
    assert telemetry_count(rt) == dev.model.counters.data_sent
    assert rt.manager.totals().crc_errors == 0


async def test_merged_frames_all_delivered(rt: Runtime) -> None:
    dev = await run_device(rt, Faults(merge=3, merge_hold=0.05))
    assert dev.injector.counters.merged_writes > 0
    # Frames still held for merging when the device stops are never written.
    assert dev.model.counters.data_sent - 2 <= telemetry_count(rt) <= dev.model.counters.data_sent


async def test_garbage_is_skipped_and_counted_exactly(rt: Runtime) -> None:
    dev = await run_device(rt, Faults(garbage=0.5))
    injected = dev.injector.counters.garbage_bytes
    assert injected > 0
    assert rt.manager.totals().skipped_bytes == injected
    assert telemetry_count(rt) == dev.model.counters.data_sent


async def test_flipped_bits_lose_only_touched_frames(rt: Runtime) -> None:
    dev = await run_device(rt, Faults(flip=0.002), frames=200)
    corrupted = dev.injector.counters.writes_corrupted
    assert corrupted > 0
    totals = rt.manager.totals()
    assert totals.crc_errors + totals.frame_timeouts > 0
    # Each corrupted write is one frame; every other DATA arrives. A flip in a
    # length byte can also hold the next frame until the frame timeout, and a
    # flipped HELLO costs a reconnect, so allow what those can cost, no more.
    sent = dev.model.counters.data_sent
    assert sent - corrupted - totals.frame_timeouts - 2 <= telemetry_count(rt) <= sent


async def test_dropped_links_come_back(rt: Runtime) -> None:
    dev = await run_device(rt, Faults(drop=5.0), frames=100)
    assert dev.injector.counters.drops > 0
    assert dev.model.counters.sessions >= 2
    assert rt.hub.devices["faulty-1"].online is False  # stopped at the end
    assert telemetry_count(rt) > 0


async def test_silence_ends_the_session_and_the_device_returns(make_app: AppFactory) -> None:
    client = await make_app(devices={"heartbeat": 1, "misses": 1})
    rt = runtime_of(client)
    host, port = rt.device_server.address
    quiet = TcpDevice(
        DeviceSpec("quiet-1", rate=5.0, seed=3, faults=Faults(silent=3.0)), host, port, backoff=FAST
    )
    stop = asyncio.Event()
    task = asyncio.create_task(quiet.run(stop))
    # The gateway ends the silent session (1 s x 1 miss) and closes the link;
    # the device reconnects and is online again with a new session.
    await wait_until(
        lambda: quiet.model.counters.sessions >= 2 and rt.manager.is_online("quiet-1"),
        "quiet-1 back online in a second session",
        timeout=20,
        every=POLL_EVERY,
    )
    stop.set()
    await asyncio.wait_for(task, 20)
    assert quiet.injector.counters.silences >= 1


async def test_bad_token_is_refused_then_the_device_logs_in(make_app: AppFactory) -> None:
    client = await make_app(devices={"token": "right"})
    rt = runtime_of(client)
    dev = await run_device(rt, Faults(badtoken=True), frames=5, token="right")
    assert dev.injector.counters.bad_tokens == 1
    assert rt.manager.counters.auth_failed == 1
    assert telemetry_count(rt) == dev.model.counters.data_sent
