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


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    """A device the gateway has seen at least once."""

    device: str
    protocol: str
    transport: str  # "tcp" | "serial"
    first_seen_ms: int
    last_seen_ms: int
