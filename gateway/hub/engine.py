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
import logging
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from devices import CommandStatus, DeviceTelemetry

from .messages import dumps
from .records import (
    CommandEvent,
    CommandLog,
    DeviceDeletion,
    DeviceRecord,
    QueuedCommand,
    StoreError,
    StoreHealth,
    TelemetryRecord,
)
from .store import FaultLog, Store

log = logging.getLogger(__name__)

# One encoder built once: json.dumps with options builds a new one per call.
_encode = dumps  # compact JSON, set up once (messages.py)

StatusCallback = Callable[[dict[str, Any]], None]


@dataclass(frozen=True, slots=True)
class Presence:
    """A device came online or went offline (docs/api.md §3.1 ``presence``)."""

    device: str
    protocol: str
    online: bool
    ts: int  # unix ms
    reason: str
    # The node that holds (held) the device's link; "" for this node in a single node.
    node: str = ""
    transport: str | None = None


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

    @property
    def clustered(self) -> bool:
        """True for a node of a cluster (device entries then say ``node``)."""
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
        from_ts: int | None = None,
        to_ts: int | None = None,
        newest: bool = False,
    ) -> list[TelemetryRecord]:
        """Kept telemetry with ``after < offset <= until`` and ``from_ts <= ts < to_ts``,
        oldest first: the oldest ``limit`` such, or with ``newest`` the newest."""
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
        """Every device ever seen, and not forgotten since."""
        ...

    async def forget_devices(self, devices: list[str]) -> None:
        """Let devices' registry entries go for good (the hub forgot them: ``forget_after``).

        The hub forgets only devices offline and unseen for a while; one that
        comes back after this call (its ``publish_presence`` later) is kept
        again. Raises ``StoreError`` when it cannot be done now.
        """
        ...

    async def delete_device(self, device: str) -> DeviceDeletion:
        """Let go of everything kept of an offline device (``DELETE /api/devices/{id}``):
        registry entry, history, labels and queued commands (returned, to be reported).

        Raises ``StoreError`` when it cannot be done now.
        """
        ...

    async def set_labels(self, device: str, labels: dict[str, Any] | None) -> None:
        """Keep a device's labels set over the API (None drops them), durably."""
        ...

    async def labels(self) -> dict[str, dict[str, Any]]:
        """The labels set over the API, by device."""
        ...

    # ---- the command log ------------------------------------------------------------------------

    def log_command(self, event: CommandEvent) -> None:
        """Keep one command status for ``command_log``; never blocks, never raises."""
        ...

    async def command_log(self, gateway_id: str) -> CommandLog | None:
        """A command's statuses (everything logged before the call), or None."""
        ...

    # ---- the offline command queue --------------------------------------------------------------
    #
    # Delivery marks a command as being sent, durably, before writing it, so a
    # command is written at most once even across a crash (see ``Store``).

    async def enqueue_command(self, command: QueuedCommand) -> QueuedCommand:
        """Keep a command for an offline device, durably; returns it with its key.

        Raises ``QueueFull`` at a bound of the queue, ``StoreError`` if it cannot be kept.
        """
        ...

    async def pending_commands(
        self, device: str, now_ms: int, *, after: int = 0, limit: int | None = None
    ) -> list[QueuedCommand]:
        """A page of the device's waiting commands after key ``after``, oldest first."""
        ...

    async def mark_sending(self, keys: Sequence[int]) -> list[int]:
        """Mark commands as being sent, durably; returns the keys still queued."""
        ...

    async def unmark_sending(self, keys: Sequence[int]) -> None:
        """Commands marked but never written wait again."""
        ...

    async def remove_commands(self, keys: Sequence[int]) -> None:
        """Forget commands written to their device."""
        ...

    async def interrupted_commands(self) -> list[QueuedCommand]:
        """Commands that were being sent when the previous process stopped (each once)."""
        ...

    async def expire_commands(self, now_ms: int, limit: int = 1000) -> list[QueuedCommand]:
        """Remove and return up to ``limit`` waiting commands whose time is up."""
        ...

    def health(self) -> StoreHealth:
        """Whether what the node keeps can be kept now (``/healthz``, docs/api.md §4)."""
        ...

    # ---- other nodes ----------------------------------------------------------------------------

    def nodes(self) -> list[str]:
        """The live nodes' names, this one included."""
        ...

    async def forward_command(
        self, device: str, body: bytes, reply: StatusCallback, command_id: str | None = None
    ) -> CommandStatus | None:
        """Send a command to ``device`` on the node that holds it; None if none does.

        Its later statuses go to ``reply`` whichever node reports them, each
        with ``command_id`` (the gateway's id, docs/api.md §3.1) and kept in
        the command log under it.
        """
        ...


class LocalEngine:
    """The single node: one ``Store`` and in-process delivery."""

    def __init__(self, storage: Store, node: str = "local") -> None:
        self.storage = storage
        self._node = node
        self._sink: EngineSink | None = None
        self._writes: set[asyncio.Task[None]] = set()
        # Telemetry dropped for want of an offset (the storage writer dead or stalled).
        self.unsequenced = 0
        self._publish_fault = FaultLog(log, "keeping telemetry")
        self._registry_fault = FaultLog(log, "keeping the device registry")
        self._log_fault = FaultLog(log, "keeping the command log")

    @property
    def node(self) -> str:
        """This node's name."""
        return self._node

    @property
    def clustered(self) -> bool:
        """A single node."""
        return False

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
        if task.cancelled():
            return
        error = task.exception()
        if isinstance(error, StoreError):
            self._registry_fault.failed(error)  # a storage fault: once, not per device event
        elif error is not None:
            log.error("%s failed", task.get_name(), exc_info=error)

    def publish_telemetry(self, event: DeviceTelemetry) -> None:
        """Offset from the storage's counter, row to its next batch, then deliver.

        A storage that cannot take the row (its writer dead) still lets the
        message reach the dashboards; one that cannot hand out an offset
        drops it (counted in ``unsequenced``). Either is logged by a
        ``FaultLog``, never once per message.
        """
        storage = self.storage
        try:
            offset = storage.next_offset()
        except StoreError as e:
            self.unsequenced += 1
            self._publish_fault.failed(e)
            return
        record = TelemetryRecord(
            offset, event.client_id, event.protocol, event.ts, event.seq, event.data
        )
        data_json = _encode(event.data)  # once, for the row and every dashboard
        try:
            storage.append_telemetry(record, data_json)
        except StoreError as e:
            self._publish_fault.failed(e)
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
        from_ts: int | None = None,
        to_ts: int | None = None,
        newest: bool = False,
    ) -> list[TelemetryRecord]:
        """From storage."""
        return await self.storage.telemetry_since(
            after,
            until=until,
            device=device,
            protocol=protocol,
            limit=limit,
            from_ts=from_ts,
            to_ts=to_ts,
            newest=newest,
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

    async def forget_devices(self, devices: list[str]) -> None:
        """From storage, durably (the storage orders it with the registry rows queued)."""
        await self.storage.delete_devices(devices)

    async def delete_device(self, device: str) -> DeviceDeletion:
        """From storage, durably (ordered with the rows queued before it)."""
        return await self.storage.delete_device(device)

    async def set_labels(self, device: str, labels: dict[str, Any] | None) -> None:
        """In storage, durably."""
        await self.storage.set_labels(device, labels)

    async def labels(self) -> dict[str, dict[str, Any]]:
        """From storage."""
        return await self.storage.labels()

    def log_command(self, event: CommandEvent) -> None:
        """To the storage writer's queue; a storage that cannot take it is logged, once."""
        try:
            self.storage.log_command(event)
        except StoreError as e:
            self._log_fault.failed(e)

    async def command_log(self, gateway_id: str) -> CommandLog | None:
        """From storage, once what was logged before is committed."""
        await self.storage.flush()
        return await self.storage.command_log(gateway_id)

    async def enqueue_command(self, command: QueuedCommand) -> QueuedCommand:
        """Into storage, committed before returning."""
        return await self.storage.enqueue_command(command)

    async def pending_commands(
        self, device: str, now_ms: int, *, after: int = 0, limit: int | None = None
    ) -> list[QueuedCommand]:
        """From storage."""
        return await self.storage.pending_commands(device, now_ms, after=after, limit=limit)

    async def mark_sending(self, keys: Sequence[int]) -> list[int]:
        """In storage, fsynced before returning."""
        return await self.storage.mark_sending(keys)

    async def unmark_sending(self, keys: Sequence[int]) -> None:
        """In storage."""
        await self.storage.unmark_sending(keys)

    async def remove_commands(self, keys: Sequence[int]) -> None:
        """From storage, committed before returning."""
        await self.storage.remove_commands(keys)

    async def interrupted_commands(self) -> list[QueuedCommand]:
        """What the storage found marked when it opened."""
        return await self.storage.interrupted_commands()

    async def expire_commands(self, now_ms: int, limit: int = 1000) -> list[QueuedCommand]:
        """From storage."""
        return await self.storage.expire_commands(now_ms, limit)

    def health(self) -> StoreHealth:
        """The storage's."""
        return self.storage.health()

    def nodes(self) -> list[str]:
        """Just this one."""
        return [self._node]

    async def forward_command(
        self, device: str, body: bytes, reply: StatusCallback, command_id: str | None = None
    ) -> CommandStatus | None:
        """A single node holds every device it knows of: there is nowhere to forward to."""
        return None
