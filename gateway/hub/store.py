"""``Store``: what the single node's engine needs of a storage engine.

The hub owns this seam; ``SQLiteStorage`` and ``MemoryStorage`` (in
``gateway.storage``) implement it, and ``LocalEngine`` uses nothing else.
"""

from __future__ import annotations

import typing

from .records import DeviceRecord, QueuedCommand, TelemetryRecord


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
    ) -> list[TelemetryRecord]:
        """Committed records with `since < offset <= until`, oldest first, at most `limit`."""
        ...

    async def latest_telemetry(self) -> dict[str, TelemetryRecord]:
        """The newest committed record of each device, by device."""
        ...

    async def enqueue_command(self, command: QueuedCommand) -> QueuedCommand:
        """Store a command durably before returning; returns it with its `key`."""
        ...

    async def pending_commands(self, device: str, now_ms: int) -> list[QueuedCommand]:
        """The device's commands not yet expired at `now_ms`, oldest first."""
        ...

    async def remove_command(self, key: int) -> None:
        """Forget a delivered command (committed before returning)."""
        ...

    async def expire_commands(self, now_ms: int) -> list[QueuedCommand]:
        """Remove and return every command with `expires_ms <= now_ms`, oldest first."""
        ...

    async def upsert_device(self, record: DeviceRecord) -> None:
        """Insert or update a device, keeping the `first_seen_ms` of an existing row."""
        ...

    async def devices(self) -> list[DeviceRecord]:
        """Every device ever seen, by name."""
        ...
