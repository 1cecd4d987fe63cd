"""The records that cross the hub's seam: telemetry, queued commands, registry rows.

The hub owns them because it defines what it keeps (``Engine``, ``Store``);
the SQLite storage and any other engine import them from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class TelemetryRecord:
    """One stored DATA message, as dashboards receive it (docs/api.md §3)."""

    offset: int  # gateway-wide, strictly increasing, kept across restarts
    device: str
    protocol: str
    ts: int  # unix ms
    seq: int  # the device's message seq
    data: dict[str, Any]  # the decoded JSON telemetry


@dataclass(frozen=True, slots=True)
class QueuedCommand:
    """A command waiting for its (offline) device until `expires_ms`."""

    key: int  # storage row id, assigned by storage; pass 0 when enqueuing
    command_id: str | None  # the dashboard's request id, may be None
    device: str
    command: dict[str, Any]  # the JSON command as given
    body: bytes  # the encoded COMMAND body
    created_ms: int
    expires_ms: int
    # The gateway's own id of the command (``command_id`` on the wire, docs/api.md
    # §3.1); None for a command queued by a gateway older than that.
    gateway_id: str | None = None


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    """A device the gateway has seen at least once."""

    device: str
    protocol: str
    transport: str  # "tcp" | "serial"
    first_seen_ms: int
    last_seen_ms: int
    # Why it last went offline (a presence reason); None while online or unknown.
    offline_reason: str | None = None


@dataclass(frozen=True, slots=True)
class CommandEvent:
    """One status of one command, for its history (``GET /api/commands/{id}``, docs/api.md §4).

    ``extra`` holds the status's other fields (``code``, ``error``, ``message``).
    """

    gateway_id: str  # the gateway's command_id
    request_id: str | int | None  # the client's ``id``
    device: str
    status: str
    ts: int  # unix ms
    extra: dict[str, Any]


@dataclass(frozen=True, slots=True)
class CommandLog:
    """A command's latest status and every status it had, oldest first."""

    gateway_id: str
    request_id: str | int | None
    device: str
    status: str
    history: list[dict[str, Any]]  # {"status", "ts", ...extra}


@dataclass(frozen=True, slots=True)
class DeviceDeletion:
    """What deleting a device took with it (``Store.delete_device``)."""

    telemetry: int  # rows of history removed
    commands: list[QueuedCommand]  # queued commands removed, oldest first


class StoreError(Exception):
    """The store could not do what was asked: a disk fault, a corrupt file, or it is closed.

    Whoever asked gets an answer saying the storage is unavailable (docs/api.md
    §4); the store's ``health()`` says whether it is failing now. The storage
    engines' own errors derive from it, so the hub needs no storage import.
    """


class StorageUnavailable(StoreError):
    """The hub could not answer a request because its store failed (``Hub.history``).

    Not the caller's fault: the message says why (it begins with "storage
    unavailable"), and asking again once ``/healthz`` is ``ok`` may succeed
    (the HTTP API answers it with 503 ``storage_unavailable``, docs/api.md §2).
    """


class QueueFull(Exception):
    """A bound of the offline command queue is reached; ``limit`` names its config key."""

    def __init__(self, limit: str, message: str) -> None:
        super().__init__(message)
        self.limit = limit


@dataclass(frozen=True, slots=True)
class StoreHealth:
    """Whether the store can do its job now: keep telemetry, commands and the registry."""

    failing: str | None = None  # why it cannot, or None when it is well
    since_ms: int = 0  # unix ms when it began failing (0 when well)

    @property
    def ok(self) -> bool:
        """True when the store is well."""
        return self.failing is None
