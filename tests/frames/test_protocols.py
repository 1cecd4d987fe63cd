"""Device protocols: env-sensor, relay-4, hex carriage, and user-registered ones."""

from __future__ import annotations

from typing import Any

import pytest
from construct import Int8ub, Int16ub, Struct
from hypothesis import given
from hypothesis import strategies as st

from frames import (
    CommandError,
    CommandSchema,
    ConstructProtocol,
    ErrorCode,
    HexProtocol,
    RemoteProtocolError,
    get_protocol,
    known_protocols,
    register_protocol,
)

ENV = get_protocol("env-sensor")
RELAY = get_protocol("relay-4")


def test_builtins_are_registered() -> None:
    assert {"env-sensor", "relay-4"} <= set(known_protocols())


def test_env_sensor_data_example() -> None:
    assert ENV.decode_data(bytes.fromhex("085911c661")) == {
        "temperature_c": 21.37,
        "humidity_pct": 45.5,
        "battery_pct": 97,
    }


def test_env_sensor_negative_temperature() -> None:
    assert ENV.decode_data(bytes.fromhex("fc18000000"))["temperature_c"] == -10.0


@pytest.mark.parametrize(
    ("command", "body"),
    [
        ({"name": "set_interval", "args": {"seconds": 10}}, "01000a"),
        ({"name": "reboot"}, "02"),
        ({"name": "reboot", "args": {}}, "02"),
        ({"hex": "ff00"}, "ff00"),
    ],
)
def test_env_sensor_commands(command: dict[str, Any], body: str) -> None:
    assert ENV.encode_command(command).hex() == body


def test_relay_data_and_command() -> None:
    assert RELAY.decode_data(b"\x09") == {"channels": [True, False, False, True]}
    command = {"name": "set", "args": {"channel": 2, "on": True}}
    assert RELAY.encode_command(command).hex() == "010201"
    assert RELAY.decode_command(bytes.fromhex("010201")) == command


@pytest.mark.parametrize(
    ("protocol", "command", "field"),
    [
        ("relay-4", {"name": "set", "args": {"channel": 7, "on": True}}, "args.channel"),
        ("relay-4", {"name": "set", "args": {"channel": -1, "on": True}}, "args.channel"),
        ("relay-4", {"name": "set", "args": {"channel": 1}}, "args.on"),
        ("relay-4", {"name": "set", "args": {"channel": 1, "on": 1}}, "args.on"),
        ("relay-4", {"name": "set", "args": {"channel": "1", "on": True}}, "args.channel"),
        ("relay-4", {"name": "set", "args": {"channel": 1, "on": True, "x": 1}}, "args.x"),
        ("relay-4", {"name": "toggle"}, "name"),
        ("relay-4", {"args": {}}, "name"),
        ("relay-4", {"name": "set", "args": [1, True]}, "args"),
        ("env-sensor", {"name": "set_interval", "args": {"seconds": 70000}}, "args.seconds"),
        ("env-sensor", {"name": "set_interval", "args": {"seconds": True}}, "args.seconds"),
        ("env-sensor", {"name": "set_interval", "args": {"seconds": 0}}, "args.seconds"),
        ("env-sensor", {"name": "set_interval", "args": {"seconds": 1.5}}, "args.seconds"),
        ("env-sensor", {"name": "set_interval"}, "args.seconds"),
        ("env-sensor", {"name": "reboot", "extra": 1}, "extra"),
        ("env-sensor", {"hex": "zz"}, "hex"),
        ("env-sensor", {"hex": 12}, "hex"),
        ("env-sensor", {"hex": "00", "name": "reboot"}, "name"),
        ("mystery", {"name": "go"}, "name"),
    ],
)
def test_invalid_commands_are_clear_errors(
    protocol: str, command: dict[str, Any], field: str
) -> None:
    with pytest.raises(CommandError) as info:
        get_protocol(protocol).encode_command(command)
    assert info.value.field == field
    assert str(info.value)


def test_command_must_be_an_object() -> None:
    with pytest.raises(CommandError):
        ENV.encode_command([1, 2])  # type: ignore[arg-type]


def test_raw_hex_over_253_bytes_is_refused() -> None:
    with pytest.raises(CommandError, match="at most 253"):
        ENV.encode_command({"hex": "00" * 254})


@pytest.mark.parametrize("body", ["", "0859", "085911c66100"])
def test_wrong_size_data_is_malformed(body: str) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        ENV.decode_data(bytes.fromhex(body))
    assert info.value.code is ErrorCode.MALFORMED
    assert info.value.field is not None
    assert info.value.field.startswith("data")


def test_decode_command_names_the_bad_argument() -> None:
    with pytest.raises(RemoteProtocolError) as info:
        RELAY.decode_command(bytes.fromhex("0107"))
    assert info.value.field == "args.channel"


def test_relay_bits_above_channel_3_are_malformed() -> None:
    with pytest.raises(RemoteProtocolError):
        RELAY.decode_data(b"\x10")


def test_unknown_protocol_carries_hex() -> None:
    proto = get_protocol("vendor.x-1")
    assert isinstance(proto, HexProtocol)
    assert proto.decode_data(bytes.fromhex("0a0b")) == {"hex": "0a0b"}
    assert proto.encode_command({"hex": "0a0b"}) == b"\x0a\x0b"


@given(st.integers(-32768, 32767), st.integers(0, 65535), st.integers(0, 255))
def test_env_sensor_data_round_trips(t: int, h: int, b: int) -> None:
    values = {"temperature_c": t / 100, "humidity_pct": h / 100, "battery_pct": b}
    assert ENV.decode_data(ENV.encode_data(values)) == values


@given(st.lists(st.booleans(), min_size=4, max_size=4))
def test_relay_data_round_trips(channels: list[bool]) -> None:
    assert RELAY.decode_data(RELAY.encode_data({"channels": channels})) == {"channels": channels}


@given(st.binary(max_size=253))
def test_any_data_body_decodes_or_is_malformed(body: bytes) -> None:
    for proto in (ENV, RELAY):
        try:
            proto.decode_data(body)
        except RemoteProtocolError as e:
            assert e.code is ErrorCode.MALFORMED


def test_user_protocol_registration() -> None:
    soil = ConstructProtocol(
        "test-soil",
        data=Struct("moisture" / Int16ub, "probe" / Int8ub),
        commands={"calibrate": CommandSchema(0x05, Struct("point" / Int8ub))},
    )
    register_protocol(soil)
    try:
        proto = get_protocol("test-soil")
        assert proto.decode_data(b"\x01\x00\x02") == {"moisture": 256, "probe": 2}
        assert proto.encode_command({"name": "calibrate", "args": {"point": 3}}) == b"\x05\x03"
        with pytest.raises(ValueError, match="already registered"):
            register_protocol(soil)
        register_protocol(soil, replace=True)
    finally:
        from frames import protocols

        protocols._registry.pop("test-soil", None)


def test_protocol_definitions_are_checked() -> None:
    with pytest.raises(ValueError, match="name"):
        ConstructProtocol("Bad Name", data=Struct())
    with pytest.raises(ValueError, match="same opcode"):
        ConstructProtocol(
            "dup", data=Struct(), commands={"a": CommandSchema(1), "b": CommandSchema(1)}
        )
