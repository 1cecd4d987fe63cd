"""Out-of-range readings: flagged, never changed (docs/api.md §3.1 ``out_of_range``),
with each protocol's own ranges and the config file's overrides
(docs/configuration.md ``[protocols."NAME"]``)."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from construct import Int8ub, Struct
from hypothesis import given
from hypothesis import strategies as st

import frames
from frames import ConstructProtocol, Integer, get_protocol
from gateway.config import ConfigError, build_config
from gateway.hub.messages import telemetry_message, telemetry_text
from gateway.hub.ranges import RangeTable
from gateway.storage import TelemetryRecord
from simulators.models import AckStatus
from tests.gateway.conftest import VIEWER, AppFactory
from tests.gateway.support import dash, device, runtime_of
from tests.support.wait import wait_until

VIEW = {"Authorization": f"Bearer {VIEWER}"}
# 21.37 degC, 45.5 %, battery 255 %: the battery (docs/protocols.md layout).
FULL_BATTERY = bytes.fromhex("085911c6ff")
IN_RANGE = bytes.fromhex("085911c661")  # battery 97 %


def test_env_sensor_declares_its_ranges_and_relay_4_none() -> None:
    table = RangeTable()
    assert table.ranges("env-sensor") == {
        "battery_pct": (0, 100),
        "humidity_pct": (0, 100),
        "temperature_c": (-40, 85),
    }
    assert table.ranges("relay-4") == {}
    assert table.check("relay-4", {"channels": [True, False]}) is None
    assert table.check("no-such-protocol", {"battery_pct": 900}) is None


def test_overrides_replace_a_protocols_range_field_by_field() -> None:
    table = RangeTable({"env-sensor": {"battery_pct": (0, 50)}, "meter": {"kwh": (0, 10)}})
    assert table.ranges("env-sensor")["battery_pct"] == (0, 50)
    assert table.ranges("env-sensor")["temperature_c"] == (-40, 85)
    assert table.check("env-sensor", {"battery_pct": 97, "temperature_c": 20}) == ("battery_pct",)
    # An unknown protocol may be given ranges too (its DATA is hex unless a module decodes it).
    assert table.check("meter", {"kwh": 11.5}) == ("kwh",)


def test_bounds_are_included_and_only_numbers_are_checked() -> None:
    table = RangeTable({"p": {"a": (0, 10)}}, protocols=[])
    assert table.check("p", {"a": 0}) is None
    assert table.check("p", {"a": 10.0}) is None
    assert table.check("p", {"a": 10.01}) == ("a",)
    assert table.check("p", {"a": math.nan}) == ("a",)  # a NaN reading is no reading
    for not_a_number in (True, "11", None, [11], {"x": 11}):
        assert table.check("p", {"a": not_a_number}) is None
    assert table.check("p", {}) is None


number = st.one_of(
    st.integers(-(10**6), 10**6), st.floats(allow_nan=False, allow_infinity=False, width=32)
)


@given(
    ranges=st.dictionaries(
        st.sampled_from(["a", "b", "c", "d"]),
        st.tuples(number, number).map(sorted).map(tuple),
        max_size=4,
    ),
    data=st.dictionaries(
        st.sampled_from(["a", "b", "c", "d", "e"]),
        st.one_of(number, st.booleans(), st.none(), st.sampled_from(["", "11", "x"])),
        max_size=5,
    ),
)
def test_check_flags_exactly_the_numbers_outside_their_range(
    ranges: dict[str, tuple[float, float]], data: dict[str, Any]
) -> None:
    table = RangeTable({"p": ranges}, protocols=[])
    expected = tuple(
        sorted(
            field
            for field, (low, high) in ranges.items()
            if type(data.get(field)) in (int, float) and not low <= data[field] <= high
        )
    )
    assert table.check("p", data) == (expected or None)


def test_the_message_carries_out_of_range_only_when_some_value_is() -> None:
    rec = TelemetryRecord(5, "s", "env-sensor", 1, 2, {"battery_pct": 255})
    data_json = json.dumps(rec.data, separators=(",", ":"))
    plain = json.loads(telemetry_text(rec, data_json))
    assert "out_of_range" not in plain
    assert plain == telemetry_message(rec)
    flagged = json.loads(telemetry_text(rec, data_json, ("battery_pct",)))
    assert flagged["out_of_range"] == ["battery_pct"]
    assert flagged == telemetry_message(rec, ["battery_pct"])
    assert flagged["data"] == {"battery_pct": 255}  # kept as sent


def test_config_ranges_are_checked() -> None:
    config = build_config(
        {"protocols": {"modules": [], "env-sensor": {"ranges": {"battery_pct": [0, 100.5]}}}},
        environ={},
    )
    assert config.protocols == []
    assert config.hub_config().ranges == {"env-sensor": {"battery_pct": (0.0, 100.5)}}
    assert build_config({"protocols": ["json"]}, environ={}).protocols == ["json"]
    for bad, words in [
        ({"env-sensor": {"ranges": {"battery_pct": [5, 1]}}}, "must not be above high"),
        ({"env-sensor": {"ranges": {"battery_pct": [1]}}}, r"expected \[low, high\]"),
        ({"env-sensor": {"ranges": {"battery_pct": [True, 3]}}}, r"expected \[low, high\]"),
        ({"env-sensor": {"ranges": {"battery_pct": ["0", 3]}}}, r"expected \[low, high\]"),
        ({"env-sensor": {"colour": 1}}, r"unknown key 'protocols\.env-sensor\.colour'"),
        ({"env-sensor": 5}, r"expected a \[protocols\.env-sensor\] table"),
    ]:
        with pytest.raises(ConfigError, match=words):
            build_config({"protocols": bad}, environ={})
    with pytest.raises(ConfigError, match="unknown key 'protocol_settings'"):
        build_config({"protocol_settings": {}}, environ={})


async def test_live_replayed_listed_and_counted(make_app: AppFactory) -> None:
    client = await make_app()
    rt = runtime_of(client)
    d = await dash(client)
    await d.request({"op": "subscribe", "all": True}, "subscribed")
    dev = await device(rt, "b1")
    dev.send(frames.Data(0, IN_RANGE))
    dev.send(frames.Data(1, FULL_BATTERY))
    first = await d.expect("telemetry", seq=0)
    second = await d.expect("telemetry", seq=1)
    assert "out_of_range" not in first
    assert second["out_of_range"] == ["battery_pct"]
    assert second["data"]["battery_pct"] == 255
    entry = await (await client.get("/api/devices/b1", headers=VIEW)).json()
    assert entry["last"]["out_of_range"] == ["battery_pct"]
    assert entry["counters"]["telemetry"] == 2
    assert entry["counters"]["out_of_range"] == 1
    late = await dash(client)
    await late.request({"op": "subscribe", "device": "b1", "since": 0}, "subscribed")
    replayed = [await late.expect("telemetry") for _ in range(2)]
    assert [m.get("out_of_range") for m in replayed] == [None, ["battery_pct"]]


async def test_configured_ranges_apply_end_to_end(make_app: AppFactory) -> None:
    client = await make_app(protocols={"env-sensor": {"ranges": {"battery_pct": [0, 50]}}})
    rt = runtime_of(client)
    d = await dash(client)
    await d.request({"op": "subscribe", "device": "c1"}, "subscribed")
    dev = await device(rt, "c1")
    dev.send(frames.Data(0, IN_RANGE))
    assert (await d.expect("telemetry"))["out_of_range"] == ["battery_pct"]
    await wait_until(lambda: rt.hub.devices["c1"].out_of_range_count == 1, "counted", timeout=10)


def test_ack_codes_name_the_simulated_devices_statuses() -> None:
    for name in ("env-sensor", "relay-4"):
        codes = get_protocol(name).ack_codes
        for status in AckStatus:
            if status is AckStatus.OK:
                assert 0 not in codes
            else:
                assert codes[int(status)] == status.name.lower().replace("_", " ")


def test_a_protocol_checks_its_declarations() -> None:
    data = Struct("v" / Integer(Int8ub, 0, 255))
    with pytest.raises(ValueError, match="low <= high"):
        ConstructProtocol("x", data, ranges={"v": (5, 1)})
    with pytest.raises(ValueError, match=r"1\.\.255"):
        ConstructProtocol("x", data, ack_codes={0: "ok"})
    made = ConstructProtocol("x", data, ranges={"v": (0, 9)}, ack_codes={3: "busy"})
    assert (made.ranges, made.ack_codes) == ({"v": (0, 9)}, {3: "busy"})
