"""The hub: device events in, dashboards out, commands back (docs/api.md §3), no aiohttp.

It composes the parts, each with one job: the ``Registry`` of devices, the
``SubscriptionIndex``, ``replay``, the ``CommandRouter`` and the JSON of
``messages``; what is kept and shared with other nodes is behind the
``Engine``. It implements the device side's ``DeviceEventSink`` and the
engine's ``EngineSink``. It never awaits a dashboard: fan-out only appends to
each dashboard's bounded queue.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from devices import (
    CommandStatus,
    DeviceEvent,
    DeviceOffline,
    DeviceOnline,
    DeviceTelemetry,
)
from frames.ratelimit import TokenBucket

from ..metrics import Metrics
from .commands import CommandRouter, CommandSettings, DeviceLinks
from .dashboard import Dashboard, Refused, Role
from .engine import Engine, Presence, StatusCallback
from .messages import (
    ClientError,
    CommandRequest,
    ErrorCode,
    dumps,
    error_message,
    now_ms,
    parse_command,
    parse_since,
    parse_target,
    presence_text,
    reply,
    request_id_of,
    telemetry_text,
)
from .records import TelemetryRecord
from .registry import DeviceState, Registry
from .replay import replay
from .subscriptions import SubscriptionIndex

log = logging.getLogger(__name__)


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
        if not self.expiry_interval > 0:
            raise ValueError("expiry_interval must be > 0")

    def command_settings(self) -> CommandSettings:
        """What command routing takes of these."""
        return CommandSettings(self.command_ttl, self.expiry_interval)


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
        self.registry = Registry()
        self.subscriptions = SubscriptionIndex()
        self.commands = CommandRouter(
            self.registry, engine, self.metrics, lambda: self.config.command_settings()
        )
        self.dashboards: dict[int, Dashboard] = {}
        self._next_dashboard = 1

    # ---- life cycle -----------------------------------------------------------------------------

    def attach(self, links: DeviceLinks) -> None:
        """Reach devices through ``links`` (which must send their events to this hub)."""
        self.commands.links = links

    async def start(self) -> None:
        """Load the registry and latest values, start delivery and command expiry."""
        self.registry.load(await self.engine.known_devices(), await self.engine.latest())
        self.metrics.devices_online.set(self.registry.online_count())
        await self.engine.open(self)
        self.commands.start()

    async def stop(self) -> None:
        """Stop background work and close every dashboard's queue."""
        await self.commands.stop()
        # Remember when each online device was last seen before storage closes.
        now = now_ms()
        for state in self.registry.devices.values():
            if state.online:
                await self.engine.remember(state.record(now))
        await self.engine.close()
        for d in list(self.dashboards.values()):
            d.close()

    # ---- device events (DeviceEventSink) --------------------------------------------------------

    def device_event(self, event: DeviceEvent) -> None:
        """Called by the device side, on the loop, for every device event."""
        if isinstance(event, DeviceTelemetry):
            self.engine.publish_telemetry(event)
        elif isinstance(event, DeviceOnline):
            info = event.info
            ts = now_ms()
            state = self.registry.online(info, ts)
            self.metrics.devices_online.set(self.registry.online_count())
            self.engine.publish_presence(
                Presence(state.device, state.protocol, True, ts, "connected"), state.record(ts)
            )
            self.commands.device_online(info.client_id, info.session)
        elif isinstance(event, DeviceOffline):
            ts = now_ms()
            gone = self.registry.offline(event.info, ts)
            if gone is None:
                return  # an older session of a device that is online again (takeover)
            self.metrics.devices_online.set(self.registry.online_count())
            self.engine.publish_presence(
                Presence(gone.device, gone.protocol, False, ts, event.reason), gone.record(ts)
            )

    # ---- deliveries (EngineSink) ----------------------------------------------------------------

    def deliver_telemetry(self, record: TelemetryRecord, data_json: str, received: float) -> None:
        """Fan a sequenced message out to its subscribers' queues."""
        self.registry.telemetry(record)
        subscribers = self.subscriptions.subscribers(record.device, record.protocol)
        if subscribers:
            text = telemetry_text(record, data_json)  # once, for every dashboard
            dropped = 0
            for d in subscribers:
                dropped += d.push_telemetry(
                    record.offset, text, received, record.device, record.protocol
                )
            if dropped:
                self.metrics.telemetry_dropped.inc(dropped)
        # Counted on the node whose device sent it (``received`` is 0 elsewhere).
        if received and self.metrics.count_telemetry():
            self.metrics.observe_pipeline(asyncio.get_running_loop().time() - received)

    def deliver_presence(self, presence: Presence) -> None:
        """Tell the device's subscribers."""
        subscribers = self.subscriptions.subscribers(presence.device, presence.protocol)
        if subscribers:
            text = presence_text(
                presence.device, presence.protocol, presence.online, presence.ts, presence.reason
            )
            for d in subscribers:
                d.push_control(text)

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
            self._next_dashboard, role, session, cfg.queue_size, TokenBucket(rate, rate, loop_now)
        )
        self._next_dashboard += 1
        self.dashboards[d.id] = d
        self.metrics.dashboards.set(len(self.dashboards))
        return d

    def disconnect_dashboard(self, d: Dashboard) -> None:
        """Forget a dashboard and its subscriptions."""
        d.close()
        self.subscriptions.remove(d)
        self.dashboards.pop(d.id, None)
        self.metrics.dashboards.set(len(self.dashboards))

    async def handle(self, d: Dashboard, msg: Any) -> None:
        """One request from a dashboard (already parsed JSON); errors go back as ``error``."""
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
                d.push_control(
                    dumps(reply("devices", request_id, {"devices": self.registry.listing()}))
                )
            elif op == "command":
                if d.role is not Role.OPERATOR:
                    raise ClientError(ErrorCode.FORBIDDEN, "commands need an operator token")
                if not d.commands.take(asyncio.get_running_loop().time()):
                    self.metrics.refused.labels("command_rate").inc()
                    raise ClientError(
                        ErrorCode.RATE_LIMITED,
                        f"over {self.config.commands_per_second:g} commands per second",
                    )
                await self.submit_command(parse_command(msg), d.push_control_json)
            elif isinstance(op, str):
                raise ClientError(ErrorCode.BAD_REQUEST, f"unknown op {op[:40]!r}")
            else:
                raise ClientError(ErrorCode.BAD_REQUEST, "a request needs an 'op' string")
        except ClientError as e:
            d.push_control(dumps(error_message(request_id, e.code, e.message)))

    async def _subscribe(self, d: Dashboard, msg: dict[str, Any], request_id: Any) -> None:
        target = parse_target(msg)
        since = parse_since(msg)
        if since is None:
            self.subscriptions.subscribe(d, target)
            d.push_control(dumps(reply("subscribed", request_id, target.echo())))
            return
        # Hold live telemetry for this target before subscribing, so that the
        # replay's seam separates history from what is held.
        d.held.targets.append(target)
        self.subscriptions.subscribe(d, target)
        d.push_control(dumps(reply("subscribed", request_id, {**target.echo(), "since": since})))
        await replay(d, target, since, self.engine)

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
        """Every known device, by id."""
        return self.registry.listing()

    def online_count(self) -> int:
        """Devices online now."""
        return self.registry.online_count()

    async def history(self, device: str, after: int, limit: int) -> list[TelemetryRecord]:
        """A device's kept telemetry after ``after``, oldest first (``GET .../telemetry``)."""
        await self.engine.flush()
        return await self.engine.history(after, device=device, limit=limit)
