"""What the storage engines share: the retention policy, the counters, the errors,
and the hub's records they store (re-exported here for the engines' own use).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from frames.errors import FrameGatewayError

from ..hub.records import (
    CommandEvent,
    CommandLog,
    DeviceDeletion,
    DeviceRecord,
    QueuedCommand,
    QueueFull,
    StoreError,
    StoreHealth,
    TelemetryRecord,
)


class StorageError(FrameGatewayError, StoreError):
    """The storage engine failed (cannot open the file, a commit failed, the writer died).

    A ``StoreError`` of the hub's seam, so the hub answers "storage unavailable".
    """


class StorageClosedError(StorageError):
    """The storage was used before `open()` or after `close()`: a bug on the caller's side."""


class StorageCorrupt(StorageError):
    """The database file cannot be used as it is: empty, not a database, or corrupt.

    Raised by `open()`; starting afresh would hand out offsets already seen, so
    the operator decides (`iot-gateway serve` exits with its own status:
    docs/deployment.md, "What a crash can lose").
    """


# Each default written once: the engine's arguments and the config file's
# [storage] section (StorageConfig) both take them from here.
RETENTION_PER_DEVICE = 10_000
RETENTION_DAYS = 7.0
BATCH_INTERVAL = 0.02  # seconds the writer waits to fill a batch
BATCH_ROWS = 500
MAX_PENDING_ROWS = 100_000  # rows waiting for the writer; beyond, new rows are dropped
MAX_QUEUED_COMMANDS_PER_DEVICE = 1000
MAX_QUEUED_COMMANDS = 100_000
# Seconds the command log keeps a command after its last status (docs/api.md §4:
# at least a day).
COMMAND_LOG_KEEP_S = 86400.0


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """How much telemetry history to keep: both limits apply."""

    max_per_device: int = RETENTION_PER_DEVICE
    max_age_s: float = RETENTION_DAYS * 86400

    def __post_init__(self) -> None:
        if self.max_per_device < 1 or not self.max_age_s > 0:
            raise ValueError(
                "retention needs max_per_device >= 1 and max_age_s > 0, got "
                f"max_per_device={self.max_per_device} max_age_s={self.max_age_s}"
            )


@dataclass(frozen=True, slots=True)
class StorageConfig:
    """The ``[storage]`` section: retention, the writer's batching, the queues' bounds."""

    retention_per_device: int = RETENTION_PER_DEVICE
    retention_days: float = RETENTION_DAYS
    batch_interval: float = BATCH_INTERVAL
    batch_rows: int = BATCH_ROWS
    # Telemetry rows and registry updates waiting for the writer (while the disk
    # fails, say); beyond, new ones are not kept (counted), dashboards still get them.
    max_pending_rows: int = MAX_PENDING_ROWS
    # Commands waiting in the offline queue: for one device, and for all; beyond,
    # a command for an offline device is rejected.
    max_queued_commands_per_device: int = MAX_QUEUED_COMMANDS_PER_DEVICE
    max_queued_commands: int = MAX_QUEUED_COMMANDS
    # The offset high-water mark, a file outside the data dir that `iot-gateway
    # restore` and every start read (docs/deployment.md, Backups); None: none kept.
    offset_mark: str | None = None

    def __post_init__(self) -> None:
        if self.retention_per_device < 1 or not self.retention_days > 0:
            raise ValueError("retention_per_device and retention_days must be > 0")
        if self.batch_interval < 0:
            raise ValueError(f"batch_interval must be >= 0, not {self.batch_interval}")
        if self.batch_rows < 1:
            raise ValueError(f"batch_rows must be >= 1, not {self.batch_rows}")
        for name in ("max_pending_rows", "max_queued_commands_per_device", "max_queued_commands"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, not {getattr(self, name)}")

    def retention(self) -> RetentionPolicy:
        """The engine's retention policy (ages in seconds)."""
        return RetentionPolicy(self.retention_per_device, self.retention_days * 86400)


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
    failed_batches: int = 0  # transactions that failed (each is retried)
    dropped_rows: int = 0  # rows never written: over max_pending_rows, or lost at close
    failed_reads: int = 0
    on_batch: Callable[[float], None] | None = field(default=None, repr=False, compare=False)


__all__ = [
    "CommandEvent",
    "CommandLog",
    "DeviceDeletion",
    "DeviceRecord",
    "QueueFull",
    "QueuedCommand",
    "RetentionPolicy",
    "StorageClosedError",
    "StorageConfig",
    "StorageCorrupt",
    "StorageError",
    "StorageStats",
    "StoreHealth",
    "TelemetryRecord",
]
