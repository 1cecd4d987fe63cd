"""A sans-IO session core on a fake clock, with the few moves every core test makes."""

from __future__ import annotations

from typing import Any

import frames
from devices import (
    CloseLink,
    DeviceCounters,
    DeviceInfo,
    DeviceOffline,
    DeviceOnline,
    DeviceTelemetry,
    LinkPolicy,
    SessionConfig,
    SessionCore,
    SessionEvent,
    SessionState,
)
from devices.core import Admit, admit_all
from tests.devices.support import FakeClock, parse, session_ids, wire


class Bench:
    """One ``SessionCore``, its fake clock, and what it emitted and wrote."""

    def __init__(
        self,
        link: str = "tcp",
        *,
        policy: LinkPolicy | None = None,
        admit: Admit = admit_all,
        **config: Any,
    ) -> None:
        self.clock = FakeClock()
        self.config = SessionConfig(**config)
        self.totals = DeviceCounters()
        if policy is None:
            policy = (
                LinkPolicy.tcp(self.config) if link == "tcp" else LinkPolicy.serial(self.config)
            )
        self.core = SessionCore(
            self.config,
            policy,
            now=self.clock.now,
            peer="test:1",
            wall_ms=self.clock.wall_ms,
            new_session_id=session_ids(),
            admit=admit,
            totals=self.totals,
        )
        self.events: list[SessionEvent] = []

    @property
    def state(self) -> SessionState:
        return self.core.state

    def feed(self, *messages: frames.Message) -> list[SessionEvent]:
        """Each message as one frame, all in one chunk, at the clock's now."""
        return self.feed_raw(wire(*messages))

    def feed_raw(self, data: bytes) -> list[SessionEvent]:
        got = self.core.receive_data(data, self.clock.now)
        self.events += got
        return got

    def advance(self, seconds: float) -> list[SessionEvent]:
        """Move the clock, then let the core expire what is due."""
        got = self.core.expire(self.clock.advance(seconds))
        self.events += got
        return got

    def run_until(self, t: float) -> list[SessionEvent]:
        """Call ``expire`` at each deadline up to clock value ``t``, as the adapter's timer does."""
        got: list[SessionEvent] = []
        while (deadline := self.core.deadline) is not None and deadline <= t:
            self.clock.now = max(self.clock.now, deadline) + 0.001
            got += self.core.expire(self.clock.now)
        self.clock.now = max(self.clock.now, t)
        self.events += got
        return got

    def out(self) -> list[frames.Message]:
        """The messages the core wrote since the last call."""
        return parse(self.core.data_to_send())

    def hello(self, client_id: str = "dev-1", protocol: str = "env-sensor", token: str = "") -> Any:
        """HELLO in; the WELCOME out (asserted)."""
        events = self.feed(frames.Hello(7, client_id, protocol, token))
        [welcome] = self.out()
        assert isinstance(welcome, frames.Welcome), welcome
        assert [type(e) for e in events] == [DeviceOnline]
        return welcome

    def errors(self) -> list[int]:
        """The ERROR codes the core wrote since the last ``out``."""
        return [m.code for m in self.out() if isinstance(m, frames.Error)]


def kinds(events: list[SessionEvent]) -> list[type]:
    return [type(e) for e in events]


def info_of(events: list[SessionEvent]) -> DeviceInfo:
    [online] = [e for e in events if isinstance(e, DeviceOnline)]
    return online.info


def offline(events: list[SessionEvent]) -> DeviceOffline:
    [off] = [e for e in events if isinstance(e, DeviceOffline)]
    return off


def closed(events: list[SessionEvent]) -> CloseLink:
    [close] = [e for e in events if isinstance(e, CloseLink)]
    return close


def telemetry(events: list[SessionEvent]) -> list[DeviceTelemetry]:
    return [e for e in events if isinstance(e, DeviceTelemetry)]
