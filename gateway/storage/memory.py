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
from collections.abc import Sequence
from typing import Any

from .records import (
    MAX_QUEUED_COMMANDS,
    MAX_QUEUED_COMMANDS_PER_DEVICE,
    CommandEvent,
    CommandLog,
    DeviceDeletion,
    DeviceRecord,
    QueuedCommand,
    QueueFull,
    RetentionPolicy,
    StorageClosedError,
    StorageError,
    StorageStats,
    StoreHealth,
    TelemetryRecord,
)


class MemoryStorage:
    """An in-memory `Storage` for tests of the routing core: same contract, no disk.

    Everything is "committed" at once; offsets start at 1 and die with the object.
    Setting ``fault`` to a reason makes it fail as a broken disk would: every
    call that writes raises `StorageError` and ``health()`` reports the reason,
    until ``fault`` is None again.
    """

    # RetentionPolicy is frozen, so one shared default is safe (B008 sees that only
    # within the module defining it).
    def __init__(
        self,
        *,
        retention: RetentionPolicy = RetentionPolicy(),  # noqa: B008
        max_queued_commands_per_device: int = MAX_QUEUED_COMMANDS_PER_DEVICE,
        max_queued_commands: int = MAX_QUEUED_COMMANDS,
    ) -> None:
        self.retention = retention
        self.max_queued_commands_per_device = max_queued_commands_per_device
        self.max_queued_commands = max_queued_commands
        self.stats = StorageStats()
        self.fault: str | None = None
        self._open = False
        self._closed = False
        self._next = 1
        self._telemetry: dict[int, TelemetryRecord] = {}
        self._by_device: dict[str, collections.deque[int]] = {}  # offsets, oldest first
        self._commands: dict[int, QueuedCommand] = {}
        self._sending: set[int] = set()  # keys of commands being sent
        self._interrupted: list[QueuedCommand] = []
        self._next_key = 1
        self._devices: dict[str, DeviceRecord] = {}
        self._labels: dict[str, dict[str, Any]] = {}
        self._log: dict[str, CommandLog] = {}

    def _check(self, what: str) -> None:
        if not self._open or self._closed:
            raise StorageClosedError(f"memory storage: {what}() on a storage that is not open")

    def _write(self, what: str) -> None:
        self._check(what)
        if self.fault is not None:
            self.stats.failed_batches += 1
            raise StorageError(f"memory storage: storage unavailable: {self.fault}")

    def health(self) -> StoreHealth:
        """Failing while ``fault`` is set."""
        return StoreHealth(self.fault, 1) if self.fault is not None else StoreHealth()

    def restart(self) -> MemoryStorage:
        """What a new process would find after a crash: the same contents, offsets above.

        Commands that were being sent are taken out of the queue, to be
        reported once by ``interrupted_commands``.
        """
        other = MemoryStorage(
            retention=self.retention,
            max_queued_commands_per_device=self.max_queued_commands_per_device,
            max_queued_commands=self.max_queued_commands,
        )
        other._next = self._next + 1000
        other._telemetry = dict(self._telemetry)
        other._by_device = {d: collections.deque(o) for d, o in self._by_device.items()}
        other._commands = {k: c for k, c in self._commands.items() if k not in self._sending}
        other._interrupted = [c for k, c in sorted(self._commands.items()) if k in self._sending]
        other._next_key = self._next_key
        other._devices = dict(self._devices)
        other._labels = dict(self._labels)
        other._log = dict(self._log)
        return other

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
        """Nothing is ever pending (unless ``fault`` is set)."""
        self._write("flush")

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
        from_ts: int | None = None,
        to_ts: int | None = None,
        newest: bool = False,
    ) -> list[TelemetryRecord]:
        """Records with `since < offset <= until` and `from_ts <= ts < to_ts`, oldest
        first, at most `limit`: the oldest such, or with `newest` the newest."""
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
            and (from_ts is None or r.ts >= from_ts)
            and (to_ts is None or r.ts < to_ts)
        ]
        if newest:
            return found[max(0, len(found) - limit) :] if limit else []
        return found[:limit]

    async def latest_telemetry(self) -> dict[str, TelemetryRecord]:
        """The newest record of each device."""
        self._check("latest_telemetry")
        latest: dict[str, TelemetryRecord] = {}
        for record in sorted(self._telemetry.values(), key=lambda r: r.offset):
            latest[record.device] = record
        return latest

    async def enqueue_command(self, command: QueuedCommand) -> QueuedCommand:
        """Keep the command; returns it with its key. `QueueFull` at a bound."""
        self._write("enqueue_command")
        mine = sum(1 for c in self._commands.values() if c.device == command.device)
        if mine >= self.max_queued_commands_per_device:
            raise QueueFull(
                "max_queued_commands_per_device",
                f"offline queue full: {mine} commands already wait for {command.device!r} "
                "(storage.max_queued_commands_per_device)",
            )
        if len(self._commands) >= self.max_queued_commands:
            raise QueueFull(
                "max_queued_commands",
                f"offline queue full: {len(self._commands)} commands already wait for their "
                "devices (storage.max_queued_commands)",
            )
        stored = dataclasses.replace(command, key=self._next_key)
        self._next_key += 1
        self._commands[stored.key] = stored
        return stored

    async def pending_commands(
        self, device: str, now_ms: int, *, after: int = 0, limit: int | None = None
    ) -> list[QueuedCommand]:
        """The device's waiting commands after `after`, not expired at `now_ms`, oldest first."""
        self._check("pending_commands")
        found = [
            c
            for key, c in sorted(self._commands.items())
            if c.device == device
            and key > after
            and c.expires_ms > now_ms
            and key not in self._sending
        ]
        return found if limit is None else found[:limit]

    async def mark_sending(self, keys: Sequence[int]) -> list[int]:
        """Mark waiting commands as being sent; the keys still queued."""
        self._write("mark_sending")
        marked = [k for k in keys if k in self._commands and k not in self._sending]
        self._sending.update(marked)
        return marked

    async def unmark_sending(self, keys: Sequence[int]) -> None:
        """They wait again."""
        self._write("unmark_sending")
        self._sending.difference_update(keys)

    async def remove_commands(self, keys: Sequence[int]) -> None:
        """Forget commands."""
        self._write("remove_commands")
        for key in keys:
            self._commands.pop(key, None)
            self._sending.discard(key)

    async def interrupted_commands(self) -> list[QueuedCommand]:
        """Those found being sent by ``restart()``, once."""
        self._check("interrupted_commands")
        found, self._interrupted = self._interrupted, []
        return found

    async def expire_commands(self, now_ms: int, limit: int = 1000) -> list[QueuedCommand]:
        """Remove and return up to `limit` waiting commands with `expires_ms <= now_ms`."""
        self._write("expire_commands")
        expired = [
            c
            for key, c in sorted(self._commands.items())
            if c.expires_ms <= now_ms and key not in self._sending
        ][:limit]
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
        """Every device ever seen and not deleted since, by name."""
        self._check("devices")
        return sorted(self._devices.values(), key=lambda d: d.device)

    async def delete_devices(self, devices: Sequence[str]) -> None:
        """Delete devices' registry rows (unknown ones are ignored)."""
        self._write("delete_devices")
        for device in devices:
            self._devices.pop(device, None)

    async def delete_device(self, device: str) -> DeviceDeletion:
        """Delete the device's row, history, labels and queued commands (returned)."""
        self._write("delete_device")
        offsets = self._by_device.pop(device, collections.deque())
        for offset in offsets:
            self._telemetry.pop(offset, None)
        commands = [c for _, c in sorted(self._commands.items()) if c.device == device]
        for c in commands:
            del self._commands[c.key]
            self._sending.discard(c.key)
        self._labels.pop(device, None)
        self._devices.pop(device, None)
        return DeviceDeletion(len(offsets), commands)

    async def set_labels(self, device: str, labels: dict[str, Any] | None) -> None:
        """Keep (or with None, drop) the device's API labels."""
        self._write("set_labels")
        if labels is None:
            self._labels.pop(device, None)
        else:
            self._labels[device] = json.loads(json.dumps(labels))

    async def labels(self) -> dict[str, dict[str, Any]]:
        """The API labels, by device."""
        self._check("labels")
        return {d: dict(v) for d, v in self._labels.items()}

    def log_command(self, event: CommandEvent) -> None:
        """Append the status to the command's history."""
        self._check("log_command")
        entry = json.loads(json.dumps({"status": event.status, "ts": event.ts, **event.extra}))
        old = self._log.get(event.gateway_id)
        if old is None:
            self._log[event.gateway_id] = CommandLog(
                event.gateway_id, event.request_id, event.device, event.status, [entry]
            )
        else:
            self._log[event.gateway_id] = dataclasses.replace(
                old, status=event.status, history=[*old.history, entry]
            )

    async def command_log(self, gateway_id: str) -> CommandLog | None:
        """The command's statuses, or None."""
        self._check("command_log")
        return self._log.get(gateway_id)
