"""The asyncio skin of a device session: one link, one ``SessionCore``, one timer.

The rules of docs/protocol.md §4 live in the sans-IO ``devices.core``. This
adapter gives the core its clocks (the loop's monotonic time, the wall clock,
uuid4 for session ids), moves bytes between the link and the core, hands the
core's events to the registry (``SessionHost``), and maps command results onto
futures. It arms a single timer at the core's next deadline; a frame only
moves the silence deadline later, so the timer is not touched per frame: it
fires at the older deadline, finds nothing to do, and is armed again.

Backpressure both ways. In: when the core holds bytes over the device's rate
(``core.throttled``) the adapter stops reading the link (``ReadFlow``) until
the timer, armed at the core's deadline, lets the core catch up. Out: a
command waits for an in-flight slot and for room on the link, both bounded by
``ack_timeout``; one that cannot be written in time fails alone (TIMEOUT,
"device not reading"), and a lost link never raises out of ``send_command``.
"""

from __future__ import annotations

import asyncio
import dataclasses
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
    CommandStatus,
    DeviceInfo,
    DeviceNotOnline,
    DeviceOffline,
    DeviceOnline,
    DeviceTelemetry,
)
from .policy import LinkPolicy
from .ports import LinkPort, ReadFlow, SessionHost

log = logging.getLogger(__name__)

# The timer fires this long after a deadline so that the core, which times a
# partial frame out only strictly after its deadline, sees it as passed.
TIMER_SLACK: Final = 0.001

# The ``error`` of a command that could not be written within the command timeout.
NOT_READING: Final = "device not reading"


def wall_ms() -> int:
    """Unix time in milliseconds (telemetry ``ts``, ``connected_at``)."""
    return time.time_ns() // 1_000_000


class DeviceSession:
    """The session of one link. Create it when the link opens, ``start`` it, feed it bytes.

    ``policy`` says which rules the link follows (default: those of
    ``link.kind``); ``counters``, when given, outlive the link (a serial port
    keeps one set across reopenings), else the session has its own. A link
    that cannot stop reading (no ``ReadFlow``) gets no backpressure: frames
    over the rate are dropped on it, as on serial.
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
        self._ack_timeout = config.ack_timeout
        policy = policy or LinkPolicy.for_transport(link.kind, config)
        self._flow = link if isinstance(link, ReadFlow) else None
        if self._flow is None and policy.backpressure:
            policy = dataclasses.replace(policy, backpressure=False)
        self._reading_paused = False
        self.core = SessionCore(
            config,
            policy,
            now=self._loop.time(),
            peer=link.peer,
            wall_ms=wall_ms,
            new_session_id=uuid.uuid4,
            admit=self._admit,
            counters=counters,
            totals=host.counters,
            logs=host.logs,
        )
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf  # the deadline the timer is armed for
        self._results: dict[int, asyncio.Future[CommandResult]] = {}
        # Waiting room for commands: one slot per command the core may have in flight.
        self._slots = asyncio.Semaphore(config.max_inflight_commands)
        self._awaiting_room = 0  # commands with a slot, waiting for room on the link
        self._not_reading_at = -math.inf  # when a command last failed for want of room
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
        if core.throttled is not self._reading_paused:
            self._follow_throttle()
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
        """Write a COMMAND once there is a slot and room on the link; return its handle.

        Both waits together last at most ``ack_timeout``: a command that cannot
        be written by then is not written at all, and its handle (seq -1) is
        already a TIMEOUT, with error "device not reading" or naming the full
        slots. Otherwise the handle's ``result`` resolves to ACKED, NACKED or
        TIMEOUT. Raises ``DeviceNotOnline`` if the session is not (or no longer)
        online before the COMMAND is written; never ``ConnectionError``.
        """
        core = self.core
        if core.state is not SessionState.ONLINE:
            raise DeviceNotOnline(self._name())
        loop = self._loop
        deadline = loop.time() + self._ack_timeout
        try:
            async with asyncio.timeout_at(deadline):
                await self._slots.acquire()
        except TimeoutError:
            if self._awaiting_room or loop.time() - self._not_reading_at <= self._ack_timeout:
                # The slots were held by commands waiting for the device to read.
                return self._not_reading()
            self.host.counters.commands_no_slot += 1
            n = self.host.config.max_inflight_commands
            return self._not_written(f"{n} commands awaited their ACK for all of ack_timeout")
        try:
            try:
                # Room first, then write: a COMMAND is never left behind in a full buffer.
                self._awaiting_room += 1
                async with asyncio.timeout_at(deadline):
                    await self.link.drain()
            except TimeoutError:
                self._slots.release()
                return self._not_reading()
            finally:
                self._awaiting_room -= 1
            # Raises DeviceNotOnline when the link went while this command waited.
            seq = core.send_command(body, loop.time())
        except BaseException:
            self._slots.release()
            raise
        assert core.info is not None
        future: asyncio.Future[CommandResult] = loop.create_future()
        self._results[seq] = future
        self._handle(())
        self._rearm()
        return CommandHandle(core.info.client_id, seq, future)

    def _not_reading(self) -> CommandHandle:
        self._not_reading_at = self._loop.time()
        self.host.counters.commands_not_reading += 1
        self.host.logs.warning(
            "not_reading",
            "device %s: a command could not be written within %g s: device not reading",
            self._name(),
            self._ack_timeout,
        )
        return self._not_written(NOT_READING)

    def _not_written(self, error: str) -> CommandHandle:
        """The handle of a command given up before it was written: already a TIMEOUT."""
        future: asyncio.Future[CommandResult] = self._loop.create_future()
        future.set_result(CommandResult(CommandStatus.TIMEOUT, error=error))
        return CommandHandle(self._name(), -1, future)

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
            self.host.logs.warning(
                "not_reading", "closing link %s: the device does not read", self.link.peer
            )
            self.close(CloseReason.NOT_READING)

    def _command_done(self, event: CommandDone) -> None:
        future = self._results.pop(event.seq, None)
        if future is not None and not future.done():
            future.set_result(event.result)
        self._slots.release()

    def _close_link(self) -> None:
        self._reading_paused = False  # nothing more to read: no resume either
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
        core = self.core
        self._handle(core.expire(self._loop.time()))
        if core.throttled is not self._reading_paused:
            self._follow_throttle()
        self._rearm()

    def _follow_throttle(self) -> None:
        """Stop or resume reading the link as the core's rate limit says."""
        flow = self._flow
        paused = self.core.throttled
        if flow is None or self.core.state is SessionState.CLOSED:
            return
        self._reading_paused = paused
        if paused:
            flow.pause_reading()
        else:
            flow.resume_reading()

    def _name(self) -> str:
        info = self.core.info
        return info.client_id if info is not None else self.link.peer
