"""The routing core: devices in, dashboards out (docs/api.md §3), with no aiohttp.

The hub keeps the device registry (by client_id and protocol), every
dashboard's subscriptions and bounded outbound queue, and carries commands
from dashboards to devices and their statuses back. It never awaits a
dashboard: fan-out only appends to per-dashboard queues, and each dashboard's
own writer (in the web layer) drains its queue at the pace of its socket.

Telemetry is encoded to JSON once and the same text goes to every dashboard.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from devices import (
    CommandHandle,
    CommandResult,
    CommandStatus,
    DeviceEvent,
    DeviceInfo,
    DeviceManager,
    DeviceNotOnline,
    DeviceOffline,
    DeviceOnline,
    DeviceTelemetry,
)
from frames import CommandError, get_protocol, valid_client_id, valid_protocol_name

from .metrics import Metrics
from .storage import DeviceRecord, QueuedCommand, Storage, TelemetryRecord

log = logging.getLogger(__name__)


def now_ms() -> int:
    """Unix time in milliseconds (the ``ts`` of docs/api.md §3)."""
    return int(time.time() * 1000)


# json.dumps with any non-default option builds a new JSONEncoder per call;
# one built once costs a third less per message on the telemetry path.
_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def dumps(obj: dict[str, Any]) -> str:
    """Compact JSON, as sent on the wire."""
    return _encode(obj)


def telemetry_text(rec: TelemetryRecord, data_json: str) -> str:
    """``dumps(telemetry_message(rec))``, given ``data_json = dumps(rec.data)``.

    The data is encoded once, for the dashboards and for the storage row; the
    rest of the message is a few scalars.
    """
    return (
        f'{{"op":"telemetry","device":{_encode(rec.device)},"protocol":{_encode(rec.protocol)},'
        f'"offset":{rec.offset:d},"ts":{rec.ts:d},"seq":{rec.seq:d},"data":{data_json}}}'
    )


class Role(enum.StrEnum):
    """A token's role (docs/api.md §1)."""

    VIEWER = "viewer"
    OPERATOR = "operator"


class ErrorCode(enum.StrEnum):
    """Dashboard error codes (docs/api.md §3)."""

    BAD_REQUEST = "bad_request"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    RATE_LIMITED = "rate_limited"
    TOO_LARGE = "too_large"


class ClientError(Exception):
    """A dashboard request the hub refuses; becomes ``{"op":"error",...}``."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Refused(Exception):
    """A dashboard or request the hub cannot take now (a limit is reached)."""


@dataclass(frozen=True, slots=True)
class HubConfig:
    """Limits of the routing core."""

    queue_size: int = 1024  # per-dashboard outbound queue (telemetry is dropped beyond)
    max_dashboards: int = 1000
    commands_per_second: float = 20.0  # per dashboard
    command_ttl: float = 3600.0  # seconds a queued command waits for its device
    batch_max_items: int = 256  # objects per WebSocket frame when batching
    expiry_interval: float = 1.0

    def __post_init__(self) -> None:
        if self.queue_size < 1:
            raise ValueError("queue_size must be >= 1")
        if self.max_dashboards < 1:
            raise ValueError("max_dashboards must be >= 1")
        if not self.commands_per_second > 0:
            raise ValueError("commands_per_second must be > 0")
        if not self.command_ttl > 0:
            raise ValueError("command_ttl must be > 0")


# ---- subscriptions ---------------------------------------------------------------------------

Target = tuple[str, str]  # ("device", id) | ("protocol", name) | ("all", "")


def parse_target(msg: dict[str, Any]) -> tuple[Target, dict[str, Any]]:
    """The subscription target of a subscribe/unsubscribe request, and its echo."""
    keys = [k for k in ("device", "protocol", "all") if k in msg]
    if len(keys) != 1:
        raise ClientError(
            ErrorCode.BAD_REQUEST, "give exactly one of 'device', 'protocol' or 'all': true"
        )
    key = keys[0]
    value = msg[key]
    if key == "all":
        if value is not True:
            raise ClientError(ErrorCode.BAD_REQUEST, "'all' must be true")
        return ("all", ""), {"all": True}
    if not isinstance(value, str):
        raise ClientError(ErrorCode.BAD_REQUEST, f"'{key}' must be a string")
    if key == "device" and not valid_client_id(value):
        raise ClientError(ErrorCode.BAD_REQUEST, "'device' is not a valid client_id")
    if key == "protocol" and not valid_protocol_name(value):
        raise ClientError(ErrorCode.BAD_REQUEST, "'protocol' is not a valid protocol name")
    return (key, value), {key: value}


def _matches(target: Target, device: str, protocol: str) -> bool:
    kind, value = target
    return kind == "all" or (kind == "device" and value == device) or value == protocol


# ---- dashboards ----------------------------------------------------------------------------


class Kind(enum.IntEnum):
    """What an outbound item is: telemetry may be dropped, the rest never."""

    TELEMETRY = 0
    CONTROL = 1


@dataclass(slots=True, eq=False)  # eq=False: hashed by identity, kept in sets
class Dashboard:
    """One connected dashboard: role, subscriptions, bounded outbound queue.

    The web layer's writer awaits ``wait()`` and sends what ``take()`` returns.
    """

    id: int
    role: Role
    session: str
    limit: int
    subscriptions: set[Target] = field(default_factory=set)
    # (kind, offset, text, loop time the device frame arrived; 0 when unknown)
    queue: deque[tuple[Kind, int, str, float]] = field(default_factory=deque)
    telemetry_queued: int = 0
    dropped: int = 0  # telemetry dropped since the last lagged notice
    resume_from: int | None = None
    dropped_total: int = 0
    closed: bool = False
    # While a replay runs, live telemetry waits here so it comes after the replay.
    replaying: int = 0
    replay_targets: list[Target] = field(default_factory=list)
    held: deque[tuple[int, str, float, str, str]] = field(default_factory=deque)
    # Set when ``held`` overflowed: the replay's own messages were let go (they
    # are in storage) and the replay must read up to a new seam.
    held_overflowed: bool = False
    # When the oldest telemetry of the last batch ``take()`` returned arrived.
    batch_received: float = 0.0
    _ready: asyncio.Event = field(default_factory=asyncio.Event)
    _room: asyncio.Event = field(default_factory=asyncio.Event)
    _cmd_tokens: float = 0.0
    _cmd_at: float = 0.0

    def push_control(self, text: str) -> None:
        """Queue a reply, presence or command_status: never dropped."""
        if self.closed:
            return
        self.queue.append((Kind.CONTROL, 0, text, 0.0))
        self._ready.set()

    def push_control_json(self, obj: dict[str, Any]) -> None:
        """Queue a control message given as a JSON object."""
        self.push_control(dumps(obj))

    def push_telemetry(
        self, offset: int, text: str, received: float = 0.0, device: str = "", protocol: str = ""
    ) -> int:
        """Queue a telemetry message; returns how many were dropped to make room."""
        if self.closed:
            return 0
        if not self.replaying:
            return self._append_telemetry(offset, text, received)
        if self.held_overflowed and self._replayed(device, protocol):
            return 0  # storage has it; the replay's next round reads it
        self.held.append((offset, text, received, device, protocol))
        if len(self.held) <= self.limit:
            return 0
        # Too much live traffic while replaying: let go of what the replay will
        # read again from storage; anything else is dropped and announced.
        self.held_overflowed = True
        dropped = 0
        kept: deque[tuple[int, str, float, str, str]] = deque()
        for item in self.held:
            if self._replayed(item[3], item[4]):
                continue
            if len(kept) < self.limit // 2:
                kept.append(item)
            else:
                self._note_drop(item[0])
                dropped += 1
        self.held = kept
        return dropped

    def _replayed(self, device: str, protocol: str) -> bool:
        return any(_matches(t, device, protocol) for t in self.replay_targets)

    def _append_telemetry(self, offset: int, text: str, received: float = 0.0) -> int:
        dropped = 0
        if self.telemetry_queued >= self.limit:
            # Drop the oldest telemetry; replies and presence stay.
            for i, (kind, off, _, _) in enumerate(self.queue):
                if kind is Kind.TELEMETRY:
                    del self.queue[i]
                    self.telemetry_queued -= 1
                    self._note_drop(off)
                    dropped = 1
                    break
        self.queue.append((Kind.TELEMETRY, offset, text, received))
        self.telemetry_queued += 1
        self._ready.set()
        return dropped

    def _note_drop(self, offset: int) -> None:
        self.dropped += 1
        self.dropped_total += 1
        if self.resume_from is None or offset < self.resume_from:
            self.resume_from = offset

    async def wait(self) -> None:
        """Until there is something to send (or the dashboard is closed)."""
        while not self.queue and not self.dropped and not self.closed:
            self._ready.clear()
            await self._ready.wait()

    def take(self, max_items: int) -> list[str]:
        """Up to ``max_items`` queued texts, a lagged notice first if telemetry was dropped."""
        out: list[str] = []
        if self.dropped:
            out.append(
                dumps({"op": "lagged", "dropped": self.dropped, "resume_from": self.resume_from})
            )
            self.dropped = 0
            self.resume_from = None
        q = self.queue
        self.batch_received = 0.0
        while q and len(out) < max_items:
            kind, _, text, received = q.popleft()
            if kind is Kind.TELEMETRY:
                self.telemetry_queued -= 1
                if received and not self.batch_received:
                    self.batch_received = received
            out.append(text)
        if self.telemetry_queued < self.limit // 2:
            self._room.set()
        return out

    async def room(self) -> None:
        """Until the queue is at most half full (replay waits on this: backpressure)."""
        while self.telemetry_queued >= self.limit // 2 and not self.closed:
            self._room.clear()
            await self._room.wait()

    def close(self) -> None:
        """No more output; wake the writer so it can finish."""
        self.closed = True
        self._ready.set()
        self._room.set()

    def allow_command(self, rate: float, now: float) -> bool:
        """Token bucket of commands per second (burst = one second's worth)."""
        self._cmd_tokens = min(rate, self._cmd_tokens + (now - self._cmd_at) * rate)
        self._cmd_at = now
        if self._cmd_tokens >= 1:
            self._cmd_tokens -= 1
            return True
        return False


# ---- devices -------------------------------------------------------------------------------


@dataclass(slots=True)
class DeviceState:
    """What the hub knows of one device, online or not."""

    device: str
    protocol: str
    online: bool = False
    transport: str | None = None
    peer: str | None = None
    session: str | None = None
    connected_at: int | None = None
    first_seen: int = 0
    last_seen: int | None = None
    last: TelemetryRecord | None = None  # latest telemetry (its message is built when asked)

    def listing(self) -> dict[str, Any]:
        """The device's entry of ``{"op":"devices"}`` and ``GET /api/devices``."""
        return {
            "device": self.device,
            "protocol": self.protocol,
            "online": self.online,
            "transport": self.transport,
            "peer": self.peer,
            "session": self.session,
            "connected_at": self.connected_at,
            "last_seen": self.last_seen,
            "last": None if self.last is None else telemetry_message(self.last),
        }


StatusCallback = Callable[[dict[str, Any]], None]

# Rounds a replay may take to catch up with live traffic before it gives up
# and sends a lagged notice instead.
REPLAY_ROUNDS = 20


class Hub:
    """The routing core. Implements ``devices.DeviceEventSink``."""

    def __init__(
        self,
        storage: Storage,
        config: HubConfig | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.storage = storage
        self.config = config or HubConfig()
        self.metrics = metrics or Metrics()
        self.manager: DeviceManager | None = None
        self.devices: dict[str, DeviceState] = {}
        self.dashboards: dict[int, Dashboard] = {}
        self._by_device: dict[str, set[Dashboard]] = {}
        self._by_protocol: dict[str, set[Dashboard]] = {}
        self._all: set[Dashboard] = set()
        self._next_dashboard = 1
        # Command statuses of queued commands go back to whoever gave them.
        self._command_owner: dict[int, StatusCallback] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._expiry: asyncio.Task[None] | None = None

    # ---- life cycle ---------------------------------------------------------------------------

    def attach(self, manager: DeviceManager) -> None:
        """Use ``manager`` to reach devices (it must send its events to this hub)."""
        self.manager = manager

    async def start(self) -> None:
        """Load the device registry and latest values, start the command expiry task."""
        for record in await self.storage.devices():
            self.devices[record.device] = DeviceState(
                device=record.device,
                protocol=record.protocol,
                transport=record.transport,
                first_seen=record.first_seen_ms,
                last_seen=record.last_seen_ms,
            )
        for device, rec in (await self.storage.latest_telemetry()).items():
            state = self.devices.get(device)
            if state is not None:
                state.last = rec
        self._expiry = asyncio.create_task(self._expire_loop(), name="command expiry")

    async def stop(self) -> None:
        """Stop background work and close every dashboard's queue."""
        if self._expiry is not None:
            self._expiry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._expiry
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        # Remember when each online device was last seen before storage closes.
        for state in self.devices.values():
            if state.online:
                await self.storage.upsert_device(self._device_record(state))
        for d in list(self.dashboards.values()):
            d.close()

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("hub task %s failed", task.get_name(), exc_info=task.exception())

    # ---- device events (DeviceEventSink) ------------------------------------------------------

    def device_event(self, event: DeviceEvent) -> None:
        """Called by the device side, on the loop, for every device event."""
        if isinstance(event, DeviceTelemetry):
            self._on_telemetry(event)
        elif isinstance(event, DeviceOnline):
            self._on_online(event.info)
        elif isinstance(event, DeviceOffline):
            self._on_offline(event.info, event.reason)

    def _on_telemetry(self, event: DeviceTelemetry) -> None:
        offset = self.storage.next_offset()
        record = TelemetryRecord(
            offset, event.client_id, event.protocol, event.ts, event.seq, event.data
        )
        data_json = _encode(event.data)
        self.storage.append_telemetry(record, data_json)
        text = telemetry_text(record, data_json)  # once, for every dashboard
        state = self.devices.get(event.client_id)
        if state is not None:
            state.last = record
            state.last_seen = event.ts
        dropped = 0
        for d in self._subscribers(event.client_id, event.protocol):
            dropped += d.push_telemetry(
                offset, text, event.received, event.client_id, event.protocol
            )
        if dropped:
            self.metrics.telemetry_dropped.inc(dropped)
        if self.metrics.count_telemetry():
            loop_now = asyncio.get_running_loop().time()
            self.metrics.observe_pipeline(loop_now - event.received)

    def _subscribers(self, device: str, protocol: str) -> Iterable[Dashboard]:
        a = self._by_device.get(device)
        b = self._by_protocol.get(protocol)
        if not a and not b:
            return self._all
        out = set(self._all)
        if a:
            out |= a
        if b:
            out |= b
        return out

    def _on_online(self, info: DeviceInfo) -> None:
        ts = now_ms()
        state = self.devices.get(info.client_id)
        if state is None:
            state = DeviceState(info.client_id, info.protocol, first_seen=ts)
            self.devices[info.client_id] = state
        state.protocol = info.protocol
        state.online = True
        state.transport = str(info.transport)
        state.peer = info.peer
        state.session = info.session
        state.connected_at = info.connected_at
        state.last_seen = ts
        self._persist_device(state)
        self.metrics.devices_online.set(self.online_count())
        self._presence(state, True, "connected", ts)
        self._spawn(self._deliver_queued(info.client_id, info.session), f"deliver {info.client_id}")

    def _on_offline(self, info: DeviceInfo, reason: str) -> None:
        state = self.devices.get(info.client_id)
        if state is None or state.session != info.session:
            return  # an older session of a device that is online again (takeover)
        ts = now_ms()
        state.online = False
        state.last_seen = ts
        self._persist_device(state)
        self.metrics.devices_online.set(self.online_count())
        self._presence(state, False, reason, ts)

    def _presence(self, state: DeviceState, online: bool, reason: str, ts: int) -> None:
        text = dumps(
            {
                "op": "presence",
                "device": state.device,
                "protocol": state.protocol,
                "online": online,
                "ts": ts,
                "reason": reason,
            }
        )
        for d in self._subscribers(state.device, state.protocol):
            d.push_control(text)

    def _device_record(self, state: DeviceState) -> DeviceRecord:
        return DeviceRecord(
            state.device,
            state.protocol,
            state.transport or "tcp",
            state.first_seen or now_ms(),
            state.last_seen or now_ms(),
        )

    def _persist_device(self, state: DeviceState) -> None:
        record = self._device_record(state)
        self._spawn(self.storage.upsert_device(record), f"persist {state.device}")

    def online_count(self) -> int:
        """Devices online now."""
        return sum(1 for s in self.devices.values() if s.online)

    # ---- dashboards ---------------------------------------------------------------------------

    def connect_dashboard(self, role: Role, session: str) -> Dashboard:
        """A new dashboard; raises ``Refused`` past ``max_dashboards``."""
        if len(self.dashboards) >= self.config.max_dashboards:
            self.metrics.refused.labels("max_dashboards").inc()
            raise Refused(f"too many dashboards (max_dashboards={self.config.max_dashboards})")
        d = Dashboard(self._next_dashboard, role, session, self.config.queue_size)
        d._cmd_tokens = self.config.commands_per_second
        d._cmd_at = asyncio.get_running_loop().time()
        self._next_dashboard += 1
        self.dashboards[d.id] = d
        self.metrics.dashboards.set(len(self.dashboards))
        return d

    def disconnect_dashboard(self, d: Dashboard) -> None:
        """Forget a dashboard and its subscriptions."""
        d.close()
        for target in list(d.subscriptions):
            self._unsubscribe(d, target)
        self.dashboards.pop(d.id, None)
        self.metrics.dashboards.set(len(self.dashboards))

    def _index(self, target: Target) -> set[Dashboard]:
        kind, value = target
        if kind == "all":
            return self._all
        table = self._by_device if kind == "device" else self._by_protocol
        return table.setdefault(value, set())

    def _subscribe(self, d: Dashboard, target: Target) -> None:
        d.subscriptions.add(target)
        self._index(target).add(d)

    def _unsubscribe(self, d: Dashboard, target: Target) -> None:
        d.subscriptions.discard(target)
        kind, value = target
        index = self._index(target)
        index.discard(d)
        if kind != "all" and not index:
            table = self._by_device if kind == "device" else self._by_protocol
            table.pop(value, None)

    async def handle(self, d: Dashboard, msg: Any) -> None:
        """One request from a dashboard (already parsed JSON)."""
        request_id = msg.get("id") if isinstance(msg, dict) else None
        if request_id is not None and not isinstance(request_id, str | int):
            request_id = None
        try:
            if not isinstance(msg, dict):
                raise ClientError(ErrorCode.BAD_REQUEST, "a request must be a JSON object")
            op = msg.get("op")
            if op == "subscribe":
                await self._handle_subscribe(d, msg, request_id)
            elif op == "unsubscribe":
                target, echo = parse_target(msg)
                self._unsubscribe(d, target)
                d.push_control(dumps(_reply("unsubscribed", request_id, echo)))
            elif op == "devices":
                d.push_control(
                    dumps(_reply("devices", request_id, {"devices": self.devices_listing()}))
                )
            elif op == "command":
                if d.role is not Role.OPERATOR:
                    raise ClientError(ErrorCode.FORBIDDEN, "commands need an operator token")
                loop_now = asyncio.get_running_loop().time()
                if not d.allow_command(self.config.commands_per_second, loop_now):
                    self.metrics.refused.labels("command_rate").inc()
                    raise ClientError(
                        ErrorCode.RATE_LIMITED,
                        f"over {self.config.commands_per_second:g} commands per second",
                    )
                await self.submit_command(msg, d.push_control_json)
            elif isinstance(op, str):
                raise ClientError(ErrorCode.BAD_REQUEST, f"unknown op {op[:40]!r}")
            else:
                raise ClientError(ErrorCode.BAD_REQUEST, "a request needs an 'op' string")
        except ClientError as e:
            d.push_control(dumps(error_message(request_id, e.code, e.message)))

    async def _handle_subscribe(self, d: Dashboard, msg: dict[str, Any], request_id: Any) -> None:
        target, echo = parse_target(msg)
        since = msg.get("since")
        if since is not None and (
            isinstance(since, bool) or not isinstance(since, int) or not -1 <= since < 2**63
        ):
            # Offsets are 64-bit (SQLite INTEGER): a bigger number can name no offset.
            raise ClientError(
                ErrorCode.BAD_REQUEST, "'since' must be an offset (an integer, -1 .. 2**63-1)"
            )
        if since is None:
            self._subscribe(d, target)
            d.push_control(dumps(_reply("subscribed", request_id, echo)))
            return
        # Replay: hold live telemetry for this dashboard, send the stored
        # messages up to the current offset, then release what was held.
        # The seam: an offset taken now is above everything already sent live
        # and below everything that comes later (offsets need not be consecutive).
        cut = self.storage.next_offset()
        d.replaying += 1
        d.replay_targets.append(target)
        self._subscribe(d, target)
        d.push_control(dumps(_reply("subscribed", request_id, {**echo, "since": since})))
        after = since
        try:
            for _ in range(REPLAY_ROUNDS):
                await self.storage.flush()
                after = await self._replay_range(d, target, after, cut)
                after = await self._release_held(d, target, after)
                if d.closed or not d.held_overflowed:
                    break  # caught up: held is empty, live flows straight in
                # Live traffic outran the hold buffer: read on to a new seam.
                d.held_overflowed = False
                cut = self.storage.next_offset()
            else:
                d._note_drop(after + 1)  # could not catch up: say where to resume
                d.held_overflowed = False
        finally:
            d.replaying -= 1
            d.replay_targets.remove(target)
            if not d.replaying:
                held, d.held = d.held, deque()
                for offset, text, received, _, _ in held:
                    d._append_telemetry(offset, text, received)

    async def _release_held(self, d: Dashboard, target: Target, after: int) -> int:
        """Move held live telemetry to the queue, waiting for room as the replay did.

        New live messages keep landing in ``held`` meanwhile, so order holds.
        Returns the offset of the last released message of ``target``.
        """
        while d.held and not d.held_overflowed and not d.closed:
            await d.room()
            while d.held and not d.held_overflowed and d.telemetry_queued < d.limit:
                offset, text, received, device, protocol = d.held.popleft()
                d._append_telemetry(offset, text, received)
                if _matches(target, device, protocol):
                    after = offset
        return after

    async def _replay_range(self, d: Dashboard, target: Target, after: int, cut: int) -> int:
        """Queue stored telemetry of ``target`` with ``after < offset <= cut``; wait for room."""
        while not d.closed:
            records = await self.storage.telemetry_since(
                after,
                until=cut,
                device=target[1] if target[0] == "device" else None,
                protocol=target[1] if target[0] == "protocol" else None,
                limit=500,
            )
            if not records:
                break
            for rec in records:
                await d.room()
                d._append_telemetry(rec.offset, dumps(telemetry_message(rec)))
            after = records[-1].offset
        return max(after, cut)

    def devices_listing(self) -> list[dict[str, Any]]:
        """Every known device, by id."""
        return [self.devices[k].listing() for k in sorted(self.devices)]

    # ---- commands -----------------------------------------------------------------------------

    async def submit_command(self, msg: dict[str, Any], reply: StatusCallback) -> list[str]:
        """Route a command request; statuses go to ``reply``. Returns the first statuses.

        ``msg`` is ``{"id", "device" | "protocol", "command"}``.
        """
        command_id = msg.get("id")
        if command_id is not None and not isinstance(command_id, str | int):
            raise ClientError(ErrorCode.BAD_REQUEST, "'id' must be a string or number")
        command = msg.get("command")
        if not isinstance(command, dict):
            raise ClientError(ErrorCode.BAD_REQUEST, "'command' must be a JSON object")
        if ("device" in msg) == ("protocol" in msg):
            raise ClientError(ErrorCode.BAD_REQUEST, "give exactly one of 'device' or 'protocol'")
        if "device" in msg:
            device = msg["device"]
            if not isinstance(device, str):
                raise ClientError(ErrorCode.BAD_REQUEST, "'device' must be a string")
            return [await self._command_device(command_id, device, command, reply)]
        protocol = msg["protocol"]
        if not isinstance(protocol, str):
            raise ClientError(ErrorCode.BAD_REQUEST, "'protocol' must be a string")
        targets = sorted(
            s.device for s in self.devices.values() if s.online and s.protocol == protocol
        )
        if not targets:
            raise ClientError(ErrorCode.NOT_FOUND, f"no online device speaks {protocol!r}")
        return [await self._command_device(command_id, dev, command, reply) for dev in targets]

    async def _command_device(
        self, command_id: Any, device: str, command: dict[str, Any], reply: StatusCallback
    ) -> str:
        def status(name: str, **extra: Any) -> str:
            self.metrics.command_results.labels(name).inc()
            reply(
                {
                    "op": "command_status",
                    "id": command_id,
                    "device": device,
                    "status": name,
                    **extra,
                }
            )
            return name

        state = self.devices.get(device)
        if state is None:
            return status("rejected", error=f"device {device!r} has never been seen")
        try:
            body = get_protocol(state.protocol).encode_command(command)
        except CommandError as e:
            return status("rejected", error=str(e))
        if state.online and self.manager is not None and self.manager.is_online(device):
            try:
                handle = await self.manager.send_command(device, body)
            except DeviceNotOnline:
                pass  # went offline meanwhile: queue it below
            else:
                self._spawn(self._await_result(handle, status), f"ack {device}")
                return status("sent")
        ts = now_ms()
        queued = await self.storage.enqueue_command(
            QueuedCommand(
                0,
                None if command_id is None else str(command_id),
                device,
                command,
                body,
                ts,
                ts + int(self.config.command_ttl * 1000),
            )
        )
        self._command_owner[queued.key] = lambda m: reply({**m, "id": command_id})
        return status("queued")

    async def _await_result(self, handle: CommandHandle, status: Callable[..., str]) -> None:
        result: CommandResult = await handle.result
        if result.status is CommandStatus.ACKED:
            status("acked")
        elif result.status is CommandStatus.NACKED:
            status("nacked", code=result.code)
        elif result.status is CommandStatus.TIMEOUT:
            status("timeout")
        else:
            # docs/api.md §3 has no status for a link lost before the ACK: to the
            # dashboard it is an ACK that never came.
            status("timeout", error=result.error or "link lost before the ACK")

    async def _deliver_queued(self, device: str, session: str) -> None:
        """On WELCOME: send the device's queued commands, oldest first."""
        pending = await self.storage.pending_commands(device, now_ms())
        for cmd in pending:
            state = self.devices.get(device)
            if state is None or state.session != session or self.manager is None:
                return
            owner = self._command_owner.get(cmd.key)

            def status(name: str, _cmd: QueuedCommand = cmd, **extra: Any) -> str:
                self.metrics.command_results.labels(name).inc()
                owner_cb = self._command_owner.get(_cmd.key)
                if owner_cb is not None:
                    owner_cb({"op": "command_status", "device": device, "status": name, **extra})
                return name

            try:
                handle = await self.manager.send_command(device, cmd.body)
            except DeviceNotOnline:
                return  # still queued; delivered at the next WELCOME
            await self.storage.remove_command(cmd.key)
            status("sent")
            self._command_owner.pop(cmd.key, None)
            if owner is not None:
                self._spawn(
                    self._await_result(handle, _owner_status(owner, device)), f"ack {device}"
                )

    async def _expire_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.expiry_interval)
            try:
                expired = await self.storage.expire_commands(now_ms())
            except Exception:
                log.exception("command expiry failed")
                continue
            for cmd in expired:
                self.metrics.command_results.labels("expired").inc()
                owner = self._command_owner.pop(cmd.key, None)
                if owner is not None:
                    owner({"op": "command_status", "device": cmd.device, "status": "expired"})


def _owner_status(owner: StatusCallback, device: str) -> Callable[..., str]:
    def status(name: str, **extra: Any) -> str:
        owner({"op": "command_status", "device": device, "status": name, **extra})
        return name

    return status


def _reply(op: str, request_id: Any, body: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"op": op}
    if request_id is not None:
        out["id"] = request_id
    out.update(body)
    return out


def error_message(request_id: Any, code: ErrorCode, message: str) -> dict[str, Any]:
    """``{"op":"error","id","code","message"}``."""
    return {"op": "error", "id": request_id, "code": str(code), "message": message}


def telemetry_message(rec: TelemetryRecord) -> dict[str, Any]:
    return {
        "op": "telemetry",
        "device": rec.device,
        "protocol": rec.protocol,
        "offset": rec.offset,
        "ts": rec.ts,
        "seq": rec.seq,
        "data": rec.data,
    }
