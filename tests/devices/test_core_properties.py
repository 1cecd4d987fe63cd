"""Property tests of the session core: any bytes, any chunking, any timing.

Whatever a device sends, in whatever pieces and at whatever pace, the core
never raises, writes only valid messages, and its state, deadline, events and
counters stay consistent with one another.
"""

from __future__ import annotations

import uuid
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import event as note_case
from hypothesis import strategies as st

import frames
from devices import (
    CloseLink,
    CommandDone,
    DeviceOffline,
    DeviceOnline,
    DeviceTelemetry,
    LinkPolicy,
    SerialPortConfig,
    SessionConfig,
    SessionState,
)
from tests.devices.core_bench import Bench
from tests.devices.support import ENV_DATA, parse

# Messages a device might send, valid and not, so that every branch is reached.
messages = st.one_of(
    st.builds(
        frames.Hello,
        st.integers(0, 255),
        st.sampled_from(["dev-1", "dev-2"]),
        st.sampled_from(["env-sensor", "relay-4", "unknown-proto"]),
        st.sampled_from(["", "s3cret"]),
    ),
    st.builds(frames.Data, st.integers(0, 255), st.sampled_from([ENV_DATA, b"", b"\x01"])),
    st.builds(frames.Ping, st.integers(0, 255)),
    st.builds(frames.Pong, st.integers(0, 255)),
    st.builds(frames.Ack, st.integers(0, 255), st.integers(0, 255)),
    st.builds(frames.Command, st.integers(0, 255), st.binary(max_size=8)),
    st.builds(
        frames.Welcome, st.integers(0, 255), st.just(uuid.UUID(int=5, version=4)), st.just(1)
    ),
    st.builds(frames.Error, st.integers(0, 255), st.integers(0, 255), st.just("x")),
)
framed = messages.map(lambda m: frames.encode_frame(m.encode()))
pieces = st.one_of(
    framed,
    framed,
    framed,
    st.binary(max_size=300).map(frames.encode_frame),  # any payload in a good frame
    st.binary(max_size=40),  # noise, partial frames, bad CRCs
)
HELLO = frames.Hello(1, "dev-1", "env-sensor", "")
# One step: bytes (cut anywhere), a pause, or a command from the hub.
steps = st.lists(
    st.one_of(
        st.tuples(st.just("bytes"), pieces, st.integers(0, 400)),
        st.tuples(st.just("wait"), st.floats(0, 40), st.just(0)),
        st.tuples(st.just("command"), st.binary(max_size=4), st.just(0)),
    ),
    max_size=60,
)


def bench_for(kind: str) -> Bench:
    config: dict[str, Any] = {
        "hello_timeout": 5.0,
        "heartbeat": 3,
        "misses": 2,
        "ack_timeout": 4.0,
        "max_frames_per_second": 20.0,
        "rate_burst": 10.0,
        "max_inflight_commands": 3,
        "garbage_bytes": 600,
        "garbage_crc_errors": 5,
        "tokens": {"dev-2": "s3cret"},
    }
    if kind == "fixed":
        port = SerialPortConfig("/dev/ttyX", client_id="dev-9", protocol="env-sensor")
        return Bench(policy=LinkPolicy.serial(SessionConfig(**config), port), **config)
    return Bench(kind, **config)


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None, max_examples=300)
@given(st.sampled_from(["tcp", "serial", "fixed"]), st.booleans(), steps)
def test_any_input_keeps_the_core_consistent(
    kind: str, hello_first: bool, script: list[tuple[str, object, object]]
) -> None:
    b = bench_for(kind)
    if hello_first:  # most interesting paths start online
        script = [("bytes", frames.encode_frame(HELLO.encode()), 0), *script]
    core = b.core
    online = ever_online = False
    closes = 0
    sent_seqs: set[int] = set()
    for action, value, cut in script:
        if action == "bytes":
            assert isinstance(value, bytes)
            assert isinstance(cut, int)
            cut = min(cut, len(value))
            events = b.feed_raw(value[:cut]) + b.feed_raw(value[cut:])
        elif action == "wait":
            assert isinstance(value, float)
            events = b.run_until(b.clock.now + value)
        else:
            assert isinstance(value, bytes)
            events = []
            if core.state is SessionState.ONLINE and core.commands.has_room:
                sent_seqs.add(core.send_command(value, b.clock.now))
        for event in events:
            assert closes == 0, "nothing follows CloseLink"
            if isinstance(event, DeviceOnline):
                assert not online
                online = ever_online = True
            elif isinstance(event, DeviceOffline):
                assert online
                online = False
            elif isinstance(event, DeviceTelemetry):
                assert online
                assert core.info is not None
                assert event.client_id == core.info.client_id
            elif isinstance(event, CommandDone):
                assert event.seq in sent_seqs
                sent_seqs.discard(event.seq)
            elif isinstance(event, CloseLink):
                closes += 1
        # The core's own view agrees with the events it emitted.
        assert online == (core.state is SessionState.ONLINE)
        if online:
            assert core.info is not None
            assert core.session_id is not None
            assert core.info.session == str(core.session_id)
        if core.state is SessionState.CLOSED:
            assert closes == 1
            assert core.deadline is None
            assert not sent_seqs
        else:
            assert closes == 0
            deadline = core.deadline
            assert deadline is None or deadline > b.clock.now - 1.0
        assert set(core.commands.pending()) == sent_seqs
        assert core.commands.inflight <= 3
        assert core.decoder.buffered < frames.max_frame_size()
        # Whatever it wrote is a valid message.
        for message in parse(core.data_to_send()):
            assert isinstance(message, frames.Pong | frames.Welcome | frames.Error | frames.Command)
    # Seen with --hypothesis-show-statistics: the script reaches every state.
    note_case(f"{kind}: ended {core.state}, {'online once' if ever_online else 'never online'}")
    counters = core.counters
    assert min(counters.frames_in, counters.crc_errors, counters.rate_limited) >= 0
    assert counters.frames_out >= counters.errors_sent
    if kind != "tcp":
        assert b.totals.garbage_closed == 0
        assert core.state is not SessionState.CLOSED or b.totals.links_closed.keys() <= {
            "auth_failed",
            "refused",
        }
