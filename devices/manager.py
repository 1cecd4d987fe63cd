"""The device side's registry: which session speaks for which client_id.

It enforces takeover (a second HELLO for an online client_id replaces the older
session, as MQTT does, docs/protocol.md §4) and the device limit, forwards
events to the hub's sink, keeps the counters ``/metrics`` reads, and is where
the hub sends commands: ``send_command(client_id, body)``. Sessions reach it
through the ``SessionHost`` interface, so it imports no session code.
"""

from __future__ import annotations

import logging

from frames import ErrorCode

from .config import SessionConfig
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
)
from .ports import ManagedSession

log = logging.getLogger(__name__)


class DeviceManager:
    """All device sessions of one gateway, and the seam to the hub (a ``SessionHost``)."""

    def __init__(self, sink: DeviceEventSink, config: SessionConfig | None = None) -> None:
        self.sink = sink
        self.config = config or SessionConfig()
        self.online: dict[str, ManagedSession] = {}
        self.links: set[ManagedSession] = set()
        self.counters = DeviceCounters()
        # Traffic of links already closed, so that totals stay monotonic.
        self.closed_totals = LinkCounters()
        # Counters that outlive a link: one set per serial port, across reopenings.
        self._port_counters: dict[str, LinkCounters] = {}

    def port_counters(self, port: str) -> LinkCounters:
        """The counters of ``port`` (a serial URL), the same set every time it reopens."""
        return self._port_counters.setdefault(port, LinkCounters())

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
        client_id = info.client_id
        older = self.online.get(client_id)
        if older is not None and older is not session:
            log.info(
                "device %s: new session from %s replaces the older one",
                client_id,
                session.link.peer,
            )
            self.counters.replaced += 1
            older.close(
                CloseReason.REPLACED, ErrorCode.REPLACED, "another link logged in as this device"
            )
            return None
        # A link saying HELLO as another client_id gives up the one it had.
        own = session.info
        present = len(self.online) - (own is not None and self.online.get(own.client_id) is session)
        if present >= self.config.max_devices:
            self.counters.refused_max_devices += 1
            log.warning("refusing device %s: %d devices online (max_devices)", client_id, present)
            return f"gateway full: max_devices={self.config.max_devices}"
        # The hub's say (it bounds the devices it knows); a sink without one admits all.
        if isinstance(self.sink, DeviceAdmission):
            return self.sink.admit_device(client_id)
        return None

    def session_started(self, session: ManagedSession, event: DeviceOnline) -> None:
        """The session is online; tell the hub."""
        info = event.info
        self.online[info.client_id] = session
        log.info(
            "device %s online (%s, %s %s)", info.client_id, info.protocol, info.transport, info.peer
        )
        self._emit(event)

    def session_ended(self, session: ManagedSession, event: DeviceOffline) -> None:
        """The session is no longer online; tell the hub."""
        client_id = event.info.client_id
        if self.online.get(client_id) is session:
            del self.online[client_id]
        log.info("device %s offline (%s)", client_id, event.reason)
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
        Raises ``DeviceNotOnline`` when the device has no live session.
        """
        session = self.online.get(client_id)
        if session is None:
            raise DeviceNotOnline(client_id)
        return await session.send_command(body)

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
