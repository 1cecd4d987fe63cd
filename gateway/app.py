"""The aiohttp skin over the hub: WebSocket, HTTP API, metrics, the page (docs/api.md).

Handlers only translate between HTTP/WebSocket and the routing core. Each
dashboard gets a writer task that drains its own queue at the pace of its
socket; the hub never awaits a socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

from devices import DeviceManager, DeviceServer, SerialLink

from .auth import TokenTable, bearer, origin_allowed
from .config import GatewayConfig
from .connections import HttpConnectionCap
from .hub import (
    ClientError,
    Dashboard,
    ErrorCode,
    Hub,
    LocalEngine,
    Refused,
    Role,
    dumps,
    error_message,
    parse_command,
    telemetry_message,
)
from .metrics import CONTENT_TYPE, Metrics, counter, counters, gauge
from .storage import RetentionPolicy, SQLiteStorage, Storage

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Runtime:
    """Everything one running gateway holds (in the app, under ``RUNTIME``)."""

    config: GatewayConfig
    tokens: TokenTable
    metrics: Metrics
    storage: Storage
    hub: Hub
    manager: DeviceManager
    device_server: DeviceServer
    http: HttpConnectionCap
    serial_links: list[SerialLink] = field(default_factory=list)
    sockets: set[web.WebSocketResponse] = field(default_factory=set)
    accepting: bool = True


RUNTIME: web.AppKey[Runtime] = web.AppKey("runtime", Runtime)


def build_runtime(config: GatewayConfig, tokens: TokenTable) -> Runtime:
    """Wire storage, hub and device side together (nothing is started)."""
    metrics = Metrics()
    s = config.storage
    storage = SQLiteStorage(
        Path(config.data_dir) / "gateway.sqlite3",
        retention=RetentionPolicy(s.retention_per_device, s.retention_days * 86400),
        batch_interval=s.batch_interval,
        batch_rows=s.batch_rows,
    )
    storage.stats.on_batch = metrics.storage_batch.observe
    hub = Hub(LocalEngine(storage), config.hub_config(), metrics)
    manager = DeviceManager(hub, config.session_config())
    hub.attach(manager)
    server = DeviceServer(
        manager,
        config.host,
        config.device_port,
        frame_options=config.frame_options(),
        max_connections=config.devices.max_connections,
    )
    http = HttpConnectionCap(config.http.max_connections)
    http.on_refused = metrics.refused.labels("http_connections").inc
    rt = Runtime(config, tokens, metrics, storage, hub, manager, server, http)
    metrics.add_snapshot(lambda: _link_metrics(rt))
    return rt


def _prefixed(c: Counter[str], prefix: str) -> dict[str, float]:
    return {k.removeprefix(prefix): v for k, v in sorted(c.items()) if k.startswith(prefix)}


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
            "iot_rate_limited_frames", "Device frames dropped by the rate limit", t.rate_limited
        ),
        counter("iot_serial_reconnects", "Serial ports reopened after a loss", t.reconnects),
        counter(
            "iot_garbage_links_closed", "TCP links closed for sending garbage", c["garbage_closed"]
        ),
        counter("iot_device_auth_failed", "HELLOs refused for a wrong token", c["auth_failed"]),
        counters(
            "iot_device_refused",
            "Device connections or HELLOs refused by a limit",
            "limit",
            {
                "max_connections": c["refused_connections"],
                "max_devices": c["refused_max_devices"],
            },
        ),
        counters(
            "iot_device_links_closed",
            "Device links closed, by reason (hello_timeout, silent, garbage, closed, lost, ...)",
            "reason",
            _prefixed(c, "closed_"),
        ),
        counters(
            "iot_device_errors_sent",
            "ERROR messages sent to devices, by code",
            "code",
            _prefixed(c, "error_"),
        ),
        counter(
            "iot_device_replaced", "Links closed by a newer HELLO of the same device", c["replaced"]
        ),
        counter("iot_stray_acks", "ACKs from devices for no command in flight", c["stray_acks"]),
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


# ---- auth helpers ----------------------------------------------------------------------------


def _presented_token(request: web.Request) -> str | None:
    return bearer(request.headers.get("Authorization")) or request.query.get("token")


def _require(request: web.Request, role: Role | None = None) -> Role:
    rt = request.app[RUNTIME]
    granted = rt.tokens.role_of(_presented_token(request))
    if granted is None:
        raise web.HTTPUnauthorized(
            text=dumps({"code": "unauthorized", "message": "missing or wrong token"}),
            content_type="application/json",
            headers={"WWW-Authenticate": 'Bearer realm="iot-gateway"'},
        )
    if role is Role.OPERATOR and granted is not Role.OPERATOR:
        raise _http_error(web.HTTPForbidden, ErrorCode.FORBIDDEN, "this needs an operator token")
    return granted


def _http_error(
    cls: type[web.HTTPException], code: ErrorCode | str, message: str
) -> web.HTTPException:
    return cls(text=dumps({"code": str(code), "message": message}), content_type="application/json")


# ---- WebSocket -------------------------------------------------------------------------------


async def ws_handler(request: web.Request) -> web.StreamResponse:
    """``GET /ws``: a dashboard's WebSocket (docs/api.md §3)."""
    rt = request.app[RUNTIME]
    role = _require(request)
    if not origin_allowed(
        request.headers.get("Origin"),
        request.host,
        request.scheme,
        rt.config.auth.allowed_origins,
    ):
        rt.metrics.refused.labels("origin").inc()
        raise _http_error(web.HTTPForbidden, ErrorCode.FORBIDDEN, "Origin not allowed")
    if not rt.accepting:
        raise _http_error(web.HTTPServiceUnavailable, "shutting_down", "the gateway is stopping")
    session = str(uuid.uuid4())
    try:
        dashboard = rt.hub.connect_dashboard(role, session)
    except Refused as e:
        raise _http_error(web.HTTPServiceUnavailable, "too_many_dashboards", str(e)) from None
    cfg = rt.config.dashboards
    ws = web.WebSocketResponse(
        compress=cfg.compression,
        max_msg_size=cfg.max_message,
        heartbeat=30.0,
    )
    try:
        await ws.prepare(request)
    except BaseException:
        rt.hub.disconnect_dashboard(dashboard)
        raise
    rt.sockets.add(ws)
    dashboard.push_control(dumps({"op": "welcome", "session": session, "role": str(role)}))
    writer = asyncio.create_task(
        _writer(rt, ws, dashboard, request), name=f"ws writer {dashboard.id}"
    )
    try:
        async for msg in ws:
            if msg.type is WSMsgType.TEXT:
                await _on_text(rt, dashboard, msg.data)
            elif msg.type is WSMsgType.BINARY:
                dashboard.push_control(
                    dumps(error_message(None, ErrorCode.BAD_REQUEST, "send JSON in text frames"))
                )
            elif msg.type is WSMsgType.ERROR:
                log.debug("dashboard %d: %s", dashboard.id, ws.exception())
    finally:
        rt.hub.disconnect_dashboard(dashboard)
        rt.sockets.discard(ws)
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await writer
    return ws


async def _on_text(rt: Runtime, dashboard: Dashboard, text: str) -> None:
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        dashboard.push_control(dumps(error_message(None, ErrorCode.BAD_REQUEST, "not valid JSON")))
        return
    await rt.hub.handle(dashboard, obj)


async def _writer(
    rt: Runtime, ws: web.WebSocketResponse, dashboard: Dashboard, request: web.Request
) -> None:
    """Send the dashboard's queue, batching objects into newline-separated frames."""
    cfg = rt.config.dashboards
    try:
        while True:
            await dashboard.wait()
            items = dashboard.take(cfg.batch_max_items)
            if not items:
                if dashboard.closed:
                    return
                continue
            received = dashboard.batch_received
            try:
                # asyncio.timeout, not wait_for: wait_for made a task per frame sent.
                async with asyncio.timeout(cfg.drain_timeout):
                    await ws.send_str("\n".join(items))
                if received:
                    # Once per frame, for its oldest telemetry: the worst case in it.
                    loop_now = asyncio.get_running_loop().time()
                    rt.metrics.send_latency.observe(loop_now - received)
            except TimeoutError:
                rt.metrics.slow_dashboards_closed.inc()
                log.warning(
                    "closing dashboard %d: its socket did not drain for %g s",
                    dashboard.id,
                    cfg.drain_timeout,
                )
                if request.transport is not None:
                    request.transport.abort()
                return
    except (ConnectionError, RuntimeError):
        return  # the socket closed under us; the reader loop cleans up


# ---- HTTP API --------------------------------------------------------------------------------


async def list_devices(request: web.Request) -> web.Response:
    """``GET /api/devices``."""
    _require(request)
    return web.json_response({"devices": request.app[RUNTIME].hub.devices_listing()}, dumps=dumps)


async def get_device(request: web.Request) -> web.Response:
    """``GET /api/devices/{id}``."""
    _require(request)
    state = request.app[RUNTIME].hub.registry.get(request.match_info["id"])
    if state is None:
        raise _http_error(web.HTTPNotFound, ErrorCode.NOT_FOUND, "no such device")
    return web.json_response(state.listing(), dumps=dumps)


def _int_param(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise _http_error(
            web.HTTPBadRequest, ErrorCode.BAD_REQUEST, f"{name} must be an integer"
        ) from None
    if not low <= value <= high:
        raise _http_error(
            web.HTTPBadRequest, ErrorCode.BAD_REQUEST, f"{name} must be in {low}..{high}"
        )
    return value


async def device_telemetry(request: web.Request) -> web.Response:
    """``GET /api/devices/{id}/telemetry?since=OFFSET&limit=N``, oldest first."""
    _require(request)
    rt = request.app[RUNTIME]
    device = request.match_info["id"]
    if device not in rt.hub.registry:
        raise _http_error(web.HTTPNotFound, ErrorCode.NOT_FOUND, "no such device")
    since = _int_param(request, "since", 0, -1, 2**63 - 1)
    limit = _int_param(request, "limit", 100, 1, 1000)
    records = await rt.hub.history(device, since, limit)
    return web.json_response(
        {"device": device, "telemetry": [telemetry_message(r) for r in records]}, dumps=dumps
    )


async def post_command(request: web.Request) -> web.Response:
    """``POST /api/devices/{id}/commands`` with ``{"command": {...}}`` -> 202 + first status."""
    _require(request, Role.OPERATOR)
    rt = request.app[RUNTIME]
    limit = rt.config.dashboards.max_message
    too_large = web.HTTPRequestEntityTooLarge(
        max_size=limit,
        actual_size=request.content_length or limit + 1,
        text=dumps({"code": str(ErrorCode.TOO_LARGE), "message": f"body over {limit} bytes"}),
        content_type="application/json",
    )
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    wait = rt.config.http.idle_timeout
    try:
        # A body that never arrives would hold the connection busy for ever.
        async with asyncio.timeout(wait):
            body = await request.json()
    except TimeoutError:
        raise _http_error(
            web.HTTPRequestTimeout, "timeout", f"request body not received within {wait:g} s"
        ) from None
    except web.HTTPRequestEntityTooLarge:
        raise too_large from None  # a chunked body that grew past client_max_size
    except ValueError:
        raise _http_error(web.HTTPBadRequest, ErrorCode.BAD_REQUEST, "body is not JSON") from None
    if not isinstance(body, dict) or not isinstance(body.get("command"), dict):
        raise _http_error(
            web.HTTPBadRequest, ErrorCode.BAD_REQUEST, 'body must be {"command": {...}}'
        )
    statuses: list[dict[str, Any]] = []
    msg = {"id": body.get("id"), "device": request.match_info["id"], "command": body["command"]}
    try:
        await rt.hub.submit_command(parse_command(msg), statuses.append)
    except ClientError as e:
        raise _http_error(web.HTTPBadRequest, e.code, e.message) from None
    first = statuses[0]
    if first["status"] == "rejected":
        status = 404 if request.match_info["id"] not in rt.hub.registry else 400
        return web.json_response(first, status=status, dumps=dumps)
    return web.json_response(first, status=202, dumps=dumps)


async def healthz(request: web.Request) -> web.Response:
    """``GET /healthz``: no token; says whether the gateway is up."""
    rt = request.app[RUNTIME]
    return web.json_response(
        {
            "status": "ok" if rt.accepting else "stopping",
            "devices_online": rt.hub.online_count(),
            "dashboards": len(rt.hub.dashboards),
        }
    )


async def metrics(request: web.Request) -> web.Response:
    """``GET /metrics``: Prometheus text format."""
    rt = request.app[RUNTIME]
    return web.Response(body=rt.metrics.render(), headers={"Content-Type": CONTENT_TYPE})


def _static_dir() -> Path:
    return Path(str(resources.files("gateway") / "static"))


PAGE_HEADERS = {
    # Revalidate page files so an upgraded gateway never mixes old and new modules.
    "Cache-Control": "no-cache",
    # The page loads nothing from elsewhere; say so, so an injected script cannot.
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
}


async def _page_headers(request: web.Request, response: web.StreamResponse) -> None:
    if request.path == "/" or request.path.startswith("/static/"):
        response.headers.update(PAGE_HEADERS)


async def index(request: web.Request) -> web.StreamResponse:
    """``GET /``: the dashboard page (it asks for the token itself)."""
    return web.FileResponse(_static_dir() / "index.html")


# ---- app -------------------------------------------------------------------------------------


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    rt = app[RUNTIME]
    await rt.storage.open()
    try:
        await rt.hub.start()
        await rt.device_server.start()
    except BaseException:
        # aiohttp runs no cleanup for a context whose startup failed: undo it here.
        await shutdown(rt)
        raise
    for port in rt.config.serial_ports():
        link = SerialLink(rt.manager, port)
        link.start()
        rt.serial_links.append(link)
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
    for link in rt.serial_links:
        await link.stop()
    rt.serial_links.clear()
    await rt.device_server.close()
    await rt.hub.stop()
    closing = [
        asyncio.wait_for(
            ws.close(code=WSCloseCode.GOING_AWAY, message=b"gateway shutting down"), 2.0
        )
        for ws in list(rt.sockets)
    ]
    await asyncio.gather(*closing, return_exceptions=True)


def create_app(config: GatewayConfig, tokens: TokenTable) -> web.Application:
    """The gateway as an aiohttp application (devices, storage and hub start with it)."""
    rt = build_runtime(config, tokens)
    app = web.Application(
        client_max_size=config.dashboards.max_message, middlewares=[rt.http.middleware]
    )
    app[RUNTIME] = rt
    app.cleanup_ctx.append(_lifecycle)
    app.on_shutdown.append(_on_shutdown)
    app.on_response_prepare.append(_page_headers)
    app.router.add_get("/ws", ws_handler)
    app.router.add_get("/api/devices", list_devices)
    app.router.add_get("/api/devices/{id}", get_device)
    app.router.add_get("/api/devices/{id}/telemetry", device_telemetry)
    app.router.add_post("/api/devices/{id}/commands", post_command)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/", index)
    static = _static_dir()
    if static.is_dir():
        app.router.add_static("/static/", static, name="static")
    return app
