"""Parked dashboards in the hub's fan-out (docs/api.md §3.1 ``lagged``).

A dashboard whose telemetry queue is full is parked: it keeps what is queued
and misses the newest until its writer drains the queue below half. One
subscribed to all and nothing else leaves the fan-out meanwhile
(``SubscriptionIndex.leave``) and its misses are counted from the number of
messages delivered; any other is counted by a flag check. Either way it must
come out the same: every message a dashboard subscribed to is sent to it or
covered by one ``lagged`` notice, whose ``resume_from`` starts the run of
messages it missed, so ``since = resume_from - 1`` replays exactly them
first. A state machine drives the real ``Hub.deliver_telemetry`` with random
subscriptions, deliveries and partial reads, and checks that against the
messages each dashboard was subscribed to when they were delivered.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from frames.ratelimit import TokenBucket
from gateway.hub import Dashboard, Hub, HubConfig, Kind, LocalEngine, Role, Target, TargetKind
from gateway.hub.messages import ALL
from gateway.storage import MemoryStorage, TelemetryRecord

SOURCES = [("a", "env-sensor"), ("b", "env-sensor"), ("c", "relay-4")]
TARGETS = [ALL, Target(TargetKind.DEVICE, "a"), Target(TargetKind.PROTOCOL, "env-sensor")]
LIMIT = 4


def record(offset: int, device: str, protocol: str) -> TelemetryRecord:
    return TelemetryRecord(offset, device, protocol, 1_716_200_000_000, offset, {"n": offset})


def new_hub() -> Hub:
    return Hub(LocalEngine(MemoryStorage()), HubConfig(queue_size=LIMIT))


def attach(hub: Hub, n: int) -> Dashboard:
    """A dashboard as ``Hub.connect_dashboard`` makes it (which needs a running loop)."""
    d = Dashboard(
        n,
        Role.VIEWER,
        f"s{n}",
        LIMIT,
        TokenBucket(1.0, 1.0, 0.0),
        on_rejoin=hub.subscriptions.rejoin,
    )
    hub.dashboards[n] = d
    return d


def read(d: Dashboard, max_items: int) -> list[dict[str, Any]]:
    return [json.loads(t) for t in d.take(max_items)]


def test_a_dashboard_subscribed_to_all_leaves_the_fan_out_and_its_misses_are_counted() -> None:
    hub = new_hub()
    stalled, reader = attach(hub, 1), attach(hub, 2)
    for d in (stalled, reader):
        hub.subscriptions.subscribe(d, ALL)
    for offset in range(1, 101):
        hub.deliver_telemetry(record(offset, "a", "env-sensor"), '{"n":0}', 0.0)
        read(reader, 10)
    assert stalled.parked
    assert hub.subscriptions.parked_all.keys() == {stalled}
    assert list(hub.subscriptions.telemetry_subscribers("a", "env-sensor")) == [reader]
    # Control messages still reach it: it is subscribed, only not fanned telemetry out to.
    assert set(hub.subscriptions.subscribers("a", "env-sensor")) == {stalled, reader}
    assert set(hub.subscriptions.all_subscribers()) == {stalled, reader}
    assert stalled.missed == 1  # the one that parked it; the rest are counted by the index
    assert hub.subscriptions.missed(stalled) == 96
    assert hub.metrics.telemetry_dropped._value.get() == 96
    assert [m["offset"] for m in read(stalled, 2)] == [1, 2]
    assert stalled.parked  # 2 of 4 left: not below half
    hub.deliver_telemetry(record(101, "a", "env-sensor"), '{"n":0}', 0.0)
    assert [m["offset"] for m in read(stalled, 1)] == [3]
    assert not stalled.parked
    assert not hub.subscriptions.parked_all
    hub.deliver_telemetry(record(102, "a", "env-sensor"), '{"n":0}', 0.0)
    got = [
        (m["op"], m.get("offset"), m.get("dropped"), m.get("resume_from"))
        for m in read(stalled, 10)
    ]
    assert got == [
        ("telemetry", 4, None, None),
        ("lagged", None, 97, 5),  # 5 to 101
        ("telemetry", 102, None, None),
    ]
    assert stalled.dropped_total == 97


def parked_on_all() -> tuple[Hub, Dashboard]:
    """A hub and one dashboard subscribed to all, parked by ten messages it did not read."""
    hub = new_hub()
    d = attach(hub, 1)
    hub.subscriptions.subscribe(d, ALL)
    for offset in range(1, 11):
        hub.deliver_telemetry(record(offset, "a", "env-sensor"), "{}", 0.0)
    return hub, d


def test_a_subscription_change_brings_a_parked_dashboard_back_to_the_flag_count() -> None:
    hub, d = parked_on_all()
    assert d in hub.subscriptions.parked_all
    hub.subscriptions.subscribe(d, Target(TargetKind.DEVICE, "c"))
    assert not hub.subscriptions.parked_all
    assert d.missed == 6  # what the index counted is the dashboard's own now
    hub.deliver_telemetry(record(11, "c", "relay-4"), "{}", 0.0)
    assert d.missed == 7
    assert d not in hub.subscriptions.parked_all  # two targets: stays in the fan-out


def test_a_dashboard_let_go_while_parked_leaves_nothing_behind() -> None:
    hub, d = parked_on_all()
    hub.disconnect_dashboard(d)
    assert hub.subscriptions.is_empty()
    assert (d.parked, d.missed) == (False, 0)
    assert d.dropped_total == 1  # counted by the index until then: let go, not announced


class ParkingMachine(RuleBasedStateMachine):
    """Random subscriptions, deliveries and partial reads against the delivered truth."""

    def __init__(self) -> None:
        super().__init__()
        self.hub = new_hub()
        self.dashboards = [attach(self.hub, n) for n in range(3)]
        self.offset = 0
        # Per dashboard: offsets it was subscribed to when delivered, and what it got.
        self.wanted: list[list[int]] = [[] for _ in self.dashboards]
        self.got: list[list[tuple[str, int, int]]] = [[] for _ in self.dashboards]

    @rule(n=st.integers(0, 2), to=st.sampled_from(TARGETS))
    def subscribe(self, n: int, to: Target) -> None:
        self.hub.subscriptions.subscribe(self.dashboards[n], to)

    @rule(n=st.integers(0, 2), to=st.sampled_from(TARGETS))
    def unsubscribe(self, n: int, to: Target) -> None:
        self.hub.subscriptions.unsubscribe(self.dashboards[n], to)

    @rule(source=st.sampled_from(SOURCES), times=st.integers(1, 6))
    def deliver(self, source: tuple[str, str], times: int) -> None:
        device, protocol = source
        for _ in range(times):
            self.offset += 1
            for d, wanted in zip(self.dashboards, self.wanted, strict=True):
                if any(t.matches(device, protocol) for t in d.subscriptions):
                    wanted.append(self.offset)
            self.hub.deliver_telemetry(record(self.offset, device, protocol), "{}", 0.0)

    @rule(n=st.integers(0, 2), k=st.integers(1, 5))
    def take(self, n: int, k: int) -> None:
        for msg in read(self.dashboards[n], k):
            if msg["op"] == "telemetry":
                self.got[n].append(("t", msg["offset"], 0))
            else:
                self.got[n].append(("lagged", msg["resume_from"], msg["dropped"]))

    @invariant()
    def every_wanted_message_is_sent_queued_or_counted(self) -> None:
        index = self.hub.subscriptions
        for n, d in enumerate(self.dashboards):
            sent = sum(1 for kind, _, _ in self.got[n] if kind == "t")
            announced = sum(count for kind, _, count in self.got[n] if kind == "lagged")
            # A notice made when the dashboard rejoined waits in order among control messages.
            waiting = sum(
                json.loads(text)["dropped"]
                for kind, _, text in d.queued_items()
                if kind is Kind.CONTROL and json.loads(text)["op"] == "lagged"
            )
            assert sent + announced + waiting + d.telemetry_queued + index.missed(d) == len(
                self.wanted[n]
            )
            assert d.dropped_total == announced + waiting + d.missed

    @invariant()
    def each_notice_starts_the_run_it_counts(self) -> None:
        for n in range(len(self.dashboards)):
            wanted, position = self.wanted[n], 0
            for kind, first, count in self.got[n]:
                if kind == "t":
                    position = wanted.index(first, position) + 1
                else:
                    # since = first - 1 replays from here: the next `count` wanted
                    # offsets are exactly the ones missed, none of them sent before.
                    assert wanted[position] == first
                    position += count

    @invariant()
    def the_fan_out_skips_exactly_the_dashboards_it_counts(self) -> None:
        index = self.hub.subscriptions
        for d in index.parked_all:
            assert d.parked
            assert d.subscriptions == {ALL}
        for device, protocol in SOURCES:
            fanned = set(index.telemetry_subscribers(device, protocol))
            assert fanned.isdisjoint(index.parked_all)
            assert fanned | index.parked_all.keys() == set(index.subscribers(device, protocol))


ParkingMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=40)
TestParkingAgainstTheDeliveredTruth = ParkingMachine.TestCase
