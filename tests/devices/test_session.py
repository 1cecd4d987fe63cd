"""The asyncio adapter around the core: one timer, futures for commands, the write side.

A real event loop and a fake link: no sockets. The timers here are short and
every wait is on an event with a deadline.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

import frames
from devices import (
    CloseReason,
    CommandResult,
    CommandStatus,
    DeviceManager,
    DeviceNotOnline,
    DeviceSession,
    DeviceTelemetry,
    SessionConfig,
    SessionState,
)
from frames import ErrorCode
from tests.devices.support import ENV_DATA, FakeLink, Recorder, wire


def session_on(**config: Any) -> tuple[DeviceSession, FakeLink, Recorder]:
    sink = Recorder()
    manager = DeviceManager(sink, SessionConfig(**config))
    link = FakeLink()
    session = DeviceSession(manager, link)
    session.start()
    return session, link, sink


def online(**config: Any) -> tuple[DeviceSession, FakeLink, Recorder]:
    session, link, sink = session_on(**config)
    session.data_received(wire(frames.Hello(1, "dev-1", "env-sensor", "")))
    assert [type(m) for m in link.take()] == [frames.Welcome]
    return session, link, sink


async def test_one_timer_not_rearmed_per_frame() -> None:
    session, _, sink = online(heartbeat=30)
    timer = session._timer
    assert timer is not None
    for seq in range(100):
        session.data_received(wire(frames.Data(seq, ENV_DATA)))
    assert session._timer is timer  # the silence deadline moved; the timer did not
    assert len(sink.telemetry()) == 100
    # An earlier deadline (a partial frame's timeout) re-arms it once.
    session.data_received(b"\xaa\xaa\x07")
    assert session._timer is not timer
    assert session._timer is not None
    assert session._timer.when() < timer.when()


async def test_hello_deadline_fires_and_closes_the_link() -> None:
    session, link, _ = session_on(hello_timeout=0.05)
    await asyncio.wait_for(link.gone.wait(), 5)
    assert [m.code for m in link.take() if isinstance(m, frames.Error)] == [
        ErrorCode.NOT_REGISTERED
    ]
    assert session.state is SessionState.CLOSED
    assert session._timer is None


async def test_telemetry_is_stamped_with_both_clocks() -> None:
    session, _, sink = online()
    loop = asyncio.get_running_loop()
    before_ms, before = time.time() * 1000, loop.time()
    session.data_received(wire(frames.Data(3, ENV_DATA)))
    [t] = sink.telemetry()
    assert isinstance(t, DeviceTelemetry)
    assert before <= t.received <= loop.time()
    assert before_ms - 1 <= t.ts <= time.time() * 1000 + 1


async def test_command_result_resolves_the_future() -> None:
    session, link, _ = online()
    handle = await session.send_command(b"\x02")
    assert link.take() == [frames.Command(handle.seq, b"\x02")]
    assert handle.client_id == "dev-1"
    session.data_received(wire(frames.Ack(handle.seq, 5)))
    assert await asyncio.wait_for(handle.result, 5) == CommandResult(CommandStatus.NACKED, code=5)


async def test_ack_timeout_through_the_timer() -> None:
    session, _, _ = online(ack_timeout=0.05)
    handle = await session.send_command(b"\x02")
    result = await asyncio.wait_for(handle.result, 5)
    assert result == CommandResult(CommandStatus.TIMEOUT)
    assert session.state is SessionState.ONLINE


async def test_commands_wait_for_a_slot_and_link_loss_ends_them() -> None:
    session, link, _ = online(max_inflight_commands=1)
    first = await session.send_command(b"\x02")
    waiting = asyncio.create_task(session.send_command(b"\x03"))
    await asyncio.sleep(0)  # let it reach the slot wait
    assert not waiting.done()
    session.data_received(wire(frames.Ack(first.seq, 0)))
    second = await asyncio.wait_for(waiting, 5)
    assert (await first.result).status is CommandStatus.ACKED
    third = asyncio.create_task(session.send_command(b"\x04"))
    await asyncio.sleep(0)
    session.link_lost(CloseReason.LOST)
    lost = await asyncio.wait_for(second.result, 5)
    assert lost == CommandResult(CommandStatus.TIMEOUT, error="link lost")
    with pytest.raises(DeviceNotOnline):
        await asyncio.wait_for(third, 5)
    assert not link.closed  # it closed by itself: nothing to close


async def test_a_cancelled_future_still_frees_its_slot_on_the_ack() -> None:
    session, _, _ = online(max_inflight_commands=1)
    first = await session.send_command(b"\x02")
    first.result.cancel()  # nobody waits for it any more
    session.data_received(wire(frames.Ack(first.seq, 0)))
    second = await asyncio.wait_for(session.send_command(b"\x02"), 5)
    assert second.seq != first.seq


async def test_send_command_waits_for_room_then_writes() -> None:
    session, link, _ = online()
    link.room.clear()
    sending = asyncio.create_task(session.send_command(b"\x02"))
    await asyncio.sleep(0)
    assert not sending.done()
    assert link.take() == []  # room first: nothing is left behind in a full buffer
    link.room.set()
    handle = await asyncio.wait_for(sending, 5)
    [command] = link.take()
    assert isinstance(command, frames.Command)
    assert command.seq == handle.seq


async def test_a_command_that_cannot_be_written_in_time_fails_alone() -> None:
    session, link, _ = online(ack_timeout=0.3, max_inflight_commands=1)
    link.room.clear()  # the device stopped reading
    started = time.monotonic()
    handle = await asyncio.wait_for(session.send_command(b"\x02"), 5)
    assert 0.25 <= time.monotonic() - started < 3.0  # bounded by the command timeout
    assert handle.seq == -1
    assert handle.result.done()
    assert handle.result.result() == CommandResult(
        CommandStatus.TIMEOUT, error="device not reading"
    )
    assert link.take() == []  # never written, so never delivered later
    assert session.host.counters.commands_not_reading == 1
    assert session.state is SessionState.ONLINE  # only the command failed
    link.room.set()
    # Its slot is free again: the next command goes out at once.
    second = await asyncio.wait_for(session.send_command(b"\x03"), 1)
    assert second.seq >= 0
    assert [type(m) for m in link.take()] == [frames.Command]


async def test_waiting_for_a_slot_is_bounded_too() -> None:
    session, _, _ = online(ack_timeout=0.3, max_inflight_commands=1)
    first = await session.send_command(b"\x02")  # never ACKed
    started = time.monotonic()
    second = await asyncio.wait_for(session.send_command(b"\x03"), 5)
    # The first one's ACK timeout frees the slot within the second one's wait.
    assert time.monotonic() - started < 3.0
    assert (await asyncio.wait_for(first.result, 5)).status is CommandStatus.TIMEOUT
    assert (await asyncio.wait_for(second.result, 5)).status is CommandStatus.TIMEOUT


async def test_a_link_lost_while_a_command_waits_for_room_is_not_online() -> None:
    session, link, _ = online()
    link.room.clear()
    sending = asyncio.create_task(session.send_command(b"\x02"))
    await asyncio.sleep(0)
    session.link_lost(CloseReason.LOST)
    link.room.set()  # what a closing link's writer does for its waiters
    with pytest.raises(DeviceNotOnline):
        await asyncio.wait_for(sending, 5)
    assert link.take() == []


async def test_a_device_that_does_not_read_is_closed() -> None:
    session, link, sink = online(max_write_buffer=1000)
    link.buffered = 1001
    session.data_received(wire(frames.Ping(1)))
    assert link.closed
    off = await sink.offline("dev-1")
    assert off.reason is CloseReason.NOT_READING


async def test_shutdown_close_sends_nothing_and_closes() -> None:
    session, link, sink = online()
    session.close(CloseReason.SHUTDOWN)
    assert link.closed
    assert link.take() == []
    assert (await sink.offline("dev-1")).reason is CloseReason.SHUTDOWN
    with pytest.raises(DeviceNotOnline):
        await session.send_command(b"\x02")
