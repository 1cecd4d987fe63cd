"""The seams between a link's session, its link and the registry, as Protocols.

The session adapter (``devices.session``) and the registry
(``devices.manager``) each need a little of the other; both import these
interfaces instead of each other, so there is no import cycle, and a test can
stand in for either side with a few lines.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from frames import ErrorCode

from .config import SessionConfig
from .counters import DeviceCounters, LinkCounters
from .events import (
    CloseReason,
    CommandHandle,
    DeviceInfo,
    DeviceOffline,
    DeviceOnline,
    DeviceTelemetry,
    Transport,
)
from .logs import LogLimiter


class LinkPort(Protocol):
    """What a session needs from its link: write bytes, wait for room, close."""

    kind: Transport  # tcp or serial
    peer: str

    def write(self, data: bytes) -> None:
        """Write bytes (dropped once the link is closing)."""

    async def drain(self) -> None:
        """Until the link's write buffer has room again, or the link is gone (never raises)."""

    def write_buffer_size(self) -> int:
        """Bytes written and not yet taken by the OS."""

    def close(self) -> None:
        """Close the link; the link reports the loss to its session."""


@runtime_checkable
class ReadFlow(Protocol):
    """A link that can stop reading: what backpressure on a device's frame rate needs.

    A TCP connection is one; a link without it has its frames over the rate
    dropped instead (docs/protocol.md §4).
    """

    def pause_reading(self) -> None:
        """Stop taking bytes from the peer (they wait in the OS, then in the peer)."""

    def resume_reading(self) -> None:
        """Take bytes from the peer again."""


class ManagedSession(Protocol):
    """What the registry needs from a session (``devices.session.DeviceSession`` is one)."""

    @property
    def link(self) -> LinkPort:
        """The link this session speaks on."""

    @property
    def info(self) -> DeviceInfo | None:
        """The identity of the latest session on this link, None before any."""

    @property
    def counters(self) -> LinkCounters:
        """The link's traffic counters."""

    @property
    def owns_counters(self) -> bool:
        """True when the counters end with the link (False: a port keeps them)."""

    def close(self, reason: CloseReason, error: ErrorCode | None = None, message: str = "") -> None:
        """Close the link for ``reason``, after sending ERROR ``error`` when given."""

    async def send_command(self, body: bytes) -> CommandHandle:
        """Write a COMMAND once there is room; its handle resolves on ACK or timeout."""


class SessionHost(Protocol):
    """What a session needs from the registry (``devices.manager.DeviceManager`` is one)."""

    @property
    def config(self) -> SessionConfig:
        """The settings every session follows."""

    @property
    def counters(self) -> DeviceCounters:
        """The gateway-wide counters sessions add to."""

    @property
    def logs(self) -> LogLimiter:
        """The bound on log lines that peers cause, shared by every session."""

    def link_opened(self, session: ManagedSession) -> None:
        """A link has a session."""

    def link_closed(self, session: ManagedSession) -> None:
        """A session's link is closed for good."""

    def admit(self, session: ManagedSession, info: DeviceInfo) -> str | None:
        """May ``session`` go online as ``info``? None admits, a string is the refusal."""

    def session_started(self, session: ManagedSession, event: DeviceOnline) -> None:
        """``session`` is online."""

    def session_ended(self, session: ManagedSession, event: DeviceOffline) -> None:
        """``session`` is no longer online (its link may stay open)."""

    def telemetry(self, event: DeviceTelemetry) -> None:
        """A DATA message was decoded (the per-frame path: keep it short)."""
