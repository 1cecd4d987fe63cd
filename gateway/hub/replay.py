"""Replay: stored telemetry after an offset, then live, with no gap and no duplicate.

A subscribe with ``since`` (docs/api.md §3.2) reads history up to a seam, an
offset taken when the replay starts: above everything already delivered live
and below everything that comes later (offsets need not be consecutive).
Live telemetry for the dashboard waits in a ``HeldLive`` buffer meanwhile and
is released after the replay, so order holds. When live traffic outruns the
buffer, what the replay will read from history anyway is let go and the
replay reads on to a new seam.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Protocol

from .messages import Target, dumps, telemetry_message
from .records import StoreError, TelemetryRecord

# Rounds a replay may take to catch up with live traffic before it gives up
# and sends a lagged notice instead.
REPLAY_ROUNDS = 20

# (offset, text, loop time the device frame arrived, device, protocol)
Held = tuple[int, str, float, str, str]


class HeldLive:
    """Live telemetry held back while one or more replays of a dashboard run."""

    __slots__ = ("items", "limit", "overflowed", "targets")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.targets: list[Target] = []
        self.items: deque[Held] = deque()
        # Set when ``items`` overflowed: the replays' own messages were let go
        # (they are in history) and the replay must read up to a new seam.
        self.overflowed = False

    @property
    def active(self) -> bool:
        """True while a replay runs."""
        return bool(self.targets)

    def replayed(self, device: str, protocol: str) -> bool:
        """True when a running replay will read this device's telemetry from history."""
        return any(t.matches(device, protocol) for t in self.targets)

    def offer(self, item: Held) -> list[int]:
        """Hold ``item``; returns the offsets of telemetry dropped to stay bounded."""
        if self.overflowed and self.replayed(item[3], item[4]):
            return []  # history has it; the replay's next round reads it
        self.items.append(item)
        if len(self.items) <= self.limit:
            return []
        # Too much live traffic while replaying: let go of what the replay will
        # read again from history; anything else is dropped and announced.
        self.overflowed = True
        dropped: list[int] = []
        kept: deque[Held] = deque()
        for held in self.items:
            if self.replayed(held[3], held[4]):
                continue
            if len(kept) < self.limit // 2:
                kept.append(held)
            else:
                dropped.append(held[0])
        self.items = kept
        return dropped


class ReplayOutbox(Protocol):
    """What a replay needs of a dashboard."""

    @property
    def closed(self) -> bool: ...

    @property
    def held(self) -> HeldLive: ...

    @property
    def has_room(self) -> bool: ...

    async def room(self) -> None: ...

    def append_telemetry(self, offset: int, text: str, received: float = 0.0) -> int: ...

    def note_drop(self, offset: int) -> None: ...


class History(Protocol):
    """What a replay reads: the seam and the stored telemetry (an ``Engine`` is one)."""

    def seam(self) -> int: ...

    async def flush(self) -> None: ...

    async def history(
        self,
        after: int,
        *,
        until: int | None = None,
        device: str | None = None,
        protocol: str | None = None,
        limit: int = 100,
    ) -> list[TelemetryRecord]: ...


# The fields of a stored message outside their range, or None.
Flag = Callable[[TelemetryRecord], tuple[str, ...] | None]


async def replay(
    d: ReplayOutbox,
    target: Target,
    since: int,
    history: History,
    flag: Flag | None = None,
) -> None:
    """Queue ``target``'s telemetry after ``since`` for ``d``, then its held live messages.

    The caller subscribed ``d`` to ``target`` and called ``d.held.targets.append(target)``
    before the seam was taken; this removes it again and releases the held messages.

    ``flag`` names the fields of a stored message outside their range (its
    ``out_of_range``, docs/api.md §3.1).

    A ``StoreError`` from the history (its storage failing) ends the replay
    and is raised after a lagged notice at the first offset not replayed, so
    the dashboard knows where to resume, as when a replay cannot catch up.
    """
    progress = _Progress(since)
    held = d.held
    try:
        cut = history.seam()
        for _ in range(REPLAY_ROUNDS):
            await history.flush()
            await _replay_range(d, target, progress, cut, history, flag)
            await _release_held(d, target, progress)
            if d.closed or not held.overflowed:
                break  # caught up: held is empty, live flows straight in
            # Live traffic outran the hold buffer: read on to a new seam.
            held.overflowed = False
            cut = history.seam()
        else:
            d.note_drop(progress.after + 1)  # could not catch up: say where to resume
            held.overflowed = False
    except StoreError:
        d.note_drop(progress.after + 1)
        held.overflowed = False
        raise
    finally:
        held.targets.remove(target)
        if not held.active:
            items, held.items = held.items, deque()
            for offset, text, received, _, _ in items:
                d.append_telemetry(offset, text, received)


class _Progress:
    """The offset up to which a replay has given ``target``'s telemetry to the dashboard."""

    __slots__ = ("after",)

    def __init__(self, after: int) -> None:
        self.after = after


async def _release_held(d: ReplayOutbox, target: Target, progress: _Progress) -> None:
    """Move held live telemetry to the queue, waiting for room as the replay did.

    New live messages keep landing in the held buffer meanwhile, so order holds.
    ``progress`` moves to the last released message of ``target``.
    """
    held = d.held
    while held.items and not held.overflowed and not d.closed:
        await d.room()
        while held.items and not held.overflowed and d.has_room:
            offset, text, received, device, protocol = held.items.popleft()
            d.append_telemetry(offset, text, received)
            if offset is not None and target.matches(device, protocol):
                progress.after = offset


async def _replay_range(
    d: ReplayOutbox,
    target: Target,
    progress: _Progress,
    cut: int,
    history: History,
    flag: Flag | None,
) -> None:
    """Queue stored telemetry of ``target`` with ``progress.after < offset <= cut``.

    Waits for room; ``progress`` follows each message queued, so a read that
    fails half way leaves it at the last one the dashboard will get.
    """
    kind = str(target.kind)
    while not d.closed:
        records = await history.history(
            progress.after,
            until=cut,
            device=target.value if kind == "device" else None,
            protocol=target.value if kind == "protocol" else None,
            limit=500,
        )
        if not records:
            break
        for rec in records:
            await d.room()
            message = telemetry_message(rec, None if flag is None else flag(rec))
            d.append_telemetry(rec.offset, dumps(message))
            progress.after = rec.offset
    progress.after = max(progress.after, cut)
