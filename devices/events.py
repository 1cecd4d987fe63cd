"""The seam between device links and the hub: typed events out, command results back.

``devices`` knows nothing about dashboards. It calls a ``DeviceEventSink`` (the
hub implements it) on the event loop, synchronously, for every change a
dashboard may care about, and hands out ``CommandHandle``s for commands.
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass, field
from typing import Any, Protocol


class Transport(enum.StrEnum):
    """How a device reaches the gateway (the ``transport`` of the devices listing)."""

    TCP = "tcp"
    SERIAL = "serial"


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """Who is online: identity and session of one device link."""

    client_id: str
    protocol: str
    transport: Transport
    peer: str  # "127.0.0.1:50123" for TCP, the port URL for serial
    session: str  # the UUIDv4 of this session, as text
    connected_at: int  # unix ms


@dataclass(frozen=True, slots=True)
class DeviceOnline:
    """A device has a new session (after HELLO, or a fixed serial link's first frame)."""

    info: DeviceInfo


@dataclass(frozen=True, slots=True)
class DeviceTelemetry:
    """One DATA message, decoded by the device's protocol."""

    client_id: str
    protocol: str
    seq: int
    data: dict[str, Any]
    ts: int  # unix ms when the gateway received it
    received: float  # loop.time() when the frame was decoded (for latency figures)


@dataclass(frozen=True, slots=True)
class DeviceOffline:
    """A session ended. ``reason``: closed, lost, silent, replaced, auth_failed, garbage, ..."""

    info: DeviceInfo
    reason: str


DeviceEvent = DeviceOnline | DeviceTelemetry | DeviceOffline


class DeviceEventSink(Protocol):
    """What the hub gives the device side: called on the event loop, must not block."""

    def device_event(self, event: DeviceEvent) -> None:
        """Handle one event. Exceptions are logged by the caller and do not close the link."""


class CommandStatus(enum.StrEnum):
    """The fate of one COMMAND sent to a device."""

    SENT = "sent"
    QUEUED = "queued"
    ACKED = "acked"
    NACKED = "nacked"
    TIMEOUT = "timeout"
    EXPIRED = "expired"
    REJECTED = "rejected"
    FAILED = "failed"  # the link was lost before the ACK came


@dataclass(frozen=True, slots=True)
class CommandResult:
    """Final status of a command; ``code`` is the device's status byte for NACKED."""

    status: CommandStatus
    code: int | None = None
    error: str | None = None


@dataclass(slots=True)
class CommandHandle:
    """A command written to a device; ``result`` resolves on ACK, NACK, timeout or loss."""

    client_id: str
    seq: int
    result: asyncio.Future[CommandResult] = field(repr=False)


class DeviceNotOnline(LookupError):
    """``send_command`` was given a client_id with no live session."""

    def __init__(self, client_id: str) -> None:
        super().__init__(f"device {client_id!r} is not online")
        self.client_id = client_id
