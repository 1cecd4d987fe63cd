"""The engine: the one seam between routing and what the gateway keeps and shares.

The hub routes; the engine keeps. Behind this seam are: telemetry offsets and
history (replay, ``last``), the device registry kept across restarts, the
offline command queue, and everything that involves other nodes: delivery to
their dashboards, commands to devices they hold, takeover across nodes, and
which nodes are alive. The hub calls an ``Engine``; the engine calls back the
hub's ``EngineSink`` for whatever must reach this node's dashboards, its own
devices' messages included, so a single node and a cluster route alike.

``LocalEngine`` is the single node: a ``Store`` (SQLite, or the in-memory
twin in tests) and in-process fan-out. A cluster engine (Redis Streams) fills
the same seam; see docs/architecture.md.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from devices import CommandStatus, DeviceTelemetry

from .records import DeviceRecord, QueuedCommand, TelemetryRecord
from .store import Store

log = logging.getLogger(__name__)

# One encoder built once: json.dumps with options builds a new one per call.
_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode

StatusCallback = Callable[[dict[str, Any]], None]


@dataclass(frozen=True, slots=True)
class Presence:
    """A device came online or went offline (docs/api.md §3.1 ``presence``)."""

    device: str
    protocol: str
    online: bool
    ts: int  # unix ms
    reason: str


class EngineSink(Protocol):
    """What the engine calls on the hub, on the event loop: deliveries to this node."""

    def deliver_telemetry(self, record: TelemetryRecord, data_json: str, received: float) -> None:
        """A sequenced telemetry message for this node's dashboards.

        ``data_json`` is ``record.data`` as JSON; ``received`` the loop time its
        frame was decoded on this node (0 when it came from another node).
        """

    def deliver_presence(self, presence: Presence) -> None:
        """A device's presence changed, on this node or another."""


class Engine(Protocol):
    """What the hub keeps and shares. Every method runs on the event loop."""

    @property
    def node(self) -> str:
        """This node's name (``local`` for a single node)."""
        ...

    async def open(self, sink: EngineSink) -> None:
        """Start; deliveries go to ``sink`` from now on."""
        ...

    async def close(self) -> None:
        """Stop delivering; keep everything accepted."""
        ...

    # ---- telemetry: offsets and history ---------------------------------------------------------

    def publish_telemetry(self, event: DeviceTelemetry) -> None:
        """Give one of this node's telemetry messages its offset, keep it, deliver it.

        Never blocks: the hot path of every frame.
        """
        ...

    def seam(self) -> int:
        """An offset above everything delivered so far and below anything delivered later."""
        ...

    async def flush(self) -> None:
        """Return once everything published before is readable by ``history``."""
        ...

    async def history(
        self,
        after: int,
        *,
        until: int | None = None,
        device: str | None = None,
        protocol: str | None = None,
        limit: int = 100,
    ) -> list[TelemetryRecord]:
        """Kept telemetry with ``after < offset <= until``, oldest first."""
        ...

    async def latest(self) -> dict[str, TelemetryRecord]:
        """The newest kept telemetry of each device."""
        ...

    # ---- presence and the registry --------------------------------------------------------------

    def publish_presence(self, presence: Presence, record: DeviceRecord) -> None:
        """One of this node's devices came or went: keep ``record``, deliver ``presence``."""
        ...

    async def remember(self, record: DeviceRecord) -> None:
        """Keep a device's registry entry now (at shutdown: its last-seen time)."""
        ...

    async def known_devices(self) -> list[DeviceRecord]:
        """Every device ever seen."""
        ...

    # ---- the offline command queue --------------------------------------------------------------

    async def enqueue_command(self, command: QueuedCommand) -> QueuedCommand:
        """Keep a command for an offline device, durably; returns it with its key."""
        ...

    async def pending_commands(self, device: str, now_ms: int) -> list[QueuedCommand]:
        """The device's queued commands not yet expired, oldest first."""
        ...

    async def remove_command(self, key: int) -> None:
        """Forget a queued command (durably, before returning)."""
        ...

    async def expire_commands(self, now_ms: int) -> list[QueuedCommand]:
        """Remove and return the queued commands whose time is up."""
        ...

    # ---- other nodes ----------------------------------------------------------------------------

    def nodes(self) -> list[str]:
        """The live nodes' names, this one included."""
        ...

    async def forward_command(
        self, device: str, body: bytes, reply: StatusCallback
    ) -> CommandStatus | None:
        """Send a command to ``device`` on the node that holds it; None if none does.

        Its later statuses go to ``reply`` whichever node reports them.
        """
        ...


class LocalEngine:
    """The single node: one ``Store`` and in-process delivery."""

    def __init__(self, storage: Store, node: str = "local") -> None:
        self.storage = storage
        self._node = node
        self._sink: EngineSink | None = None
        self._writes: set[asyncio.Task[None]] = set()

    @property
    def node(self) -> str:
        """This node's name."""
        return self._node

    async def open(self, sink: EngineSink) -> None:
        """Deliveries go to ``sink`` (the storage is opened by its owner)."""
        self._sink = sink

    async def close(self) -> None:
        """No more deliveries; registry rows already handed over reach the storage."""
        self._sink = None
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)

    def _write(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._writes.add(task)
        task.add_done_callback(self._written)

    def _written(self, task: asyncio.Task[None]) -> None:
        self._writes.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s failed", task.get_name(), exc_info=task.exception())

    def publish_telemetry(self, event: DeviceTelemetry) -> None:
        """Offset from the storage's counter, row to its next batch, then deliver."""
        storage = self.storage
        record = TelemetryRecord(
            storage.next_offset(), event.client_id, event.protocol, event.ts, event.seq, event.data
        )
        data_json = _encode(event.data)  # once, for the row and every dashboard
        storage.append_telemetry(record, data_json)
        if self._sink is not None:
            self._sink.deliver_telemetry(record, data_json, event.received)

    def seam(self) -> int:
        """An offset taken now is above every one handed out before."""
        return self.storage.next_offset()

    async def flush(self) -> None:
        """Wait for the storage writer's pending batch."""
        await self.storage.flush()

    async def history(
        self,
        after: int,
        *,
        until: int | None = None,
        device: str | None = None,
        protocol: str | None = None,
        limit: int = 100,
    ) -> list[TelemetryRecord]:
        """From storage."""
        return await self.storage.telemetry_since(
            after, until=until, device=device, protocol=protocol, limit=limit
        )

    async def latest(self) -> dict[str, TelemetryRecord]:
        """From storage."""
        return await self.storage.latest_telemetry()

    def publish_presence(self, presence: Presence, record: DeviceRecord) -> None:
        """The registry row goes to the storage writer's queue; presence is delivered now."""
        # The storage only queues the row for its writer; no need to wait here.
        self._write(self.storage.upsert_device(record), f"remember {record.device}")
        if self._sink is not None:
            self._sink.deliver_presence(presence)

    async def remember(self, record: DeviceRecord) -> None:
        """Upsert the registry row."""
        await self.storage.upsert_device(record)

    async def known_devices(self) -> list[DeviceRecord]:
        """From storage."""
        return await self.storage.devices()

    async def enqueue_command(self, command: QueuedCommand) -> QueuedCommand:
        """Into storage, committed before returning."""
        return await self.storage.enqueue_command(command)

    async def pending_commands(self, device: str, now_ms: int) -> list[QueuedCommand]:
        """From storage."""
        return await self.storage.pending_commands(device, now_ms)

    async def remove_command(self, key: int) -> None:
        """From storage, committed before returning."""
        await self.storage.remove_command(key)

    async def expire_commands(self, now_ms: int) -> list[QueuedCommand]:
        """From storage."""
        return await self.storage.expire_commands(now_ms)

    def nodes(self) -> list[str]:
        """Just this one."""
        return [self._node]

    async def forward_command(
        self, device: str, body: bytes, reply: StatusCallback
    ) -> CommandStatus | None:
        """A single node holds every device it knows of: there is nowhere to forward to."""
        return None
