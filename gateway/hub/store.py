"""``Store``: what the single node's engine needs of a storage engine.

The hub owns this seam; ``SQLiteStorage`` and ``MemoryStorage`` (in
``gateway.storage``) implement it, and ``LocalEngine`` uses nothing else.

A store that fails (a full disk, a corrupt page) raises ``StoreError`` from
the call that needed it and says so in ``health()`` until it heals; it never
fails silently. ``FaultLog`` is how its users log such a fault without one
line per failed call.
"""

from __future__ import annotations

import logging
import time
import typing
from collections.abc import Callable, Sequence
from typing import Any

from .records import (
    CommandEvent,
    CommandLog,
    DeviceDeletion,
    DeviceRecord,
    QueuedCommand,
    StoreHealth,
    TelemetryRecord,
)


class Store(typing.Protocol):
    """Offsets, history, the offline command queue and the registry, kept durably."""

    def next_offset(self) -> int:
        """Next gateway-wide offset: strictly increasing, also across restarts and crashes.

        Synchronous and free of I/O, so the hub can call it on the event loop.
        """
        ...

    def append_telemetry(self, record: TelemetryRecord, data_json: str | None = None) -> None:
        """Queue one record for the next batch; never blocks.

        ``data_json``, when given, is ``record.data`` already encoded as JSON
        (the hub encodes it once for the dashboards and the row).
        """
        ...

    def health(self) -> StoreHealth:
        """Whether the store can keep what it is given now (synchronous, no I/O)."""
        ...

    async def flush(self) -> None:
        """Return once everything appended before the call is committed."""
        ...

    async def telemetry_since(
        self,
        since: int,
        *,
        until: int | None = None,
        device: str | None = None,
        protocol: str | None = None,
        limit: int = 1000,
        from_ts: int | None = None,
        to_ts: int | None = None,
        newest: bool = False,
    ) -> list[TelemetryRecord]:
        """Committed records with `since < offset <= until` and `from_ts <= ts < to_ts`,
        oldest first, at most `limit`: the oldest such, or with `newest` the newest."""
        ...

    async def latest_telemetry(self) -> dict[str, TelemetryRecord]:
        """The newest committed record of each device, by device."""
        ...

    # ---- the offline command queue --------------------------------------------------------------
    #
    # A queued command is either waiting or being sent. ``mark_sending`` is made
    # durable before the command is written to its device, so a command being
    # written when the process dies is found marked at the next start and is
    # never written again (``interrupted_commands``): at most once, even
    # across a kill -9 (docs/deployment.md, "What a crash can lose").

    async def enqueue_command(self, command: QueuedCommand) -> QueuedCommand:
        """Store a command durably before returning; returns it with its `key`.

        Raises ``QueueFull`` when the device's or the whole queue's bound is reached.
        """
        ...

    async def pending_commands(
        self, device: str, now_ms: int, *, after: int = 0, limit: int | None = None
    ) -> list[QueuedCommand]:
        """The device's waiting commands with `key > after`, not yet expired at `now_ms`.

        Oldest first, at most `limit` (None: all); commands being sent are left out.
        """
        ...

    async def mark_sending(self, keys: Sequence[int]) -> list[int]:
        """Mark waiting commands as being sent, durably (fsynced) before returning.

        Returns the keys marked, in the order given: a key no longer queued
        (expired or removed meanwhile) is left out.
        """
        ...

    async def unmark_sending(self, keys: Sequence[int]) -> None:
        """Commands marked but never written: they wait for the device's next session again."""
        ...

    async def remove_commands(self, keys: Sequence[int]) -> None:
        """Forget commands (written to their device), committed before returning.

        Not fsynced: a power cut may bring one back, marked as being sent, and
        it then ends as interrupted, never written twice.
        """
        ...

    async def interrupted_commands(self) -> list[QueuedCommand]:
        """The commands the previous process had marked as being sent when it stopped.

        Taken out of the queue when the store opened; each call returns them once.
        """
        ...

    async def expire_commands(self, now_ms: int, limit: int = 1000) -> list[QueuedCommand]:
        """Remove and return waiting commands with `expires_ms <= now_ms`, oldest first.

        At most `limit` at a time (call again while it returns `limit`).
        """
        ...

    # ---- the registry ---------------------------------------------------------------------------

    async def upsert_device(self, record: DeviceRecord) -> None:
        """Insert or update a device, keeping the `first_seen_ms` of an existing row."""
        ...

    async def devices(self) -> list[DeviceRecord]:
        """Every device ever seen and not deleted since, by name."""
        ...

    async def delete_devices(self, devices: Sequence[str]) -> None:
        """Delete devices' registry rows (unknown ones are ignored), durably before returning.

        Ordered with ``upsert_device``: a row upserted before the call is
        deleted, one upserted after it is kept. The devices' telemetry is
        left to retention and their queued commands to ``command_ttl``.
        """
        ...

    async def delete_device(self, device: str) -> DeviceDeletion:
        """Delete everything kept of ``device`` (registry row, history, labels, queued
        commands, which are returned), durably before returning.

        Ordered with ``append_telemetry`` and ``upsert_device`` like ``delete_devices``.
        """
        ...

    # ---- labels and the command log -------------------------------------------------------------

    async def set_labels(self, device: str, labels: dict[str, Any] | None) -> None:
        """Keep the labels set over the API for ``device`` (None drops them), durably."""
        ...

    async def labels(self) -> dict[str, dict[str, Any]]:
        """The labels set over the API, by device."""
        ...

    def log_command(self, event: CommandEvent) -> None:
        """Queue one command status for the command log; never blocks.

        Readable by ``command_log`` after a ``flush``; kept at least a day
        after the command's last status.
        """
        ...

    async def command_log(self, gateway_id: str) -> CommandLog | None:
        """The statuses of the command with this gateway id, or None."""
        ...


class FaultLog:
    """Logs a fault when it begins, at most once per ``interval`` while it lasts, and its end.

    A store failing every batch, or a task retrying every second, would
    otherwise write the same line many times a second (docs/api.md §4 puts the
    fault on ``/healthz`` and ``/metrics``; the log only has to tell the story).
    Not thread-safe: each thread keeps its own.
    """

    def __init__(
        self,
        logger: logging.Logger,
        what: str,
        interval: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.what = what
        self.interval = interval
        self.clock = clock
        self.since: float | None = None  # the fault began then (clock time), or None
        self.failures = 0  # since it began
        self._logged_at = 0.0
        self._unlogged = 0  # failures since the last line

    @property
    def failing(self) -> bool:
        """True from a failure until the next success."""
        return self.since is not None

    def failed(self, error: object) -> None:
        """One failure: logged if it begins a fault, or if the last line is old enough."""
        now = self.clock()
        self.failures += 1
        self._unlogged += 1
        if self.since is None:
            self.since = self._logged_at = now
            self._unlogged = 0
            self.logger.error("%s failed: %s", self.what, error)
        elif now - self._logged_at >= self.interval:
            self.logger.error(
                "%s still failing (%d failures in the last %.0f s): %s",
                self.what,
                self._unlogged,
                now - self._logged_at,
                error,
            )
            self._logged_at = now
            self._unlogged = 0

    def ok(self) -> None:
        """A success: ends a fault (one line saying so), otherwise nothing."""
        if self.since is None:
            return
        self.logger.warning(
            "%s works again after %d failures over %.1f s",
            self.what,
            self.failures,
            self.clock() - self.since,
        )
        self.since = None
        self.failures = self._unlogged = 0
