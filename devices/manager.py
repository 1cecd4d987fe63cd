"""The device side's registry: which session speaks for which client_id.

It enforces takeover (a second HELLO for an online client_id replaces the older
session, as MQTT does) and the device limit, forwards events to the hub's sink,
and is where the hub sends commands: ``send_command(client_id, body)``.
"""

from __future__ import annotations

import logging
from collections import Counter

from frames import Discarded, ErrorCode

from .config import SessionConfig
from .events import (
    CommandHandle,
    DeviceEvent,
    DeviceEventSink,
    DeviceInfo,
    DeviceNotOnline,
    DeviceOffline,
    DeviceOnline,
    DeviceTelemetry,
    Transport,
)
from .session import DeviceSession, LinkCounters

log = logging.getLogger(__name__)


class DeviceManager:
    """All device sessions of one gateway, and the seam to the hub."""

    def __init__(self, sink: DeviceEventSink, config: SessionConfig | None = None) -> None:
        self.sink = sink
        self.config = config or SessionConfig()
        self.online: dict[str, DeviceSession] = {}
        self.links: set[DeviceSession] = set()
        # Serial links keep one counter set across reopenings of their port.
        self.serial_counters: dict[str, LinkCounters] = {}
        # Gateway-wide counters by name (errors sent by code, limits hit, ...).
        self.counters: Counter[str] = Counter()
        # Totals of links already closed, so metrics stay monotonic.
        self.closed_totals = LinkCounters()

    # ---- called by sessions -----------------------------------------------------------------

    def link_opened(self, session: DeviceSession) -> None:
        """A link (TCP connection, serial port) has a new session."""
        self.links.add(session)

    def link_closed(self, session: DeviceSession) -> None:
        """A session's link is closed for good; fold its counters into the totals."""
        if session in self.links:
            self.links.discard(session)
            if session.link.kind is not Transport.TCP:
                return  # counted through serial_counters
            totals, c = self.closed_totals, session.counters
            for name in LinkCounters.__dataclass_fields__:
                if name != "reconnects":
                    setattr(totals, name, getattr(totals, name) + getattr(c, name))

    def admit(self, session: DeviceSession, info: DeviceInfo) -> str | None:
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
            self.counters["replaced"] += 1
            older.close("replaced", ErrorCode.REPLACED, "another link logged in as this device")
        elif len(self.online) >= self.config.max_devices:
            self.counters["refused_max_devices"] += 1
            log.warning(
                "refusing device %s: %d devices online (max_devices)", client_id, len(self.online)
            )
            return f"gateway full: max_devices={self.config.max_devices}"
        return None

    def session_started(self, session: DeviceSession) -> None:
        """The session is online; tell the hub."""
        assert session.info is not None
        self.online[session.info.client_id] = session
        log.info(
            "device %s online (%s, %s %s)",
            session.info.client_id,
            session.info.protocol,
            session.info.transport,
            session.info.peer,
        )
        self._emit(DeviceOnline(session.info))

    def session_ended(self, session: DeviceSession, reason: str) -> None:
        """The session is no longer online; tell the hub."""
        info = session.info
        if info is None:
            return
        if self.online.get(info.client_id) is session:
            del self.online[info.client_id]
        log.info("device %s offline (%s)", info.client_id, reason)
        self._emit(DeviceOffline(info, reason))

    def telemetry(self, event: DeviceTelemetry) -> None:
        """A DATA message was decoded."""
        self._emit(event)

    def count_discard(self, event: Discarded) -> None:
        """Gateway-wide discard counters (per-link ones live on the session)."""
        self.counters[f"discarded_{event.reason}"] += event.nbytes

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

        The handle's ``result`` future resolves to acked, nacked, timeout or failed.
        Raises ``DeviceNotOnline`` when the device has no live session.
        """
        session = self.online.get(client_id)
        if session is None:
            raise DeviceNotOnline(client_id)
        return await session.send_command(body)

    def totals(self) -> LinkCounters:
        """Counters summed over every link, open and closed."""
        out = LinkCounters(
            **{
                name: getattr(self.closed_totals, name)
                for name in LinkCounters.__dataclass_fields__
            }
        )
        live = [s.counters for s in self.links if s.link.kind is Transport.TCP]
        for c in [*live, *self.serial_counters.values()]:
            for name in LinkCounters.__dataclass_fields__:
                setattr(out, name, getattr(out, name) + getattr(c, name))
        return out

    def close_all(self, reason: str = "shutdown") -> None:
        """Close every link (gateway shutdown)."""
        for session in list(self.links):
            session.close(reason)
