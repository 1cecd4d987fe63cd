"""One connected dashboard: its role, subscriptions and bounded outbound queue.

The hub never awaits a dashboard: fan-out only appends here, and the web
layer's writer drains the queue at the pace of the socket (``wait`` and
``take``). Telemetry is what gets dropped when the queue is full, never
replies, presence or command statuses (docs/api.md §3.1); the dashboard is
told with a ``lagged`` notice where to resume. Those control messages are
bounded too, in characters of JSON: a dashboard that lets more than
``control_limit`` of them wait is closed, never allowed to grow (docs/api.md §3).

A full telemetry queue *parks* the dashboard: what is queued stays (the
oldest), and live telemetry is only counted, not queued, until the writer
has drained the queue below half. Then the dashboard rejoins, with one
``lagged`` notice queued in order (after what it kept, before what comes
next) naming how many it missed and the first offset missed, so that
``since = resume_from - 1`` recovers exactly those. The point is the cost: a
dashboard that stopped reading costs the fan-out no queue operation, only a
flag check a message, or nothing when the subscription index can count for
it (``SubscriptionIndex.leave``; docs/benchmarks.md, issue 12).
"""

from __future__ import annotations

import asyncio
import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from frames.ratelimit import TokenBucket

from .messages import Target, dumps
from .replay import HeldLive


class Role(enum.StrEnum):
    """A token's role (docs/api.md §1)."""

    VIEWER = "viewer"
    OPERATOR = "operator"


class Refused(Exception):
    """A dashboard or request the hub cannot take now (a limit is reached)."""


class Kind(enum.IntEnum):
    """What an outbound item is: telemetry may be dropped, the rest never."""

    TELEMETRY = 0
    CONTROL = 1


# What a dashboard whose control messages passed ``control_limit`` is closed for.
CONTROL_QUEUE = "control_queue"


# eq=False: hashed by identity, kept in sets; weakref_slot: tests prove nothing keeps a
# disconnected dashboard alive.
@dataclass(slots=True, eq=False, weakref_slot=True)
class Dashboard:
    """One dashboard's outbound side. The writer awaits ``wait()`` and sends ``take()``."""

    id: int
    role: Role
    session: str
    limit: int
    commands: TokenBucket  # commands per second (docs/api.md §3.2)
    # Characters of control messages (replies, presence, statuses) that may wait.
    control_limit: int = 1 << 20
    # Called once when ``control_limit`` is passed; the hub disconnects the dashboard.
    on_overflow: Callable[[Dashboard], None] | None = None
    # Called when a parked dashboard rejoins, before its notice is made: the
    # subscription index adds what it counted for it (``SubscriptionIndex.leave``).
    on_rejoin: Callable[[Dashboard], None] | None = None
    subscriptions: set[Target] = field(default_factory=set)
    # Two FIFOs instead of one, so that counting telemetry stays O(1) whatever
    # control messages wait (a stalled dashboard during session churn): each
    # entry carries a sequence number, and ``take`` merges the two by it, so
    # the order pushed is the order sent. control: (seq, text); telemetry:
    # (seq, offset, text, loop time the device frame arrived, 0 when unknown)
    _control: deque[tuple[int, str]] = field(default_factory=deque)
    _telemetry: deque[tuple[int, int, str, float]] = field(default_factory=deque)
    _seq: int = 0
    telemetry_queued: int = 0
    control_queued: int = 0  # characters of the control messages queued
    # Drops announced at the head of the next batch (a replay that could not
    # catch up, or its hold overflowing): how many, and the lowest offset.
    dropped: int = 0
    resume_from: int | None = None
    # Parked: the telemetry queue filled up and live telemetry is counted in
    # ``missed``, not queued, until ``take`` drains the queue below half. The
    # hub's fan-out reads ``parked`` and bumps ``missed`` itself (inlined: it
    # runs once a message for every subscribed dashboard).
    parked: bool = False
    missed: int = 0
    # The first offset missed while parked; None when it was not sequenced
    # (a cluster node cut from Redis) and until a sequenced one is missed.
    missed_from: int | None = None
    _dropped_before: int = 0  # dropped or missed, not counting ``missed`` now
    closed: bool = False
    # Why the hub closed it (``CONTROL_QUEUE``); None while open or closed by the web layer.
    close_reason: str | None = None
    # Command requests being routed for this dashboard (docs/api.md §3.2 ``command``).
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    # When the oldest telemetry of the last batch ``take()`` returned arrived.
    batch_received: float = 0.0
    held: HeldLive = field(init=False)
    _ready: asyncio.Event = field(default_factory=asyncio.Event)
    _room: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.held = HeldLive(self.limit)

    def push_control(self, text: str) -> None:
        """Queue a reply, presence or command_status: never dropped.

        Past ``control_limit`` characters waiting, the dashboard is closed
        instead: one message is always taken into an empty queue, so a reply
        bigger than the limit (a ``devices`` page) still reaches a reader.
        """
        if self.closed:
            return
        size = len(text)
        if self.control_queued and self.control_queued + size > self.control_limit:
            self.overflow()
            return
        self.control_queued += size
        self._seq += 1
        self._control.append((self._seq, text))
        self._ready.set()

    def push_control_json(self, obj: dict[str, object]) -> None:
        """Queue a control message given as a JSON object."""
        self.push_control(dumps(obj))

    def push_telemetry(
        self, offset: int, text: str, received: float = 0.0, device: str = "", protocol: str = ""
    ) -> int:
        """Queue a live telemetry message; returns 1 when it was dropped instead, else 0.

        The hub's fan-out has the parked case inlined (``Hub.deliver_telemetry``).
        """
        if self.closed:
            return 0
        if self.parked:
            self.miss(offset)
            return 1
        if not self.held.targets:
            # append_telemetry inlined: this runs once per message per subscribed dashboard.
            if self.telemetry_queued < self.limit:
                self._seq = seq = self._seq + 1
                self._telemetry.append((seq, offset, text, received))
                self.telemetry_queued += 1
                self._ready.set()
                return 0
            self.park(offset)
            return 1
        dropped = self.held.offer((offset, text, received, device, protocol))
        for off in dropped:
            self.note_drop(off)
        return len(dropped)

    def append_telemetry(self, offset: int, text: str, received: float = 0.0) -> int:
        """Queue telemetry behind what is queued; full (or parked), it is missed instead.

        Returns how many were dropped (0 or 1). The writer needs no wake-up
        for a drop: what fills the queue already woke it.
        """
        if self.parked:
            self.miss(offset)
            return 1
        if self.telemetry_queued >= self.limit:
            self.park(offset)
            return 1
        self._seq += 1
        self._telemetry.append((self._seq, offset, text, received))
        self.telemetry_queued += 1
        self._ready.set()
        return 0

    def park(self, offset: int) -> None:
        """The queue is full: keep what it holds and count live telemetry, from ``offset`` on."""
        self.parked = True
        self.missed = 1
        self.missed_from = offset

    def miss(self, offset: int) -> None:
        """Telemetry at ``offset`` went past a parked dashboard (the hub inlines this)."""
        self.missed += 1
        if self.missed_from is None:
            self.missed_from = offset

    def note_drop(self, offset: int) -> None:
        """Telemetry at ``offset`` will not reach this dashboard: announce it first thing."""
        # The lagged notice is itself something to send: wake the writer even
        # when nothing else is queued after the drop.
        self._ready.set()
        self.dropped += 1
        self._dropped_before += 1
        if offset is not None and (self.resume_from is None or offset < self.resume_from):
            self.resume_from = offset

    @property
    def dropped_total(self) -> int:
        """Telemetry dropped or missed since the dashboard connected (announced or not yet).

        While it is out of the fan-out, what it misses is counted by the
        subscription index (``SubscriptionIndex.missed``) and added when it rejoins.
        """
        return self._dropped_before + self.missed

    def queued_items(self) -> list[tuple[Kind, int, str]]:
        """What waits to be sent, in order, as (kind, offset, text): for tests and debugging."""
        merged: list[tuple[int, Kind, int, str]] = [
            (seq, Kind.CONTROL, 0, text) for seq, text in self._control
        ]
        merged += [(seq, Kind.TELEMETRY, off, text) for seq, off, text, _ in self._telemetry]
        return [(kind, off, text) for _, kind, off, text in sorted(merged)]

    @property
    def has_room(self) -> bool:
        """True while telemetry can be queued without dropping any."""
        return not self.parked and self.telemetry_queued < self.limit

    async def wait(self) -> None:
        """Until there is something to send (or the dashboard is closed)."""
        while not self._control and not self._telemetry and not self.dropped and not self.closed:
            self._ready.clear()
            await self._ready.wait()

    def take(self, max_items: int) -> list[str]:
        """Up to ``max_items`` queued texts, a lagged notice first if telemetry was dropped."""
        out: list[str] = []
        if self.dropped:
            out.append(
                dumps({"op": "lagged", "dropped": self.dropped, "resume_from": self.resume_from})
            )
            self.dropped = 0
            self.resume_from = None
        control, telemetry = self._control, self._telemetry
        self.batch_received = 0.0
        while len(out) < max_items and (control or telemetry):
            if telemetry and (not control or telemetry[0][0] < control[0][0]):
                _, _, text, received = telemetry.popleft()
                self.telemetry_queued -= 1
                if received and not self.batch_received:
                    self.batch_received = received
            else:
                text = control.popleft()[1]
                self.control_queued -= len(text)
            out.append(text)
        if self.telemetry_queued < self._half:
            if self.parked:
                self._rejoin()
            self._room.set()
        return out

    def _rejoin(self) -> None:
        """Drained below half: live telemetry is queued again, behind a ``lagged`` notice.

        The notice goes into the control queue in order, so it arrives after
        the telemetry kept and before the next live message. It is not held
        to ``control_limit``: one small notice per park, and parking needs the
        writer to have drained half the queue first.
        """
        if self.on_rejoin is not None:
            self.on_rejoin(self)
        notice = dumps({"op": "lagged", "dropped": self.missed, "resume_from": self.missed_from})
        self._dropped_before += self.missed
        self.parked = False
        self.missed = 0
        self.missed_from = None
        self._seq += 1
        self._control.append((self._seq, notice))
        self.control_queued += len(notice)
        self._ready.set()

    @property
    def _half(self) -> int:
        # At least 1: with a queue of 1, "half full" must still mean "empty".
        return max(1, self.limit // 2)

    async def room(self) -> None:
        """Until the queue is at most half full (a replay waits on this: backpressure)."""
        while self.telemetry_queued >= self._half and not self.closed:
            self._room.clear()
            await self._room.wait()

    def close(self) -> None:
        """No more output; wake the writer so it can finish."""
        self.closed = True
        self._ready.set()
        self._room.set()

    def overflow(self) -> None:
        """Control messages passed ``control_limit``: close, let go of the queue, tell the hub."""
        if self.closed:
            return
        self.close_reason = CONTROL_QUEUE
        self.close()
        self.discard()
        if self.on_overflow is not None:
            self.on_overflow(self)

    def discard(self) -> None:
        """Let go of everything queued or held: nobody will read it (call after ``close``)."""
        self._control.clear()
        self._telemetry.clear()
        self.telemetry_queued = 0
        self.control_queued = 0
        self.dropped = 0
        self.resume_from = None
        self._dropped_before += self.missed
        self.parked = False
        self.missed = 0
        self.missed_from = None
        self.held.items.clear()
