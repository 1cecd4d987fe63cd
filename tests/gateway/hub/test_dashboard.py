"""gateway.hub.dashboard and the HeldLive buffer of gateway.hub.replay: one dashboard's outbox.

Pins the rules of the bounded outbound queue (docs/api.md §3.1 ``lagged``):
telemetry is what gets dropped when the queue is full, never a control
message; a full queue parks the dashboard, which keeps the oldest telemetry
and only counts the newest, until ``take()`` drains it below half; then one
``lagged`` notice, queued in order after what was kept, counts what was
missed and names the first offset missed. Drops of a replay (``note_drop``)
are announced first in the next batch. ``take()`` batches and records
when its oldest telemetry arrived; ``room()`` is the replay's backpressure;
``close()`` wakes every waiter; and while a replay holds live telemetry,
``push_telemetry`` goes to the hold, whose overflow lets go of what the
replay will re-read and keeps the rest up to ``limit // 2``. Control
messages are never dropped but bounded: past ``control_limit`` characters
waiting the dashboard closes itself, lets go of its queue and tells the hub
once (docs/api.md §3, "A dashboard that does not read").
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from frames.ratelimit import TokenBucket
from gateway.hub import Dashboard, HeldLive, Kind, Role, Target, TargetKind
from gateway.hub.replay import Held

DEVICE_A = Target(TargetKind.DEVICE, "a")


def dashboard(limit: int) -> Dashboard:
    return Dashboard(1, Role.VIEWER, "s", limit, TokenBucket(1.0, 1.0, 0.0))


def tele(offset: int) -> str:
    return json.dumps({"op": "telemetry", "offset": offset})


def ctl(n: int) -> str:
    return json.dumps({"op": "presence", "n": n})


def take_all(d: Dashboard) -> list[dict[str, Any]]:
    return [json.loads(t) for t in d.take(10_000)]


async def blocked(task: asyncio.Task[None]) -> bool:
    """True when ``task`` is still waiting after the loop has run everything ready."""
    for _ in range(5):
        await asyncio.sleep(0)
    return not task.done()


# ---- the bounded queue -------------------------------------------------------------------------


def test_telemetry_and_control_keep_their_order() -> None:
    d = dashboard(8)
    d.push_control(ctl(0))
    d.push_telemetry(1, tele(1))
    d.push_control_json({"op": "presence", "n": 1})
    d.push_telemetry(2, tele(2))
    assert d.take(10) == [ctl(0), tele(1), '{"op":"presence","n":1}', tele(2)]
    assert d.telemetry_queued == 0


def test_full_queue_keeps_the_oldest_telemetry_and_every_control_message() -> None:
    d = dashboard(3)
    d.push_control(ctl(0))
    for offset in (10, 11, 12):
        assert d.push_telemetry(offset, tele(offset)) == 0
    d.push_control(ctl(1))
    assert d.push_telemetry(13, tele(13)) == 1  # the newest is the one missed
    assert d.push_telemetry(14, tele(14)) == 1
    d.push_control(ctl(2))  # control messages still queue while parked
    assert d.parked
    assert (d.telemetry_queued, d.missed, d.missed_from, d.dropped_total) == (3, 2, 13, 2)
    assert (d.dropped, d.resume_from) == (0, None)  # nothing to announce before what is kept
    assert take_all(d) == [
        {"op": "presence", "n": 0},
        {"op": "telemetry", "offset": 10},
        {"op": "telemetry", "offset": 11},
        {"op": "telemetry", "offset": 12},
        {"op": "presence", "n": 1},
        {"op": "presence", "n": 2},
    ]
    # Drained: it rejoins, and the notice is the next thing it gets, then live telemetry.
    assert not d.parked
    d.push_telemetry(15, tele(15))
    assert take_all(d) == [
        {"op": "lagged", "dropped": 2, "resume_from": 13},
        {"op": "telemetry", "offset": 15},
    ]
    assert d.dropped_total == 2


def test_a_parked_dashboard_rejoins_below_half_with_the_notice_in_order() -> None:
    d = dashboard(8)
    for offset in range(1, 9):
        d.push_telemetry(offset, tele(offset))
    for offset in range(9, 20):
        assert d.push_telemetry(offset, tele(offset)) == 1
    assert [json.loads(t)["offset"] for t in d.take(4)] == [1, 2, 3, 4]
    assert d.parked  # 4 left: not below half of 8 yet
    assert d.push_telemetry(20, tele(20)) == 1
    assert not d.has_room  # a replay must not queue past a parked queue
    assert [json.loads(t)["offset"] for t in d.take(1)] == [5]
    assert not d.parked  # 3 left: rejoined
    assert d.has_room
    d.push_telemetry(21, tele(21))
    d.push_control(ctl(0))
    assert take_all(d) == [
        {"op": "telemetry", "offset": 6},
        {"op": "telemetry", "offset": 7},
        {"op": "telemetry", "offset": 8},
        {"op": "lagged", "dropped": 12, "resume_from": 9},
        {"op": "telemetry", "offset": 21},
        {"op": "presence", "n": 0},
    ]


def test_control_messages_are_never_dropped_nor_counted() -> None:
    d = dashboard(1)
    for n in range(100):
        d.push_control(ctl(n))
    assert d.telemetry_queued == 0
    assert d.has_room
    d.push_telemetry(1, tele(1))
    d.push_telemetry(2, tele(2))  # missed: 1 is kept, and no control message goes
    texts = d.take(1000)
    assert texts[:100] == [ctl(n) for n in range(100)]
    assert texts[100:] == [tele(1)]
    assert take_all(d) == [{"op": "lagged", "dropped": 1, "resume_from": 2}]


def test_lagged_counts_every_miss_and_names_the_first_offset_missed() -> None:
    d = dashboard(2)
    for offset in (5, 7, 9, 11, 13):
        d.push_telemetry(offset, tele(offset))
    got = take_all(d)
    assert [m["offset"] for m in got] == [5, 7]
    assert take_all(d) == [{"op": "lagged", "dropped": 3, "resume_from": 9}]
    assert d.dropped_total == 3


def test_a_parked_dashboard_counts_unsequenced_telemetry_and_resumes_at_the_first_offset() -> None:
    """A cluster node cut from Redis delivers its own telemetry with no offset yet."""
    d = dashboard(1)
    d.push_telemetry(1, tele(1))
    for offset in (None, 3, 4):
        assert d.push_telemetry(offset, tele(0)) == 1  # type: ignore[arg-type]
    assert (d.missed, d.missed_from) == (3, 3)


def test_replay_drops_name_the_lowest_offset_whatever_their_order() -> None:
    d = dashboard(4)
    for offset in (50, 40, 45):
        d.note_drop(offset)
    assert (d.dropped, d.resume_from) == (3, 40)


def test_one_lagged_notice_per_gap() -> None:
    d = dashboard(2)
    for offset in range(1, 6):
        d.push_telemetry(offset, tele(offset))
    first = take_all(d) + take_all(d)
    assert first == [
        {"op": "telemetry", "offset": 1},
        {"op": "telemetry", "offset": 2},
        {"op": "lagged", "dropped": 3, "resume_from": 3},
    ]
    assert (d.parked, d.missed, d.missed_from) == (False, 0, None)
    d.push_telemetry(6, tele(6))
    assert take_all(d) == [{"op": "telemetry", "offset": 6}]
    for offset in range(7, 11):
        d.push_telemetry(offset, tele(offset))
    again = take_all(d) + take_all(d)
    assert again == [
        {"op": "telemetry", "offset": 7},
        {"op": "telemetry", "offset": 8},
        {"op": "lagged", "dropped": 2, "resume_from": 9},  # a new gap, a new notice
    ]
    assert d.dropped_total == 5


def test_a_replay_release_into_a_full_queue_parks_too() -> None:
    """``append_telemetry`` (the replay's way in) follows the same rule as live pushes."""
    d = dashboard(2)
    assert [d.append_telemetry(n, tele(n)) for n in (1, 2, 3, 4)] == [0, 0, 1, 1]
    assert (d.parked, d.missed, d.missed_from) == (True, 2, 3)
    assert d.push_telemetry(5, tele(5)) == 1
    assert [m["offset"] for m in take_all(d)] == [1, 2]
    assert take_all(d) == [{"op": "lagged", "dropped": 3, "resume_from": 3}]


# ---- take() ------------------------------------------------------------------------------------


def test_take_returns_at_most_max_items_oldest_first() -> None:
    d = dashboard(10)
    for offset in range(1, 6):
        d.push_telemetry(offset, tele(offset))
    assert d.take(2) == [tele(1), tele(2)]
    assert d.telemetry_queued == 3
    assert d.take(2) == [tele(3), tele(4)]
    assert d.take(2) == [tele(5)]
    assert d.take(2) == []
    assert d.telemetry_queued == 0


def test_a_replay_drop_notice_comes_first_and_counts_in_the_batch() -> None:
    d = dashboard(4)
    d.push_telemetry(1, tele(1))
    d.note_drop(7)  # what replay() does when it cannot catch up
    assert [json.loads(t)["op"] for t in d.take(1)] == ["lagged"]
    assert d.take(1) == [tele(1)]


def test_batch_received_is_the_arrival_of_the_oldest_timed_telemetry_in_the_batch() -> None:
    d = dashboard(10)
    d.push_control(ctl(0))
    d.push_telemetry(1, tele(1))  # arrived from another node: no time
    d.push_telemetry(2, tele(2), received=100.5)
    d.push_telemetry(3, tele(3), received=101.0)
    d.push_telemetry(4, tele(4), received=102.0)
    assert len(d.take(3)) == 3
    assert d.batch_received == 100.5
    assert d.take(10) == [tele(3), tele(4)]
    assert d.batch_received == 101.0
    d.push_control(ctl(1))
    d.take(10)
    assert d.batch_received == 0.0  # no telemetry in this batch


# ---- wait(), room(), has_room, close() ---------------------------------------------------------


async def test_wait_returns_at_once_when_something_is_queued() -> None:
    d = dashboard(4)
    d.push_control(ctl(0))
    async with asyncio.timeout(5):
        await d.wait()
    assert d.take(10) == [ctl(0)]


@pytest.mark.parametrize("what", ["control", "telemetry"])
async def test_wait_wakes_when_a_message_is_queued(what: str) -> None:
    d = dashboard(4)
    waiter = asyncio.create_task(d.wait())
    assert await blocked(waiter)
    if what == "control":
        d.push_control(ctl(0))
    else:
        d.push_telemetry(1, tele(1))
    async with asyncio.timeout(5):
        await waiter
    assert len(d.take(10)) == 1


async def test_wait_wakes_when_only_a_drop_is_pending() -> None:
    d = dashboard(4)
    waiter = asyncio.create_task(d.wait())
    assert await blocked(waiter)
    d.note_drop(7)  # what replay() does when it cannot catch up
    try:
        async with asyncio.timeout(1):
            await waiter
    finally:
        waiter.cancel()
    assert take_all(d) == [{"op": "lagged", "dropped": 1, "resume_from": 7}]


def test_has_room_until_the_telemetry_limit() -> None:
    d = dashboard(3)
    for offset in (1, 2):
        d.push_telemetry(offset, tele(offset))
        assert d.has_room
    d.push_control(ctl(0))
    assert d.has_room  # control does not use telemetry room
    d.push_telemetry(3, tele(3))
    assert not d.has_room
    d.take(1)
    assert d.has_room


@pytest.mark.parametrize(
    "limit",
    [
        1,
        2,
        3,
        4,
        1024,
    ],
)
async def test_room_returns_at_once_on_an_empty_queue(limit: int) -> None:
    d = dashboard(limit)
    async with asyncio.timeout(1):
        await d.room()
    assert d.telemetry_queued == 0


async def test_room_waits_for_the_queue_to_drain_below_half() -> None:
    d = dashboard(4)
    d.push_telemetry(1, tele(1))
    async with asyncio.timeout(5):
        await d.room()  # 1 of 4: below half
    d.push_telemetry(2, tele(2))
    d.push_control(ctl(0))
    waiter = asyncio.create_task(d.room())
    assert await blocked(waiter)  # 2 of 4: half full
    assert d.take(1) == [tele(1)]
    async with asyncio.timeout(5):
        await waiter
    assert d.telemetry_queued == 1


async def test_room_stays_blocked_while_take_leaves_the_queue_half_full() -> None:
    d = dashboard(4)
    for offset in (1, 2, 3):
        d.push_telemetry(offset, tele(offset))
    waiter = asyncio.create_task(d.room())
    assert await blocked(waiter)
    d.take(1)  # 2 of 4 left: still half full
    assert await blocked(waiter)
    d.take(1)  # 1 of 4
    async with asyncio.timeout(5):
        await waiter


async def test_close_wakes_a_replay_waiting_for_room() -> None:
    d = dashboard(2)
    d.push_telemetry(1, tele(1))
    replay = asyncio.create_task(d.room())
    assert await blocked(replay)  # 1 of 2: half full
    d.close()
    async with asyncio.timeout(5):
        await replay
    assert d.closed
    assert d.telemetry_queued == 1  # closing wakes; it does not pretend the queue drained


async def test_close_wakes_an_idle_writer() -> None:
    d = dashboard(2)
    writer = asyncio.create_task(d.wait())
    assert await blocked(writer)
    d.close()
    async with asyncio.timeout(5):
        await writer


def test_a_closed_dashboard_takes_nothing_more() -> None:
    d = dashboard(2)
    d.close()
    d.push_control(ctl(0))
    d.push_control_json({"op": "presence"})
    assert d.push_telemetry(1, tele(1)) == 0
    assert not d.queued_items()
    assert d.telemetry_queued == 0


# ---- live telemetry held during a replay -------------------------------------------------------


def held(offset: int, device: str, protocol: str = "env-sensor") -> Held:
    return (offset, tele(offset), 0.0, device, protocol)


def test_push_telemetry_during_a_hold_goes_to_the_hold() -> None:
    d = dashboard(4)
    d.held.targets.append(DEVICE_A)
    assert d.held.active
    assert d.push_telemetry(1, tele(1), 5.0, "a", "env-sensor") == 0
    assert d.push_telemetry(2, tele(2), 6.0, "b", "env-sensor") == 0
    assert not d.queued_items()
    assert d.telemetry_queued == 0
    assert list(d.held.items) == [
        (1, tele(1), 5.0, "a", "env-sensor"),
        (2, tele(2), 6.0, "b", "env-sensor"),
    ]


def test_without_a_hold_push_telemetry_queues() -> None:
    d = dashboard(4)
    assert not d.held.active
    d.push_telemetry(1, tele(1), 0.0, "a", "env-sensor")
    assert not d.held.items
    assert d.telemetry_queued == 1


def test_hold_overflow_lets_go_of_replayed_items_and_keeps_half_the_rest() -> None:
    h = HeldLive(4)
    h.targets.append(DEVICE_A)
    for item in (held(1, "a"), held(2, "b"), held(3, "a"), held(4, "b")):
        assert h.offer(item) == []
    assert not h.overflowed
    assert h.offer(held(5, "b")) == [5]  # a1, a3 let go; b2, b4 kept (4 // 2); b5 dropped
    assert h.overflowed
    assert [item[0] for item in h.items] == [2, 4]
    # Overflowed: what the replay reads anyway is not held at all; the rest still is.
    assert h.offer(held(6, "a")) == []
    assert h.offer(held(7, "b")) == []
    assert [item[0] for item in h.items] == [2, 4, 7]


def test_hold_overflow_of_only_replayed_items_drops_nothing() -> None:
    h = HeldLive(2)
    h.targets.append(Target(TargetKind.PROTOCOL, "env-sensor"))
    assert [h.offer(held(n, f"d{n}")) for n in range(1, 4)] == [[], [], []]
    assert h.overflowed
    assert not h.items


def test_hold_overflow_is_reported_as_drops_of_the_dashboard() -> None:
    d = dashboard(4)
    d.held.targets.append(DEVICE_A)
    pushed = [d.push_telemetry(n, tele(n), 0.0, "b", "relay-4") for n in range(10, 15)]
    assert pushed == [0, 0, 0, 0, 3]  # 10, 11 kept; 12, 13, 14 dropped
    assert (d.dropped, d.resume_from, d.dropped_total) == (3, 12, 3)
    assert [item[0] for item in d.held.items] == [10, 11]
    assert not d.queued_items()


def test_held_replayed_matches_any_active_target() -> None:
    h = HeldLive(4)
    assert not h.active
    assert not h.replayed("a", "env-sensor")
    h.targets += [DEVICE_A, Target(TargetKind.PROTOCOL, "relay-4")]
    assert h.active
    assert h.replayed("a", "env-sensor")
    assert h.replayed("z", "relay-4")
    assert not h.replayed("z", "env-sensor")


@given(
    limit=st.integers(1, 8),
    targets=st.lists(
        st.sampled_from([DEVICE_A, Target(TargetKind.PROTOCOL, "p"), Target(TargetKind.ALL)]),
        min_size=1,
        max_size=2,
    ),
    sources=st.lists(st.tuples(st.sampled_from("abc"), st.sampled_from(["p", "q"])), max_size=40),
)
def test_every_offered_item_is_held_let_go_or_dropped(
    limit: int, targets: list[Target], sources: list[tuple[str, str]]
) -> None:
    h = HeldLive(limit)
    h.targets += targets
    dropped: list[int] = []
    for offset, (device, protocol) in enumerate(sources, start=1):
        dropped += h.offer(held(offset, device, protocol))
        assert len(h.items) <= limit
    kept = [item[0] for item in h.items]
    assert kept == sorted(kept)  # order holds
    assert set(kept).isdisjoint(dropped)
    for offset, (device, protocol) in enumerate(sources, start=1):
        replayed = any(t.matches(device, protocol) for t in targets)
        if offset in dropped:
            assert not replayed  # never drop what the replay reads again from history
        elif offset not in kept:
            assert replayed
            assert h.overflowed
    if not h.overflowed:
        assert kept == list(range(1, len(sources) + 1))
        assert dropped == []


@given(
    limit=st.integers(1, 6),
    ops=st.lists(st.one_of(st.integers(1, 3), st.just(0), st.just(-1)), max_size=60),
)
def test_queue_invariants_over_random_pushes_and_takes(limit: int, ops: list[int]) -> None:
    """n > 0: push n telemetry; 0: a control message; -1: take a batch of 2.

    Whatever the interleaving, each message is sent or covered by exactly one
    ``lagged`` notice; a notice covers the consecutive run of offsets from its
    ``resume_from`` (what ``since = resume_from - 1`` replays first), all of
    them after what was sent before it and before what is sent after it.
    """
    d = dashboard(limit)
    offset = 0
    log: list[tuple[str, int, int]] = []  # ("t", offset, 0) or ("lagged", resume_from, K)

    def record(texts: list[str]) -> None:
        for text in texts:
            msg = json.loads(text)
            if msg["op"] == "telemetry":
                log.append(("t", msg["offset"], 0))
            elif msg["op"] == "lagged":
                log.append(("lagged", msg["resume_from"], msg["dropped"]))

    for op in ops:
        if op > 0:
            for _ in range(op):
                offset += 1
                d.push_telemetry(offset, tele(offset))
        elif op == 0:
            d.push_control(ctl(offset))
        else:
            record(d.take(2))
        assert d.telemetry_queued == sum(1 for k, *_ in d.queued_items() if k is Kind.TELEMETRY)
        assert d.telemetry_queued <= limit
        assert d.control_queued == sum(len(t) for k, _, t in d.queued_items() if k is Kind.CONTROL)
        assert not d.parked or d.telemetry_queued >= max(1, limit // 2)
    while batch := d.take(10_000):
        record(batch)
    # Each notice's run of offsets, in place: the stream is then 1..offset, in order.
    stream: list[int] = []
    for kind, first, count in log:
        stream += [first] if kind == "t" else list(range(first, first + count))
    assert stream == list(range(1, offset + 1))
    announced = sum(count for kind, _, count in log if kind == "lagged")
    assert d.dropped_total == announced
    assert (d.parked, d.missed) == (False, 0)  # drained: nothing is left unannounced


# ---- the bound on control messages -------------------------------------------------------------


def bounded(control_limit: int, closed: list[Dashboard] | None = None) -> Dashboard:
    return Dashboard(
        1,
        Role.VIEWER,
        "s",
        4,
        TokenBucket(1.0, 1.0, 0.0),
        control_limit=control_limit,
        on_overflow=None if closed is None else closed.append,
    )


def test_control_characters_are_counted_in_and_out() -> None:
    d = bounded(1000)
    d.push_control("x" * 10)
    d.push_telemetry(1, tele(1))
    d.push_control_json({"op": "presence"})
    assert d.control_queued == 10 + len('{"op":"presence"}')
    d.take(2)
    assert d.control_queued == len('{"op":"presence"}')
    d.take(10)
    assert d.control_queued == 0


def test_passing_the_control_limit_closes_the_dashboard_and_lets_go_of_its_queue() -> None:
    closed: list[Dashboard] = []
    d = bounded(100, closed)
    d.held.targets.append(DEVICE_A)
    d.push_telemetry(1, tele(1), 0.0, "a", "env-sensor")  # held during a replay
    for n in range(6):
        d.push_telemetry(10 + n, tele(10 + n), 0.0, "b", "env-sensor")  # some dropped
    d.push_control("x" * 60)
    d.push_control("y" * 40)  # exactly the limit: still fine
    assert not d.closed
    d.push_control("z")
    assert closed == [d]
    assert d.closed
    assert d.close_reason == "control_queue"
    assert not d.queued_items()
    assert not d.held.items
    assert (d.telemetry_queued, d.control_queued, d.dropped, d.resume_from) == (0, 0, 0, None)
    assert d.take(10) == []  # the writer finds nothing and ends
    d.push_control("more")
    d.overflow()
    assert closed == [d]  # the hub is told once


def test_one_message_bigger_than_the_limit_fits_an_empty_queue() -> None:
    d = bounded(10)
    d.push_control("x" * 50)
    assert not d.closed
    assert d.take(1) == ["x" * 50]
    d.push_control("y" * 50)
    assert not d.closed
    d.push_control("z")
    assert d.closed


def test_telemetry_never_counts_against_the_control_limit() -> None:
    d = bounded(10)
    d.push_control("x" * 10)
    for n in range(100):
        d.push_telemetry(n, tele(n))
    assert not d.closed
    assert d.control_queued == 10
