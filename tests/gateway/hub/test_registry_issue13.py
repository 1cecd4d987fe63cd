"""The registry's issue-13 fields: labels (config and API, field by field), why
and since when a device is offline, per-device counters, and ``restore``
(docs/api.md §3.2)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from devices import DeviceInfo, Transport
from gateway.hub.ranges import RangeTable
from gateway.hub.registry import LABEL_FIELDS, RESTART, Registry, check_labels
from gateway.storage import DeviceRecord, TelemetryRecord


def info(client_id: str, session: str = "s1") -> DeviceInfo:
    return DeviceInfo(client_id, "env-sensor", Transport.TCP, "127.0.0.1:1", session, 1000)


def test_offline_since_and_reason_follow_the_sessions() -> None:
    r = Registry()
    r.online(info("a"), 1000)
    entry = r.entry("a")
    assert entry is not None
    assert (entry["offline_since"], entry["offline_reason"]) == (None, None)
    r.offline(info("a"), 5000, "silent")
    entry = r.entry("a")
    assert entry is not None
    assert (entry["offline_since"], entry["offline_reason"]) == (5000, "silent")
    state = r.get("a")
    assert state is not None
    assert state.record(9000).offline_reason == "silent"  # kept across a restart
    r.online(info("a", "s2"), 7000)
    entry = r.entry("a")
    assert entry is not None
    assert (entry["offline_since"], entry["offline_reason"]) == (None, None)
    assert r.entry("nope") is None


def test_a_loaded_device_is_offline_since_it_was_last_seen() -> None:
    r = Registry()
    r.load(
        [
            DeviceRecord("a", "env-sensor", "tcp", 100, 5000, "shutdown"),
            DeviceRecord("b", "env-sensor", "tcp", 100, 6000),  # an older data dir: no reason
        ],
        {},
    )
    a, b = r.entry("a"), r.entry("b")
    assert a is not None
    assert b is not None
    assert (a["offline_since"], a["offline_reason"]) == (5000, "shutdown")
    assert (b["offline_since"], b["offline_reason"]) == (6000, RESTART)


def test_counters_count_telemetry_and_out_of_range() -> None:
    r = Registry(ranges=RangeTable())
    r.online(info("a"), 1000)
    ok = TelemetryRecord(1, "a", "env-sensor", 2000, 0, {"battery_pct": 50})
    bad = TelemetryRecord(2, "a", "env-sensor", 3000, 1, {"battery_pct": 255})
    r.telemetry(ok)
    r.telemetry(bad, out_of_range=True)
    entry = r.entry("a")
    assert entry is not None
    assert entry["counters"] == {"telemetry": 2, "out_of_range": 1, "commands": 0, "nacks": 0}
    assert entry["last"]["out_of_range"] == ["battery_pct"]


# Few distinct values: what is checked is which source wins, not the text.
labels_value = st.one_of(st.none(), st.sampled_from(["a", "bb", "North bed"]))
channels_value = st.one_of(st.none(), st.lists(st.sampled_from(["", "pump", "fan"]), max_size=4))
labels = st.fixed_dictionaries(
    {}, optional={"name": labels_value, "location": labels_value, "channels": channels_value}
)


@given(config=labels, api=labels)
def test_api_labels_win_field_by_field_over_the_config(
    config: dict[str, object], api: dict[str, object]
) -> None:
    r = Registry({"a": check_labels(config)})
    r.api_labels["a"] = check_labels(api)
    merged = r.labels("a")
    assert set(merged) == set(LABEL_FIELDS)
    for key in LABEL_FIELDS:
        expected = api.get(key) if api.get(key) is not None else config.get(key)
        assert merged[key] == expected
    assert r.labels("unknown") == dict.fromkeys(LABEL_FIELDS)


def test_restore_brings_back_a_forgotten_state_unless_the_device_came_back() -> None:
    r = Registry()
    r.online(info("a"), 1000)
    r.offline(info("a"), 2000, "closed")
    state = r.get("a")
    assert state is not None
    assert r.forget("a")
    r.restore(state)
    assert r.get("a") is state
    assert [e["device"] for e in r.listing()] == ["a"]
    assert r.forget("a")
    newer = r.online(info("a", "s9"), 3000)
    r.restore(state)
    assert r.get("a") is newer
    assert r.online_count() == 1


@pytest.mark.parametrize(
    "bad",
    [
        {"name": ""},
        {"location": "x" * 101},
        {"channels": ["x" * 41]},
        {"channels": "a"},
        {"other": 1},
        "labels",
    ],
)
def test_check_labels_refuses(bad: object) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - each message is checked in test_labels.py
        check_labels(bad)
