"""The routing core without sockets: queues, drops, lagged notices, routing, replay seam."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import time
import weakref
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from devices import (
    CloseReason,
    CommandHandle,
    CommandResult,
    CommandStatus,
    DeviceInfo,
    DeviceOffline,
    DeviceOnline,
    DeviceTelemetry,
    Transport,
)
from gateway.hub import (
    Dashboard,
    Hub,
    HubConfig,
    LocalEngine,
    Role,
    StorageUnavailable,
    StoreError,
    dumps,
    now_ms,
    telemetry_message,
    telemetry_text,
)
from gateway.storage import DeviceRecord, MemoryStorage, SQLiteStorage, Storage, TelemetryRecord


def info(client_id: str, protocol: str = "env-sensor", session: str = "s1") -> DeviceInfo:
    return DeviceInfo(client_id, protocol, Transport.TCP, "127.0.0.1:1", session, 0)


def telemetry(client_id: str, seq: int, protocol: str = "env-sensor") -> DeviceTelemetry:
    return DeviceTelemetry(client_id, protocol, seq, {"n": seq}, int(time.time() * 1000), 0.0)


def drain(d: Dashboard) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    while batch := d.take(1000):
        out += [json.loads(t) for t in batch]
    return out


@pytest.fixture
async def hub() -> AsyncIterator[Hub]:
    storage = MemoryStorage()
    await storage.open()
    h = Hub(LocalEngine(storage), HubConfig(queue_size=8))
    await h.start()
    yield h
    await h.stop()
    await storage.close()


async def test_full_queue_keeps_the_oldest_telemetry_and_every_control_message(
    hub: Hub,
) -> None:
    d = hub.connect_dashboard(Role.VIEWER, "x")
    await hub.handle(d, {"op": "subscribe", "all": True})
    hub.device_event(DeviceOnline(info("a")))
    for i in range(20):
        hub.device_event(telemetry("a", i))
    hub.device_event(DeviceOffline(info("a"), CloseReason.SILENT))
    dropped_metric = hub.metrics.telemetry_dropped._value.get()
    got = drain(d)
    ops = [m["op"] for m in got]
    # What was queued comes first, in order, control messages too; the notice
    # is where the gap is, after the 8 kept and the presence queued while parked.
    assert ops == ["subscribed", "presence", *["telemetry"] * 8, "presence", "lagged"]
    assert [m["seq"] for m in got if m["op"] == "telemetry"] == list(range(8))  # the 8 oldest
    lagged = got[-1]
    assert lagged["dropped"] == 12 == dropped_metric
    stored = [r.offset for r in await hub.engine.history(0, limit=100)]
    assert lagged["resume_from"] == stored[8]  # the first one not sent
    assert d.telemetry_queued == 0
    assert not d.parked


async def test_since_resume_from_minus_one_recovers_exactly_what_was_missed(hub: Hub) -> None:
    """docs/api.md §3.1: the missed run is consecutive, so a replay from it has no duplicate."""
    d = hub.connect_dashboard(Role.VIEWER, "x")
    await hub.handle(d, {"op": "subscribe", "device": "a"})
    hub.device_event(DeviceOnline(info("a")))
    hub.device_event(DeviceOnline(info("b")))
    sent: list[int] = []
    notices: list[dict[str, Any]] = []
    for i in range(40):
        hub.device_event(telemetry("a", i))
        hub.device_event(telemetry("b", i))  # not subscribed: never counted
        if i % 10 == 9:  # the writer gets a word in now and then, reading 3 at a time
            for text in d.take(3):
                msg = json.loads(text)
                if msg["op"] == "telemetry":
                    sent.append(msg["offset"])
                elif msg["op"] == "lagged":
                    notices.append(msg)
    rest = drain(d)
    sent += [m["offset"] for m in rest if m["op"] == "telemetry"]
    notices += [m for m in rest if m["op"] == "lagged"]
    assert len(notices) >= 2  # parked, rejoined, parked again
    of_a = [r.offset for r in await hub.engine.history(0, device="a", limit=1000)]
    missed = sorted(set(of_a) - set(sent))
    assert sum(n["dropped"] for n in notices) == len(missed)
    # Each notice: since = resume_from - 1 replays its K missed ones first, then
    # telemetry the dashboard already has (live after the notice), never one it had before.
    recovered: list[int] = []
    for n in notices:
        e = hub.connect_dashboard(Role.VIEWER, "again")
        e.limit = 1000  # room for the whole replay without a writer
        await hub.handle(e, {"op": "subscribe", "device": "a", "since": n["resume_from"] - 1})
        replayed = [m["offset"] for m in drain(e) if m["op"] == "telemetry"]
        assert replayed[0] == n["resume_from"]
        recovered += replayed[: n["dropped"]]
        assert not set(replayed[: n["dropped"]]) & set(sent)
        hub.disconnect_dashboard(e)
    assert recovered == missed


async def test_a_parked_dashboard_is_not_touched_by_the_fan_out(hub: Hub) -> None:
    stalled = hub.connect_dashboard(Role.VIEWER, "stalled")
    reader = hub.connect_dashboard(Role.VIEWER, "reader")
    for d in (stalled, reader):
        await hub.handle(d, {"op": "subscribe", "all": True})
    for i in range(8):
        hub.device_event(telemetry("a", i))
    queued = stalled.queued_items()
    read = len(drain(reader))
    for i in range(8, 1000):
        hub.device_event(telemetry("a", i))
        read += len(drain(reader))
    assert read == 1 + 1000  # subscribed, then every message
    assert stalled.parked
    assert stalled.queued_items() == queued  # the same 8, untouched
    # Subscribed to all alone, it left the fan-out: the index counts what it misses.
    assert stalled in hub.subscriptions.parked_all
    assert hub.subscriptions.missed(stalled) == 992
    assert hub.metrics.telemetry_dropped._value.get() == 992


async def test_one_lagged_notice_per_gap(hub: Hub) -> None:
    d = hub.connect_dashboard(Role.VIEWER, "x")
    await hub.handle(d, {"op": "subscribe", "all": True})
    hub.device_event(DeviceOnline(info("a")))
    for i in range(30):
        hub.device_event(telemetry("a", i))
    first = drain(d)
    assert [m["op"] for m in first].count("lagged") == 1
    for i in range(3):
        hub.device_event(telemetry("a", 100 + i))
    assert [m["op"] for m in drain(d)] == ["telemetry"] * 3


async def test_fan_out_reaches_each_dashboard_once(hub: Hub) -> None:
    both = hub.connect_dashboard(Role.VIEWER, "x")
    await hub.handle(both, {"op": "subscribe", "all": True})
    await hub.handle(both, {"op": "subscribe", "device": "a"})
    await hub.handle(both, {"op": "subscribe", "protocol": "env-sensor"})
    other = hub.connect_dashboard(Role.VIEWER, "y")
    await hub.handle(other, {"op": "subscribe", "protocol": "relay-4"})
    hub.device_event(DeviceOnline(info("a")))
    hub.device_event(telemetry("a", 1))
    assert [m["op"] for m in drain(both)].count("telemetry") == 1
    assert [m for m in drain(other) if m["op"] == "telemetry"] == []


async def test_the_same_text_goes_to_every_dashboard(hub: Hub) -> None:
    ds = [hub.connect_dashboard(Role.VIEWER, str(i)) for i in range(3)]
    for d in ds:
        await hub.handle(d, {"op": "subscribe", "all": True})
        d.take(10)
    hub.device_event(telemetry("a", 1))
    texts = [d.queued_items()[0][2] for d in ds]
    assert texts[0] is texts[1] is texts[2]  # encoded once


async def test_takeover_offline_of_old_session_is_ignored(hub: Hub) -> None:
    d = hub.connect_dashboard(Role.VIEWER, "x")
    await hub.handle(d, {"op": "subscribe", "all": True})
    hub.device_event(DeviceOnline(info("a", session="old")))
    hub.device_event(DeviceOnline(info("a", session="new")))
    hub.device_event(DeviceOffline(info("a", session="old"), CloseReason.REPLACED))
    assert hub.devices["a"].online
    assert hub.devices["a"].session == "new"
    presence = [m for m in drain(d) if m["op"] == "presence"]
    assert [p["online"] for p in presence] == [True, True]


async def test_disconnect_forgets_subscriptions(hub: Hub) -> None:
    d = hub.connect_dashboard(Role.VIEWER, "x")
    await hub.handle(d, {"op": "subscribe", "device": "a"})
    drain(d)
    hub.disconnect_dashboard(d)
    assert hub.subscriptions.is_empty()
    assert d.closed
    hub.device_event(telemetry("a", 1))
    assert not d.queued_items()


async def test_replay_then_live_without_gap_or_duplicate(hub: Hub) -> None:
    hub.device_event(DeviceOnline(info("a")))
    for i in range(5):
        hub.device_event(telemetry("a", i))
    d = hub.connect_dashboard(Role.VIEWER, "x")
    got: list[dict[str, Any]] = []

    async def writer() -> None:  # what the web layer's writer does: drain as it can
        while not d.closed:
            await d.wait()
            got.extend(m for m in map(json.loads, d.take(3)) if m["op"] == "telemetry")

    drainer = asyncio.create_task(writer())
    replay = asyncio.create_task(hub.handle(d, {"op": "subscribe", "device": "a", "since": 0}))
    while not d.held.active:
        await asyncio.sleep(0)
    hub.device_event(telemetry("a", 5))  # live, during the replay: held until it ends
    await replay
    hub.device_event(telemetry("a", 6))
    while len(got) < 7:
        await asyncio.sleep(0)
    d.close()
    await drainer
    assert [m["seq"] for m in got] == list(range(7))
    offsets = [m["offset"] for m in got]
    assert offsets == sorted(set(offsets))


async def test_replay_since_skips_older(hub: Hub) -> None:
    hub.config = HubConfig(queue_size=64)  # room for the whole replay without a writer
    for i in range(6):
        hub.device_event(telemetry("a", i))
    d = hub.connect_dashboard(Role.VIEWER, "x")
    await hub.handle(d, {"op": "subscribe", "all": True, "since": 0})
    all_offsets = [m["offset"] for m in drain(d) if m["op"] == "telemetry"]
    e = hub.connect_dashboard(Role.VIEWER, "y")
    await hub.handle(e, {"op": "subscribe", "all": True, "since": all_offsets[2]})
    assert [m["offset"] for m in drain(e) if m["op"] == "telemetry"] == all_offsets[3:]


# ---- history while the storage fails (docs/api.md §3.2) --------------------------------------


def local(h: Hub) -> tuple[LocalEngine, MemoryStorage]:
    engine = h.engine
    assert isinstance(engine, LocalEngine)
    assert isinstance(engine.storage, MemoryStorage)
    return engine, engine.storage


async def test_a_subscribe_with_since_while_the_storage_fails_is_answered(hub: Hub) -> None:
    """An ``unavailable`` error and a lagged notice; the socket's handler never sees the fault."""
    _, storage = local(hub)
    for i in range(3):
        hub.device_event(telemetry("a", i))
    d = hub.connect_dashboard(Role.VIEWER, "x")
    storage.fault = "disk full"
    await hub.handle(d, {"op": "subscribe", "device": "a", "since": 0, "id": "s"})
    got = drain(d)
    assert [m["op"] for m in got] == ["lagged", "subscribed", "error"]
    assert got[0]["resume_from"] == 1  # nothing replayed: everything after since
    error = got[2]
    assert (error["id"], error["code"]) == ("s", "unavailable")
    assert "storage unavailable: disk full" in error["message"]
    # Subscribed, nothing held back: live telemetry flows; other requests are answered.
    assert not d.held.active
    hub.device_event(telemetry("a", 3))
    assert [m["seq"] for m in drain(d) if m["op"] == "telemetry"] == [3]
    await hub.handle(d, {"op": "devices", "id": "d"})
    assert [m["op"] for m in drain(d)] == ["devices"]
    # Once the storage works, the same request replays.
    storage.fault = None
    await hub.handle(d, {"op": "subscribe", "device": "a", "since": 0, "id": "s2"})
    assert [m["seq"] for m in drain(d) if m["op"] == "telemetry"] == [0, 1, 2, 3]


async def test_a_replay_cut_short_by_the_storage_says_where_to_resume(hub: Hub) -> None:
    engine, _ = local(hub)
    for i in range(5):
        hub.device_event(telemetry("a", i))
    offsets = [r.offset for r in await engine.history(0)]
    reads = 0
    real = engine.history

    async def failing_second_read(after: int, **kw: Any) -> list[TelemetryRecord]:
        nonlocal reads
        reads += 1
        if reads > 1:
            raise StoreError("storage unavailable: an I/O error")
        return (await real(after, **kw))[:2]  # a short page: the replay reads on

    engine.history = failing_second_read  # type: ignore[method-assign]
    d = hub.connect_dashboard(Role.VIEWER, "x")
    await hub.handle(d, {"op": "subscribe", "device": "a", "since": 0, "id": "s"})
    got = drain(d)
    assert [m["offset"] for m in got if m["op"] == "telemetry"] == offsets[:2]
    (lagged,) = [m for m in got if m["op"] == "lagged"]
    assert lagged["resume_from"] == offsets[2]  # the first one the dashboard did not get
    assert [m["code"] for m in got if m["op"] == "error"] == ["unavailable"]


async def test_a_seam_the_storage_cannot_give_holds_nothing_back(hub: Hub) -> None:
    """No offset to cut history at (the writer stalled): live telemetry must not stay held."""
    engine, _ = local(hub)

    def no_seam() -> int:
        raise StoreError("offsets are not reserved yet")

    engine.seam = no_seam  # type: ignore[method-assign]
    d = hub.connect_dashboard(Role.VIEWER, "x")
    await hub.handle(d, {"op": "subscribe", "device": "a", "since": 0, "id": "s"})
    assert [m["op"] for m in drain(d)] == ["lagged", "subscribed", "error"]
    assert not d.held.active
    hub.device_event(telemetry("a", 7))
    assert [m["seq"] for m in drain(d) if m["op"] == "telemetry"] == [7]


async def test_history_while_the_storage_fails_is_storage_unavailable(hub: Hub) -> None:
    _, storage = local(hub)
    hub.device_event(telemetry("a", 0))
    storage.fault = "disk full"
    with pytest.raises(StorageUnavailable, match=r"^storage unavailable: disk full$"):
        await hub.history("a", 0, 10)
    storage.fault = None
    assert [r.seq for r in await hub.history("a", 0, 10)] == [0]


async def test_max_dashboards_refused() -> None:
    storage = MemoryStorage()
    await storage.open()
    h = Hub(LocalEngine(storage), HubConfig(max_dashboards=1))
    h.connect_dashboard(Role.VIEWER, "a")
    from gateway.hub import Refused

    with pytest.raises(Refused, match="max_dashboards"):
        h.connect_dashboard(Role.VIEWER, "b")
    await storage.close()


@given(
    device=st.text(min_size=1, max_size=64),
    protocol=st.text(min_size=1, max_size=32),
    offset=st.integers(1, 2**63 - 1),
    ts=st.integers(0, 2**53),
    seq=st.integers(0, 255),
    data=st.dictionaries(
        st.text(max_size=8),
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
        max_size=6,
    ),
)
def test_telemetry_text_is_the_message_encoded_whole(
    device: str, protocol: str, offset: int, ts: int, seq: int, data: dict[str, Any]
) -> None:
    """The hub encodes the data once and builds the message around it: same bytes on the wire."""
    rec = TelemetryRecord(offset, device, protocol, ts, seq, data)
    text = telemetry_text(rec, dumps(data))
    assert text == dumps(telemetry_message(rec))
    assert json.loads(text)["data"] == json.loads(dumps(data))


# ---- bounds: what a peer can make the hub hold (docs/api.md §3, docs/configuration.md) -------


@contextlib.asynccontextmanager
async def bounded_hub(**config: Any) -> AsyncIterator[Hub]:
    storage = MemoryStorage()
    await storage.open()
    h = Hub(LocalEngine(storage), HubConfig(**config))
    await h.start()
    try:
        yield h
    finally:
        await h.stop()
        await storage.close()


def refused(h: Hub, limit: str) -> float | None:
    return h.metrics.registry.get_sample_value("iot_refused_total", {"limit": limit})


async def test_a_new_device_past_max_known_devices_is_refused_known_ones_are_not() -> None:
    async with bounded_hub(max_known_devices=2) as h:
        for name in ("a", "b"):
            assert h.admit_device(name) is None
            h.device_event(DeviceOnline(info(name, session=name)))
        h.device_event(DeviceOffline(info("a", session="a"), CloseReason.CLOSED))
        refusal = h.admit_device("c")
        assert refusal is not None
        assert "max_known_devices=2" in refusal
        assert h.counters.refused_known_devices == 1
        assert "c" not in h.devices
        assert h.admit_device("a") is None  # known, though offline
        assert h.admit_device("b") is None  # online: a takeover
        assert h.counters.refused_known_devices == 1


async def test_admissions_not_yet_online_count_against_max_known_devices() -> None:
    """The device side admits every HELLO of one read before the hub hears of them."""
    async with bounded_hub(max_known_devices=2) as h:
        assert h.admit_device("a") is None
        assert h.admit_device("a") is None  # the same id again: no second place
        assert h.admit_device("b") is None
        assert h.admit_device("c") is not None
        h.device_event(DeviceOnline(info("a", session="a")))
        h.device_event(DeviceOnline(info("b", session="b")))
        await asyncio.sleep(0)  # the reservations end with the loop iteration
        assert h.admit_device("c") is not None
        assert len(h.devices) == 2


async def test_an_admission_that_never_came_online_gives_its_place_back() -> None:
    async with bounded_hub(max_known_devices=1) as h:
        assert h.admit_device("a") is None  # refused later by the device side, say
        assert h.admit_device("b") is not None
        await asyncio.sleep(0)
        assert h.admit_device("b") is None


async def test_devices_offline_longer_than_forget_after_are_forgotten() -> None:
    async with bounded_hub(forget_after=60.0) as h:
        for name in ("old", "recent", "online"):
            h.device_event(DeviceOnline(info(name, session=name)))
        h.device_event(telemetry("old", 1))
        for name in ("old", "recent"):
            h.device_event(DeviceOffline(info(name, session=name), CloseReason.CLOSED))
        now = now_ms()
        h.devices["old"].last_seen = now - 61_000
        h.devices["online"].last_seen = now - 3_600_000  # online: seen, whatever the clock says
        assert h.forget_stale(now) == ["old"]
        assert sorted(h.devices) == ["online", "recent"]
        assert h.counters.forgotten == 1
        assert [e["device"] for e in h.devices_listing()] == ["online", "recent"]
        # A forgotten device is new again: it needs a place under max_known_devices.
        h.device_event(DeviceOnline(info("old", session="back")))
        assert h.devices["old"].online


async def test_forgetting_is_off_by_default() -> None:
    async with bounded_hub() as h:
        h.device_event(DeviceOnline(info("a")))
        h.device_event(DeviceOffline(info("a"), CloseReason.CLOSED))
        h.devices["a"].last_seen = 0
        assert h.forget_stale(now_ms()) == []
        assert "a" in h.devices


async def test_the_hub_forgets_by_itself_and_at_start() -> None:
    storage = MemoryStorage()
    await storage.open()
    await storage.upsert_device(DeviceRecord("gone", "env-sensor", "tcp", 1, 2))
    h = Hub(LocalEngine(storage), HubConfig(forget_after=0.2))
    await h.start()
    try:
        assert "gone" not in h.devices  # unseen since 1970: forgotten as it is loaded
        assert await storage.devices() == []  # and its row with it
        h.device_event(DeviceOnline(info("a")))
        h.device_event(DeviceOffline(info("a"), CloseReason.CLOSED))
        await until(lambda: "a" not in h.devices, "a forgotten")
        assert h.counters.forgotten == 2
        await until_rows(storage, [], "a's row deleted")
    finally:
        await h.stop()
        await storage.close()


async def until(check: Callable[[], bool], what: str) -> None:
    """Poll the hub's own state (a sweep has no event to await), with a deadline."""
    async with asyncio.timeout(10):
        while not check():
            await asyncio.sleep(0.01)
    assert check(), what


async def until_rows(storage: Storage, devices: list[str], what: str) -> None:
    async with asyncio.timeout(10):
        while [r.device for r in await storage.devices()] != devices:
            await asyncio.sleep(0.01)
    assert [r.device for r in await storage.devices()] == devices, what


async def test_a_forgotten_device_stays_forgotten_after_a_restart(tmp_path: Path) -> None:
    """Its SQLite row goes too: it is neither listed nor forgotten again at the next start."""
    path = tmp_path / "gateway.sqlite3"
    storage = SQLiteStorage(path)
    await storage.open()
    h = Hub(LocalEngine(storage), HubConfig(forget_after=0.2))
    await h.start()
    try:
        for name in ("old", "kept"):
            h.device_event(DeviceOnline(info(name, session=name)))
        h.device_event(DeviceOffline(info("old", session="old"), CloseReason.CLOSED))
        await until(lambda: "old" not in h.devices, "old forgotten")
        await until_rows(storage, ["kept"], "old's row deleted")
    finally:
        await h.stop()
        await storage.close()

    storage = SQLiteStorage(path)
    await storage.open()
    # Forgetting off: only the storage can have let it go.
    h = Hub(LocalEngine(storage), HubConfig())
    await h.start()
    try:
        assert sorted(h.devices) == ["kept"]
        assert h.counters.forgotten == 0
        assert [e["device"] for e in h.devices_listing()] == ["kept"]
    finally:
        await h.stop()
        await storage.close()


async def test_rows_a_failing_storage_kept_are_deleted_once_it_works() -> None:
    storage = MemoryStorage()
    await storage.open()
    h = Hub(LocalEngine(storage), HubConfig(forget_after=0.2))
    await h.start()
    try:
        for name in ("gone", "back"):
            h.device_event(DeviceOnline(info(name, session=name)))
            h.device_event(DeviceOffline(info(name, session=name), CloseReason.CLOSED))
        await until_rows(storage, ["back", "gone"], "both rows")
        storage.fault = "disk full"
        await until(lambda: not h.devices, "both forgotten")
        await until(lambda: h._unforgotten == {"back", "gone"}, "their rows left to delete")
        assert [r.device for r in await storage.devices()] == ["back", "gone"]
        # One comes back meanwhile: known again, its row must stay.
        h.device_event(DeviceOnline(info("back", session="again")))
        storage.fault = None
        await until(lambda: not h._unforgotten, "the next sweep")
        await until_rows(storage, ["back"], "gone's row deleted, back's kept")
        assert h.devices["back"].online
    finally:
        await h.stop()
        await storage.close()


async def test_devices_replies_come_by_page() -> None:
    async with bounded_hub(devices_page_size=3) as h:
        for i in range(7):
            h.device_event(DeviceOnline(info(f"d{i}", session=str(i))))
        d = h.connect_dashboard(Role.VIEWER, "x")
        drain(d)
        pages: list[list[str]] = []
        after: str | None = None
        while True:
            request: dict[str, Any] = {"op": "devices", "id": len(pages)}
            if after is not None:
                request["after"] = after
            await h.handle(d, request)
            (answer,) = drain(d)
            assert answer["id"] == len(pages)
            pages.append([e["device"] for e in answer["devices"]])
            after = answer["next"]
            if after is None:
                break
        assert pages == [["d0", "d1", "d2"], ["d3", "d4", "d5"], ["d6"]]
        await h.handle(d, {"op": "devices", "limit": 2, "after": "d10"})  # any string
        (answer,) = drain(d)
        assert ([e["device"] for e in answer["devices"]], answer["next"]) == (["d2", "d3"], "d3")
        await h.handle(d, {"op": "devices", "limit": 1000})  # capped at the page size
        (answer,) = drain(d)
        assert len(answer["devices"]) == 3
        assert h.devices_page("d5", 10) == (h.registry.listing()[6:], None)


@pytest.mark.parametrize(
    "request_",
    [
        {"op": "devices", "after": 3},
        {"op": "devices", "limit": 0},
        {"op": "devices", "limit": "10"},
        {"op": "devices", "limit": True},
    ],
)
async def test_a_bad_devices_page_request_is_a_bad_request(request_: dict[str, Any]) -> None:
    async with bounded_hub() as h:
        d = h.connect_dashboard(Role.VIEWER, "x")
        drain(d)
        await h.handle(d, request_)
        (answer,) = drain(d)
        assert (answer["op"], answer["code"]) == ("error", "bad_request")


async def test_subscriptions_past_max_subscriptions_are_refused() -> None:
    async with bounded_hub(max_subscriptions=3) as h:
        d = h.connect_dashboard(Role.VIEWER, "x")
        for i in range(3):
            await h.handle(d, {"op": "subscribe", "device": f"d{i}"})
        await h.handle(d, {"op": "subscribe", "device": "d3", "id": "over"})
        await h.handle(d, {"op": "subscribe", "all": True, "since": 0, "id": "replay"})
        await h.handle(d, {"op": "subscribe", "device": "d0", "id": "again"})  # already held
        answers = drain(d)
        assert [(m["op"], m.get("code")) for m in answers[-3:]] == [
            ("error", "too_large"),
            ("error", "too_large"),
            ("subscribed", None),
        ]
        assert "max_subscriptions" in answers[-3]["message"]
        assert refused(h, "max_subscriptions") == 2
        assert len(d.subscriptions) == 3
        await h.handle(d, {"op": "unsubscribe", "device": "d1"})
        await h.handle(d, {"op": "subscribe", "device": "d3"})
        assert [m["op"] for m in drain(d)] == ["unsubscribed", "subscribed"]


async def test_disconnect_lets_go_of_everything_the_dashboard_held() -> None:
    async with bounded_hub(queue_size=4) as h:
        d = h.connect_dashboard(Role.VIEWER, "x")
        for i in range(50):
            await h.handle(d, {"op": "subscribe", "device": f"d{i}"})
        await h.handle(d, {"op": "subscribe", "all": True})
        await h.handle(d, {"op": "subscribe", "protocol": "env-sensor"})
        h.device_event(DeviceOnline(info("d1")))
        for i in range(10):
            h.device_event(telemetry("d1", i))
        await h.handle(d, {"op": "devices"})
        assert d.queued_items()
        assert (d.parked, d.missed > 0) == (True, True)
        ref = weakref.ref(d)
        h.disconnect_dashboard(d)
        assert h.subscriptions.is_empty()
        assert not d.queued_items()
        assert not d.subscriptions
        assert not d.dropped
        assert (d.parked, d.missed) == (False, 0)
        assert (d.telemetry_queued, d.control_queued) == (0, 0)
        assert h.dashboards == {}
        del d
        gc.collect()
        assert ref() is None  # nothing in the hub keeps it


async def test_a_dashboard_that_lets_control_messages_pile_up_is_disconnected() -> None:
    async with bounded_hub(control_queue_bytes=4096) as h:
        stalled = h.connect_dashboard(Role.VIEWER, "stalled")
        reader = h.connect_dashboard(Role.VIEWER, "reader")
        for d in (stalled, reader):
            await h.handle(d, {"op": "subscribe", "all": True})
        drain(reader)
        for i in range(100):  # presence only: never dropped, ~120 characters each
            h.device_event(DeviceOnline(info(f"d{i}", session=str(i))))
            h.device_event(DeviceOffline(info(f"d{i}", session=str(i)), CloseReason.CLOSED))
            drain(reader)
        assert stalled.closed
        assert stalled.close_reason == "control_queue"
        assert not stalled.queued_items()
        assert stalled.control_queued == 0
        assert stalled.id not in h.dashboards
        assert reader.id in h.dashboards
        assert h.counters.dashboards_closed == {"control_queue": 1}
        assert h.subscriptions.subscribers("d0", "env-sensor") == {reader}
        # Requests of a dashboard closed by a bound are not answered (the web layer closes it).
        await h.handle(stalled, {"op": "subscribe", "all": True})
        assert not stalled.queued_items()
        assert h.subscriptions.subscribers("x", "y") == {reader}


async def test_one_reply_bigger_than_the_bound_reaches_a_dashboard_that_reads() -> None:
    async with bounded_hub(control_queue_bytes=1024) as h:
        for i in range(40):
            h.device_event(DeviceOnline(info(f"device-{i:04d}", session=str(i))))
        d = h.connect_dashboard(Role.VIEWER, "x")
        await h.handle(d, {"op": "devices"})
        (answer,) = drain(d)
        assert len(answer["devices"]) == 40
        await h.handle(d, {"op": "devices"})
        await h.handle(d, {"op": "devices"})  # two waiting: over the bound
        assert d.closed


# ---- commands run beside the dashboard's other requests ----------------------------------------


class StuckLinks:
    """A device side whose one device never reads: a command's write never completes."""

    def __init__(self) -> None:
        self.sends = 0
        self.cancelled = 0
        self.release = asyncio.Event()

    def is_online(self, client_id: str) -> bool:
        return True

    async def send_command(self, client_id: str, body: bytes) -> CommandHandle:
        self.sends += 1
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        future: asyncio.Future[CommandResult] = asyncio.get_running_loop().create_future()
        future.set_result(CommandResult(CommandStatus.ACKED))
        return CommandHandle(client_id, 1, future)


def command(rid: object, device: str = "slow") -> dict[str, Any]:
    return {"op": "command", "id": rid, "device": device, "command": {"name": "reboot"}}


async def test_a_command_to_a_device_that_does_not_read_holds_up_no_other_request() -> None:
    async with bounded_hub() as h:
        links = StuckLinks()
        h.attach(links)
        h.device_event(DeviceOnline(info("slow")))
        d = h.connect_dashboard(Role.OPERATOR, "x")
        async with asyncio.timeout(5):  # the old hub awaited the write here, for ever
            await h.handle(d, command("c1"))
            await h.handle(d, {"op": "devices", "id": "d"})
        assert [m["op"] for m in drain(d)] == ["devices"]
        assert len(d.tasks) == 1
        links.release.set()  # the device reads again: the command goes on, statuses in order
        async with asyncio.timeout(5):
            while d.tasks or len(d.queued_items()) < 2:
                await asyncio.sleep(0.01)
        statuses = [m["status"] for m in drain(d) if m["op"] == "command_status"]
        assert statuses == ["sent", "acked"]


async def test_commands_waiting_past_max_pending_commands_are_refused() -> None:
    async with bounded_hub(max_pending_commands=2) as h:
        links = StuckLinks()
        h.attach(links)
        h.device_event(DeviceOnline(info("slow")))
        d = h.connect_dashboard(Role.OPERATOR, "x")
        for rid in ("c1", "c2", "c3"):
            await h.handle(d, command(rid))
        await asyncio.sleep(0)
        (answer,) = drain(d)
        assert (answer["op"], answer["id"], answer["code"]) == ("error", "c3", "rate_limited")
        assert "max_pending_commands" in answer["message"]
        assert refused(h, "max_pending_commands") == 1
        assert links.sends == 2


async def test_disconnect_cancels_the_dashboards_commands_still_waiting() -> None:
    async with bounded_hub() as h:
        links = StuckLinks()
        h.attach(links)
        h.device_event(DeviceOnline(info("slow")))
        d = h.connect_dashboard(Role.OPERATOR, "x")
        await h.handle(d, command("c1"))
        await asyncio.sleep(0)
        tasks = set(d.tasks)
        h.disconnect_dashboard(d)
        await asyncio.gather(*tasks, return_exceptions=True)
        assert links.cancelled == 1
        assert not d.tasks


async def test_a_command_that_fails_inside_the_gateway_is_an_error_not_a_dead_socket() -> None:
    async with bounded_hub() as h:
        h.device_event(DeviceOnline(info("a")))
        h.device_event(DeviceOffline(info("a"), CloseReason.CLOSED))

        async def broken(*args: Any) -> Any:
            raise OSError("disk I/O error")

        h.engine.enqueue_command = broken  # type: ignore[method-assign,assignment]
        d = h.connect_dashboard(Role.OPERATOR, "x")
        await h.handle(d, command("c1", device="a"))
        async with asyncio.timeout(5):
            while d.tasks:
                await asyncio.sleep(0.01)
        (answer,) = drain(d)
        assert (answer["op"], answer["id"], answer["code"]) == ("error", "c1", "unavailable")
        await h.handle(d, {"op": "devices"})
        assert [m["op"] for m in drain(d)] == ["devices"]


async def test_a_group_command_to_no_online_device_is_still_not_found() -> None:
    async with bounded_hub() as h:
        d = h.connect_dashboard(Role.OPERATOR, "x")
        await h.handle(
            d, {"op": "command", "id": "g", "protocol": "relay-4", "command": {"hex": "00"}}
        )
        async with asyncio.timeout(5):
            while d.tasks:
                await asyncio.sleep(0.01)
        (answer,) = drain(d)
        assert (answer["op"], answer["id"], answer["code"]) == ("error", "g", "not_found")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("max_known_devices", 0),
        ("forget_after", -1.0),
        ("devices_page_size", 0),
        ("max_subscriptions", 0),
        ("control_queue_bytes", 1023),
        ("max_pending_commands", 0),
        ("max_command_id", 0),
    ],
)
def test_a_bound_out_of_range_is_refused_naming_its_key(key: str, value: float) -> None:
    bad: dict[str, Any] = {key: value}
    with pytest.raises(ValueError, match=key):
        HubConfig(**bad)
