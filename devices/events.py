"""The seam between device links and the hub: typed events out, command results back.

``devices`` knows nothing about dashboards. It calls a ``DeviceEventSink`` (the
hub implements it) on the event loop, synchronously, for every change a
dashboard may care about, and hands out ``CommandHandle``s for commands.
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


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


class CloseReason(enum.StrEnum):
    """Why a device link was closed or its session ended.

    It is ``DeviceOffline.reason`` (the ``reason`` of a dashboard's presence,
    docs/api.md §3) and the ``reason`` label of ``iot_device_links_closed_total``.
    SILENT on a serial link and REHELLO end a session but keep the link open.
    """

    HELLO_TIMEOUT = "hello_timeout"  # no valid HELLO in time (TCP)
    HELLO_BUDGET = "hello_budget"  # too many bytes or frames before a HELLO (TCP)
    SILENT = "silent"  # nothing heard for misses x heartbeat
    GARBAGE = "garbage"  # mostly garbage within the garbage window (TCP)
    AUTH_FAILED = "auth_failed"  # a HELLO with the wrong token
    REFUSED = "refused"  # a HELLO beyond max_devices, max_takeovers, max_client_id_changes
    REPLACED = "replaced"  # a newer link said HELLO as the same client_id
    NOT_READING = "not_reading"  # the device left max_write_buffer unread
    CLOSED = "closed"  # the device closed the link
    LOST = "lost"  # the link failed (reset, unplugged port)
    SHUTDOWN = "shutdown"  # the gateway is stopping
    REHELLO = "rehello"  # the link said HELLO as another client_id


@dataclass(frozen=True, slots=True)
class DeviceOffline:
    """A session ended, for ``reason``."""

    info: DeviceInfo
    reason: CloseReason


DeviceEvent = DeviceOnline | DeviceTelemetry | DeviceOffline


class DeviceEventSink(Protocol):
    """What the hub gives the device side: called on the event loop, must not block."""

    def device_event(self, event: DeviceEvent) -> None:
        """Handle one event. Exceptions are logged by the caller and do not close the link."""


@runtime_checkable
class DeviceAdmission(Protocol):
    """A sink that also bounds which devices may come online (the hub: known devices).

    Optional: the manager asks a sink that has ``admit_device``; any other admits all.
    """

    def admit_device(self, client_id: str) -> str | None:
        """May a HELLO bring ``client_id`` online? None admits; a string is the refusal.

        A refused device gets ERROR RATE_LIMITED and its link is closed.
        """


class CommandStatus(enum.StrEnum):
    """Every status a command can have, device side and hub side (docs/api.md §3).

    The device side ends a command as ACKED, NACKED or TIMEOUT; the hub adds
    SENT, QUEUED, EXPIRED and REJECTED. A link lost (or a serial device gone
    silent) after the COMMAND was written and before its ACK is a TIMEOUT whose
    ``error`` says why ("link lost", "device went silent"): nobody will answer.
    """

    SENT = "sent"
    QUEUED = "queued"
    ACKED = "acked"
    NACKED = "nacked"
    TIMEOUT = "timeout"
    EXPIRED = "expired"
    REJECTED = "rejected"


@dataclass(frozen=True, slots=True)
class CommandResult:
    """Final status of a command.

    ``code`` is the device's status byte for NACKED; ``error`` says why for a
    TIMEOUT that no ACK can end any more ("link lost", "device went silent"), or
    that was never written ("device not reading").
    """

    status: CommandStatus
    code: int | None = None
    error: str | None = None


@dataclass(slots=True)
class CommandHandle:
    """A command written to a device; ``result`` resolves to ACKED, NACKED or TIMEOUT.

    ``seq`` is the COMMAND's seq, or -1 for a command that could not be written
    within the command timeout (its ``result`` is already a TIMEOUT saying why).
    """

    client_id: str
    seq: int
    result: asyncio.Future[CommandResult] = field(repr=False)


class DeviceNotOnline(LookupError):
    """``send_command`` was given a client_id with no live session."""

    def __init__(self, client_id: str) -> None:
        super().__init__(f"device {client_id!r} is not online")
        self.client_id = client_id
