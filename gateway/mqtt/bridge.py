"""The MQTT bridge: the hub's telemetry and presence out, commands in (docs/mqtt.md).

The bridge is a dashboard of the hub (operator role, subscribed to every
device), so the hot path does for it what it does for any dashboard: one
append to a bounded queue, never an await. A task of ours drains that queue:

- telemetry becomes the device's retained state, conflated per device (the
  latest value wins, at most one publish per device per ``min_interval``);
- presence becomes the retained availability, ``removed`` an empty retained
  discovery config;
- everything bound for the broker waits in one bounded queue while the
  broker is away (the oldest dropped and counted beyond ``queue_size``).

A supervisor connects with aiomqtt, reconnects with the shared capped
backoff and full jitter (``frames.backoff``), and on every connect
subscribes again and publishes the bridge state, discovery, availability and
latest state of every device again (a broker may have kept nothing).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from frames import get_protocol
from frames.backoff import Backoff, BackoffPolicy

from ..hub import Hub, Presence
from ..hub.messages import ClientError, CommandRequest, dumps, telemetry_text
from ..hub.records import TelemetryRecord
from .discovery import discovery_messages, removal_topics

log = logging.getLogger(__name__)

_OP = '"op":"telemetry",'
# The reason of the offline presence a cluster gives the devices of a node it lost.
NODE_LOST = "node_lost"

# The latest telemetry of a device: what the hub delivered, encoded only when published.
State = tuple[TelemetryRecord, str, tuple[str, ...] | None]


def state_payload(text: str) -> str:
    """The state topic's payload (docs/mqtt.md): the hub's telemetry text without its op."""
    return "{" + text[1 + len(_OP) :]


def _payload(state: State) -> str:
    return state_payload(telemetry_text(*state))


DISCOVERY_CHOICES = ("homeassistant", "none")


class MqttUrlError(ValueError):
    """An ``--mqtt`` URL the bridge cannot use."""


@dataclass(frozen=True, slots=True)
class Broker:
    """Where the broker is, from ``parse_url``."""

    host: str
    port: int
    tls: bool
    username: str | None = None
    password: str | None = None


def parse_url(url: str) -> Broker:
    """``mqtt://[USER:PASS@]HOST[:PORT]`` or ``mqtts://...`` (ports 1883 and 8883 by default)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise MqttUrlError(f"{url!r} is not a valid MQTT URL: {e}") from None
    if parts.scheme not in ("mqtt", "mqtts"):
        raise MqttUrlError(f"{url!r}: the scheme must be mqtt:// or mqtts://")
    if not parts.hostname:
        raise MqttUrlError(f"{url!r} names no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise MqttUrlError(f"{url!r}: only mqtt://[USER:PASS@]HOST:PORT is understood")
    tls = parts.scheme == "mqtts"
    return Broker(
        parts.hostname,
        port if port is not None else (8883 if tls else 1883),
        tls,
        None if parts.username is None else unquote(parts.username),
        None if parts.password is None else unquote(parts.password),
    )


def _topic_level(name: str, value: str) -> None:
    if not value or any(c in value for c in "+#\0") or value.startswith("$"):
        raise ValueError(f"{name} {value!r} is not a valid MQTT topic level")


@dataclass(frozen=True, slots=True)
class MqttConfig:
    """The ``[mqtt]`` section (docs/configuration.md); ``url`` None: no bridge."""

    url: str | None = None
    prefix: str = "iotgw"
    discovery: str = "homeassistant"  # the discovery prefix; "none": no discovery
    username: str | None = None  # wins over the URL's; also IOT_GATEWAY_MQTT_USERNAME
    password: str | None = None  # also IOT_GATEWAY_MQTT_PASSWORD
    ca: str | None = None  # a CA file for mqtts:// (the system's CAs when unset)
    # Seconds between two state publishes of one device (latest wins); 0: every message.
    min_interval: float = 1.0
    queue_size: int = 10_000  # messages waiting for the broker; the oldest dropped beyond
    keepalive: int = 30
    version: int = 5  # MQTT 5 or 3 (3.1.1)
    reconnect_base: float = 0.5
    reconnect_cap: float = 30.0
    client_id: str | None = None  # the bridge's MQTT client id; None: iotgw-<host>-<pid>
    # A cluster node's name: the bridge state is <prefix>/bridge/<node>/state and
    # commands come through the shared subscription (docs/mqtt.md, "In a cluster").
    node: str | None = None
    max_pending_commands: int = 100

    def __post_init__(self) -> None:
        if self.url is not None:
            try:
                parse_url(self.url)
            except MqttUrlError as e:
                raise ValueError(f"url is not usable: {e}") from None
        _topic_level("prefix", self.prefix)
        if self.discovery != "none":
            _topic_level("discovery", self.discovery)
        if self.node is not None:
            _topic_level("node", self.node)
        if not self.min_interval >= 0:
            raise ValueError(f"min_interval must be >= 0, not {self.min_interval}")
        if self.queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, not {self.queue_size}")
        if self.keepalive < 1:
            raise ValueError(f"keepalive must be >= 1, not {self.keepalive}")
        if self.version not in (3, 5):
            raise ValueError(f"version must be 3 or 5, not {self.version}")
        if not 0 < self.reconnect_base <= self.reconnect_cap:
            raise ValueError("reconnect needs 0 < reconnect_base <= reconnect_cap")
        if self.max_pending_commands < 1:
            raise ValueError("max_pending_commands must be >= 1")

    @property
    def enabled(self) -> bool:
        """True when a broker is configured."""
        return self.url is not None

    def tls_context(self) -> ssl.SSLContext | None:
        """The TLS context of an ``mqtts://`` broker (None for ``mqtt://``).

        Raises ``ValueError`` (one line) for a CA file that cannot be read.
        """
        if self.url is None or not parse_url(self.url).tls:
            return None
        try:
            return ssl.create_default_context(cafile=self.ca)
        except (OSError, ssl.SSLError) as e:
            raise ValueError(f"ca: cannot use {self.ca!r}: {e}") from None

    @property
    def url_without_password(self) -> str:
        """The broker's address for logs (never its credentials)."""
        if self.url is None:
            return "(none)"
        broker = parse_url(self.url)
        scheme = "mqtts" if broker.tls else "mqtt"
        return f"{scheme}://{broker.host}:{broker.port}"

    @property
    def bridge_topic(self) -> str:
        """The bridge's retained online/offline (its last will)."""
        if self.node is None:
            return f"{self.prefix}/bridge/state"
        return f"{self.prefix}/bridge/{self.node}/state"

    @property
    def command_filter(self) -> str:
        """What the bridge subscribes to for commands (shared in a cluster)."""
        own = f"{self.prefix}/+/command"
        return own if self.node is None else f"$share/{self.prefix}/{own}"


@dataclass(slots=True)
class MqttCounters:
    """What ``/metrics`` shows of the bridge (docs/api.md §4)."""

    published: int = 0
    dropped: int = 0  # messages dropped from the full queue while the broker was away
    conflated: int = 0  # state updates replaced by a newer one before publishing
    connects: int = 0
    connect_failures: int = 0
    commands: int = 0
    commands_rejected: int = 0


@dataclass(slots=True)
class _Device:
    protocol: str
    online: bool = False
    state: State | None = None  # the latest telemetry (``_payload`` makes the JSON)
    published_at: float = float("-inf")  # loop time of the last state publish


Message = tuple[str, str | bytes, int, bool, Properties | None]


@dataclass(slots=True)
class MqttBridge:
    """One gateway's connection to its MQTT broker. ``start`` after the hub, ``stop`` before."""

    hub: Hub
    config: MqttConfig
    counters: MqttCounters = field(default_factory=MqttCounters)
    connected: bool = False
    devices: dict[str, _Device] = field(default_factory=dict)
    _queue: deque[Message] = field(default_factory=deque)
    _dirty: dict[str, None] = field(default_factory=dict)  # devices whose state waits
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _commands: set[asyncio.Task[None]] = field(default_factory=set)
    _client: aiomqtt.Client | None = None
    _stopping: bool = False
    _connected_event: asyncio.Event = field(default_factory=asyncio.Event)
    #: For tests: called with each (topic, payload) handed to the client.
    on_publish: Callable[[str, str | bytes], None] | None = None

    # ---- life cycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Subscribe to the hub and start connecting (returns at once; the broker may be down)."""
        # An observer of the hub: told synchronously of each delivery, it only keeps the
        # latest record per device; building and publishing payloads is our task's.
        self.hub.observers.append(self)
        for device, state in self.hub.devices.items():
            if self._own(device):
                self.devices[device] = _Device(state.protocol, state.online)
        self._tasks = [asyncio.create_task(self._supervise(), name="mqtt: broker connection")]

    async def stop(self) -> None:
        """Say ``offline`` on the bridge topic, disconnect, stop."""
        self._stopping = True
        client = self._client
        if client is not None and self.connected:
            try:
                await asyncio.wait_for(self._flush(client), 2.0)
                await asyncio.wait_for(
                    client.publish(self.config.bridge_topic, "offline", qos=1, retain=True), 2.0
                )
            except (aiomqtt.MqttError, TimeoutError, OSError) as e:
                log.info("mqtt: could not say offline before stopping: %s", e)
        tasks = [*self._tasks, *self._commands]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks = []
        if self in self.hub.observers:
            self.hub.observers.remove(self)

    async def wait_connected(self, timeout: float) -> None:
        """Until the broker connection is up (for tests and benchmarks)."""
        await asyncio.wait_for(self._connected_event.wait(), timeout)

    @property
    def queued(self) -> int:
        """Messages waiting for the broker."""
        return len(self._queue)

    # ---- from the hub ---------------------------------------------------------------------------

    def telemetry(
        self, record: TelemetryRecord, data_json: str, out_of_range: tuple[str, ...] | None
    ) -> None:
        """``HubObserver``: the latest record of a device (its payload is made when published)."""
        device = record.device
        dev = self.devices.get(device)
        if dev is None:
            if not self._own(device):
                return  # another cluster node's: it publishes it
            dev = self.devices[device] = _Device(record.protocol, True)
        dev.state = (record, data_json, out_of_range)
        if self.config.min_interval == 0:
            self._put((f"{self.config.prefix}/{device}", _payload(dev.state), 0, True, None))
            return
        dirty = self._dirty
        if device in dirty:
            self.counters.conflated += 1
        elif not dirty:
            self._wake.set()  # the publisher sleeps until something is due
        dirty[device] = None

    def presence(self, presence: Presence) -> None:
        """``HubObserver``: a device came or went (on this node or, in a cluster, another)."""
        if presence.reason == NODE_LOST and not presence.online and not self._own(presence.device):
            # Its node is gone and cannot say so: every node that saw it go says it
            # (the same retained value, so saying it more than once changes nothing).
            self._put(
                (f"{self.config.prefix}/{presence.device}/availability", "offline", 1, True, None)
            )
            return
        self._presence(presence.device, presence.protocol, presence.online)

    def removed(self, device: str, reason: str) -> None:
        """``HubObserver``: a device was deleted or forgotten: its retained topics go."""
        self._removed(device)

    def _own(self, device: str) -> bool:
        """Does this node publish ``device``? In a cluster, only the devices it holds."""
        engine = self.hub.engine
        if not engine.clustered:
            return True
        state = self.hub.devices.get(device)
        return state is not None and state.node == engine.node

    def _presence(self, device: str, protocol: str, online: bool) -> None:
        if not self._own(device):
            # Held by another cluster node now: that node publishes its topics.
            self.devices.pop(device, None)
            self._dirty.pop(device, None)
            return
        dev = self.devices.get(device)
        first = dev is None
        if dev is None:
            dev = self.devices[device] = _Device(protocol, online)
        dev.online = online
        if first and self.connected:
            for topic, payload in self._discovery(device, dev):
                self._put((topic, payload, 1, True, None))
        self._put(self._availability(device, dev))

    def _removed(self, device: str) -> None:
        dev = self.devices.pop(device, None)
        self._dirty.pop(device, None)
        if dev is None:
            return
        prefix = self.config.prefix
        # Empty retained payloads delete what the broker keeps of the device.
        self._put((f"{prefix}/{device}", b"", 0, True, None))
        self._put((f"{prefix}/{device}/availability", b"", 1, True, None))
        if self.config.discovery != "none":
            for topic in removal_topics(self.config.discovery, device, _entities(dev.protocol)):
                self._put((topic, b"", 1, True, None))

    def _put(self, message: Message) -> None:
        if len(self._queue) >= self.config.queue_size:
            self._queue.popleft()
            self.counters.dropped += 1
        self._queue.append(message)
        self._wake.set()

    def _availability(self, device: str, dev: _Device) -> Message:
        topic = f"{self.config.prefix}/{device}/availability"
        return (topic, "online" if dev.online else "offline", 1, True, None)

    def _discovery(self, device: str, dev: _Device) -> list[tuple[str, str]]:
        cfg = self.config
        if cfg.discovery == "none":
            return []
        entities = _entities(dev.protocol)
        if not entities:
            return []
        return discovery_messages(
            discovery=cfg.discovery,
            prefix=cfg.prefix,
            client_id=device,
            protocol=dev.protocol,
            entities=entities,
            bridge_topic=cfg.bridge_topic,
        )

    # ---- to the broker --------------------------------------------------------------------------

    def _client_args(self) -> dict[str, Any]:
        cfg = self.config
        assert cfg.url is not None
        broker = parse_url(cfg.url)
        tls = cfg.tls_context()
        version = aiomqtt.ProtocolVersion.V5 if cfg.version == 5 else aiomqtt.ProtocolVersion.V311
        return {
            "hostname": broker.host,
            "port": broker.port,
            "username": cfg.username if cfg.username is not None else broker.username,
            "password": cfg.password if cfg.password is not None else broker.password,
            "identifier": cfg.client_id
            or f"iotgw-{cfg.node or socket.gethostname()}-{os.getpid()}"[:64],
            "protocol": version,
            "will": aiomqtt.Will(cfg.bridge_topic, "offline", qos=1, retain=True),
            "keepalive": cfg.keepalive,
            "tls_context": tls,
            "timeout": 10.0,
        }

    async def _supervise(self) -> None:
        cfg = self.config
        backoff = Backoff(BackoffPolicy(cfg.reconnect_base, cfg.reconnect_cap))
        args = self._client_args()
        while not self._stopping:
            try:
                async with aiomqtt.Client(**args) as client:
                    self._client = client
                    backoff.reset()
                    await self._session(client)
            except aiomqtt.MqttError as e:
                if self.connected:
                    log.warning("mqtt: lost the broker: %s", e)
                else:
                    self.counters.connect_failures += 1
                    log.info("mqtt: cannot reach the broker: %s", e)
            finally:
                self._client = None
                self.connected = False
                self._connected_event.clear()
            delay = backoff.next_delay()
            await asyncio.sleep(delay)

    async def _session(self, client: aiomqtt.Client) -> None:
        cfg = self.config
        await client.subscribe(cfg.command_filter, qos=1)
        if cfg.discovery != "none":
            await client.subscribe(f"{cfg.discovery}/status", qos=1)
        self.connected = True
        self.counters.connects += 1
        log.info("mqtt: connected to the broker at %s", self.config.url_without_password)
        await self._republish(client)
        self._connected_event.set()
        publisher = asyncio.create_task(self._publisher(client), name="mqtt: publish")
        try:
            async for message in client.messages:
                self._incoming(client, message)
        finally:
            publisher.cancel()
            await asyncio.gather(publisher, return_exceptions=True)
        if publisher.done() and not publisher.cancelled():
            exc = publisher.exception()
            if exc is not None:
                raise exc

    async def _republish(self, client: aiomqtt.Client) -> None:
        """Everything the broker should hold, again: it may have kept nothing."""
        prefix = self.config.prefix
        await client.publish(self.config.bridge_topic, "online", qos=1, retain=True)
        await self._publish_discovery(client)
        for device, dev in list(self.devices.items()):
            topic, payload, qos, retain, _ = self._availability(device, dev)
            await client.publish(topic, payload, qos=qos, retain=retain)
            if dev.state is not None:
                await client.publish(f"{prefix}/{device}", _payload(dev.state), qos=0, retain=True)
                dev.published_at = time.monotonic()
            self._dirty.pop(device, None)
        self.counters.published += len(self.devices) * 2 + 1

    async def _publish_discovery(self, client: aiomqtt.Client) -> None:
        for device, dev in list(self.devices.items()):
            for topic, payload in self._discovery(device, dev):
                await client.publish(topic, payload, qos=1, retain=True)
                self.counters.published += 1

    async def _publisher(self, client: aiomqtt.Client) -> None:
        # Woken by queued messages at once; conflated states are looked at a few
        # times per min_interval, not once per telemetry message (which would cost
        # a wake-up and a timer per frame on the hot loop).
        tick = self.config.min_interval / 4
        while True:
            await self._flush(client)
            self._wake.clear()
            if self._queue:
                continue
            if self._dirty:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(tick):
                        await self._wake.wait()
            else:
                await self._wake.wait()

    async def _flush(self, client: aiomqtt.Client) -> None:
        queue = self._queue
        hook = self.on_publish
        while queue:
            topic, payload, qos, retain, props = queue[0]
            await client.publish(topic, payload, qos=qos, retain=retain, properties=props)
            queue.popleft()  # only once the client took it: a lost broker keeps it queued
            self.counters.published += 1
            if hook is not None:
                hook(topic, payload)
        if self._dirty:
            now = time.monotonic()
            interval = self.config.min_interval
            prefix = self.config.prefix
            for device in list(self._dirty):
                dev = self.devices.get(device)
                if dev is None or dev.state is None:
                    del self._dirty[device]
                    continue
                if now - dev.published_at < interval:
                    continue
                del self._dirty[device]
                dev.published_at = now
                payload = _payload(dev.state)
                await client.publish(f"{prefix}/{device}", payload, qos=0, retain=True)
                self.counters.published += 1
                if hook is not None:
                    hook(f"{prefix}/{device}", payload)

    # ---- from the broker ------------------------------------------------------------------------

    def _incoming(self, client: aiomqtt.Client, message: aiomqtt.Message) -> None:
        cfg = self.config
        topic = message.topic.value
        if cfg.discovery != "none" and topic == f"{cfg.discovery}/status":
            if message.payload == b"online":
                task = asyncio.create_task(self._publish_discovery(client))
                self._commands.add(task)
                task.add_done_callback(self._commands.discard)
            return
        device = _command_device(cfg.prefix, topic)
        if device is None:
            return
        self.counters.commands += 1
        props = message.properties
        response = getattr(props, "ResponseTopic", None) if props is not None else None
        correlation = getattr(props, "CorrelationData", None) if props is not None else None
        if len(self._commands) >= cfg.max_pending_commands:
            busy = _rejected(None, device, "busy: too many commands in progress")
            self._status(device, response, correlation, busy)
            return
        task = asyncio.create_task(
            self._command(device, message.payload, response, correlation),
            name=f"mqtt command to {device}",
        )
        self._commands.add(task)
        task.add_done_callback(self._commands.discard)

    async def _command(
        self, device: str, payload: Any, response: str | None, correlation: bytes | None
    ) -> None:
        def reply(status: dict[str, Any]) -> None:
            self._status(device, response, correlation, status)

        try:
            body = json.loads(payload) if isinstance(payload, bytes | str) else None
        except (ValueError, UnicodeDecodeError):
            body = None
        if not isinstance(body, dict):
            self.counters.commands_rejected += 1
            reply(_rejected(None, device, "the payload must be a JSON command object"))
            return
        request_id = body.pop("id", None)
        if request_id is not None and (
            isinstance(request_id, bool) or not isinstance(request_id, str | int)
        ):
            self.counters.commands_rejected += 1
            reply(_rejected(None, device, "'id' must be a string or number"))
            return
        if device not in self.hub.devices:
            self.counters.commands_rejected += 1
            reply(_rejected(request_id, device, f"unknown device {device!r}"))
            return
        try:
            await self.hub.submit_command(CommandRequest(request_id, body, device=device), reply)
        except ClientError as e:
            self.counters.commands_rejected += 1
            reply(_rejected(request_id, device, e.message))
        except Exception:
            log.exception("mqtt: command to %s failed", device)
            reply(_rejected(request_id, device, "the gateway could not carry out the command"))

    def _status(
        self,
        device: str,
        response: str | None,
        correlation: bytes | None,
        status: dict[str, Any],
    ) -> None:
        text = dumps(status)
        self._put((f"{self.config.prefix}/{device}/command/status", text, 1, False, None))
        if response:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            if correlation is not None:
                props.CorrelationData = correlation
            self._put((response, text, 1, False, props))


def _rejected(request_id: Any, device: str, error: str) -> dict[str, Any]:
    return {
        "op": "command_status",
        "id": request_id,
        "device": device,
        "status": "rejected",
        "error": error,
    }


def _command_device(prefix: str, topic: str) -> str | None:
    head = prefix + "/"
    if topic.startswith(head) and topic.endswith("/command"):
        device = topic[len(head) : -len("/command")]
        if device and "/" not in device and device != "bridge":
            return device
    return None


def _entities(protocol: str) -> tuple[Any, ...]:
    """What a device of ``protocol`` shows in Home Assistant (none for an unknown one)."""
    return tuple(get_protocol(protocol).mqtt_entities)
