"""The device side's registry: which session speaks for which client_id.

It enforces takeover (a second HELLO for an online client_id replaces the older
session, as MQTT does, docs/protocol.md §4), bounded: at most
``max_takeovers`` of one client_id within ``churn_window``, beyond which a
HELLO for it is refused (RATE_LIMITED, closed) until the window ends, so two
links fighting over one client_id cannot spin the gateway; and the device
limit. It forwards events to the hub's sink, keeps the counters ``/metrics``
reads, bounds the log lines peers cause (``LogLimiter``; a takeover storm is
one line when it starts and one summary per window), and is where the hub
sends commands: ``send_command(client_id, body)``. Sessions reach it through
the ``SessionHost`` interface, so it imports no session code.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from frames import ErrorCode

from .config import SerialPortConfig, SessionConfig
from .counters import DeviceCounters, LinkCounters
from .events import (
    CloseReason,
    CommandHandle,
    DeviceAdmission,
    DeviceEvent,
    DeviceEventSink,
    DeviceInfo,
    DeviceNotOnline,
    DeviceOffline,
    DeviceOnline,
    DeviceTelemetry,
    Transport,
)
from .logs import LogLimiter
from .ports import ManagedSession

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Churn:
    """Takeovers of one client_id within one window (from ``since``)."""

    since: float
    takeovers: int = 0
    refused: int = 0
    sessions: int = 0  # TCP sessions admitted (max_sessions_per_client)


class PortState(enum.StrEnum):
    """Where a configured serial port is (docs/api.md, ``GET /api/serial``)."""

    OPEN = "open"  # opened: its device can talk
    RETRYING = "retrying"  # not open yet, failed to open or lost: opened again with backoff
    MISSING = "missing"  # its device node does not exist (unplugged, wrong path)


@dataclass(slots=True)
class SerialPortStatus:
    """One configured serial port's state, since when (unix ms), and the last error."""

    url: str
    client_id: str | None
    protocol: str | None
    state: PortState
    since: int
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The port as ``GET /api/serial`` lists it."""
        return {
            "url": self.url,
            "client_id": self.client_id,
            "protocol": self.protocol,
            "state": str(self.state),
            "since": self.since,
            "error": self.error,
        }


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


class DeviceManager:
    """All device sessions of one gateway, and the seam to the hub (a ``SessionHost``)."""

    def __init__(
        self,
        sink: DeviceEventSink,
        config: SessionConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_ms: Callable[[], int] = _wall_ms,
    ) -> None:
        self.sink = sink
        self.config = config = config or SessionConfig()
        self.online: dict[str, ManagedSession] = {}
        self.links: set[ManagedSession] = set()
        self.counters = DeviceCounters()
        self.logs = LogLimiter(log, config.max_log_lines, config.log_window, clock)
        self._clock = clock
        # Takeovers per client_id in the current window, oldest window first, so that
        # ended windows are forgotten from the front: bounded by the takeovers of one
        # window, never by every client_id ever taken over.
        self._churn: dict[str, _Churn] = {}
        # Traffic of links already closed, so that totals stay monotonic.
        self.closed_totals = LinkCounters()
        # Counters that outlive a link: one set per serial port, across reopenings.
        self._port_counters: dict[str, LinkCounters] = {}
        # Every configured serial port, by URL, from start: open, retrying or missing.
        self.serial_ports: dict[str, SerialPortStatus] = {}
        self._wall_ms = wall_ms

    def port_counters(self, port: str) -> LinkCounters:
        """The counters of ``port`` (a serial URL), the same set every time it reopens."""
        return self._port_counters.setdefault(port, LinkCounters())

    def add_serial_port(self, port: SerialPortConfig) -> SerialPortStatus:
        """Register a configured serial port (``retrying`` until it first opens); idempotent."""
        status = self.serial_ports.get(port.url)
        if status is None:
            status = self.serial_ports[port.url] = SerialPortStatus(
                port.url, port.client_id, port.protocol, PortState.RETRYING, self._wall_ms()
            )
        return status

    def serial_port_changed(self, url: str, state: PortState, error: str | None) -> None:
        """A serial link's port opened, failed to open, went missing or was lost."""
        status = self.serial_ports.get(url)
        if status is None:
            status = self.serial_ports[url] = SerialPortStatus(
                url, None, None, state, self._wall_ms(), error
            )
            return
        if status.state is not state:
            status.since = self._wall_ms()  # since the state, not since the last retry
        status.state = state
        status.error = error

    def serial_summary(self) -> dict[str, int]:
        """How many configured serial ports are in each state (for ``/healthz``)."""
        out = {str(state): 0 for state in PortState}
        for status in self.serial_ports.values():
            out[str(status.state)] += 1
        return out

    # ---- called by sessions (SessionHost) -----------------------------------------------------

    def link_opened(self, session: ManagedSession) -> None:
        """A link (TCP connection, serial port) has a new session."""
        self.links.add(session)

    def link_closed(self, session: ManagedSession) -> None:
        """A session's link is closed for good; keep its traffic in the totals."""
        if session in self.links:
            self.links.discard(session)
            if session.owns_counters:
                self.closed_totals.add(session.counters)

    def admit(self, session: ManagedSession, info: DeviceInfo) -> str | None:
        """May this session go online? Replaces an older session of the same client_id.

        Returns None to admit, or the reason for refusing.
        """
        if info.transport is not Transport.TCP:
            return self._admit(session, info)
        churn = self._churn_of(info.client_id)
        refusal = self._sessions_bound(info.client_id, churn)
        if refusal is None:
            refusal = self._admit(session, info)
            if refusal is None:
                churn.sessions += 1  # only sessions that start count
        return refusal

    def _admit(self, session: ManagedSession, info: DeviceInfo) -> str | None:
        client_id = info.client_id
        older = self.online.get(client_id)
        if older is not None and older is not session:
            return self._take_over(client_id, session, older)
        # A link saying HELLO as another client_id gives up the one it had.
        own = session.info
        present = len(self.online) - (own is not None and self.online.get(own.client_id) is session)
        if present >= self.config.max_devices:
            self.counters.refused_max_devices += 1
            self.logs.warning(
                "refused", "refusing device %s: %d devices online (max_devices)", client_id, present
            )
            return f"gateway full: max_devices={self.config.max_devices}"
        # The hub's say (it bounds the devices it knows); a sink without one admits all.
        if isinstance(self.sink, DeviceAdmission):
            return self.sink.admit_device(client_id)
        return None

    def _sessions_bound(self, client_id: str, churn: _Churn) -> str | None:
        """Past ``max_sessions_per_client`` TCP sessions of ``client_id``, refuse.

        A device that connects, says HELLO and leaves in a loop (with a valid
        token) costs a session, two presence messages and two registry writes
        each time; a real device reconnects a few times a minute at worst.
        Serial links are not counted: nothing can loop on them.
        """
        config = self.config
        if churn.sessions >= config.max_sessions_per_client:
            churn.refused += 1
            self.counters.refused_sessions += 1
            if churn.refused == 1:
                self.logs.warning(
                    "takeovers",
                    "device %s: %d sessions within %g s (a device reconnecting in a loop?); "
                    "refusing HELLOs for it for the rest of the window",
                    client_id,
                    churn.sessions,
                    config.churn_window,
                )
            return (
                f"client_id {client_id} reconnects too often: "
                f"max_sessions_per_client={config.max_sessions_per_client} "
                f"per {config.churn_window:g} s"
            )
        return None

    def _take_over(
        self, client_id: str, session: ManagedSession, older: ManagedSession
    ) -> str | None:
        config = self.config
        churn = self._churn_of(client_id)
        if churn.takeovers >= config.max_takeovers:
            churn.refused += 1
            self.counters.refused_takeovers += 1
            if churn.refused == 1:  # once per window, not once per refused HELLO
                self.logs.warning(
                    "takeovers",
                    "device %s: taken over %d times within %g s (two devices with one "
                    "client_id?); refusing HELLOs for it for the rest of the window",
                    client_id,
                    churn.takeovers,
                    config.churn_window,
                )
            return (
                f"client_id {client_id} taken over too often: "
                f"max_takeovers={config.max_takeovers} per {config.churn_window:g} s"
            )
        churn.takeovers += 1
        if churn.takeovers == 1:
            self.logs.info(
                "takeovers",
                "device %s: new session from %s replaces the older one",
                client_id,
                session.link.peer,
            )
        self.counters.replaced += 1
        older.close(
            CloseReason.REPLACED, ErrorCode.REPLACED, "another link logged in as this device"
        )
        return None

    def _churn_of(self, client_id: str) -> _Churn:
        """The takeover window of ``client_id``, after forgetting (and summing up) ended ones."""
        now = self._clock()
        window = self.config.churn_window
        churn = self._churn
        while churn:
            oldest_id = next(iter(churn))
            oldest = churn[oldest_id]
            if now - oldest.since < window:
                break
            del churn[oldest_id]
            if oldest.takeovers > 1 or oldest.refused:  # a quiet window is not logged
                self.logs.warning(
                    "takeovers",
                    "device %s: %d takeovers and %d refused HELLOs in %g s",
                    oldest_id,
                    oldest.takeovers,
                    oldest.refused,
                    window,
                )
        record = churn.get(client_id)
        if record is None:
            record = churn[client_id] = _Churn(now)
        return record

    def _quiet(self, client_id: str) -> bool:
        """True while ``client_id`` is being taken over again and again: its online and
        offline lines are left to the window's summary."""
        record = self._churn.get(client_id)
        return (
            record is not None
            and record.takeovers > 1
            and self._clock() - record.since < self.config.churn_window
        )

    def session_started(self, session: ManagedSession, event: DeviceOnline) -> None:
        """The session is online; tell the hub."""
        info = event.info
        self.online[info.client_id] = session
        if not self._quiet(info.client_id):
            self.logs.info(
                "sessions",
                "device %s online (%s, %s %s)",
                info.client_id,
                info.protocol,
                info.transport,
                info.peer,
            )
        self._emit(event)

    def session_ended(self, session: ManagedSession, event: DeviceOffline) -> None:
        """The session is no longer online; tell the hub."""
        client_id = event.info.client_id
        if self.online.get(client_id) is session:
            del self.online[client_id]
        if not self._quiet(client_id):
            self.logs.info("sessions", "device %s offline (%s)", client_id, event.reason)
        self._emit(event)

    def telemetry(self, event: DeviceTelemetry) -> None:
        """A DATA message was decoded."""
        try:
            self.sink.device_event(event)
        except Exception:
            log.exception("hub failed on %s", type(event).__name__)

    def _emit(self, event: DeviceEvent) -> None:
        try:
            self.sink.device_event(event)
        except Exception:
            # A bug in the hub must not take a device link down with it.
            log.exception("hub failed on %s", type(event).__name__)

    # ---- called by the hub --------------------------------------------------------------------

    def is_online(self, client_id: str) -> bool:
        """True when client_id has a live session."""
        return client_id in self.online

    async def send_command(self, client_id: str, body: bytes) -> CommandHandle:
        """Send a COMMAND body to an online device; await room on its link.

        The handle's ``result`` future resolves to acked, nacked or timeout
        (with ``error`` "link lost" when the link went before the ACK).
        Raises ``DeviceNotOnline`` when the device has no live session. Never
        waits longer than ``ack_timeout``: a command that cannot be written by
        then resolves at once as TIMEOUT ("device not reading").
        """
        session = self.online.get(client_id)
        if session is None:
            raise DeviceNotOnline(client_id)
        return await session.send_command(body)

    def replace(self, client_id: str) -> None:
        """Close ``client_id``'s session with ERROR REPLACED: a newer one began elsewhere
        (another node of a cluster). Nothing when it has none."""
        session = self.online.get(client_id)
        if session is not None:
            self.counters.replaced += 1
            session.close(
                CloseReason.REPLACED, ErrorCode.REPLACED, "another link logged in as this device"
            )

    def totals(self) -> LinkCounters:
        """Traffic counters summed over every link, open and closed."""
        out = LinkCounters()
        out.add(self.closed_totals)
        for session in self.links:
            if session.owns_counters:
                out.add(session.counters)
        for counters in self._port_counters.values():
            out.add(counters)
        return out
