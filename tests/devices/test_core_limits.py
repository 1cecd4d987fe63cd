"""The bounds a hostile or faulty device meets in the session core (docs/protocol.md §4).

On a fake clock: backpressure over TCP (a burst late but whole, never dropped),
drops over serial (an ACK never), the pre-HELLO budget, anonymous devices on a
port that is not loopback, and client_id changes on one link.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import frames
from devices import (
    CloseLink,
    CloseReason,
    CommandDone,
    CommandStatus,
    LinkPolicy,
    SessionConfig,
    SessionState,
)
from frames import ErrorCode
from tests.devices.core_bench import Bench, closed, telemetry
from tests.devices.support import ENV_DATA, wire

DATA_FRAME = len(wire(frames.Data(0, ENV_DATA)))  # 12 bytes
PING_FRAME = len(wire(frames.Ping(0)))  # 7 bytes


def data(n: int, first: int = 0) -> list[frames.Message]:
    return [frames.Data((first + i) & 0xFF, ENV_DATA) for i in range(n)]


# ---- TCP: over the rate, the device is slowed down, never dropped ------------------------------


def test_tcp_burst_over_the_rate_arrives_late_but_whole() -> None:
    b = Bench(max_frames_per_second=10, rate_burst=5, ack_timeout=60.0)
    b.hello()  # the HELLO took one token: 4 left
    start = b.clock.now
    seq = b.core.send_command(b"\x02", start)
    n = 100
    now_events = b.feed(*data(n), frames.Ack(seq, 0))
    first = telemetry(now_events)
    # Some frames go through at once (at most one slice of the inbox), the rest wait.
    assert 0 < len(first) <= frames.max_frame_size() // DATA_FRAME + 1
    assert b.core.throttled  # the adapter stops reading the socket now
    assert b.core.deadline is not None
    assert b.core.deadline < start + 5
    batches: list[int] = []
    later = []
    while b.core.throttled:
        deadline = b.core.deadline
        assert deadline is not None
        events = b.run_until(deadline + 0.001)
        batches.append(len(telemetry(events)))
        later += events
    got = first + telemetry(later)
    assert [t.seq for t in got] == list(range(n))  # all of them, in order
    assert b.errors() == []  # no RATE_LIMITED
    assert b.core.counters.rate_limited == 0
    assert b.core.counters.throttled == 1
    # At the rate: 100 frames at 10/s, less the 4 saved tokens and one slice ahead.
    last = got[-1].received
    assert start + (n - 4 - 22) / 10 <= last <= start + n / 10 + 1
    # Each wake feeds a bounded slice, not the whole backlog.
    assert max(batches) <= frames.max_frame_size() // DATA_FRAME + 1
    # The ACK over the rate came late, and was still matched.
    [done] = [e for e in later if isinstance(e, CommandDone)]
    assert done.result.status is CommandStatus.ACKED
    assert b.state is SessionState.ONLINE


def test_a_frame_split_by_the_throttle_never_times_out() -> None:
    # A slice of the inbox may end inside a frame; the frame's rest waits in the inbox
    # longer than the frame timeout, which must not abandon it.
    b = Bench(max_frames_per_second=1, rate_burst=1, frame_timeout=0.2)
    b.hello()
    odd = [frames.Data(i, ENV_DATA + bytes(i % 3)) for i in range(40)]  # unequal sizes
    events = b.feed(*odd)
    events += b.run_until(b.clock.now + 120)
    assert len(telemetry(events)) + b.core.counters.errors_sent == 40
    assert b.core.counters.frame_timeouts == 0
    assert b.core.counters.crc_errors == 0
    assert b.core.counters.skipped_bytes == 0


def test_a_partial_frame_still_times_out_once_the_inbox_is_empty() -> None:
    b = Bench(frame_timeout=1.0)
    b.hello()
    b.feed_raw(wire(frames.Data(1, ENV_DATA))[:-3])
    assert not b.core.throttled
    b.run_until(b.clock.now + 2)
    assert b.core.counters.frame_timeouts == 1


def test_without_backpressure_a_tcp_policy_drops_like_serial() -> None:
    # A link that cannot pause reading (no ReadFlow) gets this policy from the adapter.
    config = SessionConfig(max_frames_per_second=5, rate_burst=5)
    policy = LinkPolicy.tcp(config)
    assert policy.backpressure
    b = Bench(
        policy=dataclasses.replace(policy, backpressure=False),
        max_frames_per_second=5,
        rate_burst=5,
    )
    b.hello()
    assert len(telemetry(b.feed(*data(10)))) == 4
    assert b.core.counters.rate_limited == 6
    assert not b.core.throttled


# ---- serial: over the rate, frames are dropped, but never an ACK --------------------------------


def test_serial_never_drops_an_ack_over_the_rate() -> None:
    b = Bench("serial", max_frames_per_second=1, rate_burst=1)
    b.hello()  # the only token
    seq = b.core.send_command(b"\x02", b.clock.now)
    b.out()
    events = b.feed(*data(5), frames.Ack(seq, 0))
    assert telemetry(events) == []
    assert b.core.counters.rate_limited == 5
    [done] = [e for e in events if isinstance(e, CommandDone)]
    assert done.result.status is CommandStatus.ACKED
    assert b.errors() == [ErrorCode.RATE_LIMITED]


# ---- the pre-HELLO budget (TCP) -----------------------------------------------------------------


def test_over_the_frame_budget_before_hello_closes() -> None:
    b = Bench(hello_budget_frames=16)
    events = b.feed(*[frames.Ping(i) for i in range(17)])
    assert closed(events) == CloseLink(CloseReason.HELLO_BUDGET)
    out = b.out()
    assert [type(m) for m in out] == [frames.Pong] * 16 + [frames.Error]
    error = out[-1]
    assert isinstance(error, frames.Error)
    assert error.code == ErrorCode.NOT_REGISTERED
    assert "before HELLO" in error.reason
    assert b.totals.links_closed == {CloseReason.HELLO_BUDGET: 1}


def test_over_the_byte_budget_before_hello_closes_without_decoding_the_rest() -> None:
    b = Bench(hello_budget_bytes=300, hello_budget_frames=1000)
    flood = wire(*[frames.Ping(i & 0xFF) for i in range(10_000)])  # 70 KB of valid frames
    events = b.feed_raw(flood)
    assert closed(events) == CloseLink(CloseReason.HELLO_BUDGET)
    # Only the budget reached the decoder: the flood cost what 300 bytes cost.
    assert b.core.decoder.frames <= 300 // PING_FRAME
    assert b.core.counters.frames_in <= 300 // PING_FRAME
    assert b.core.counters.bytes_in == len(flood)  # counted as received, all the same
    assert b.feed_raw(flood) == []  # closed: nothing more is even looked at


def test_the_budget_is_spent_across_chunks() -> None:
    b = Bench(hello_budget_bytes=300, hello_budget_frames=1000)
    for i in range(42):  # 294 bytes: within the budget
        assert b.feed(frames.Ping(i)) == []
    events = b.feed(frames.Ping(42))
    assert closed(events) == CloseLink(CloseReason.HELLO_BUDGET)


def test_a_hello_within_the_budget_lifts_it_even_in_the_same_chunk() -> None:
    b = Bench(hello_budget_bytes=300, hello_budget_frames=16)
    events = b.feed(frames.Hello(1, "quick", "env-sensor", ""), *data(150))
    assert len(telemetry(events)) == 150  # 1,800 bytes after the HELLO: no budget any more
    assert b.state is SessionState.ONLINE


def test_serial_links_have_no_budget() -> None:
    b = Bench("serial", hello_budget_frames=16)
    b.feed(*[frames.Ping(i) for i in range(100)])
    assert [type(m) for m in b.out()] == [frames.Pong] * 100
    assert b.state is SessionState.AWAITING_HELLO


# ---- anonymous devices on a port that is not loopback -------------------------------------------


def _refusing(**config: Any) -> Bench:
    """A session on a device port that is not loopback (no allow_anonymous)."""
    session = SessionConfig(**config)
    return Bench(policy=LinkPolicy.tcp(session, allow_anonymous=False), **config)


def test_anonymous_hello_is_refused_where_the_port_needs_a_token() -> None:
    b = _refusing()
    events = b.feed(frames.Hello(1, "anon-1", "env-sensor", ""))
    assert closed(events) == CloseLink(CloseReason.AUTH_FAILED)
    [error] = b.out()
    assert isinstance(error, frames.Error)
    assert (error.code, error.reason) == (
        ErrorCode.AUTH_FAILED,
        "this device port needs a device token",
    )
    assert b.totals.refused_anonymous == 1
    assert b.totals.auth_failed == 0  # no token was wrong: none was configured


def test_a_device_with_its_token_is_welcome_on_such_a_port() -> None:
    b = _refusing(token="shared")
    b.hello("with-token", token="shared")


def test_per_client_tokens_leave_other_ids_anonymous() -> None:
    b = _refusing(tokens={"pump-7": "p7"})
    b.hello("pump-7", token="p7")
    c = _refusing(tokens={"pump-7": "p7"})
    assert closed(c.feed(frames.Hello(1, "other", "env-sensor", ""))) == CloseLink(
        CloseReason.AUTH_FAILED
    )


def test_allow_anonymous_and_loopback_admit_anonymous_devices() -> None:
    Bench().hello()  # the default policy: a loopback port
    config = SessionConfig(allow_anonymous=True)
    policy = LinkPolicy.tcp(config, allow_anonymous=True)
    Bench(policy=policy, allow_anonymous=True).hello()


# ---- client_id changes on one link --------------------------------------------------------------


def rehello(b: Bench, client_id: str) -> None:
    """HELLO as ``client_id`` on a link that may be online as another: WELCOMEd."""
    events = b.feed(frames.Hello(7, client_id, "env-sensor", ""))
    assert [type(m) for m in b.out()] == [frames.Welcome]
    assert b.core.info is not None
    assert b.core.info.client_id == client_id, events


def test_client_id_changes_on_one_link_are_bounded() -> None:
    b = Bench(max_client_id_changes=3, churn_window=10.0)
    rehello(b, "id-0")
    for i in range(1, 4):
        rehello(b, f"id-{i}")
    rehello(b, "id-3")  # the same id again is no change
    events = b.feed(frames.Hello(1, "id-4", "env-sensor", ""))
    assert closed(events) == CloseLink(CloseReason.REFUSED)
    [error] = b.out()
    assert isinstance(error, frames.Error)
    assert error.code == ErrorCode.RATE_LIMITED
    assert "max_client_id_changes=3" in error.reason
    assert b.totals.refused_client_id_changes == 1


def test_client_id_changes_are_counted_per_window() -> None:
    b = Bench(max_client_id_changes=2, churn_window=10.0)
    rehello(b, "a")
    rehello(b, "b")
    rehello(b, "c")
    b.clock.advance(10.0)
    rehello(b, "d")
    rehello(b, "e")
    assert b.state is SessionState.ONLINE
