"""The asyncio skin of a device session: one link, one ``SessionCore``, one timer.

The rules of docs/protocol.md §4 live in the sans-IO ``devices.core``. This
adapter gives the core its clocks (the loop's monotonic time, the wall clock,
uuid4 for session ids), moves bytes between the link and the core, hands the
core's events to the registry (``SessionHost``), and maps command results onto
futures. It arms a single timer at the core's next deadline; a frame only
moves the silence deadline later, so the timer is not touched per frame: it
fires at the older deadline, finds nothing to do, and is armed again.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from typing import Final

from frames import ErrorCode

from .core import CloseLink, CommandDone, SessionCore, SessionEvent, SessionState
from .counters import LinkCounters
from .events import (
    CloseReason,
    CommandHandle,
    CommandResult,
    DeviceInfo,
    DeviceNotOnline,
    DeviceOffline,
    DeviceOnline,
    DeviceTelemetry,
)
from .policy import LinkPolicy
from .ports import LinkPort, SessionHost

log = logging.getLogger(__name__)

# The timer fires this long after a deadline so that the core, which times a
# partial frame out only strictly after its deadline, sees it as passed.
TIMER_SLACK: Final = 0.001


def wall_ms() -> int:
    """Unix time in milliseconds (telemetry ``ts``, ``connected_at``)."""
    return time.time_ns() // 1_000_000


class DeviceSession:
    """The session of one link. Create it when the link opens, ``start`` it, feed it bytes.

    ``policy`` says which rules the link follows (default: those of
    ``link.kind``); ``counters``, when given, outlive the link (a serial port
    keeps one set across reopenings), else the session has its own.
    """

    def __init__(
        self,
        host: SessionHost,
        link: LinkPort,
        *,
        policy: LinkPolicy | None = None,
        counters: LinkCounters | None = None,
    ) -> None:
        self.host = host
        self.link = link
        self.owns_counters = counters is None
        self._loop = asyncio.get_running_loop()
        config = host.config
        self._max_write_buffer = config.max_write_buffer
        self.core = SessionCore(
            config,
            policy or LinkPolicy.for_transport(link.kind, config),
            now=self._loop.time(),
            peer=link.peer,
            wall_ms=wall_ms,
            new_session_id=uuid.uuid4,
            admit=self._admit,
            counters=counters,
            totals=host.counters,
        )
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf  # the deadline the timer is armed for
        self._results: dict[int, asyncio.Future[CommandResult]] = {}
        # Waiting room for commands: one slot per command the core may have in flight.
        self._slots = asyncio.Semaphore(config.max_inflight_commands)
        self._link_gone = False  # the link closed by itself: nothing to close
        self._finished = False  # the registry has been told the link is closed

    # ---- what the registry and tests read -------------------------------------------------------

    @property
    def info(self) -> DeviceInfo | None:
        """The identity of the latest session on this link, None before any."""
        return self.core.info

    @property
    def state(self) -> SessionState:
        """awaiting_hello, online or closed."""
        return self.core.state

    @property
    def counters(self) -> LinkCounters:
        """The link's traffic counters."""
        return self.core.counters

    # ---- life cycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """The link is open: register it and arm the HELLO deadline (if the link has one)."""
        self.host.link_opened(self)
        self._rearm()

    def data_received(self, data: bytes) -> None:
        """Bytes from the link, in any chunks."""
        core = self.core
        self._handle(core.receive_data(data, self._loop.time()))
        deadline = core.deadline
        if deadline is not None and deadline < self._timer_at:
            self._arm(deadline)

    def link_lost(self, reason: CloseReason) -> None:
        """The link is gone (closed by the peer, failed, or unplugged)."""
        self._link_gone = True
        self._handle(self.core.close(reason))

    def close(self, reason: CloseReason, error: ErrorCode | None = None, message: str = "") -> None:
        """Close the link for ``reason``, after sending ERROR ``error`` when given."""
        self._handle(self.core.close(reason, error, message))

    # ---- commands -------------------------------------------------------------------------------

    async def send_command(self, body: bytes) -> CommandHandle:
        """Write a COMMAND (waiting for a slot and for room: backpressure); return its handle.

        The handle's ``result`` resolves to ACKED, NACKED or TIMEOUT. Raises
        ``DeviceNotOnline`` if the session is not (or no longer) online.
        """
        core = self.core
        if core.state is not SessionState.ONLINE:
            raise DeviceNotOnline(self._name())
        await self._slots.acquire()
        try:
            seq = core.send_command(body, self._loop.time())
        except BaseException:
            self._slots.release()
            raise
        assert core.info is not None
        future: asyncio.Future[CommandResult] = self._loop.create_future()
        self._results[seq] = future
        self._handle(())
        self._rearm()
        await self.link.drain()
        return CommandHandle(core.info.client_id, seq, future)

    # ---- events and bytes out -------------------------------------------------------------------

    def _handle(self, events: list[SessionEvent] | tuple[()]) -> None:
        out = self.core.data_to_send()
        if out:
            self.link.write(out)
        host = self.host
        for event in events:
            if isinstance(event, DeviceTelemetry):
                host.telemetry(event)
            elif isinstance(event, DeviceOnline):
                host.session_started(self, event)
            elif isinstance(event, DeviceOffline):
                host.session_ended(self, event)
            elif isinstance(event, CommandDone):
                self._command_done(event)
            elif isinstance(event, CloseLink):
                self._close_link()
        if (
            out
            and self.link.write_buffer_size() > self._max_write_buffer
            and self.core.state is not SessionState.CLOSED
        ):
            log.warning("closing link %s: the device does not read", self.link.peer)
            self.close(CloseReason.NOT_READING)

    def _command_done(self, event: CommandDone) -> None:
        future = self._results.pop(event.seq, None)
        if future is not None and not future.done():
            future.set_result(event.result)
        self._slots.release()

    def _close_link(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_at = math.inf
        if not self._link_gone:
            self.link.close()
        if not self._finished:
            self._finished = True
            self.host.link_closed(self)

    def _admit(self, info: DeviceInfo) -> str | None:
        return self.host.admit(self, info)

    # ---- the one timer --------------------------------------------------------------------------

    def _rearm(self) -> None:
        deadline = self.core.deadline
        if deadline is not None and deadline < self._timer_at:
            self._arm(deadline)

    def _arm(self, deadline: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_at(deadline + TIMER_SLACK, self._on_timer)
        self._timer_at = deadline

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = math.inf
        self._handle(self.core.expire(self._loop.time()))
        self._rearm()

    def _name(self) -> str:
        info = self.core.info
        return info.client_id if info is not None else self.link.peer
