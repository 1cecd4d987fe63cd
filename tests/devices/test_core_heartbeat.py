"""Heartbeat per device, per serial port and per protocol, on the sans-IO core and a fake clock.

Which wins (docs/configuration.md, ``[devices.heartbeat_overrides]``): the
device's own, then the serial port's, then the protocol's, then the global
``heartbeat``. The WELCOME carries the chosen interval and the session goes
silent after ``misses`` x that interval, not the global one.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import frames
from devices import CloseReason, DeviceOffline, LinkPolicy, SerialPortConfig, SessionConfig
from devices.config import HeartbeatOverrides
from tests.devices.core_bench import Bench, kinds, offline
from tests.devices.support import ENV_DATA

OVERRIDES = HeartbeatOverrides(protocols={"env-sensor": 300}, devices={"sensor-7": 600})


def test_a_battery_sensor_reporting_every_two_minutes_does_not_flap() -> None:
    # The case: global 30 s x 3 misses = 90 s, the sensor reports every 120 s.
    b = Bench(heartbeat=30, misses=3, heartbeat_overrides=OVERRIDES)
    welcome = b.hello("battery-1", "env-sensor")
    assert welcome.heartbeat == 300
    for seq in range(10):  # 20 minutes of readings, 2 minutes apart
        assert b.run_until(b.clock.now + 120.0) == []
        b.feed(frames.Data(seq, ENV_DATA))
    assert DeviceOffline not in kinds(b.events)
    # Silent for misses x 300 s after its last reading: offline then, not before.
    last = b.core.last_seen
    assert b.run_until(last + 899.0) == []
    events = b.run_until(last + 900.01)
    assert offline(events).reason is CloseReason.SILENT


def test_without_an_override_the_same_sensor_flaps_at_90_s() -> None:
    # The failure the override fixes: the test above, with no override.
    b = Bench(heartbeat=30, misses=3)
    assert b.hello("battery-1", "env-sensor").heartbeat == 30
    events = b.run_until(b.clock.now + 120.0)
    assert offline(events).reason is CloseReason.SILENT


def test_the_device_override_wins_over_the_protocol_one() -> None:
    b = Bench(heartbeat=30, misses=2, heartbeat_overrides=OVERRIDES)
    assert b.hello("sensor-7", "env-sensor").heartbeat == 600
    assert b.core.deadline == b.clock.now + 1200.0


def test_other_protocols_keep_the_global_heartbeat() -> None:
    b = Bench(heartbeat=30, misses=3, heartbeat_overrides=OVERRIDES)
    assert b.hello("relay-1", "relay-4").heartbeat == 30
    assert b.core.deadline == b.clock.now + 90.0


def _serial_bench(port_heartbeat: int | None, **config: Any) -> Bench:
    session = SessionConfig(**config)
    port = SerialPortConfig("/dev/ttyUSB9", heartbeat=port_heartbeat)
    return Bench("serial", policy=LinkPolicy.serial(session, port), **config)


def test_a_serial_port_heartbeat_wins_over_the_protocol_one() -> None:
    b = _serial_bench(120, heartbeat=30, heartbeat_overrides=OVERRIDES)
    assert b.hello("s-1", "env-sensor").heartbeat == 120


def test_the_device_override_wins_over_the_serial_port() -> None:
    b = _serial_bench(120, heartbeat=30, heartbeat_overrides=OVERRIDES)
    assert b.hello("sensor-7", "env-sensor").heartbeat == 600


def test_a_serial_port_without_a_heartbeat_takes_the_protocol_one() -> None:
    b = _serial_bench(None, heartbeat=30, heartbeat_overrides=OVERRIDES)
    assert b.hello("s-1", "env-sensor").heartbeat == 300


def test_a_new_hello_as_another_device_takes_that_devices_heartbeat() -> None:
    b = Bench("serial", heartbeat=30, misses=1, heartbeat_overrides=OVERRIDES)
    assert b.hello("sensor-7", "env-sensor").heartbeat == 600
    welcome = b.feed(frames.Hello(8, "relay-1", "relay-4", ""))
    assert [m.heartbeat for m in b.out() if isinstance(m, frames.Welcome)] == [30]
    assert welcome  # sensor-7 went offline, relay-1 online
    # relay-1 goes silent after 30 s, not 600 s.
    events = b.run_until(b.clock.now + 30.01)
    assert offline(events).info.client_id == "relay-1"


def test_a_repeated_hello_is_answered_with_the_same_heartbeat() -> None:
    b = Bench(heartbeat=30, heartbeat_overrides=OVERRIDES)
    b.hello("sensor-7", "env-sensor")
    b.feed(frames.Hello(9, "sensor-7", "env-sensor", ""))
    [welcome] = b.out()
    assert isinstance(welcome, frames.Welcome)
    assert welcome.heartbeat == 600


@pytest.mark.parametrize("bad", [0, 65536, -5])
def test_overrides_outside_1_to_65535_are_refused(bad: int) -> None:
    with pytest.raises(ValueError, match=r"devices\.d-1 must be 1\.\.65535"):
        HeartbeatOverrides(devices={"d-1": bad})
    with pytest.raises(ValueError, match=r"must be 1\.\.65535"):
        SerialPortConfig("/dev/ttyUSB0", heartbeat=bad)


def test_override_keys_no_hello_could_carry_are_refused() -> None:
    with pytest.raises(ValueError, match="'Env Sensor' is not a protocol name"):
        HeartbeatOverrides(protocols={"Env Sensor": 300})
    with pytest.raises(ValueError, match="'sensor 7' is not a client_id"):
        HeartbeatOverrides(devices={"sensor 7": 300})


def test_serial_cli_form_takes_a_heartbeat() -> None:
    port = SerialPortConfig.parse("/dev/ttyUSB0,heartbeat=300")
    assert port.heartbeat == 300
    with pytest.raises(ValueError, match="heartbeat must be an integer"):
        SerialPortConfig.parse("/dev/ttyUSB0,heartbeat=5m")


beats = st.integers(1, 0xFFFF)


@given(
    glob=beats,
    proto=st.none() | beats,
    port=st.none() | beats,
    device=st.none() | beats,
)
def test_which_wins_device_then_port_then_protocol_then_global(
    glob: int, proto: int | None, port: int | None, device: int | None
) -> None:
    overrides = HeartbeatOverrides(
        protocols={} if proto is None else {"env-sensor": proto},
        devices={} if device is None else {"d-1": device},
    )
    config = SessionConfig(heartbeat=glob, heartbeat_overrides=overrides)
    expected = next(v for v in (device, port, proto, glob) if v is not None)
    assert config.heartbeat_for("d-1", "env-sensor", port) == expected
    # Another device and protocol see only the port's and the global value.
    assert config.heartbeat_for("d-2", "relay-4", port) == (glob if port is None else port)


@given(
    heartbeat=beats,
    baud=st.integers(1, 4_000_000),
    url=st.sampled_from(["/dev/ttyUSB0", "socket://127.0.0.1:4000", "/dev/serial/by-id/x"]),
)
def test_serial_cli_form_round_trips_the_heartbeat(heartbeat: int, baud: int, url: str) -> None:
    port = SerialPortConfig.parse(f"{url},baud={baud},heartbeat={heartbeat}")
    assert (port.url, port.baud, port.heartbeat) == (url, baud, heartbeat)
    assert LinkPolicy.serial(SessionConfig(), port).heartbeat == heartbeat
