"""gateway.hub.registry: every device the gateway knows, online or not, and its latest value.

Pins the registry's rules: a device is online with its newest session and
an older session's offline is ignored (takeover, docs/api.md §3.1
``presence``); ``online_count`` follows every sequence of sessions (a
property test against a model); ``online_of`` is sorted and filtered by
protocol; ``load`` fills offline devices from ``DeviceRecord``s and their
latest telemetry; ``listing`` has the keys of docs/api.md §3.2 ``devices``
sorted by id, and ``page`` cuts it into pages that add up to it whatever
comes and goes; ``stale`` and ``forget`` let offline devices go (never an
online one); ``record`` is what is kept across restarts.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from devices import DeviceInfo, Transport
from gateway.hub import DeviceState, Registry, telemetry_message
from gateway.storage import DeviceRecord, TelemetryRecord

# The keys of one entry of {"op":"devices"} (docs/api.md §3.2).
LISTING_KEYS = {
    "device",
    "protocol",
    "online",
    "transport",
    "peer",
    "session",
    "connected_at",
    "last_seen",
    "last",
    "labels",
    "offline_since",
    "offline_reason",
    "counters",
}
NO_LABELS = {"name": None, "location": None, "channels": None}


def info(
    client_id: str,
    session: str = "s1",
    protocol: str = "env-sensor",
    transport: Transport = Transport.TCP,
    connected_at: int = 1000,
) -> DeviceInfo:
    return DeviceInfo(client_id, protocol, transport, "127.0.0.1:50080", session, connected_at)


def rec(device: str, offset: int, ts: int, protocol: str = "env-sensor") -> TelemetryRecord:
    return TelemetryRecord(offset, device, protocol, ts, offset % 256, {"n": offset})


# ---- sessions ----------------------------------------------------------------------------------


def test_a_new_device_comes_online() -> None:
    r = Registry()
    state = r.online(info("a", connected_at=900), 1000)
    assert r.get("a") is state
    assert "a" in r
    assert len(r) == 1
    assert (state.device, state.protocol, state.online) == ("a", "env-sensor", True)
    assert (state.transport, state.peer, state.session) == ("tcp", "127.0.0.1:50080", "s1")
    assert state.connected_at == 900
    assert state.first_seen == 1000
    assert state.last_seen == 1000
    assert state.last is None
    assert r.online_count() == 1


def test_offline_of_the_current_session() -> None:
    r = Registry()
    r.online(info("a"), 1000)
    gone = r.offline(info("a"), 2000)
    assert gone is r.get("a")
    assert gone is not None
    assert not gone.online
    assert gone.last_seen == 2000
    assert gone.session == "s1"  # an offline device's session describes its last one
    assert gone.first_seen == 1000
    assert r.online_count() == 0
    assert "a" in r  # known, though offline


def test_an_older_sessions_offline_is_ignored() -> None:
    r = Registry()
    r.online(info("a", session="old"), 1000)
    r.online(info("a", session="new", connected_at=1500), 1500)  # takeover
    assert r.online_count() == 1
    assert r.offline(info("a", session="old"), 2000) is None
    state = r.get("a")
    assert state is not None
    assert state.online
    assert state.session == "new"
    assert state.connected_at == 1500
    assert state.last_seen == 1500
    assert state.first_seen == 1000
    assert r.online_count() == 1


def test_a_second_offline_of_the_same_session_is_ignored() -> None:
    r = Registry()
    r.online(info("a"), 1000)
    assert r.offline(info("a"), 2000) is not None
    assert r.offline(info("a"), 3000) is None
    assert r.online_count() == 0
    state = r.get("a")
    assert state is not None
    assert state.last_seen == 2000


def test_offline_of_an_unknown_device_is_ignored() -> None:
    r = Registry()
    assert r.offline(info("ghost"), 1000) is None
    assert "ghost" not in r
    assert r.online_count() == 0


def test_online_again_after_offline() -> None:
    r = Registry()
    r.online(info("a", session="s1"), 1000)
    r.offline(info("a", session="s1"), 2000)
    state = r.online(info("a", session="s2", transport=Transport.SERIAL), 3000)
    assert state.online
    assert state.session == "s2"
    assert state.transport == "serial"
    assert state.first_seen == 1000
    assert r.online_count() == 1
    assert len(r) == 1


def test_a_device_may_change_protocol_between_sessions() -> None:
    r = Registry()
    r.online(info("a", protocol="env-sensor"), 1000)
    r.online(info("a", session="s2", protocol="relay-4"), 2000)
    assert r.online_of("env-sensor") == []
    assert r.online_of("relay-4") == ["a"]
    assert r.online_count() == 1


def test_online_of_is_sorted_and_filtered_by_protocol() -> None:
    r = Registry()
    for name in ("c", "a", "d", "b"):
        r.online(info(name), 1000)
    r.online(info("e", protocol="relay-4"), 1000)
    r.offline(info("d"), 2000)
    assert r.online_of("env-sensor") == ["a", "b", "c"]
    assert r.online_of("relay-4") == ["e"]
    assert r.online_of("other") == []


def test_telemetry_is_the_latest_value_of_a_known_device() -> None:
    r = Registry()
    r.online(info("a"), 1000)
    first, second = rec("a", 5, 1100), rec("a", 9, 1200)
    r.telemetry(first)
    r.telemetry(second)
    state = r.get("a")
    assert state is not None
    assert state.last == second
    assert state.last_seen == 1200


def test_telemetry_of_an_unknown_device_adds_nothing() -> None:
    r = Registry()
    r.telemetry(rec("ghost", 1, 1000))
    assert "ghost" not in r
    assert len(r) == 0


# ---- load --------------------------------------------------------------------------------------


def test_load_fills_offline_devices_with_their_latest_telemetry() -> None:
    r = Registry()
    latest = {"a": rec("a", 40, 5000), "ghost": rec("ghost", 41, 5001)}
    r.load(
        [
            DeviceRecord("a", "env-sensor", "tcp", 100, 5000),
            DeviceRecord("b", "relay-4", "serial", 200, 300),
        ],
        latest,
    )
    assert len(r) == 2
    assert "ghost" not in r  # telemetry of a device with no record is not a device
    a, b = r.get("a"), r.get("b")
    assert a is not None
    assert b is not None
    assert (a.protocol, a.transport, a.first_seen, a.last_seen) == ("env-sensor", "tcp", 100, 5000)
    assert (b.protocol, b.transport, b.first_seen, b.last_seen) == ("relay-4", "serial", 200, 300)
    assert a.last == latest["a"]
    assert b.last is None
    assert not a.online
    assert not b.online
    assert (a.session, a.peer, a.connected_at) == (None, None, None)
    assert r.online_count() == 0
    assert r.online_of("env-sensor") == []


def test_a_loaded_device_comes_online_keeping_its_first_seen() -> None:
    r = Registry()
    r.load([DeviceRecord("a", "env-sensor", "tcp", 100, 5000)], {})
    state = r.online(info("a"), 9000)
    assert state.first_seen == 100
    assert state.last_seen == 9000
    assert r.online_count() == 1


# ---- listing and record ------------------------------------------------------------------------


def test_listing_has_the_documented_keys_sorted_by_id() -> None:
    r = Registry()
    r.online(info("b", session="sb", connected_at=1716200000000), 1716200000000)
    r.online(info("a"), 1000)
    last = rec("b", 27, 1716200012358)
    r.telemetry(last)
    r.offline(info("a"), 2000)
    listing = r.listing()
    assert [e["device"] for e in listing] == ["a", "b"]
    for entry in listing:
        assert set(entry) == LISTING_KEYS
    assert listing[0] == {
        "device": "a",
        "protocol": "env-sensor",
        "online": False,
        "transport": "tcp",
        "peer": "127.0.0.1:50080",
        "session": "s1",
        "connected_at": 1000,
        "last_seen": 2000,
        "last": None,
        "labels": NO_LABELS,
        "offline_since": 2000,
        "offline_reason": "restart",  # offline() was told no reason
        "counters": {"telemetry": 0, "out_of_range": 0, "commands": 0, "nacks": 0},
    }
    assert listing[1] == {
        "device": "b",
        "protocol": "env-sensor",
        "online": True,
        "transport": "tcp",
        "peer": "127.0.0.1:50080",
        "session": "sb",
        "connected_at": 1716200000000,
        "last_seen": 1716200012358,
        "last": telemetry_message(last),
        "labels": NO_LABELS,
        "offline_since": None,
        "offline_reason": None,
        "counters": {"telemetry": 1, "out_of_range": 0, "commands": 0, "nacks": 0},
    }
    assert listing[1]["last"]["op"] == "telemetry"


def test_an_empty_registry_lists_nothing() -> None:
    assert Registry().listing() == []
    assert Registry().page(None, 10) == ([], None)


def names(page: tuple[list[dict[str, Any]], str | None]) -> list[str]:
    return [e["device"] for e in page[0]]


def test_pages_follow_each_other_by_id() -> None:
    r = Registry()
    r.load([DeviceRecord(n, "env-sensor", "tcp", 1, 2) for n in ("c", "a", "e")], {})
    r.online(info("b"), 10)
    r.online(info("d"), 10)
    first = r.page(None, 2)
    assert (names(first), first[1]) == (["a", "b"], "b")
    second = r.page("b", 2)
    assert (names(second), second[1]) == (["c", "d"], "d")
    third = r.page("d", 2)
    assert (names(third), third[1]) == (["e"], None)
    assert r.page("e", 2) == ([], None)
    assert names(r.page("bb", 1)) == ["c"]  # after: any id, known or not
    assert r.page(None, 5)[1] is None  # exactly the last: no next page
    assert r.page(None, 5)[0] == r.listing()


def test_stale_lists_offline_devices_last_seen_before_a_time() -> None:
    r = Registry()
    r.load([DeviceRecord("old", "env-sensor", "tcp", 1, 100)], {})
    r.online(info("up"), 50)
    r.online(info("recent"), 50)
    r.offline(info("recent"), 500)
    assert r.stale(200) == ["old"]
    assert sorted(r.stale(501)) == ["old", "recent"]


def test_forget_lets_an_offline_device_go_never_an_online_one() -> None:
    r = Registry()
    r.load([DeviceRecord("a", "env-sensor", "tcp", 1, 100)], {"a": rec("a", 1, 100)})
    r.online(info("b"), 50)
    assert r.forget("a")
    assert not r.forget("a")  # already gone
    assert not r.forget("b")  # online
    assert not r.forget("ghost")
    assert "a" not in r
    assert [e["device"] for e in r.listing()] == ["b"]
    assert r.page(None, 10)[0] == r.listing()
    r.offline(info("b"), 60)
    assert r.forget("b")
    assert len(r) == 0
    assert r.online_count() == 0


@given(
    ops=st.lists(
        st.tuples(st.booleans(), st.sampled_from(["a", "b", "c", "d", "e", "f"])), max_size=40
    ),
    size=st.integers(1, 4),
)
def test_pages_add_up_to_the_listing_after_any_comings_and_forgettings(
    ops: list[tuple[bool, str]], size: int
) -> None:
    """(True, id): the device comes and goes; (False, id): it is forgotten."""
    r = Registry()
    for now, (come, device) in enumerate(ops, start=1):
        if come:
            r.online(info(device), now)
            r.offline(info(device), now)
        else:
            r.forget(device)
    pages: list[dict[str, object]] = []
    after: str | None = None
    while True:
        page, after = r.page(after, size)
        assert len(page) <= size
        pages += page
        if after is None:
            break
    assert pages == r.listing()
    assert [e["device"] for e in pages] == sorted(r.devices)


def test_record_is_what_is_kept_across_restarts() -> None:
    r = Registry()
    r.online(info("a", transport=Transport.SERIAL), 1000)
    r.offline(info("a", transport=Transport.SERIAL), 4000)
    state = r.get("a")
    assert state is not None
    assert state.record(9999) == DeviceRecord("a", "env-sensor", "serial", 1000, 4000)


def test_record_fills_what_is_unknown_with_now() -> None:
    state = DeviceState("a", "relay-4")
    assert state.record(777) == DeviceRecord("a", "relay-4", "tcp", 777, 777)


def test_record_after_load_round_trips() -> None:
    r = Registry()
    kept = DeviceRecord("a", "relay-4", "serial", 100, 5000)
    r.load([kept], {})
    state = r.get("a")
    assert state is not None
    assert state.record(9999) == kept


# ---- online_count over random sequences --------------------------------------------------------

events = st.lists(
    st.tuples(st.booleans(), st.sampled_from(["a", "b", "c"]), st.sampled_from(["s1", "s2", "s3"])),
    max_size=50,
)


@given(events=events)
def test_online_count_follows_any_sequence_of_sessions(events: list[tuple[bool, str, str]]) -> None:
    """(True, device, session): online; (False, ...): offline. Model: the newest session rules."""
    r = Registry()
    session: dict[str, str] = {}
    online: dict[str, bool] = {}
    for now, (up, device, sess) in enumerate(events, start=1):
        if up:
            r.online(info(device, session=sess), now)
            session[device] = sess
            online[device] = True
        else:
            gone = r.offline(info(device, session=sess), now)
            current = online.get(device, False) and session[device] == sess
            assert (gone is not None) == current
            if current:
                online[device] = False
        expected = sum(online.values())
        assert r.online_count() == expected
        assert r.online_count() == sum(s.online for s in r.devices.values())
        assert r.online_of("env-sensor") == sorted(d for d, up_now in online.items() if up_now)
    for device, sess in session.items():
        state = r.get(device)
        assert state is not None
        assert state.session == sess
        assert state.online == online[device]
