"""The aiohttp skin over the hub (docs/architecture.md): WebSocket, HTTP API, the page.

Handlers only translate between HTTP/WebSocket and the routing core. What
leans on aiohttp's internals (connection caps) is in ``connections`` alone.
``add_routes`` mounts every handler on an application whose ``WEB`` key holds
a ``WebContext``; the composition root (``gateway.app``) builds both.
"""

from __future__ import annotations

from aiohttp import web

from . import rest, serial
from .context import WEB, WebContext
from .errors import json_errors
from .page import index, page_headers, static_dir
from .ws import ws_handler


def add_routes(app: web.Application) -> None:
    """Mount the WebSocket, the HTTP API, health, metrics and the page.

    Also adds the middleware that makes every ``/api/`` error JSON (after any
    the application was made with, so the connection cap still sees each request).
    """
    app.middlewares.append(json_errors)
    app.on_response_prepare.append(page_headers)
    app.router.add_get("/ws", ws_handler)
    app.router.add_get("/api/devices", rest.list_devices)
    app.router.add_get("/api/devices/{id}", rest.get_device)
    app.router.add_delete("/api/devices/{id}", rest.delete_device)
    app.router.add_put("/api/devices/{id}/labels", rest.put_labels)
    app.router.add_get("/api/devices/{id}/telemetry", rest.device_telemetry)
    app.router.add_post("/api/devices/{id}/commands", rest.post_command)
    app.router.add_get("/api/serial", serial.list_serial_ports)
    app.router.add_get("/api/commands/{command_id}", rest.get_command)
    app.router.add_get("/healthz", rest.healthz)
    app.router.add_get("/metrics", rest.metrics)
    app.router.add_get("/", index)
    static = static_dir()
    if static.is_dir():
        app.router.add_static("/static/", static, name="static")


__all__ = ["WEB", "WebContext", "add_routes"]
