"""gateway.hub.subscriptions: which dashboards want a device's telemetry and presence.

Pins the index's rules (docs/api.md §3.2): targets add up per dashboard,
subscribing twice is harmless, unsubscribing what one does not have is no
error, ``remove`` forgets a dashboard entirely, ``subscribers`` is the union
of the device, protocol and "all" entries with each dashboard once, the
index and each dashboard's own ``subscriptions`` set stay mirrors, and the
index is empty again once the last subscriber leaves. A state machine checks
``subscribers`` against the brute-force answer over random sequences.
"""

from __future__ import annotations

import itertools

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from frames.ratelimit import TokenBucket
from gateway.hub import Dashboard, Role, SubscriptionIndex, Target, TargetKind
from gateway.hub.messages import ALL

DEVICES = ["a", "b", "c"]
PROTOCOLS = ["env-sensor", "relay-4"]
TARGETS = (
    [Target(TargetKind.DEVICE, d) for d in DEVICES]
    + [Target(TargetKind.PROTOCOL, p) for p in PROTOCOLS]
    + [ALL]
    # A device named like a protocol: its entry must not answer for the protocol.
    + [Target(TargetKind.DEVICE, "relay-4")]
)


def dashboard(n: int) -> Dashboard:
    return Dashboard(n, Role.VIEWER, f"s{n}", 8, TokenBucket(1.0, 1.0, 0.0))


def dev(name: str) -> Target:
    return Target(TargetKind.DEVICE, name)


def proto(name: str) -> Target:
    return Target(TargetKind.PROTOCOL, name)


def test_a_new_index_is_empty() -> None:
    index = SubscriptionIndex()
    assert index.is_empty()
    assert not index.subscribers("a", "env-sensor")
    assert not index.all_subscribers()


def test_subscribe_by_device_protocol_and_all() -> None:
    index = SubscriptionIndex()
    by_device, by_protocol, everything = dashboard(1), dashboard(2), dashboard(3)
    index.subscribe(by_device, dev("a"))
    index.subscribe(by_protocol, proto("relay-4"))
    index.subscribe(everything, ALL)
    assert set(index.subscribers("a", "env-sensor")) == {by_device, everything}
    assert set(index.subscribers("b", "relay-4")) == {by_protocol, everything}
    assert set(index.subscribers("a", "relay-4")) == {by_device, by_protocol, everything}
    assert set(index.subscribers("z", "other")) == {everything}
    assert set(index.all_subscribers()) == {everything}
    assert by_device.subscriptions == {dev("a")}
    assert by_protocol.subscriptions == {proto("relay-4")}
    assert everything.subscriptions == {ALL}


def test_a_device_target_never_answers_for_a_protocol_of_the_same_name() -> None:
    index = SubscriptionIndex()
    d = dashboard(1)
    index.subscribe(d, dev("relay-4"))
    assert not index.subscribers("a", "relay-4")
    assert set(index.subscribers("relay-4", "env-sensor")) == {d}


def test_subscribers_lists_a_dashboard_once_whatever_its_targets() -> None:
    index = SubscriptionIndex()
    d, other = dashboard(1), dashboard(2)
    for target in (dev("a"), proto("env-sensor"), ALL):
        index.subscribe(d, target)
    index.subscribe(other, dev("a"))
    found = list(index.subscribers("a", "env-sensor"))
    assert len(found) == 2
    assert set(found) == {d, other}


def test_subscribing_twice_is_harmless() -> None:
    index = SubscriptionIndex()
    d = dashboard(1)
    index.subscribe(d, dev("a"))
    index.subscribe(d, dev("a"))
    assert d.subscriptions == {dev("a")}
    assert list(index.subscribers("a", "p")) == [d]
    index.unsubscribe(d, dev("a"))  # once is enough
    assert index.is_empty()
    assert not d.subscriptions


def test_targets_add_up_and_leave_one_by_one() -> None:
    index = SubscriptionIndex()
    d = dashboard(1)
    index.subscribe(d, dev("a"))
    index.subscribe(d, dev("b"))
    index.unsubscribe(d, dev("a"))
    assert not index.subscribers("a", "p")
    assert set(index.subscribers("b", "p")) == {d}
    assert d.subscriptions == {dev("b")}
    assert not index.is_empty()


def test_unsubscribing_what_one_does_not_have_is_no_error() -> None:
    index = SubscriptionIndex()
    d, other = dashboard(1), dashboard(2)
    index.unsubscribe(d, dev("a"))
    index.unsubscribe(d, proto("relay-4"))
    index.unsubscribe(d, ALL)
    assert index.is_empty()
    index.subscribe(other, dev("a"))
    index.unsubscribe(d, dev("a"))  # someone else's entry stays
    assert set(index.subscribers("a", "p")) == {other}


def test_remove_forgets_every_target_of_one_dashboard() -> None:
    index = SubscriptionIndex()
    d, other = dashboard(1), dashboard(2)
    for target in (dev("a"), proto("env-sensor"), ALL):
        index.subscribe(d, target)
    index.subscribe(other, proto("env-sensor"))
    index.remove(d)
    assert not d.subscriptions
    assert set(index.subscribers("a", "env-sensor")) == {other}
    assert not index.all_subscribers()
    index.remove(other)
    assert index.is_empty()


def test_the_index_empties_when_the_last_subscriber_leaves() -> None:
    index = SubscriptionIndex()
    ds = [dashboard(n) for n in range(3)]
    for d in ds:
        index.subscribe(d, dev("a"))
        index.subscribe(d, proto("relay-4"))
    for d in ds[:-1]:
        index.remove(d)
        assert not index.is_empty()
    index.unsubscribe(ds[-1], dev("a"))
    assert not index.is_empty()
    index.unsubscribe(ds[-1], proto("relay-4"))
    assert index.is_empty()


def test_remove_of_a_dashboard_without_subscriptions_is_harmless() -> None:
    index = SubscriptionIndex()
    d, other = dashboard(1), dashboard(2)
    index.subscribe(other, ALL)
    index.remove(d)
    assert set(index.all_subscribers()) == {other}


class SubscriptionMachine(RuleBasedStateMachine):
    """Random subscribe/unsubscribe/remove against a model: target sets by dashboard."""

    def __init__(self) -> None:
        super().__init__()
        self.index = SubscriptionIndex()
        self.dashboards = [dashboard(n) for n in range(4)]
        self.model: dict[Dashboard, set[Target]] = {d: set() for d in self.dashboards}

    # (``target`` is a keyword of @rule itself, hence ``to``.)
    @rule(n=st.integers(0, 3), to=st.sampled_from(TARGETS))
    def subscribe(self, n: int, to: Target) -> None:
        d = self.dashboards[n]
        self.index.subscribe(d, to)
        self.model[d].add(to)

    @rule(n=st.integers(0, 3), to=st.sampled_from(TARGETS))
    def unsubscribe(self, n: int, to: Target) -> None:
        d = self.dashboards[n]
        self.index.unsubscribe(d, to)
        self.model[d].discard(to)

    @rule(n=st.integers(0, 3))
    def remove(self, n: int) -> None:
        d = self.dashboards[n]
        self.index.remove(d)
        self.model[d].clear()

    @invariant()
    def subscribers_are_the_dashboards_with_a_matching_target(self) -> None:
        for device, protocol in itertools.product([*DEVICES, "relay-4", "z"], [*PROTOCOLS, "x"]):
            expected = {
                d
                for d, targets in self.model.items()
                if any(t.matches(device, protocol) for t in targets)
            }
            found = list(self.index.subscribers(device, protocol))
            assert len(found) == len(set(found)), "a dashboard listed twice"
            assert set(found) == expected, (device, protocol)

    @invariant()
    def all_subscribers_are_those_with_all(self) -> None:
        assert set(self.index.all_subscribers()) == {d for d, t in self.model.items() if ALL in t}

    @invariant()
    def each_dashboard_mirrors_its_entries(self) -> None:
        for d, targets in self.model.items():
            assert d.subscriptions == targets

    @invariant()
    def empty_exactly_when_nobody_subscribes(self) -> None:
        assert self.index.is_empty() == (not any(self.model.values()))


SubscriptionMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=30)
TestSubscriptionIndexAgainstBruteForce = SubscriptionMachine.TestCase
