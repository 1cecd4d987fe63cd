"""What the storage engines share: the retention policy, the counters, the errors,
and the hub's records they store (re-exported here for the engines' own use).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from frames.errors import FrameGatewayError

from ..hub.records import DeviceRecord, QueuedCommand, TelemetryRecord


class StorageError(FrameGatewayError):
    """The storage engine failed (cannot open the file, a commit failed, the writer died)."""


class StorageClosedError(StorageError):
    """The storage was used before `open()` or after `close()`: a bug on the caller's side."""


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


__all__ = [
    "DeviceRecord",
    "QueuedCommand",
    "RetentionPolicy",
    "StorageClosedError",
    "StorageError",
    "StorageStats",
    "TelemetryRecord",
]
