"""The registry with fake links: takeover, max_devices, counters, the hub seam."""

from __future__ import annotations

import logging

import pytest

import frames
from devices import (
    CloseReason,
    DeviceEvent,
    DeviceManager,
    DeviceNotOnline,
    DeviceOffline,
    DeviceOnline,
    DeviceSession,
    DeviceTelemetry,
    LinkCounters,
    LinkPolicy,
    SessionConfig,
    Transport,
)
from frames import ErrorCode
from tests.devices.support import ENV_DATA, FakeLink, Recorder, wire


def open_link(
    manager: DeviceManager,
    peer: str,
    policy: LinkPolicy | None = None,
    counters: LinkCounters | None = None,
) -> tuple[DeviceSession, FakeLink]:
    link = FakeLink(peer)
    session = DeviceSession(manager, link, policy=policy, counters=counters)
    session.start()
    return session, link


def hello(session: DeviceSession, link: FakeLink, client_id: str) -> None:
    session.data_received(wire(frames.Hello(1, client_id, "env-sensor", "")))
    assert [type(m) for m in link.take()] == [frames.Welcome]


async def test_takeover_replaces_the_older_session() -> None:
    sink = Recorder()
    manager = DeviceManager(sink)
    old, old_link = open_link(manager, "a:1")
    new, new_link = open_link(manager, "b:2")
    hello(old, old_link, "dup")
    hello(new, new_link, "dup")
    # The older link got REPLACED and was closed; the registry points at the new one.
    assert [(m.code, m.reason) for m in old_link.take() if isinstance(m, frames.Error)] == [
        (ErrorCode.REPLACED, "another link logged in as this device")
    ]
    assert old_link.closed
    assert not new_link.closed
    assert manager.online["dup"] is new
    assert [type(e) for e in sink.events] == [DeviceOnline, DeviceOffline, DeviceOnline]
    first, off, second = sink.events
    assert isinstance(first, DeviceOnline)
    assert isinstance(off, DeviceOffline)
    assert isinstance(second, DeviceOnline)
    assert off.reason is CloseReason.REPLACED
    assert off.info.session == first.info.session != second.info.session
    assert manager.counters.replaced == 1
    assert manager.counters.links_closed == {CloseReason.REPLACED: 1}
    assert manager.links == {new}
    # The old link's own loss report later changes nothing.
    old.link_lost(CloseReason.CLOSED)
    assert manager.counters.links_closed == {CloseReason.REPLACED: 1}


async def test_max_devices_refuses_and_counts() -> None:
    manager = DeviceManager(Recorder(), SessionConfig(max_devices=2))
    for peer, client_id in (("a:1", "a"), ("b:2", "b")):
        hello(*open_link(manager, peer), client_id)
    c, c_link = open_link(manager, "c:3")
    c.data_received(wire(frames.Hello(1, "c", "env-sensor", "")))
    [error] = c_link.take()
    assert isinstance(error, frames.Error)
    assert error.code == ErrorCode.RATE_LIMITED
    assert "max_devices=2" in error.reason
    assert c_link.closed
    assert manager.counters.refused_max_devices == 1
    assert manager.counters.links_closed == {CloseReason.REFUSED: 1}
    assert sorted(manager.online) == ["a", "b"]


async def test_a_full_gateway_still_lets_a_link_change_its_client_id() -> None:
    manager = DeviceManager(Recorder(), SessionConfig(max_devices=1))
    session, link = open_link(manager, "a:1")
    hello(session, link, "first")
    hello(session, link, "second")
    assert list(manager.online) == ["second"]


async def test_send_command_needs_an_online_device() -> None:
    manager = DeviceManager(Recorder())
    with pytest.raises(DeviceNotOnline):
        await manager.send_command("nobody", b"\x02")
    session, link = open_link(manager, "a:1")
    hello(session, link, "act")
    handle = await manager.send_command("act", b"\x02")
    assert link.take() == [frames.Command(handle.seq, b"\x02")]
    assert manager.is_online("act")


async def test_totals_keep_closed_links_and_port_counters() -> None:
    manager = DeviceManager(Recorder())
    tcp, tcp_link = open_link(manager, "a:1")
    hello(tcp, tcp_link, "t")
    tcp.data_received(wire(frames.Data(1, ENV_DATA)) + b"\x00\x01")
    port = manager.port_counters("/dev/ttyX")
    assert manager.port_counters("/dev/ttyX") is port
    serial_policy = LinkPolicy.serial(manager.config)
    for _ in range(2):  # a port reopened keeps one set of counters
        s, s_link = open_link(manager, "/dev/ttyX", policy=serial_policy, counters=port)
        hello(s, s_link, "s")
        s.link_lost(CloseReason.LOST)
    port.reconnects += 1
    totals = manager.totals()
    assert (totals.frames_in, totals.skipped_bytes, totals.reconnects) == (4, 2, 1)
    tcp.link_lost(CloseReason.CLOSED)
    assert manager.totals() == totals  # closed links stay counted
    assert manager.links == set()
    assert manager.counters.links_closed == {CloseReason.LOST: 2, CloseReason.CLOSED: 1}


async def test_a_failing_hub_does_not_take_the_link_down() -> None:
    class Broken:
        def device_event(self, event: DeviceEvent) -> None:
            raise RuntimeError("hub bug")

    manager = DeviceManager(Broken())
    session, link = open_link(manager, "a:1")
    hello(session, link, "d")
    session.data_received(wire(frames.Data(1, ENV_DATA), frames.Ping(4)))
    assert link.take() == [frames.Pong(4)]
    assert manager.is_online("d")


async def test_events_reach_the_hub_in_order() -> None:
    sink = Recorder()
    manager = DeviceManager(sink)
    session, link = open_link(manager, "a:1")
    hello(session, link, "e")
    session.data_received(wire(frames.Data(1, ENV_DATA), frames.Data(2, ENV_DATA)))
    session.link_lost(CloseReason.LOST)
    assert [type(e) for e in sink.events] == [
        DeviceOnline,
        DeviceTelemetry,
        DeviceTelemetry,
        DeviceOffline,
    ]
    off = sink.events[-1]
    assert isinstance(off, DeviceOffline)
    assert off.reason is CloseReason.LOST
    assert off.info.transport is Transport.TCP
    assert not manager.is_online("e")


# ---- takeover storms and the log lines peers cause ---------------------------------------------


class Clock:
    """A monotonic clock for the registry that moves when the test says."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def fight(manager: DeviceManager, client_id: str, rounds: int) -> list[FakeLink]:
    """Links taking ``client_id`` over from each other, one new link per round."""
    links = []
    for i in range(rounds):
        session, link = open_link(manager, f"p:{i}")
        session.data_received(wire(frames.Hello(1, client_id, "env-sensor", "")))
        links.append(link)
    return links


async def test_takeovers_of_one_client_id_are_bounded_per_window() -> None:
    clock = Clock()
    manager = DeviceManager(
        Recorder(), SessionConfig(max_takeovers=3, churn_window=60.0), clock=clock
    )
    links = fight(manager, "dup", 6)  # one online, 3 takeovers, 2 refused
    assert manager.counters.replaced == 3
    assert manager.counters.refused_takeovers == 2
    refused = links[4:]
    for link in refused:
        [error] = [m for m in link.take() if isinstance(m, frames.Error)]
        assert error.code == ErrorCode.RATE_LIMITED
        assert "max_takeovers=3" in error.reason
        assert link.closed
    # The last link admitted keeps the client_id: the storm stopped at it.
    holder = links[3]
    assert not holder.closed
    assert manager.online["dup"].link is holder
    assert manager.counters.links_closed == {CloseReason.REPLACED: 3, CloseReason.REFUSED: 2}
    # Another client_id is not affected; and after the window, takeovers work again.
    fight(manager, "other", 2)
    assert manager.counters.replaced == 4
    clock.now += 60.0
    fight(manager, "dup", 1)
    assert manager.counters.replaced == 5
    assert manager.counters.refused_takeovers == 2


async def test_a_takeover_storm_logs_a_few_lines_not_one_per_takeover(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="devices")
    clock = Clock()
    manager = DeviceManager(
        Recorder(),
        SessionConfig(max_takeovers=50, max_sessions_per_client=1000, churn_window=60.0),
        clock=clock,
    )
    fight(manager, "storm", 500)
    assert manager.counters.replaced == 50
    assert manager.counters.refused_takeovers == 449
    lines = [r.getMessage() for r in caplog.records if "storm" in r.getMessage()]
    # The first online and takeover as usual, one warning when refusals start.
    assert len(lines) <= 6, lines
    assert any("refusing HELLOs for it" in line for line in lines)
    # The window's summary comes with the next takeover after it.
    caplog.clear()
    clock.now += 61.0
    fight(manager, "storm", 1)
    summary = [r.getMessage() for r in caplog.records if "takeovers and" in r.getMessage()]
    assert summary == ["device storm: 50 takeovers and 449 refused HELLOs in 60 s"]
    assert len(manager._churn) == 1  # ended windows are forgotten


async def test_log_lines_of_one_kind_are_bounded_per_window(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="devices")
    clock = Clock()
    manager = DeviceManager(
        Recorder(), SessionConfig(max_log_lines=5, log_window=10.0, token="t"), clock=clock
    )
    for i in range(100):  # a reconnect loop with a wrong token
        session, link = open_link(manager, f"p:{i}")
        session.data_received(wire(frames.Hello(1, "intruder", "env-sensor", "bad")))
        assert link.closed
    assert manager.counters.auth_failed == 100
    wrong = [r for r in caplog.records if "wrong token" in r.getMessage()]
    assert len(wrong) == 5
    assert manager.logs.suppressed == 95
    clock.now += 10.0
    session, _ = open_link(manager, "p:last")
    session.data_received(wire(frames.Hello(1, "intruder", "env-sensor", "bad")))
    assert any("95 more auth log lines" in r.getMessage() for r in caplog.records)
