"""The hub: device events in, dashboards out, commands back (docs/api.md §3), no aiohttp.

It composes the parts, each with one job: the ``Registry`` of devices, the
``SubscriptionIndex``, ``replay``, the ``CommandRouter`` and the JSON of
``messages``; what is kept and shared with other nodes is behind the
``Engine``. It implements the device side's ``DeviceEventSink`` and the
engine's ``EngineSink``. It never awaits a dashboard: fan-out only appends to
each dashboard's bounded queue, and a dashboard's command requests run as
tasks of their own, so a slow device never holds up its other requests.

Everything a peer can make it hold is bounded by a ``HubConfig`` key: known
devices, subscriptions and control messages per dashboard, command requests
in progress per dashboard, the size of a ``devices`` reply and of a command's id.
A failing storage is an answer (``unavailable``), never a dead socket.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from devices import (
    CommandStatus,
    DeviceEvent,
    DeviceOffline,
    DeviceOnline,
    DeviceTelemetry,
)
from frames.ratelimit import TokenBucket

from ..metrics import Metrics
from .commands import MAX_COMMAND_ID, CommandRouter, CommandSettings, DeviceLinks
from .dashboard import CONTROL_QUEUE, Dashboard, Refused, Role
from .engine import Engine, Presence, StatusCallback
from .messages import (
    ClientError,
    CommandRequest,
    ErrorCode,
    dumps,
    error_message,
    labels_text,
    now_ms,
    parse_command,
    parse_since,
    parse_target,
    presence_text,
    removed_text,
    reply,
    request_id_of,
    telemetry_text,
)
from .ranges import RangeTable, flag
from .records import (
    CommandLog,
    DeviceDeletion,
    StorageUnavailable,
    StoreError,
    TelemetryRecord,
)
from .registry import LABEL_FIELDS, DeviceState, Labels, Registry
from .replay import replay
from .store import FaultLog
from .subscriptions import SubscriptionIndex

log = logging.getLogger(__name__)

# A refusal at max_known_devices is logged at most this often (seconds): one
# line per refused HELLO would let a registration flood fill the log.
REFUSAL_LOG_INTERVAL = 60.0


@dataclass(frozen=True, slots=True)
class HubConfig:
    """Limits of the routing core (the ``[dashboards]`` keys of docs/configuration.md)."""

    queue_size: int = 1024  # per-dashboard outbound queue (telemetry is dropped beyond)
    max_dashboards: int = 1000
    commands_per_second: float = 20.0  # per dashboard
    command_ttl: float = 3600.0  # seconds a queued command waits for its device
    batch_max_items: int = 256  # objects per WebSocket frame when batching
    expiry_interval: float = 1.0
    # Devices known at once, online or not; a HELLO of a new client_id beyond is refused.
    max_known_devices: int = 100_000
    # Seconds an offline device stays known after it was last seen; 0 keeps it for ever.
    forget_after: float = 0.0
    # Most entries in one ``devices`` reply (a page; docs/api.md §3.2).
    devices_page_size: int = 1000
    # Targets one dashboard may subscribe to.
    max_subscriptions: int = 1000
    # Characters of replies, presence and statuses waiting for one dashboard before
    # it is disconnected (control messages are never dropped: docs/api.md §3.1).
    control_queue_bytes: int = 1 << 20
    # Command requests of one dashboard still being routed (waiting for a device's link).
    max_pending_commands: int = 100
    # Characters of a command's ``id``: it is kept with a queued command for up to
    # command_ttl, so a longer one is a bad request (docs/api.md §3).
    max_command_id: int = MAX_COMMAND_ID
    # Not [dashboards] keys: the config file's [labels] and [protocols.NAME.ranges]
    # sections, handed over by ``GatewayConfig.hub_config`` (docs/configuration.md).
    # Labels by device (name, location, channels), as in the config file.
    labels: Mapping[str, Mapping[str, Any]] = field(
        default_factory=dict, metadata={"section": False}
    )
    # Range overrides: protocol -> field -> (low, high).
    ranges: Mapping[str, Mapping[str, tuple[float, float]]] = field(
        default_factory=dict, metadata={"section": False}
    )

    def __post_init__(self) -> None:
        if self.queue_size < 1:
            raise ValueError("queue_size must be >= 1")
        if self.max_dashboards < 1:
            raise ValueError("max_dashboards must be >= 1")
        if not self.commands_per_second > 0:
            raise ValueError("commands_per_second must be > 0")
        if not self.command_ttl > 0:
            raise ValueError("command_ttl must be > 0")
        if not self.expiry_interval > 0:
            raise ValueError("expiry_interval must be > 0")
        if self.max_known_devices < 1:
            raise ValueError(f"max_known_devices must be >= 1, not {self.max_known_devices}")
        if not self.forget_after >= 0:
            raise ValueError(f"forget_after must be >= 0 (0: never), not {self.forget_after}")
        if self.devices_page_size < 1:
            raise ValueError(f"devices_page_size must be >= 1, not {self.devices_page_size}")
        if self.max_subscriptions < 1:
            raise ValueError(f"max_subscriptions must be >= 1, not {self.max_subscriptions}")
        if self.control_queue_bytes < 1024:
            raise ValueError(f"control_queue_bytes must be >= 1024, not {self.control_queue_bytes}")
        if self.max_pending_commands < 1:
            raise ValueError(f"max_pending_commands must be >= 1, not {self.max_pending_commands}")
        if self.max_command_id < 1:
            raise ValueError(f"max_command_id must be >= 1, not {self.max_command_id}")

    def command_settings(self) -> CommandSettings:
        """What command routing takes of these."""
        return CommandSettings(
            self.command_ttl, self.expiry_interval, max_command_id=self.max_command_id
        )

    def forget_interval(self) -> float:
        """How often devices unseen for ``forget_after`` are looked for (seconds)."""
        return min(60.0, self.forget_after / 4)


class HubObserver(Protocol):
    """Told of every delivery, synchronously on the loop, before any dashboard (the MQTT
    bridge, docs/mqtt.md). Each call must be cheap and must not raise: it runs on the hot
    path; whatever takes time is for the observer's own task."""

    def telemetry(
        self, record: TelemetryRecord, data_json: str, out_of_range: tuple[str, ...] | None
    ) -> None: ...

    def presence(self, presence: Presence) -> None: ...

    def removed(self, device: str, reason: str) -> None: ...


class DeviceIsOnline(Exception):
    """A request that needs the device offline (``DELETE /api/devices/{id}``: 409)."""


@dataclass(slots=True)
class HubCounters:
    """What the hub counts for ``/metrics`` (read at scrape time, like the device side's)."""

    refused_known_devices: int = 0  # HELLOs of a new client_id refused at max_known_devices
    forgotten: int = 0  # devices forgotten after forget_after
    # Dashboards the hub disconnected, by reason (``control_queue``).
    dashboards_closed: dict[str, int] = field(default_factory=lambda: {CONTROL_QUEUE: 0})


class Hub:
    """The routing core. Implements ``devices.DeviceEventSink`` and ``EngineSink``."""

    def __init__(
        self,
        engine: Engine,
        config: HubConfig | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.engine = engine
        self.config = config or HubConfig()
        self.metrics = metrics or Metrics()
        #: The value ranges checked on every telemetry message (docs/api.md §3.1).
        self.ranges = RangeTable(self.config.ranges)
        self._range_checks = self.ranges.by_protocol
        self.registry = Registry(
            {device: dict(labels) for device, labels in self.config.labels.items()}, self.ranges
        )
        self.subscriptions = SubscriptionIndex()
        self.commands = CommandRouter(
            self.registry, engine, self.metrics, lambda: self.config.command_settings()
        )
        self.dashboards: dict[int, Dashboard] = {}
        #: Told of every telemetry, presence and removal (``HubObserver``).
        self.observers: list[HubObserver] = []
        self._next_dashboard = 1
        self.counters = HubCounters()
        # New client_ids admitted whose DeviceOnline has not arrived yet: the device
        # side admits every HELLO of a read before it hands over their events.
        self._admitting: set[str] = set()
        self._refusal_logged = float("-inf")
        self._forget: asyncio.Task[None] | None = None
        # Devices forgotten whose registry rows the engine could not delete yet
        # (its storage failing): tried again at each sweep.
        self._unforgotten: set[str] = set()
        self._forget_faults = FaultLog(log, "forgetting devices' registry entries")

    # ---- life cycle -----------------------------------------------------------------------------

    def attach(self, links: DeviceLinks) -> None:
        """Reach devices through ``links`` (which must send their events to this hub)."""
        self.commands.links = links

    async def start(self) -> None:
        """Load the registry and latest values, start delivery and command expiry."""
        self.registry.load(await self.engine.known_devices(), await self.engine.latest())
        if self.engine.clustered:
            # The devices this node kept are the ones it held (docs/cluster.md);
            # other nodes' come as presence once the engine is open.
            for state in self.registry.devices.values():
                state.node = self.engine.node
        self.registry.api_labels = await self.engine.labels()
        # Devices that went stale while the gateway was stopped (or whose rows
        # could not be deleted before it stopped) are forgotten now, rows too.
        await self._forget_rows(self.forget_stale(now_ms()))
        self.metrics.devices_online.set(self.registry.online_count())
        await self.engine.open(self)
        self.commands.start()
        if self.config.forget_after > 0:
            self._forget = asyncio.create_task(self._forget_loop(), name="forget devices")

    async def stop(self) -> None:
        """Stop background work and close every dashboard's queue."""
        tasks = [t for d in self.dashboards.values() for t in d.tasks]
        if self._forget is not None:
            tasks.append(self._forget)
            self._forget = None
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        await self.commands.stop()
        # Remember when each online device was last seen before storage closes.
        now = now_ms()
        for state in self.registry.devices.values():
            if state.online:
                # Offline from now on, for the reason the next start shows.
                record = dataclasses.replace(state.record(now), offline_reason="shutdown")
                await self.engine.remember(record)
        await self.engine.close()
        for d in list(self.dashboards.values()):
            d.close()

    # ---- device events (DeviceEventSink) --------------------------------------------------------

    def admit_device(self, client_id: str) -> str | None:
        """May a HELLO bring ``client_id`` online? None admits; a string is why not.

        A known device is always admitted; a new one only while fewer than
        ``max_known_devices`` are known (docs/protocol.md §4: the device gets
        ERROR RATE_LIMITED and its link is closed).
        """
        if client_id in self.registry or client_id in self._admitting:
            return None
        limit = self.config.max_known_devices
        if len(self.registry) + len(self._admitting) < limit:
            if not self._admitting:
                # Its DeviceOnline comes in the same call of the device side.
                asyncio.get_running_loop().call_soon(self._admitting.clear)
            self._admitting.add(client_id)
            return None
        self.counters.refused_known_devices += 1
        now = asyncio.get_running_loop().time()
        if now - self._refusal_logged >= REFUSAL_LOG_INTERVAL:
            self._refusal_logged = now
            log.warning(
                "refusing new device %s: %d devices known (max_known_devices); %d refused so far",
                client_id,
                len(self.registry),
                self.counters.refused_known_devices,
            )
        return f"gateway full: max_known_devices={limit}"

    def device_event(self, event: DeviceEvent) -> None:
        """Called by the device side, on the loop, for every device event."""
        if isinstance(event, DeviceTelemetry):
            self.engine.publish_telemetry(event)
        elif isinstance(event, DeviceOnline):
            info = event.info
            self._admitting.discard(info.client_id)
            ts = now_ms()
            state = self.registry.online(info, ts)
            if self.engine.clustered:
                state.node = self.engine.node
            self.metrics.devices_online.set(self.registry.online_count())
            self.engine.publish_presence(
                Presence(state.device, state.protocol, True, ts, "connected"), state.record(ts)
            )
            self.commands.device_online(info.client_id, info.session)
        elif isinstance(event, DeviceOffline):
            ts = now_ms()
            gone = self.registry.offline(event.info, ts, event.reason)
            if gone is None:
                return  # an older session of a device that is online again (takeover)
            self.metrics.devices_online.set(self.registry.online_count())
            self.engine.publish_presence(
                Presence(gone.device, gone.protocol, False, ts, event.reason), gone.record(ts)
            )

    # ---- deliveries (EngineSink) ----------------------------------------------------------------

    def deliver_telemetry(self, record: TelemetryRecord, data_json: str, received: float) -> None:
        """Fan a sequenced message out to its subscribers' queues."""
        # One dict lookup for a protocol without ranges (docs/api.md §3.1 out_of_range).
        checks = self._range_checks.get(record.protocol)
        out_of_range = None if checks is None else flag(checks, record.data)
        self.registry.telemetry(record, out_of_range is not None)
        for observer in self.observers:
            observer.telemetry(record, data_json, out_of_range)
        index = self.subscriptions
        index.delivered += 1
        # Parked dashboards out of the fan-out miss every message (SubscriptionIndex.leave).
        dropped = len(index.parked_all)
        subscribers = index.telemetry_subscribers(record.device, record.protocol)
        if subscribers:
            text = telemetry_text(record, data_json, out_of_range)  # once, for every dashboard
            offset, device, protocol = record.offset, record.device, record.protocol
            leaving: list[Dashboard] | None = None
            for d in subscribers:
                if d.parked:
                    # Dashboard.miss inlined: a parked dashboard still in the fan-out
                    # costs this, not a queue operation (docs/api.md §3.1 lagged).
                    d.missed += 1
                    if d.missed_from is None:
                        d.missed_from = offset
                    dropped += 1
                elif n := d.push_telemetry(offset, text, received, device, protocol):
                    dropped += n
                    if d.parked:  # it just filled up: out of the fan-out, if it can be
                        leaving = [d] if leaving is None else [*leaving, d]
            if leaving is not None:
                for d in leaving:  # not while iterating: ``subscribers`` may be the index's set
                    index.leave(d)
        if dropped:
            self.metrics.telemetry_dropped.inc(dropped)
        # Counted on the node whose device sent it (``received`` is 0 elsewhere).
        if received and self.metrics.count_telemetry():
            self.metrics.observe_pipeline(asyncio.get_running_loop().time() - received)

    def deliver_presence(self, presence: Presence) -> None:
        """Tell the device's subscribers (and, from another node, update the registry)."""
        if presence.node and presence.node != self.engine.node:
            known = self.registry.remote(
                presence.device,
                presence.protocol,
                presence.node,
                presence.online,
                presence.ts,
                presence.reason,
                presence.transport,
            )
            self.metrics.devices_online.set(self.registry.online_count())
            if known is None:
                return
            if presence.online:
                self.commands.device_elsewhere(presence.device)
        for observer in self.observers:
            observer.presence(presence)
        subscribers = self.subscriptions.subscribers(presence.device, presence.protocol)
        if subscribers:
            text = presence_text(
                presence.device, presence.protocol, presence.online, presence.ts, presence.reason
            )
            # A copy: a dashboard whose control queue overflows leaves the index now.
            for d in tuple(subscribers):
                d.push_control(text)

    def run_forwarded(
        self, device: str, body: bytes, answer: Callable[[str, dict[str, Any]], None]
    ) -> None:
        """Another node's command for one of this node's devices (the cluster engine's)."""
        self.commands.run_forwarded(device, body, answer)

    def replaced(self, device: str) -> None:
        """Close this node's session of ``device`` (ERROR REPLACED): it moved to another node."""
        replace = getattr(self.commands.links, "replace", None)
        if replace is not None:
            replace(device)

    def labels_elsewhere(self, device: str, labels: Labels | None) -> None:
        """Labels set over the API on another node (the cluster engine's); kept already."""
        if labels is None:
            self.registry.api_labels.pop(device, None)
        else:
            self.registry.api_labels[device] = labels
        state = self.registry.get(device)
        if state is not None:
            self._tell(device, state.protocol, labels_text(device, self.registry.labels(device)))

    def deleted_elsewhere(self, device: str, deletion: DeviceDeletion) -> None:
        """A device deleted over the API on another node (the cluster engine's), and
        what this node kept of it deleted already: forgotten as ``delete_device`` does."""
        self.registry.api_labels.pop(device, None)
        self.commands.device_deleted(deletion.commands)
        state = self.registry.get(device)
        if state is None or state.online:
            return  # unknown here, or online again (a later HELLO wins)
        self.registry.forget(device)
        self._tell(device, state.protocol, removed_text(device, "deleted"))
        for observer in self.observers:
            observer.removed(device, "deleted")

    def _tell(self, device: str, protocol: str, text: str) -> None:
        """A control message about a device, to the dashboards subscribed to it."""
        subscribers = self.subscriptions.subscribers(device, protocol)
        # A copy: a dashboard whose control queue overflows leaves the index now.
        for d in tuple(subscribers):
            d.push_control(text)

    # ---- forgetting devices ---------------------------------------------------------------------

    def forget_stale(self, now: int) -> list[str]:
        """Forget the offline devices last seen more than ``forget_after`` before ``now`` (ms)."""
        after = self.config.forget_after
        if not after > 0:
            return []
        stale = [
            state
            for d in self.registry.stale(now - int(after * 1000))
            if (state := self.registry.get(d)) is not None and self.registry.forget(d)
        ]
        if stale:
            self.counters.forgotten += len(stale)
            log.info("forgot %d devices unseen for %g s (forget_after)", len(stale), after)
            for state in stale:
                self._tell(state.device, state.protocol, removed_text(state.device, "unseen"))
                for observer in self.observers:
                    observer.removed(state.device, "unseen")
        return [state.device for state in stale]

    async def _forget_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.forget_interval())
            await self._forget_rows(self.forget_stale(now_ms()))

    async def _forget_rows(self, gone: list[str]) -> None:
        """Have the engine let go of what it keeps of ``gone`` (and of earlier ones it could not).

        Otherwise they would be loaded again, and forgotten again, at every
        start. A device known again meanwhile keeps its entry. A storage that
        fails leaves them for the next sweep; past ``max_known_devices`` names
        waiting, the rest wait for the next start, which finds them stale again.
        """
        waiting = self._unforgotten
        if waiting:
            self._unforgotten = set()
            gone = [*gone, *(d for d in waiting if d not in self.registry)]
        if not gone:
            return
        try:
            await self.engine.forget_devices(gone)
        except StoreError as e:
            self._forget_faults.failed(e)
            room = self.config.max_known_devices - len(self._unforgotten)
            self._unforgotten.update(gone[: max(0, room)])
        else:
            self._forget_faults.ok()

    # ---- dashboards -----------------------------------------------------------------------------

    def connect_dashboard(self, role: Role, session: str) -> Dashboard:
        """A new dashboard; raises ``Refused`` past ``max_dashboards``."""
        cfg = self.config
        if len(self.dashboards) >= cfg.max_dashboards:
            self.metrics.refused.labels("max_dashboards").inc()
            raise Refused(f"too many dashboards (max_dashboards={cfg.max_dashboards})")
        rate = cfg.commands_per_second
        loop_now = asyncio.get_running_loop().time()
        d = Dashboard(
            self._next_dashboard,
            role,
            session,
            cfg.queue_size,
            TokenBucket(rate, rate, loop_now),
            control_limit=cfg.control_queue_bytes,
            on_overflow=self._overflowed,
            on_rejoin=self.subscriptions.rejoin,
        )
        self._next_dashboard += 1
        self.dashboards[d.id] = d
        self.metrics.dashboards.set(len(self.dashboards))
        return d

    def disconnect_dashboard(self, d: Dashboard) -> None:
        """Forget a dashboard: its subscriptions, queue and command requests in progress."""
        d.close()
        d.discard()
        self.subscriptions.remove(d)
        for task in d.tasks:
            task.cancel()
        self.dashboards.pop(d.id, None)
        self.metrics.dashboards.set(len(self.dashboards))

    def _overflowed(self, d: Dashboard) -> None:
        """``d`` let more than ``control_queue_bytes`` of control messages wait: let it go."""
        reason = d.close_reason or CONTROL_QUEUE
        closed = self.counters.dashboards_closed
        closed[reason] = closed.get(reason, 0) + 1
        log.warning(
            "closing dashboard %d: over %d characters of replies, presence and statuses "
            "waiting (control_queue_bytes)",
            d.id,
            self.config.control_queue_bytes,
        )
        self.disconnect_dashboard(d)

    async def handle(self, d: Dashboard, msg: Any) -> None:
        """One request from a dashboard (already parsed JSON); errors go back as ``error``.

        A ``command`` is routed by a task of its own, so this returns before
        its first status; everything else is answered, in order, before it returns.
        """
        if d.closed:
            return  # disconnected by a bound; the web layer is closing it
        request_id = request_id_of(msg)
        try:
            if not isinstance(msg, dict):
                raise ClientError(ErrorCode.BAD_REQUEST, "a request must be a JSON object")
            op = msg.get("op")
            if op == "subscribe":
                await self._subscribe(d, msg, request_id)
            elif op == "unsubscribe":
                target = parse_target(msg)
                self.subscriptions.unsubscribe(d, target)
                d.push_control(dumps(reply("unsubscribed", request_id, target.echo())))
            elif op == "devices":
                after, limit = self._page_request(msg)
                devices, following = self.registry.page(after, limit)
                d.push_control(
                    dumps(reply("devices", request_id, {"devices": devices, "next": following}))
                )
            elif op == "command":
                self._command(d, msg)
            elif isinstance(op, str):
                raise ClientError(ErrorCode.BAD_REQUEST, f"unknown op {op[:40]!r}")
            else:
                raise ClientError(ErrorCode.BAD_REQUEST, "a request needs an 'op' string")
        except ClientError as e:
            d.push_control(dumps(error_message(request_id, e.code, e.message)))

    def _page_request(self, msg: dict[str, Any]) -> tuple[str | None, int]:
        """``after`` and ``limit`` of a ``devices`` request (docs/api.md §3.2)."""
        page = self.config.devices_page_size
        after = msg.get("after")
        if after is not None and not isinstance(after, str):
            raise ClientError(ErrorCode.BAD_REQUEST, "'after' must be a device id (a string)")
        limit = msg.get("limit", page)
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ClientError(ErrorCode.BAD_REQUEST, "'limit' must be a positive integer")
        return after, min(limit, page)

    def _command(self, d: Dashboard, msg: dict[str, Any]) -> None:
        """Check a command request, then route it in a task of its own."""
        if d.role is not Role.OPERATOR:
            raise ClientError(ErrorCode.FORBIDDEN, "commands need an operator token")
        request = parse_command(msg)
        cfg = self.config
        if len(d.tasks) >= cfg.max_pending_commands:
            self.metrics.refused.labels("max_pending_commands").inc()
            raise ClientError(
                ErrorCode.RATE_LIMITED,
                f"{cfg.max_pending_commands} commands of this dashboard are still waiting "
                "for their devices (max_pending_commands)",
            )
        if not d.commands.take(asyncio.get_running_loop().time()):
            self.metrics.refused.labels("command_rate").inc()
            raise ClientError(
                ErrorCode.RATE_LIMITED, f"over {cfg.commands_per_second:g} commands per second"
            )
        task = asyncio.create_task(self._route(d, request), name=f"command of dashboard {d.id}")
        d.tasks.add(task)
        task.add_done_callback(d.tasks.discard)

    async def _route(self, d: Dashboard, request: CommandRequest) -> None:
        """Route one command request; its statuses, or an ``error``, go to ``d``."""
        try:
            await self.submit_command(request, d.push_control_json)
        except ClientError as e:
            d.push_control(dumps(error_message(request.request_id, e.code, e.message)))
        except Exception:
            # Whatever went wrong (storage failing, a link reset), the dashboard
            # gets an answer and stays connected.
            log.exception("command of dashboard %d failed", d.id)
            d.push_control(
                dumps(
                    error_message(
                        request.request_id,
                        ErrorCode.UNAVAILABLE,
                        "the gateway could not carry out the command; try again later",
                    )
                )
            )

    async def _subscribe(self, d: Dashboard, msg: dict[str, Any], request_id: Any) -> None:
        target = parse_target(msg)
        since = parse_since(msg)
        limit = self.config.max_subscriptions
        if target not in d.subscriptions and len(d.subscriptions) >= limit:
            self.metrics.refused.labels("max_subscriptions").inc()
            raise ClientError(
                ErrorCode.TOO_LARGE,
                f"this dashboard holds {limit} subscriptions (max_subscriptions): "
                "unsubscribe first, or subscribe to a protocol or to all",
            )
        if since is None:
            self.subscriptions.subscribe(d, target)
            d.push_control(dumps(reply("subscribed", request_id, target.echo())))
            return
        # Hold live telemetry for this target before subscribing, so that the
        # replay's seam separates history from what is held.
        d.held.targets.append(target)
        self.subscriptions.subscribe(d, target)
        d.push_control(dumps(reply("subscribed", request_id, {**target.echo(), "since": since})))
        try:
            await replay(d, target, since, self.engine, self.out_of_range)
        except StoreError as e:
            # The subscription stands and live telemetry flows; the replay left
            # a lagged notice saying where history stopped (docs/api.md §3.2).
            raise ClientError(
                ErrorCode.UNAVAILABLE,
                f"the history could not be read ({self._unavailable(e)}): subscribed, "
                "live telemetry follows; subscribe again with since = resume_from - 1 "
                "of the lagged notice once the storage works",
            ) from e

    # ---- commands and queries -------------------------------------------------------------------

    async def submit_command(
        self, request: CommandRequest, reply_to: StatusCallback
    ) -> list[CommandStatus]:
        """Route a checked command request; statuses go to ``reply_to``."""
        return await self.commands.submit(request, reply_to)

    @property
    def devices(self) -> dict[str, DeviceState]:
        """Every known device by id (read it; the registry changes it)."""
        return self.registry.devices

    def devices_listing(self) -> list[dict[str, Any]]:
        """Every known device, by id (``GET /api/devices``; see ``devices_page``)."""
        return self.registry.listing()

    def devices_page(
        self, after: str | None = None, limit: int | None = None
    ) -> tuple[list[dict[str, Any]], str | None]:
        """Up to ``limit`` (at most ``devices_page_size``) devices with ids above ``after``.

        Returns the entries, by id, and the id to pass as ``after`` for the
        next page, None after the last one (docs/api.md §3.2 ``devices``).
        """
        page = self.config.devices_page_size
        return self.registry.page(after, page if limit is None else max(1, min(limit, page)))

    def online_count(self) -> int:
        """Devices online now."""
        return self.registry.online_count()

    async def history(
        self,
        device: str,
        after: int,
        limit: int,
        *,
        from_ts: int | None = None,
        to_ts: int | None = None,
        newest: bool = False,
    ) -> list[TelemetryRecord]:
        """A device's kept telemetry after ``after`` (and ``from_ts <= ts < to_ts``),
        oldest first: the oldest ``limit``, or with ``newest`` the newest
        (``GET .../telemetry``, docs/api.md §4).

        Raises ``StorageUnavailable`` when the storage cannot be read now (or
        cannot commit what was published before, which the answer must hold).
        """
        try:
            await self.engine.flush()
            return await self.engine.history(
                after, device=device, limit=limit, from_ts=from_ts, to_ts=to_ts, newest=newest
            )
        except StoreError as e:
            raise StorageUnavailable(self._unavailable(e)) from e

    def out_of_range(self, record: TelemetryRecord) -> tuple[str, ...] | None:
        """The fields of a stored message outside their range (for replay and history)."""
        return self.ranges.check(record.protocol, record.data)

    def device_entry(self, device: str) -> dict[str, Any] | None:
        """A device's listing entry (``GET /api/devices/{id}``), or None when unknown."""
        return self.registry.entry(device)

    async def command_log(self, command_id: str) -> CommandLog | None:
        """A command's latest status and history (``GET /api/commands/{id}``), or None.

        Raises ``StorageUnavailable`` when the storage cannot be read now.
        """
        try:
            return await self.engine.command_log(command_id)
        except StoreError as e:
            raise StorageUnavailable(self._unavailable(e)) from e

    async def set_labels(self, device: str, labels: Labels) -> dict[str, Any]:
        """Set a device's labels over the API (``PUT .../labels``, docs/api.md §4).

        ``labels`` holds ``LABEL_FIELDS`` (checked by the caller); a null field
        falls back to the config file's value. Kept durably, then its
        subscribers get ``{"op":"labels"}``. Returns the device's entry.
        Raises ``KeyError`` for an unknown device, ``StorageUnavailable`` when
        the labels cannot be kept now.
        """
        state = self.registry.get(device)
        if state is None:
            raise KeyError(device)
        kept = {key: labels.get(key) for key in LABEL_FIELDS}
        stored = kept if any(v is not None for v in kept.values()) else None
        try:
            await self.engine.set_labels(device, stored)
        except StoreError as e:
            raise StorageUnavailable(self._unavailable(e)) from e
        if stored is None:
            self.registry.api_labels.pop(device, None)
        else:
            self.registry.api_labels[device] = stored
        effective = self.registry.labels(device)
        self._tell(device, state.protocol, labels_text(device, effective))
        entry = self.registry.entry(device)
        if entry is None:  # deleted meanwhile
            raise KeyError(device)
        return entry

    async def delete_device(self, device: str) -> None:
        """Forget an offline device and everything kept of it (``DELETE /api/devices/{id}``).

        Its queued commands end as ``expired`` (``device deleted``), its
        subscribers get ``{"op":"removed","reason":"deleted"}``. Raises
        ``KeyError`` for an unknown device, ``DeviceIsOnline`` for an online
        one, ``StorageUnavailable`` when the storage cannot delete now (the
        device is then still known).
        """
        state = self.registry.get(device)
        if state is None:
            raise KeyError(device)
        if state.online:
            raise DeviceIsOnline(device)
        # Forgotten at once, so a HELLO while the storage works makes a new device.
        self.registry.forget(device)
        try:
            deletion = await self.engine.delete_device(device)
        except StoreError as e:
            self.registry.restore(state)
            raise StorageUnavailable(self._unavailable(e)) from e
        self.registry.api_labels.pop(device, None)
        self.commands.device_deleted(deletion.commands)
        log.info(
            "deleted device %s: %d telemetry rows, %d queued commands",
            device,
            deletion.telemetry,
            len(deletion.commands),
        )
        self._tell(device, state.protocol, removed_text(device, "deleted"))
        for observer in self.observers:
            observer.removed(device, "deleted")

    def _unavailable(self, error: StoreError) -> str:
        """Why the storage could not serve a request, for whoever made it."""
        return f"storage unavailable: {self.engine.health().failing or error}"
