"""The composition root's wiring: storage, hub, devices and the web skin of one gateway.

``build_runtime`` wires the parts (nothing starts); ``create_app`` makes the
aiohttp application whose lifecycle starts and stops them in order. This and
the CLI are the only modules that import every layer (docs/architecture.md).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import WSCloseCode, web
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from devices import (
    DeviceManager,
    DeviceServer,
    SerialLink,
    TlsDoor,
    load_deny_list,
    server_context,
)
from devices.tls import REASONS as TLS_REASONS

from .auth import TokenTable
from .cluster import RedisEngine
from .config import GatewayConfig
from .hub import Hub, LocalEngine
from .hub.engine import Engine
from .metrics import Metrics, counter, counters, gauge
from .mqtt import MqttBridge
from .storage import SQLiteStorage, Storage
from .web import WEB, WebContext, add_routes
from .web.connections import HttpConnectionCap
from .web.serial import SERIAL_PORTS, SERIAL_SUMMARY


@dataclass(slots=True)
class Runtime(WebContext):
    """Everything one running gateway holds: what the web skin sees, plus devices and storage."""

    storage: Storage = field(kw_only=True)
    manager: DeviceManager = field(kw_only=True)
    device_server: DeviceServer = field(kw_only=True)
    serial_links: list[SerialLink] = field(default_factory=list, kw_only=True)
    # The TLS doors by port (``http``, ``devices``); a plain port has none (docs/tls.md).
    tls: dict[str, TlsDoor] = field(default_factory=dict, kw_only=True)
    # The MQTT northbound (docs/mqtt.md); None without a broker.
    mqtt: MqttBridge | None = field(default=None, kw_only=True)


RUNTIME: web.AppKey[Runtime] = web.AppKey("runtime", Runtime)


TLS_PORTS = ("http", "devices")


def build_tls(config: GatewayConfig) -> dict[str, TlsDoor]:
    """A TLS door for each port with a certificate (``devices.TlsConfigError`` if a file
    cannot be used): read at start, and again at each SIGHUP (``reload_tls``)."""
    doors = {}
    for port in TLS_PORTS:
        files = config.tls.files(port)
        if files is not None:
            doors[port] = TlsDoor(
                port,
                server_context(files),
                load_deny_list(files.deny_list),
                config.tls.handshake_timeout,
            )
    return doors


def reload_tls(rt: Runtime) -> None:
    """Read the certificates, CRL and deny-list again: new connections get them, open ones
    stay. Everything is read before anything is swapped, so a bad file changes nothing."""
    fresh = build_tls(rt.config)
    for port, door in rt.tls.items():
        new = fresh.get(port)
        if new is not None:
            door.reload(new.context, new.deny_list)


def build_runtime(
    config: GatewayConfig, tokens: TokenTable, tls: dict[str, TlsDoor] | None = None
) -> Runtime:
    """Wire storage, hub and device side together (nothing is started).

    ``tls``: the doors ``build_tls`` made (None: made here from the config).
    """
    doors = build_tls(config) if tls is None else tls
    metrics = Metrics()
    s = config.storage
    storage = SQLiteStorage(
        Path(config.data_dir) / "gateway.sqlite3",
        retention=s.retention(),
        batch_interval=s.batch_interval,
        batch_rows=s.batch_rows,
        max_pending_rows=s.max_pending_rows,
        max_queued_commands_per_device=s.max_queued_commands_per_device,
        max_queued_commands=s.max_queued_commands,
    )
    if s.offset_mark is not None:
        storage.offset_mark = Path(s.offset_mark)
    storage.stats.on_batch = metrics.storage_batch.observe
    engine: Engine = LocalEngine(storage)
    if config.cluster.url is not None:
        engine = RedisEngine(
            LocalEngine(storage, config.cluster.node_id or "local"), config.cluster
        )
        metrics.add_snapshot(lambda: _cluster_metrics(engine))
    hub = Hub(engine, config.hub_config(), metrics)
    manager = DeviceManager(hub, config.session_config())
    hub.attach(manager)
    server = DeviceServer(
        manager,
        config.host if config.device_host is None else config.device_host,
        config.device_port,
        frame_options=config.frame_options(),
        max_connections=config.devices.max_connections,
        tls=doors.get("devices"),
    )
    http = HttpConnectionCap(config.http.max_connections)
    http.on_refused = metrics.refused.labels("http_connections").inc
    http_tls = doors.get("http")
    if http_tls is not None:
        # Handshakes hold descriptors before the cap sees them: bound them by it too.
        http_tls.admit = lambda _host: _admit_handshake(http_tls, http)
    rt = Runtime(
        config,
        tokens,
        metrics,
        hub,
        http,
        storage=storage,
        manager=manager,
        device_server=server,
        # Made (not started) now, so each configured port is listed from the start.
        serial_links=[SerialLink(manager, port) for port in config.serial_ports()],
        tls=doors,
    )
    if config.mqtt.enabled:
        mqtt = config.mqtt
        if config.cluster.url is not None and mqtt.node is None:
            # Each node its own bridge state and will, commands shared (docs/mqtt.md).
            mqtt = dataclasses.replace(mqtt, node=config.cluster.node_id)
        bridge = rt.mqtt = MqttBridge(hub, mqtt)
        rt.mqtt_state = lambda: "connected" if bridge.connected else "down"
    metrics.add_snapshot(lambda: _link_metrics(rt))
    metrics.add_snapshot(lambda: _hub_metrics(rt))
    metrics.add_snapshot(lambda: _storage_metrics(rt))
    # Without TLS the families are there with no samples: every documented metric is.
    metrics.add_snapshot(lambda: _tls_metrics(rt))
    metrics.add_snapshot(lambda: _mqtt_metrics(rt))
    return rt


def _mqtt_metrics(rt: Runtime) -> list[Any]:
    """The MQTT bridge (docs/mqtt.md); no samples without a broker."""
    b = rt.mqtt
    c = b.counters if b is not None else None
    families: list[Any] = []
    for name, doc, value in (
        ("iot_mqtt_published", "Messages handed to the MQTT broker", "published"),
        (
            "iot_mqtt_dropped",
            "MQTT messages dropped from the full queue (mqtt.queue_size)",
            "dropped",
        ),
        (
            "iot_mqtt_conflated",
            "State updates replaced by a newer one (mqtt.min_interval)",
            "conflated",
        ),
        ("iot_mqtt_connects", "Connections made to the MQTT broker", "connects"),
        (
            "iot_mqtt_connect_failures",
            "Attempts to reach the MQTT broker that failed",
            "connect_failures",
        ),
        ("iot_mqtt_commands", "Commands received over MQTT", "commands"),
        (
            "iot_mqtt_commands_rejected",
            "Commands over MQTT rejected by the bridge",
            "commands_rejected",
        ),
    ):
        family = CounterMetricFamily(name, doc)
        if c is not None:
            family.add_metric([], getattr(c, value))
        families.append(family)
    up = GaugeMetricFamily("iot_mqtt_connected", "1 while the MQTT broker connection is up")
    queued = GaugeMetricFamily("iot_mqtt_queued", "MQTT messages waiting for the broker")
    if b is not None:
        up.add_metric([], 1 if b.connected else 0)
        queued.add_metric([], b.queued)
    return [*families, up, queued]


def _admit_handshake(door: TlsDoor, cap: HttpConnectionCap) -> bool:
    """Whether the HTTP port may start one more TLS handshake (at most ``http.max_connections``
    at once, whatever the open connections); a refusal is counted as the cap's own."""
    if door.handshaking < cap.limit:
        return True
    cap.on_refused()
    return False


def _tls_metrics(rt: Runtime) -> list[Any]:
    """Failed TLS handshakes by port and reason (docs/tls.md), every reason from the start."""
    failures = CounterMetricFamily(
        "iot_tls_handshake_failures",
        "TLS handshakes that failed, by port and reason",
        labels=["port", "reason"],
    )
    done = CounterMetricFamily(
        "iot_tls_handshakes", "TLS handshakes that succeeded, by port", labels=["port"]
    )
    busy = GaugeMetricFamily(
        "iot_tls_handshakes_in_progress", "TLS handshakes in progress, by port", labels=["port"]
    )
    for port, door in rt.tls.items():
        for reason in TLS_REASONS:
            failures.add_metric([port, reason], door.failures.get(reason, 0))
        done.add_metric([port], door.handshakes)
        busy.add_metric([port], door.handshaking)
    return [failures, done, busy]


def _cluster_metrics(engine: Engine) -> list[Any]:
    """The node's cluster counters (docs/api.md §4, docs/cluster.md)."""
    if not isinstance(engine, RedisEngine):
        return []
    c = engine.counters
    return [
        gauge(
            "iot_cluster_nodes", "Live nodes of the cluster, this one included", len(engine.nodes())
        ),
        gauge("iot_cluster_degraded", "1 while Redis is unreachable, else 0", int(engine.degraded)),
        counter("iot_cluster_sequenced", "Telemetry of this node given an offset", c.sequenced),
        counter("iot_cluster_log_read", "Log entries this node read", c.read),
        counter(
            "iot_cluster_spool_dropped",
            "Telemetry dropped at cluster.spool while Redis was away (never sequenced)",
            c.spool_dropped,
        ),
        counter(
            "iot_cluster_node_lost", "Devices this node declared offline (node_lost)", c.nodes_lost
        ),
        counter("iot_cluster_redis_errors", "Failed Redis operations", c.redis_errors),
    ]


# Every reason a command can be refused for, so each series exists from the start.
_COMMAND_REFUSALS = (
    "max_command_id",
    "max_queued_commands_per_device",
    "max_queued_commands",
    "storage_unavailable",
)


def _storage_metrics(rt: Runtime) -> list[Any]:
    """Storage faults and the offline queue's bounds (docs/api.md §4)."""
    stats = rt.storage.stats
    refused = rt.hub.commands.refused
    return [
        gauge(
            "iot_storage_failing",
            "1 while the storage cannot write (see /healthz), else 0",
            0 if rt.storage.health().ok else 1,
        ),
        counter(
            "iot_storage_failed_batches",
            "Storage transactions that failed (their rows are retried)",
            stats.failed_batches,
        ),
        counter(
            "iot_storage_dropped_rows",
            "Rows never stored: over storage.max_pending_rows, or lost at a failing close",
            stats.dropped_rows,
        ),
        counter("iot_storage_failed_reads", "Storage reads that failed", stats.failed_reads),
        counters(
            "iot_commands_refused",
            "Commands rejected by a bound or a failing storage, by reason",
            "reason",
            {reason: refused[reason] for reason in _COMMAND_REFUSALS},
        ),
    ]


def _hub_metrics(rt: Runtime) -> list[Any]:
    c = rt.hub.counters
    return [
        gauge("iot_devices_known", "Devices the gateway knows, online or not", len(rt.hub.devices)),
        counter(
            "iot_devices_forgotten",
            "Offline devices forgotten after dashboards.forget_after",
            c.forgotten,
        ),
        counters(
            "iot_dashboards_closed",
            "Dashboards the hub disconnected, by reason (control_queue)",
            "reason",
            dict(sorted(c.dashboards_closed.items())),
        ),
    ]


def _serial_ports(rt: Runtime) -> Any:
    """Configured serial ports by state: what to alert on for an unplugged port, since
    ``/healthz`` stays 200 for it (docs/api.md §4)."""
    family = GaugeMetricFamily(
        "iot_serial_ports",
        "Configured serial ports, by state (open, retrying, missing)",
        labels=["state"],
    )
    for state, n in rt.manager.serial_summary().items():
        family.add_metric([state], n)
    return family


def _link_metrics(rt: Runtime) -> list[Any]:
    t = rt.manager.totals()
    c = rt.manager.counters
    out = [
        counter("iot_frames_in", "Valid frames received from devices", t.frames_in),
        counter("iot_frames_out", "Frames sent to devices", t.frames_out),
        counter("iot_bytes_in", "Bytes received from devices", t.bytes_in),
        counter("iot_bytes_out", "Bytes sent to devices", t.bytes_out),
        counter("iot_crc_errors", "Frames rejected for a bad CRC", t.crc_errors),
        counter("iot_discarded_bytes", "Bytes skipped while looking for a header", t.skipped_bytes),
        counter(
            "iot_frame_timeouts", "Partial frames abandoned by the frame timeout", t.frame_timeouts
        ),
        counter(
            "iot_rate_limited_frames",
            "Device frames dropped by the rate limit (serial links)",
            t.rate_limited,
        ),
        counter(
            "iot_device_throttled",
            "Times a TCP device over its rate was left unread for a while (backpressure)",
            t.throttled,
        ),
        counter("iot_serial_reconnects", "Serial ports reopened after a loss", t.reconnects),
        _serial_ports(rt),
        counter(
            "iot_garbage_links_closed", "TCP links closed for sending garbage", c.garbage_closed
        ),
        counter("iot_device_auth_failed", "HELLOs refused for a wrong token", c.auth_failed),
        counters(
            "iot_device_refused",
            "Device connections or HELLOs refused by a limit",
            "limit",
            {
                "max_connections": c.refused_connections,
                "max_failed_links": c.refused_failed_links,
                "max_devices": c.refused_max_devices,
                "max_known_devices": rt.hub.counters.refused_known_devices,
                "max_takeovers": c.refused_takeovers,
                "max_sessions_per_client": c.refused_sessions,
                "max_client_id_changes": c.refused_client_id_changes,
                "anonymous": c.refused_anonymous,
            },
        ),
        counters(
            "iot_device_links_closed",
            "Device links closed, by reason (hello_timeout, silent, garbage, closed, lost, ...)",
            "reason",
            # Only the reasons seen so far: a label appears once it has been counted.
            {str(reason): n for reason, n in sorted(c.links_closed.items())},
        ),
        counters(
            "iot_device_errors_sent",
            "ERROR messages sent to devices, by code",
            "code",
            dict(sorted((code.name.lower(), n) for code, n in c.errors_sent.items())),
        ),
        counter(
            "iot_device_replaced", "Links closed by a newer HELLO of the same device", c.replaced
        ),
        counter("iot_stray_acks", "ACKs from devices for no command in flight", c.stray_acks),
        counters(
            "iot_device_commands_not_written",
            "Commands given up before they were written to their device, by reason",
            "reason",
            {"not_reading": c.commands_not_reading, "no_slot": c.commands_no_slot},
        ),
        counter(
            "iot_device_log_lines_suppressed",
            "Log lines caused by devices left out at devices.max_log_lines",
            rt.manager.logs.suppressed,
        ),
        gauge(
            "iot_http_connections",
            "Open HTTP connections (dashboards included)",
            rt.http.open_connections(),
        ),
        counter(
            "iot_http_idle_closed",
            "Idle HTTP connections closed to make room at http.max_connections",
            rt.http.stats.evicted,
        ),
        gauge(
            "iot_device_links",
            "Open device links (TCP connections and serial ports)",
            len(rt.manager.links),
        ),
        gauge(
            "iot_storage_pending_rows",
            "Rows queued for the storage writer",
            rt.storage.stats.pending,
        ),
    ]
    return out


# ---- app -------------------------------------------------------------------------------------


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    rt = app[RUNTIME]
    await rt.storage.open()
    try:
        await rt.hub.start()
        await rt.device_server.start()
        if rt.mqtt is not None:
            await rt.mqtt.start()  # returns at once: the broker may come later
    except BaseException:
        # aiohttp runs no cleanup for a context whose startup failed: undo it here.
        await shutdown(rt)
        raise
    for link in rt.serial_links:
        link.start()
    yield
    # Runs after on_shutdown and after the handlers ended: flush what was accepted.
    await stop_traffic(rt)
    await rt.storage.close()


async def shutdown(rt: Runtime) -> None:
    """Stop traffic and close storage (for a gateway whose start failed half way)."""
    await stop_traffic(rt)
    await rt.storage.close()


async def _on_shutdown(app: web.Application) -> None:
    await stop_traffic(app[RUNTIME])


async def stop_traffic(rt: Runtime) -> None:
    """Stop accepting, close devices and dashboards (1001). Safe to call twice.

    aiohttp runs this (on_shutdown) before it waits for handlers, so open
    WebSockets end at once instead of holding the shutdown for its timeout.
    """
    if not rt.accepting:
        return
    rt.accepting = False
    await rt.device_server.stop_accepting()
    http_tls = rt.tls.get("http")
    if http_tls is not None:
        http_tls.abort_handshakes()  # the HTTP site stops accepting later, in runner.cleanup
    for link in rt.serial_links:
        await link.stop()
    rt.serial_links.clear()
    await rt.device_server.close()
    if rt.mqtt is not None:
        # After the devices (their offline availability goes out), before the hub.
        await rt.mqtt.stop()
    await rt.hub.stop()
    closing = [
        asyncio.wait_for(
            ws.close(code=WSCloseCode.GOING_AWAY, message=b"gateway shutting down"), 2.0
        )
        for ws in list(rt.sockets)
    ]
    await asyncio.gather(*closing, return_exceptions=True)


def create_app(
    config: GatewayConfig, tokens: TokenTable, tls: dict[str, TlsDoor] | None = None
) -> web.Application:
    """The gateway as an aiohttp application (devices, storage and hub start with it)."""
    rt = build_runtime(config, tokens, tls)
    app = web.Application(
        client_max_size=config.dashboards.max_message, middlewares=[rt.http.middleware]
    )
    app[RUNTIME] = rt
    app[WEB] = rt
    ports = rt.manager.serial_ports
    app[SERIAL_PORTS] = lambda: [status.to_json() for status in ports.values()]
    app[SERIAL_SUMMARY] = rt.manager.serial_summary
    app.cleanup_ctx.append(_lifecycle)
    app.on_shutdown.append(_on_shutdown)
    add_routes(app)
    return app
