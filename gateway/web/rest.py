"""The HTTP API (docs/api.md §4): devices, telemetry history, commands, health, metrics.

Handlers check the token, translate the request into a hub call, and the
result into JSON; no routing rule lives here.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from ..hub import ClientError, ErrorCode, Role, dumps, parse_command, telemetry_message
from ..hub.commands import STORAGE_UNAVAILABLE, is_storage_unavailable
from ..hub.records import StoreError
from ..metrics import CONTENT_TYPE
from .context import WEB
from .errors import http_error, presented, require
from .serial import serial_summary

# The code of a 503 to a request that needs the storage while it fails.
STORAGE_UNAVAILABLE_CODE = "storage_unavailable"
# Seconds a caller refused for a failing storage is told to wait (``Retry-After``).
STORAGE_RETRY_AFTER = 5


def _storage_unavailable(message: str) -> web.HTTPException:
    """503 ``storage_unavailable``: not the caller's fault, try again (docs/api.md §4)."""
    return http_error(
        web.HTTPServiceUnavailable,
        STORAGE_UNAVAILABLE_CODE,
        message,
        headers={"Retry-After": str(STORAGE_RETRY_AFTER)},
    )


# The longest ``after`` that can name a device: a client_id has 1 to 64 characters.
MAX_AFTER = 64


async def list_devices(request: web.Request) -> web.Response:
    """``GET /api/devices?after=ID&limit=N``: a page of the known devices, by id.

    Paged like the WebSocket's ``devices`` (docs/api.md §3.2, §4): at most
    ``dashboards.devices_page_size`` entries, and ``next``, the ``after`` of
    the following page (null on the last one). A whole listing of 100,000
    devices in one answer was some 30 MB built on the loop.
    """
    require(request)
    hub = request.app[WEB].hub
    after = request.query.get("after")
    if after is not None and not 0 < len(after) <= MAX_AFTER:
        raise http_error(
            web.HTTPBadRequest,
            ErrorCode.BAD_REQUEST,
            f"after must be a device id (1 to {MAX_AFTER} characters)",
        )
    page = hub.config.devices_page_size
    limit = page
    raw = request.query.get("limit")
    if raw is not None:
        # Digits only (int() would take " 5", "+5" and "5_0"), and not thousands of them.
        limit = int(raw) if raw.isascii() and raw.isdecimal() and len(raw) <= 30 else 0
        if limit < 1:
            raise http_error(
                web.HTTPBadRequest, ErrorCode.BAD_REQUEST, "limit must be a positive integer"
            )
    # A larger limit gives a full page, as on the WebSocket.
    devices, following = hub.devices_page(after, min(limit, page))
    return web.json_response({"devices": devices, "next": following}, dumps=dumps)


async def get_device(request: web.Request) -> web.Response:
    """``GET /api/devices/{id}``."""
    require(request)
    state = request.app[WEB].hub.registry.get(request.match_info["id"])
    if state is None:
        raise http_error(web.HTTPNotFound, ErrorCode.NOT_FOUND, "no such device")
    return web.json_response(state.listing(), dumps=dumps)


def _int_param(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise http_error(
            web.HTTPBadRequest, ErrorCode.BAD_REQUEST, f"{name} must be an integer"
        ) from None
    if not low <= value <= high:
        raise http_error(
            web.HTTPBadRequest, ErrorCode.BAD_REQUEST, f"{name} must be in {low}..{high}"
        )
    return value


async def device_telemetry(request: web.Request) -> web.Response:
    """``GET /api/devices/{id}/telemetry?since=OFFSET&limit=N``, oldest first."""
    require(request)
    hub = request.app[WEB].hub
    device = request.match_info["id"]
    if device not in hub.registry:
        raise http_error(web.HTTPNotFound, ErrorCode.NOT_FOUND, "no such device")
    since = _int_param(request, "since", 0, -1, 2**63 - 1)
    limit = _int_param(request, "limit", 100, 1, 1000)
    try:
        records = await hub.history(device, since, limit)
    except StoreError:
        # A full disk or a damaged file: what was asked may be unreadable or not
        # yet written, and the storage heals by itself (``/healthz`` says when).
        # The storage's own message names its file: the caller gets the reason only.
        why = hub.engine.health().failing or "the telemetry history could not be read"
        raise _storage_unavailable(f"{STORAGE_UNAVAILABLE}: {why}") from None
    return web.json_response(
        {"device": device, "telemetry": [telemetry_message(r) for r in records]}, dumps=dumps
    )


def _take_command(request: web.Request, token: str) -> None:
    """Spend one of the token's commands; past the rate, 429 with ``Retry-After``."""
    ctx = request.app[WEB]
    rates = ctx.command_rates()
    if not rates.take(token, asyncio.get_running_loop().time()):
        ctx.metrics.refused.labels("command_rate").inc()
        raise http_error(
            web.HTTPTooManyRequests,
            ErrorCode.RATE_LIMITED,
            f"over {rates.rate:g} commands per second for this token",
            headers={"Retry-After": str(rates.retry_after())},
        )


async def post_command(request: web.Request) -> web.Response:
    """``POST /api/devices/{id}/commands`` with ``{"command": {...}}`` -> 202 + first status."""
    role, token = presented(request)
    if role is not Role.OPERATOR:
        raise http_error(web.HTTPForbidden, ErrorCode.FORBIDDEN, "this needs an operator token")
    # Before the body is read: a flood is refused at the least cost.
    _take_command(request, token)
    ctx = request.app[WEB]
    limit = ctx.config.dashboards.max_message
    too_large = web.HTTPRequestEntityTooLarge(
        max_size=limit,
        actual_size=request.content_length or limit + 1,
        text=dumps({"code": str(ErrorCode.TOO_LARGE), "message": f"body over {limit} bytes"}),
        content_type="application/json",
    )
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    wait = ctx.config.http.idle_timeout
    try:
        # A body that never arrives would hold the connection busy for ever.
        async with asyncio.timeout(wait):
            body = await request.json()
    except TimeoutError:
        raise http_error(
            web.HTTPRequestTimeout, "timeout", f"request body not received within {wait:g} s"
        ) from None
    except web.HTTPRequestEntityTooLarge:
        raise too_large from None  # a chunked body that grew past client_max_size
    except ValueError:
        raise http_error(web.HTTPBadRequest, ErrorCode.BAD_REQUEST, "body is not JSON") from None
    except RecursionError:
        # json.loads recurses per level: a body of 60,000 "[" is valid-looking and bottomless.
        raise http_error(
            web.HTTPBadRequest, ErrorCode.BAD_REQUEST, "body is nested too deeply"
        ) from None
    if not isinstance(body, dict) or not isinstance(body.get("command"), dict):
        raise http_error(
            web.HTTPBadRequest, ErrorCode.BAD_REQUEST, 'body must be {"command": {...}}'
        )
    statuses: list[dict[str, Any]] = []
    device = request.match_info["id"]
    msg = {"id": body.get("id"), "device": device, "command": body["command"]}
    try:
        await ctx.hub.submit_command(parse_command(msg), statuses.append)
    except ClientError as e:
        raise http_error(web.HTTPBadRequest, e.code, e.message) from None
    first = statuses[0]
    if is_storage_unavailable(first):
        # Not the caller's fault: the command could not be kept (docs/api.md §4).
        raise _storage_unavailable(first["error"])
    if first["status"] == "rejected":
        status = 404 if device not in ctx.hub.registry else 400
        return web.json_response(first, status=status, dumps=dumps)
    return web.json_response(first, status=202, dumps=dumps)


async def healthz(request: web.Request) -> web.Response:
    """``GET /healthz``: no token; 503 ``degraded`` while the node cannot do its job.

    That is, while its storage cannot keep what it is given (docs/api.md §4),
    so a load balancer or a monitor sees it without reading ``/metrics``.
    """
    ctx = request.app[WEB]
    health = ctx.hub.engine.health()
    body: dict[str, Any] = {
        "status": "ok" if ctx.accepting else "stopping",
        "devices_online": ctx.hub.online_count(),
        "dashboards": len(ctx.hub.dashboards),
        "storage": {"status": "ok"},
        # A missing serial port is shown, not a failure of the node: the status stays 200.
        "serial": serial_summary(request.app),
    }
    if health.ok:
        return web.json_response(body)
    body["storage"] = {"status": "failing", "error": health.failing, "since": health.since_ms}
    if ctx.accepting:
        body["status"] = "degraded"
    return web.json_response(body, status=503)


async def metrics(request: web.Request) -> web.Response:
    """``GET /metrics``: Prometheus text format."""
    return web.Response(
        body=request.app[WEB].metrics.render(), headers={"Content-Type": CONTENT_TYPE}
    )
