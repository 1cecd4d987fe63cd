"""Every session rule of docs/protocol.md §4, on the sans-IO core and a fake clock.

No socket, no event loop, no sleep: bytes and times go in, events and bytes
come out. The TCP and pty tests next to this one check the same rules end to
end; these check them exactly (to the millisecond, to the byte).
"""

from __future__ import annotations

import uuid
from typing import Any

import frames
from devices import (
    CloseLink,
    CloseReason,
    DeviceOffline,
    DeviceOnline,
    DeviceTelemetry,
    LinkPolicy,
    SerialPortConfig,
    SessionConfig,
    SessionState,
    Transport,
)
from frames import ErrorCode
from tests.devices.core_bench import Bench, closed, info_of, kinds, offline, telemetry
from tests.devices.support import ENV_DATA, ENV_VALUES, wire

# ---- HELLO and WELCOME ---------------------------------------------------------------------


def test_tcp_hello_deadline_sends_not_registered_and_closes() -> None:
    b = Bench(hello_timeout=5.0)
    assert b.core.deadline == b.clock.now + 5.0
    assert b.advance(4.999) == []
    events = b.advance(0.002)
    assert events == [CloseLink(CloseReason.HELLO_TIMEOUT)]
    [error] = b.out()
    assert isinstance(error, frames.Error)
    assert error.code == ErrorCode.NOT_REGISTERED
    assert "no valid HELLO within 5 s" in error.reason
    assert b.state is SessionState.CLOSED
    assert b.core.deadline is None
    assert b.totals.links_closed == {CloseReason.HELLO_TIMEOUT: 1}
    assert b.totals.errors_sent == {ErrorCode.NOT_REGISTERED: 1}


def test_serial_has_no_hello_deadline() -> None:
    b = Bench("serial")
    assert b.core.deadline is None
    assert b.advance(3600.0) == []
    assert b.state is SessionState.AWAITING_HELLO
    b.hello()


def test_welcome_carries_a_new_session_id_and_the_interval() -> None:
    b = Bench(heartbeat=17)
    b.clock.advance(1.5)
    events = b.feed(frames.Hello(9, "sensor-1", "env-sensor", ""))
    [welcome] = b.out()
    assert isinstance(welcome, frames.Welcome)
    assert welcome.seq == 9  # the HELLO's seq
    assert welcome.heartbeat == 17
    assert welcome.session_id == uuid.UUID(int=1, version=4)
    info = info_of(events)
    assert info.session == str(welcome.session_id)
    assert (info.client_id, info.protocol, info.transport, info.peer) == (
        "sensor-1",
        "env-sensor",
        Transport.TCP,
        "test:1",
    )
    assert info.connected_at == b.clock.wall_ms()
    assert b.state is SessionState.ONLINE
    assert b.core.deadline == b.clock.now + 3 * 17  # the HELLO deadline is gone


def test_each_session_gets_a_fresh_id_and_a_repeated_hello_keeps_it() -> None:
    b = Bench()
    first = b.hello("a")
    again = b.feed(frames.Hello(8, "a", "env-sensor", ""))
    assert again == []  # same session: no new DeviceOnline
    [welcome] = b.out()
    assert isinstance(welcome, frames.Welcome)
    assert (welcome.seq, welcome.session_id) == (8, first.session_id)
    # A HELLO as another client_id ends this session and starts another.
    events = b.feed(frames.Hello(9, "b", "env-sensor", ""))
    assert kinds(events) == [DeviceOffline, DeviceOnline]
    assert offline(events).reason is CloseReason.REHELLO
    assert offline(events).info.client_id == "a"
    assert info_of(events).client_id == "b"
    [welcome_b] = b.out()
    assert isinstance(welcome_b, frames.Welcome)
    assert welcome_b.session_id != first.session_id


# ---- staying alive -------------------------------------------------------------------------


def test_silence_for_misses_times_interval_closes_a_tcp_link() -> None:
    b = Bench(heartbeat=10, misses=3)
    b.hello()
    assert b.advance(29.999) == []
    events = b.advance(0.001)
    assert kinds(events) == [DeviceOffline, CloseLink]
    assert offline(events).reason is CloseReason.SILENT
    assert closed(events).reason is CloseReason.SILENT
    assert b.out() == []  # silence is closed without an ERROR
    assert b.totals.links_closed == {CloseReason.SILENT: 1}


def test_any_valid_frame_keeps_the_session_alive() -> None:
    # A DATA every 0.3 s for 3.5 s with heartbeat 1 s x 2 misses: never silent.
    b = Bench(heartbeat=1, misses=2)
    b.hello()
    seq = 0
    while b.clock.now < 103.5:
        b.run_until(b.clock.now + 0.3)
        b.feed(frames.Data(seq, ENV_DATA))
        seq += 1
    assert b.state is SessionState.ONLINE
    assert DeviceOffline not in kinds(b.events)
    assert len(telemetry(b.events)) == seq
    # Each kind of valid frame counts: PING, PONG, a stray ACK, an ERROR.
    for message in (frames.Ping(1), frames.Pong(2), frames.Ack(3, 0), frames.Error(0, 6, "")):
        b.run_until(b.clock.now + 1.9)
        b.feed(message)
    assert b.state is SessionState.ONLINE
    # Then silence: offline exactly misses x heartbeat after the last frame.
    last = b.core.last_seen
    events = b.run_until(last + 2.0 + 0.01)
    assert offline(events).reason is CloseReason.SILENT


def test_frames_that_are_not_valid_messages_are_no_sign_of_life() -> None:
    b = Bench(heartbeat=1, misses=1)
    b.hello()
    b.clock.advance(0.9)
    b.feed_raw(frames.encode_frame(b"\x21\x00"))  # an ACK without its status: MALFORMED
    assert b.errors() == [ErrorCode.MALFORMED]
    assert b.advance(0.11) != []  # silent: 1 s after the HELLO, not after the bad frame


def test_serial_silence_ends_the_session_and_keeps_the_link() -> None:
    b = Bench("serial", heartbeat=5, misses=2)
    b.hello("s-1")
    events = b.advance(10.0)
    assert kinds(events) == [DeviceOffline]
    assert offline(events).reason is CloseReason.SILENT
    assert b.state is SessionState.AWAITING_HELLO
    assert b.core.deadline is None  # nothing to wait for: no HELLO deadline on serial
    assert b.totals.links_closed == {}
    # Until it says HELLO again, DATA is NOT_REGISTERED; then it has a new session.
    b.feed(frames.Data(1, ENV_DATA))
    assert b.errors() == [ErrorCode.NOT_REGISTERED]
    welcome = b.hello("s-1")
    assert str(welcome.session_id) != offline(events).info.session


def test_ping_is_answered_with_pong_of_the_same_seq_before_and_after_hello() -> None:
    b = Bench()
    assert b.feed(frames.Ping(77)) == []
    assert b.out() == [frames.Pong(77)]
    b.hello()
    b.feed(frames.Ping(200), frames.Ping(3))
    assert b.out() == [frames.Pong(200), frames.Pong(3)]


# ---- refusals ------------------------------------------------------------------------------


def test_wrong_token_is_auth_failed_and_closed() -> None:
    b = Bench(token="s3cret")
    events = b.feed(frames.Hello(1, "intruder", "env-sensor", "wrong"))
    assert events == [CloseLink(CloseReason.AUTH_FAILED)]
    assert b.errors() == [ErrorCode.AUTH_FAILED]
    assert b.totals.auth_failed == 1
    assert b.totals.links_closed == {CloseReason.AUTH_FAILED: 1}
    assert b.feed(frames.Hello(2, "intruder", "env-sensor", "s3cret")) == []  # closed for good


def test_per_client_token_wins_over_the_shared_one() -> None:
    tokens: dict[str, Any] = {"token": "all", "tokens": {"special": "mine"}}
    refused = Bench(**tokens)
    refused.feed(frames.Hello(1, "special", "env-sensor", "all"))
    assert refused.errors() == [ErrorCode.AUTH_FAILED]
    Bench(**tokens).hello("special", token="mine")
    Bench(**tokens).hello("other", token="all")


def test_anything_but_hello_or_ping_before_hello_is_not_registered() -> None:
    b = Bench()
    for message in (frames.Data(1, ENV_DATA), frames.Ack(1, 0), frames.Pong(1)):
        assert b.feed(message) == []
        assert b.errors() == [ErrorCode.NOT_REGISTERED]
    b.hello()  # the link stays usable


def test_bad_hello_names_the_field_and_keeps_the_link() -> None:
    b = Bench()
    bad = bytes([0x01, 1, 5]) + b"a b c" + bytes([3]) + b"env" + b"\x00"
    assert b.feed_raw(frames.encode_frame(bad)) == []
    [error] = b.out()
    assert isinstance(error, frames.Error)
    assert error.code == ErrorCode.BAD_HELLO
    assert "client_id" in error.reason
    b.hello()


def test_unknown_type_and_malformed_keep_the_link() -> None:
    b = Bench()
    b.hello()
    b.feed_raw(frames.encode_frame(b"\x55\x01"))
    assert b.errors() == [ErrorCode.UNKNOWN_TYPE]
    b.feed(frames.Command(1, b"\x01"), frames.Welcome(1, uuid.uuid4(), 1))  # not from devices
    assert b.errors() == [ErrorCode.UNKNOWN_TYPE, ErrorCode.UNKNOWN_TYPE]
    b.feed(frames.Data(2, b"\x00"))  # an env-sensor DATA body is 5 bytes
    b.feed_raw(frames.encode_frame(b"\x21\x00") + frames.encode_frame(b"\x03\x01\xff"))
    b.feed_raw(frames.encode_frame(b"\x10"))  # no seq
    assert b.errors() == [ErrorCode.MALFORMED] * 4
    events = b.feed(frames.Data(3, ENV_DATA))
    assert [t.data for t in telemetry(events)] == [ENV_VALUES]
    assert b.totals.errors_sent == {ErrorCode.UNKNOWN_TYPE: 3, ErrorCode.MALFORMED: 4}
    assert b.core.counters.errors_sent == 7


def test_serial_rate_limit_drops_with_one_error_a_second() -> None:
    # Serial has no flow control: over the rate, frames are dropped and counted
    # (TCP slows the device down instead: test_core_limits.py).
    b = Bench("serial", max_frames_per_second=5, rate_burst=5)
    b.hello()  # the HELLO took one token: 4 left
    events = b.feed(*[frames.Data(i, ENV_DATA) for i in range(10)])
    assert len(telemetry(events)) == 4
    assert b.errors() == [ErrorCode.RATE_LIMITED]  # one ERROR for six dropped frames
    assert b.core.counters.rate_limited == 6
    b.clock.advance(0.5)  # 2.5 tokens back; still within the second: no second ERROR
    events = b.feed(*[frames.Data(i, ENV_DATA) for i in range(4)])
    assert len(telemetry(events)) == 2
    assert b.errors() == []
    b.clock.advance(0.6)
    events = b.feed(*[frames.Data(i, ENV_DATA) for i in range(5)])
    assert len(telemetry(events)) == 3
    assert b.errors() == [ErrorCode.RATE_LIMITED]
    assert b.core.counters.rate_limited == 6 + 2 + 2
    assert b.state is SessionState.ONLINE  # dropped, never closed
    b.clock.advance(100.0)  # the bucket holds at most the burst
    assert len(telemetry(b.feed(*[frames.Data(i, ENV_DATA) for i in range(8)]))) == 5


def test_refusal_from_the_registry_is_rate_limited_and_closed() -> None:
    b = Bench(admit=lambda info: f"gateway full: max_devices=2 ({info.client_id})")
    events = b.feed(frames.Hello(1, "c", "env-sensor", ""))
    assert events == [CloseLink(CloseReason.REFUSED)]
    [error] = b.out()
    assert isinstance(error, frames.Error)
    assert (error.code, error.reason) == (ErrorCode.RATE_LIMITED, "gateway full: max_devices=2 (c)")


# ---- noise -----------------------------------------------------------------------------------


def test_tcp_garbage_rule_closes_on_bytes_or_crc_errors() -> None:
    b = Bench(garbage_bytes=4096)
    b.hello("noisy")
    events = b.feed_raw(bytes(range(0x00, 0xA0)) * 40)  # no header anywhere
    assert kinds(events) == [DeviceOffline, CloseLink]
    assert offline(events).reason is CloseReason.GARBAGE
    assert b.totals.garbage_closed == 1
    assert b.core.counters.skipped_bytes >= 4096

    b = Bench(garbage_crc_errors=10)
    b.hello("bitrot")
    bad = bytearray(frames.encode_frame(frames.Data(1, ENV_DATA).encode()))
    bad[-1] ^= 0xFF
    assert closed(b.feed_raw(bytes(bad) * 12)).reason is CloseReason.GARBAGE
    assert b.core.counters.crc_errors == 10  # counted up to the close, then nothing more


def test_garbage_window_forgets_old_noise() -> None:
    b = Bench(garbage_bytes=1000, garbage_window=60.0)
    b.hello()
    noise = bytes(range(0x00, 0xA0)) * 6  # 960 bytes, no header
    b.feed_raw(noise)
    b.clock.advance(61.0)
    b.feed(frames.Ping(1))  # alive, so not silent
    assert CloseLink not in kinds(b.feed_raw(noise))
    assert CloseLink in kinds(b.feed_raw(noise[:50]))


def test_serial_noise_is_counted_never_closed() -> None:
    b = Bench("serial", garbage_bytes=100, garbage_crc_errors=2)
    b.hello()
    bad = bytearray(frames.encode_frame(frames.Data(1, ENV_DATA).encode()))
    bad[-1] ^= 0xFF
    events = b.feed_raw(
        bytes(range(0x00, 0xA0)) * 10 + bytes(bad) * 5 + wire(frames.Data(2, ENV_DATA))
    )
    assert kinds(events) == [DeviceTelemetry]
    assert b.core.counters.skipped_bytes >= 1600
    assert b.core.counters.crc_errors == 5
    assert b.totals.garbage_closed == 0


def test_frame_timeout_releases_a_stalled_partial_frame() -> None:
    b = Bench("serial", serial_frame_timeout=0.2)
    b.hello()
    good = wire(frames.Data(7, ENV_DATA))
    # A header whose length byte was corrupted to 250 swallows the good frame behind it.
    assert b.feed_raw(b"\xaa\xaa\xfa" + good) == []
    assert b.core.deadline == b.clock.now + 0.2
    assert b.advance(0.2) == []  # the timeout passes strictly after the deadline
    events = b.advance(0.001)
    assert [t.seq for t in telemetry(events)] == [7]
    assert b.core.counters.frame_timeouts == 1


# ---- fixed identity --------------------------------------------------------------------------


def fixed_bench(**config: Any) -> Bench:
    session = SessionConfig(**config)
    port = SerialPortConfig("/dev/ttyX", client_id="boiler-1", protocol="env-sensor")
    return Bench(policy=LinkPolicy.serial(session, port), **config)


def test_fixed_identity_is_online_from_its_first_valid_frame() -> None:
    b = fixed_bench()
    assert b.feed_raw(b"\x00\x01garbage") == []  # noise is no frame
    events = b.feed(frames.Data(4, ENV_DATA))
    assert kinds(events) == [DeviceOnline, DeviceTelemetry]
    info = info_of(events)
    assert (info.client_id, info.protocol, info.transport) == ("boiler-1", "env-sensor", "serial")
    assert b.out() == []  # no WELCOME: the device never said HELLO


def test_fixed_identity_ping_brings_it_online_too() -> None:
    b = fixed_bench()
    assert kinds(b.feed(frames.Ping(5))) == [DeviceOnline]
    assert b.out() == [frames.Pong(5)]


def test_fixed_identity_hello_is_welcomed_as_the_configured_device() -> None:
    b = fixed_bench(token="s3cret")
    events = b.feed(frames.Hello(2, "someone-else", "relay-4", "no-token"))  # trusted as wired
    assert (info_of(events).client_id, info_of(events).protocol) == ("boiler-1", "env-sensor")
    [welcome] = b.out()
    assert isinstance(welcome, frames.Welcome)


def test_fixed_identity_comes_back_after_silence_with_a_new_session() -> None:
    b = fixed_bench(heartbeat=1, misses=1)
    first = info_of(b.feed(frames.Data(1, ENV_DATA)))
    assert kinds(b.advance(1.0)) == [DeviceOffline]
    events = b.feed(frames.Data(2, ENV_DATA))
    assert kinds(events) == [DeviceOnline, DeviceTelemetry]
    assert info_of(events).session != first.session


# ---- close -----------------------------------------------------------------------------------


def test_close_sends_the_error_first_and_happens_once() -> None:
    b = Bench()
    b.hello()
    events = b.core.close(CloseReason.REPLACED, ErrorCode.REPLACED, "taken over")
    assert kinds(events) == [DeviceOffline, CloseLink]
    assert b.errors() == [ErrorCode.REPLACED]
    assert b.core.close(CloseReason.LOST) == []
    assert b.feed(frames.Data(1, ENV_DATA)) == []
    assert b.out() == []
    assert b.core.expire(1e9) == []
    assert b.totals.links_closed == {CloseReason.REPLACED: 1}


def test_telemetry_carries_wall_time_and_the_monotonic_receive_time() -> None:
    b = Bench()
    b.hello()
    b.clock.advance(2.25)
    [t] = telemetry(b.feed(frames.Data(42, ENV_DATA)))
    assert (t.client_id, t.protocol, t.seq, t.data) == ("dev-1", "env-sensor", 42, ENV_VALUES)
    assert t.ts == b.clock.wall_ms()
    assert t.received == b.clock.now
    assert b.core.counters.frames_in == 2
    assert b.core.counters.bytes_in == len(wire(frames.Hello(7, "dev-1", "env-sensor", ""))) + 12
