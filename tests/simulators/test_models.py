"""The simulated devices' behaviour, driven by a fake clock: every time and byte is exact."""

from __future__ import annotations

import itertools
import uuid
from typing import Any, TypeVar

import pytest

from frames import (
    Ack,
    Command,
    Data,
    Error,
    ErrorCode,
    Hello,
    Message,
    Ping,
    Pong,
    Welcome,
    get_protocol,
)
from simulators import (
    AckStatus,
    DeviceModel,
    EnvSensorModel,
    ModelState,
    Relay4Model,
    model_class,
)

M = TypeVar("M", bound=DeviceModel)
ENV = get_protocol("env-sensor")
RELAY = get_protocol("relay-4")
SESSION = uuid.UUID("12345678-1234-4234-8234-123456789abc")


def welcome(heartbeat: int = 30) -> Welcome:
    return Welcome(0, SESSION, heartbeat)


def online(model: M, now: float = 0.0, heartbeat: int = 30) -> M:
    """Bring a model online at ``now``: HELLO out, WELCOME in."""
    [hello] = model.connect(now)
    assert isinstance(hello, Hello)
    assert model.on_message(welcome(heartbeat), now) == []
    return model


def run_clock(
    model: DeviceModel, start: float, end: float, step: float
) -> list[tuple[float, Message]]:
    """Tick the model at start, start+step, ... end; return (time, message) for all it sent."""
    sent: list[tuple[float, Message]] = []
    k = 0
    while (now := round(start + k * step, 9)) <= end:
        sent += [(now, m) for m in model.tick(now)]
        k += 1
    return sent


def data_values(sent: list[tuple[float, Message]]) -> list[dict[str, Any]]:
    """The telemetry JSON of every DATA sent."""
    return [ENV.decode_data(m.body) for _, m in sent if isinstance(m, Data)]


def data_times(sent: list[tuple[float, Message]]) -> list[float]:
    return [t for t, m in sent if isinstance(m, Data)]


def command(seq: int, protocol_command: dict[str, object], protocol: str = "env-sensor") -> Command:
    return Command(seq, get_protocol(protocol).encode_command(protocol_command))


# ---- session ---------------------------------------------------------------------------------


def test_connect_sends_hello_and_nothing_more_until_welcome() -> None:
    m = EnvSensorModel("env-1", token="s3cret", rate=2.0, seed=1)
    assert m.connect(0.0) == [Hello(0, "env-1", "env-sensor", "s3cret")]
    assert m.state is ModelState.HELLO_SENT
    assert run_clock(m, 0.0, 4.5, 0.5) == []
    # The HELLO may have been lost: it is repeated after hello_retry (5 s).
    assert m.tick(5.0) == [Hello(1, "env-1", "env-sensor", "s3cret")]
    assert m.on_message(welcome(heartbeat=15), 6.0) == []
    assert m.online
    assert m.session_id == SESSION
    assert m.heartbeat == 15.0
    assert m.counters.hellos_sent == 2
    assert m.counters.sessions == 1


def test_data_goes_out_at_the_rate_exactly_from_the_welcome() -> None:
    m = online(EnvSensorModel("env-1", rate=2.0, seed=1), now=10.0)
    sent = run_clock(m, 10.0, 13.0, 0.25)
    assert data_times(sent) == [10.0, 10.5, 11.0, 11.5, 12.0, 12.5, 13.0]
    assert [m.seq for _, m in sent] == [1, 2, 3, 4, 5, 6, 7]  # HELLO took seq 0
    assert m.counters.data_sent == 7


def test_a_rate_whose_interval_is_not_exact_in_binary_still_keeps_time() -> None:
    # 10 Hz: 0.1 s steps accumulate float error; the model must not skip a beat.
    m = online(Relay4Model("relay-1", rate=10.0, seed=1))
    assert len(data_times(run_clock(m, 0.0, 3.0, 0.1))) == 31


def test_next_deadline_tells_the_driver_when_to_tick() -> None:
    m = online(EnvSensorModel("env-1", rate=0.5, seed=1), now=3.0)
    assert m.next_deadline() == 3.0
    m.tick(3.0)
    assert m.next_deadline() == 5.0
    assert m.tick(4.9) == []
    assert len(m.tick(5.0)) == 1


def test_a_stalled_clock_skips_missed_data_instead_of_bursting() -> None:
    m = online(EnvSensorModel("env-1", rate=1.0, seed=1))
    m.tick(0.0)
    assert len(m.tick(60.0)) == 1
    assert m.next_deadline() == 61.0


def test_fixed_serial_device_needs_no_hello() -> None:
    m = Relay4Model("relay-1", rate=1.0, seed=1, hello=False)
    assert m.connect(5.0) == []
    assert m.online
    assert m.tick(5.0) == [Data(0, RELAY.encode_data({"channels": [False] * 4}))]


def test_answers_ping_with_pong_of_the_same_seq() -> None:
    m = online(EnvSensorModel("env-1", seed=1))
    assert m.on_message(Ping(200), 1.0) == [Pong(200)]
    assert m.counters.pongs_sent == 1
    # A PONG (the answer to our own PING) needs no reply.
    assert m.on_message(Pong(3), 1.0) == []


def test_heartbeat_ping_only_when_nothing_was_sent_for_the_interval() -> None:
    # One DATA every 100 s, heartbeat 10 s: PINGs fill the silence, DATA resets it.
    m = online(EnvSensorModel("env-1", rate=0.01, seed=1), heartbeat=10)
    sent = run_clock(m, 0.0, 125.0, 0.5)
    pings = [t for t, msg in sent if isinstance(msg, Ping)]
    assert data_times(sent) == [0.0, 100.0]
    assert pings == [10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 110.0, 120.0]
    assert m.counters.pings_sent == 11
    # Answering the gateway counts as sending: the next PING waits a full interval.
    assert m.on_message(Ping(1), 125.0) == [Pong(1)]
    assert [type(x) for x in m.tick(134.5)] == []
    assert [type(x) for x in m.tick(135.0)] == [Ping]


def test_sequence_numbers_wrap_after_255() -> None:
    m = online(Relay4Model("relay-1", rate=1.0, seed=1))
    seqs = [msg.seq for _, msg in run_clock(m, 0.0, 300.0, 1.0)]
    assert seqs[:3] == [1, 2, 3]
    assert seqs[254:258] == [255, 0, 1, 2]


def test_fatal_error_stops_the_device_for_good() -> None:
    m = online(EnvSensorModel("env-1", seed=1))
    err = Error(0, ErrorCode.REPLACED, "another session took over")
    assert m.on_message(err, 1.0) == []
    assert m.stopped
    assert m.last_error == err
    assert m.counters.errors_received == 1
    assert m.tick(10.0) == []
    assert m.on_message(Ping(1), 10.0) == []
    m.disconnected()
    assert m.connect(20.0) == []
    assert m.stopped


def test_non_fatal_errors_are_recorded_and_not_registered_means_hello_again() -> None:
    m = online(EnvSensorModel("env-1", token="t", seed=1))
    assert m.on_message(Error(0, ErrorCode.RATE_LIMITED, "slow down"), 1.0) == []
    assert m.online
    [hello] = m.on_message(Error(0, ErrorCode.NOT_REGISTERED, "who are you?"), 2.0)
    assert isinstance(hello, Hello)
    assert hello.client_id == "env-1"
    assert hello.token == "t"
    assert m.state is ModelState.HELLO_SENT
    assert m.counters.errors_received == 2
    assert m.on_message(welcome(), 2.5) == []
    assert m.counters.sessions == 2


def test_reconnect_is_counted_and_starts_a_new_session() -> None:
    m = online(EnvSensorModel("env-1", seed=1))
    m.tick(0.0)
    m.disconnected()
    assert m.state is ModelState.OFFLINE
    assert m.tick(5.0) == []
    assert m.next_deadline() is None
    [hello] = m.connect(7.0)
    assert isinstance(hello, Hello)
    assert m.counters.reconnects == 1
    m.on_message(welcome(), 7.0)
    assert data_times(run_clock(m, 7.0, 8.0, 0.5)) == [7.0, 8.0]


# ---- env-sensor ------------------------------------------------------------------------------


def test_env_sensor_telemetry_is_plausible_slow_and_seeded() -> None:
    def readings(seed: int) -> list[dict[str, Any]]:
        m = online(EnvSensorModel("env-1", rate=1.0, seed=seed))
        return data_values(run_clock(m, 0.0, 600.0, 1.0))

    values = readings(7)
    assert len(values) == 601
    temps = [v["temperature_c"] for v in values]
    hums = [v["humidity_pct"] for v in values]
    assert all(15.0 < t < 27.0 for t in temps)
    assert all(30.0 < h < 60.0 for h in hums)
    # It drifts, slowly: it changes, but never jumps.
    assert len(set(temps)) > 50
    assert max(abs(a - b) for a, b in itertools.pairwise(temps)) < 0.2
    assert readings(7) == values
    assert readings(8) != values


def test_env_sensor_battery_drains() -> None:
    m = online(EnvSensorModel("env-1", rate=1.0, seed=3))
    battery = [v["battery_pct"] for v in data_values(run_clock(m, 0.0, 20_000.0, 10.0))]
    assert battery[-1] < battery[0]
    assert battery == sorted(battery, reverse=True)


def test_set_interval_acks_and_changes_the_data_interval() -> None:
    m = online(EnvSensorModel("env-1", rate=1.0, seed=1))
    m.tick(0.0)
    cmd = command(42, {"name": "set_interval", "args": {"seconds": 5}})
    assert m.on_message(cmd, 1.5) == [Ack(42, AckStatus.OK)]
    assert m.interval == 5.0
    assert data_times(run_clock(m, 1.5, 17.0, 0.5)) == [6.5, 11.5, 16.5]
    assert m.counters.acks_sent == 1


def test_set_interval_zero_is_refused() -> None:
    m = online(EnvSensorModel("env-1", rate=1.0, seed=1))
    # The gateway refuses to encode 0 s; a raw body still reaches a device.
    cmd = Command(3, bytes.fromhex("010000"))
    assert m.on_message(cmd, 1.0) == [Ack(3, AckStatus.BAD_ARGUMENT)]
    assert m.interval == 1.0
    assert m.counters.nacks_sent == 1


def test_reboot_acks_then_goes_quiet_and_restarts_its_sequence_and_interval() -> None:
    m = online(EnvSensorModel("env-1", rate=1.0, seed=1, reboot_time=2.0))
    m.on_message(command(1, {"name": "set_interval", "args": {"seconds": 10}}), 0.0)
    run_clock(m, 0.0, 12.0, 1.0)
    assert m.on_message(command(9, {"name": "reboot"}), 12.0) == [Ack(9, AckStatus.OK)]
    assert m.state is ModelState.REBOOTING
    assert m.online  # the gateway's session is untouched
    assert m.on_message(Ping(5), 13.0) == []  # deaf while booting
    assert m.tick(13.9) == []
    first = m.tick(14.0)
    assert [(type(x), x.seq) for x in first] == [(Data, 0)]
    assert data_times(run_clock(m, 14.5, 16.0, 0.5)) == [15.0, 16.0]  # back to 1 Hz
    assert m.counters.reboots == 1


def test_unknown_or_malformed_commands_are_nacked() -> None:
    m = online(EnvSensorModel("env-1", seed=1))
    assert m.on_message(Command(4, bytes.fromhex("09")), 1.0) == [Ack(4, AckStatus.UNKNOWN_COMMAND)]
    assert m.on_message(Command(5, b""), 1.0) == [Ack(5, AckStatus.UNKNOWN_COMMAND)]
    # set_interval with its u16 cut short.
    assert m.on_message(Command(6, bytes.fromhex("0100")), 1.0) == [Ack(6, AckStatus.BAD_ARGUMENT)]
    assert m.counters.nacks_sent == 3
    assert m.counters.acks_sent == 0


# ---- relay-4 ---------------------------------------------------------------------------------


def test_relay_set_acks_and_reports_the_new_state_at_once() -> None:
    m = online(Relay4Model("relay-1", rate=1.0, seed=1))
    m.tick(0.0)
    cmd = command(77, {"name": "set", "args": {"channel": 2, "on": True}}, "relay-4")
    ack, data = m.on_message(cmd, 0.3)
    assert ack == Ack(77, AckStatus.OK)
    assert isinstance(data, Data)
    assert RELAY.decode_data(data.body) == {"channels": [False, False, True, False]}
    # The periodic report keeps the new state.
    [later] = m.tick(1.0)
    assert isinstance(later, Data)
    assert RELAY.decode_data(later.body) == {"channels": [False, False, True, False]}
    off = command(78, {"name": "set", "args": {"channel": 2, "on": False}}, "relay-4")
    _, data = m.on_message(off, 1.2)
    assert isinstance(data, Data)
    assert RELAY.decode_data(data.body) == {"channels": [False] * 4}


def test_relay_bad_channel_is_nacked_with_a_device_error_and_changes_nothing() -> None:
    m = online(Relay4Model("relay-1", rate=1.0, seed=1))
    # channel 7, on: a raw body, since the gateway's encoder refuses it.
    assert m.on_message(Command(12, bytes.fromhex("010701")), 1.0) == [
        Ack(12, AckStatus.BAD_ARGUMENT)
    ]
    assert m.channels == [False] * 4
    assert m.on_message(Command(13, bytes.fromhex("02")), 1.0) == [
        Ack(13, AckStatus.UNKNOWN_COMMAND)
    ]


# ---- construction ----------------------------------------------------------------------------


def test_models_are_looked_up_by_protocol_and_refuse_bad_settings() -> None:
    assert model_class("env-sensor") is EnvSensorModel
    assert model_class("relay-4") is Relay4Model
    with pytest.raises(ValueError, match="known: env-sensor, relay-4"):
        model_class("thermostat")
    with pytest.raises(ValueError, match="client_id"):
        EnvSensorModel("bad id with spaces")
    with pytest.raises(ValueError, match="rate"):
        Relay4Model("relay-1", rate=0)
