"""The values that cross the storage seam: records, the retention policy, the
counters, and the errors.

They have their own module because every engine and the hub share them, and
they need nothing but the standard library (and the gateway-wide error base).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from frames.errors import FrameGatewayError


class StorageError(FrameGatewayError):
    """The storage engine failed (cannot open the file, a commit failed, the writer died)."""


class StorageClosedError(StorageError):
    """The storage was used before `open()` or after `close()`: a bug on the caller's side."""


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


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """How much telemetry history to keep: both limits apply."""

    max_per_device: int = 10_000
    max_age_s: float = 7 * 24 * 3600

    def __post_init__(self) -> None:
        if self.max_per_device < 1 or not self.max_age_s > 0:
            raise ValueError(
                "retention needs max_per_device >= 1 and max_age_s > 0, got "
                f"max_per_device={self.max_per_device} max_age_s={self.max_age_s}"
            )


@dataclass(slots=True)
class StorageStats:
    """Counters for /metrics, updated by the engine (the SQLite writer thread).

    `rows_written` and `pending` count telemetry rows and device upserts, the rows
    that are batched; `on_batch`, when set, is called from the writer thread with
    each committed batch's duration in seconds (feed it to a histogram; it must be
    quick and thread-safe).
    """

    batches: int = 0
    rows_written: int = 0
    last_batch_ms: float = 0.0
    max_batch_ms: float = 0.0
    pending: int = 0  # queued rows not yet committed: what a kill -9 would lose now
    pruned_rows: int = 0
    failed_batches: int = 0
    on_batch: Callable[[float], None] | None = field(default=None, repr=False, compare=False)
