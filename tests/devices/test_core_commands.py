"""Commands on the sans-IO core: seqs, the in-flight bound, ACK/NACK, timeouts, loss."""

from __future__ import annotations

import pytest

import frames
from devices import (
    CloseReason,
    CommandDone,
    CommandResult,
    CommandStatus,
    CommandTracker,
    DeviceNotOnline,
    DeviceOffline,
)
from tests.devices.core_bench import Bench, kinds
from tests.devices.support import ENV_DATA


def commands_out(b: Bench) -> list[frames.Command]:
    out = b.out()
    assert all(isinstance(m, frames.Command) for m in out), out
    return [m for m in out if isinstance(m, frames.Command)]


def test_no_command_before_the_session_is_online() -> None:
    b = Bench()
    with pytest.raises(DeviceNotOnline):
        b.core.send_command(b"\x02", b.clock.now)
    b.hello()
    b.core.close(CloseReason.CLOSED)
    with pytest.raises(DeviceNotOnline):
        b.core.send_command(b"\x02", b.clock.now)


def test_command_is_written_and_acked_or_nacked_by_seq() -> None:
    b = Bench()
    b.hello()
    first = b.core.send_command(b"\x02", b.clock.now)
    second = b.core.send_command(b"\x01\x00\x05", b.clock.now)
    assert [(c.seq, c.body) for c in commands_out(b)] == [
        (first, b"\x02"),
        (second, b"\x01\x00\x05"),
    ]
    assert first != second
    # Out of order: matched by seq.
    events = b.feed(frames.Ack(second, 3), frames.Ack(first, 0))
    assert events == [
        CommandDone(second, CommandResult(CommandStatus.NACKED, code=3)),
        CommandDone(first, CommandResult(CommandStatus.ACKED)),
    ]
    assert b.core.commands.inflight == 0


def test_ack_for_no_command_in_flight_is_a_stray() -> None:
    b = Bench()
    b.hello()
    assert b.feed(frames.Ack(99, 0)) == []
    assert b.totals.stray_acks == 1


def test_ack_timeout_is_a_deadline() -> None:
    b = Bench(ack_timeout=10.0)
    b.hello()
    seq = b.core.send_command(b"\x02", b.clock.now)
    assert b.core.deadline == b.clock.now + 10.0
    b.clock.advance(4.0)
    later = b.core.send_command(b"\x02", b.clock.now)
    assert b.advance(5.999) == []
    assert b.advance(0.001) == [CommandDone(seq, CommandResult(CommandStatus.TIMEOUT))]
    assert b.core.deadline == b.clock.now + 4.0  # the second one's
    b.feed(frames.Ack(seq, 0))  # late: counted, not matched
    assert b.totals.stray_acks == 1
    assert b.advance(4.0) == [CommandDone(later, CommandResult(CommandStatus.TIMEOUT))]


def test_link_lost_before_the_ack_is_a_timeout_saying_so() -> None:
    b = Bench()
    b.hello()
    seqs = [b.core.send_command(b"\x02", b.clock.now) for _ in range(3)]
    events = b.core.close(CloseReason.LOST)
    lost = CommandResult(CommandStatus.TIMEOUT, error="link lost")
    assert events[:3] == [CommandDone(s, lost) for s in seqs]
    assert kinds(events)[3:] == [DeviceOffline, type(events[-1])]


def test_serial_silence_before_the_ack_is_a_timeout_saying_so() -> None:
    b = Bench("serial", heartbeat=1, misses=3, ack_timeout=10.0)
    b.hello()
    seq = b.core.send_command(b"\x02", b.clock.now)
    events = b.advance(3.0)
    silent = CommandResult(CommandStatus.TIMEOUT, error="device went silent")
    assert events[0] == CommandDone(seq, silent)
    assert kinds(events)[1:] == [DeviceOffline]
    assert b.core.commands.inflight == 0


def test_seq_skips_those_awaiting_their_ack_and_wraps() -> None:
    b = Bench(max_inflight_commands=255)
    b.hello()
    seqs = [b.core.send_command(b"\x02", b.clock.now) for _ in range(255)]
    assert seqs == list(range(255))
    b.feed(frames.Ack(7, 0), frames.Ack(200, 0), frames.Ack(3, 0))
    # Next is 255 (never used), then the freed seqs in turn, after wrapping.
    assert [b.core.send_command(b"\x02", b.clock.now) for _ in range(3)] == [255, 3, 7]
    b.feed(frames.Ack(0, 0))
    assert b.core.send_command(b"\x02", b.clock.now) == 200


def test_in_flight_bound() -> None:
    b = Bench(max_inflight_commands=2)
    b.hello()
    b.core.send_command(b"\x02", b.clock.now)
    second = b.core.send_command(b"\x02", b.clock.now)
    assert not b.core.commands.has_room
    with pytest.raises(frames.LocalProtocolError):
        b.core.send_command(b"\x02", b.clock.now)
    b.feed(frames.Ack(second, 0))
    assert b.core.commands.has_room
    b.core.send_command(b"\x02", b.clock.now)


def test_a_body_too_big_takes_no_seq() -> None:
    b = Bench(max_inflight_commands=1)
    b.hello()
    with pytest.raises(frames.LocalProtocolError):
        b.core.send_command(bytes(254), b.clock.now)
    assert b.core.commands.inflight == 0
    assert b.out() == []
    seq = b.core.send_command(b"\x02", b.clock.now)  # the one slot is still free
    assert [c.seq for c in commands_out(b)] == [seq]


def test_data_still_flows_while_commands_wait() -> None:
    b = Bench()
    b.hello()
    b.core.send_command(b"\x02", b.clock.now)
    assert len(b.feed(frames.Data(1, ENV_DATA), frames.Data(2, ENV_DATA))) == 2


def test_tracker_alone() -> None:
    t = CommandTracker(max_inflight=3, ack_timeout=1.0)
    assert t.deadline is None
    assert [t.start(0.0), t.start(0.5)] == [0, 1]
    assert t.deadline == 1.0
    assert t.pending() == [0, 1]
    assert t.ack(0, 0) == CommandResult(CommandStatus.ACKED)
    assert t.ack(0, 0) is None
    assert t.expire(1.49) == []
    assert t.expire(1.5) == [1]
    t.start(2.0)
    assert t.drain() == [2]
    assert t.inflight == 0
    with pytest.raises(ValueError, match=r"1\.\.255"):
        CommandTracker(max_inflight=256, ack_timeout=1.0)
