"""`MemoryStorage`: the in-memory twin of `SQLiteStorage`, for the routing-core tests.

It has its own module because it shares nothing with the SQLite engine but the
contract (base.py): the hub's tests run against it without a file or threads,
and tests/gateway/test_storage_contract.py holds both engines to the same checks.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import time

from .records import (
    DeviceRecord,
    QueuedCommand,
    RetentionPolicy,
    StorageClosedError,
    StorageStats,
    TelemetryRecord,
)


class MemoryStorage:
    """An in-memory `Storage` for tests of the routing core: same contract, no disk.

    Everything is "committed" at once; offsets start at 1 and die with the object.
    """

    # RetentionPolicy is frozen, so one shared default is safe (B008 sees that only
    # within the module defining it).
    def __init__(self, *, retention: RetentionPolicy = RetentionPolicy()) -> None:  # noqa: B008
        self.retention = retention
        self.stats = StorageStats()
        self._open = False
        self._closed = False
        self._next = 1
        self._telemetry: dict[int, TelemetryRecord] = {}
        self._by_device: dict[str, collections.deque[int]] = {}  # offsets, oldest first
        self._commands: dict[int, QueuedCommand] = {}
        self._next_key = 1
        self._devices: dict[str, DeviceRecord] = {}

    def _check(self, what: str) -> None:
        if not self._open or self._closed:
            raise StorageClosedError(f"memory storage: {what}() on a storage that is not open")

    async def open(self) -> None:
        """Start accepting calls."""
        self._open = True

    async def close(self) -> None:
        """Stop accepting calls (nothing to flush)."""
        self._closed = True

    def next_offset(self) -> int:
        """Next offset, strictly increasing for this object's lifetime."""
        self._check("next_offset")
        self._next += 1
        return self._next - 1

    def append_telemetry(self, record: TelemetryRecord, data_json: str | None = None) -> None:
        """Store the record (a copy of its data, as the SQLite engine stores JSON)."""
        self._check("append_telemetry")
        data = json.loads(json.dumps(record.data) if data_json is None else data_json)
        self._telemetry[record.offset] = dataclasses.replace(record, data=data)
        self.stats.rows_written += 1
        mine = self._by_device.setdefault(record.device, collections.deque())
        mine.append(record.offset)
        while len(mine) > self.retention.max_per_device:
            del self._telemetry[mine.popleft()]
            self.stats.pruned_rows += 1

    async def flush(self) -> None:
        """Nothing is ever pending."""
        self._check("flush")

    async def prune(self, now_ms: int | None = None) -> int:
        """Apply the age rule now (the count rule applies on every append)."""
        self._check("prune")
        now = time.time() * 1000 if now_ms is None else now_ms
        cutoff = math.floor(now - self.retention.max_age_s * 1000)
        old = {r.offset for r in self._telemetry.values() if r.ts < cutoff}
        for offset in old:
            del self._telemetry[offset]
        for offsets in self._by_device.values():
            kept = [offset for offset in offsets if offset not in old]
            offsets.clear()
            offsets.extend(kept)
        self.stats.pruned_rows += len(old)
        return len(old)

    async def telemetry_since(
        self,
        since: int,
        *,
        until: int | None = None,
        device: str | None = None,
        protocol: str | None = None,
        limit: int = 1000,
    ) -> list[TelemetryRecord]:
        """Records with `since < offset <= until`, oldest first, at most `limit`."""
        self._check("telemetry_since")
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        found = [
            r
            for r in sorted(self._telemetry.values(), key=lambda r: r.offset)
            if r.offset > since
            and (until is None or r.offset <= until)
            and device in (None, r.device)
            and protocol in (None, r.protocol)
        ]
        return found[:limit]

    async def latest_telemetry(self) -> dict[str, TelemetryRecord]:
        """The newest record of each device."""
        self._check("latest_telemetry")
        latest: dict[str, TelemetryRecord] = {}
        for record in sorted(self._telemetry.values(), key=lambda r: r.offset):
            latest[record.device] = record
        return latest

    async def enqueue_command(self, command: QueuedCommand) -> QueuedCommand:
        """Keep the command; returns it with its key."""
        self._check("enqueue_command")
        stored = dataclasses.replace(command, key=self._next_key)
        self._next_key += 1
        self._commands[stored.key] = stored
        return stored

    async def pending_commands(self, device: str, now_ms: int) -> list[QueuedCommand]:
        """The device's commands not yet expired at `now_ms`, oldest first."""
        self._check("pending_commands")
        return [c for c in self._commands.values() if c.device == device and c.expires_ms > now_ms]

    async def remove_command(self, key: int) -> None:
        """Forget a delivered command."""
        self._check("remove_command")
        self._commands.pop(key, None)

    async def expire_commands(self, now_ms: int) -> list[QueuedCommand]:
        """Remove and return the commands with `expires_ms <= now_ms`, oldest first."""
        self._check("expire_commands")
        expired = [c for c in self._commands.values() if c.expires_ms <= now_ms]
        for command in expired:
            del self._commands[command.key]
        return expired

    async def upsert_device(self, record: DeviceRecord) -> None:
        """Insert or update a device, keeping the first_seen_ms of an existing one."""
        self._check("upsert_device")
        old = self._devices.get(record.device)
        if old is not None:
            record = dataclasses.replace(record, first_seen_ms=old.first_seen_ms)
        self._devices[record.device] = record

    async def devices(self) -> list[DeviceRecord]:
        """Every device ever seen, by name."""
        self._check("devices")
        return sorted(self._devices.values(), key=lambda d: d.device)
