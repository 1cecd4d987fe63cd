"""The HTTP API (docs/api.md §4): devices, labels, telemetry history (JSON or CSV),
commands and their history, health, metrics.

Handlers check the token, translate the request into a hub call, and the
result into JSON; no routing rule lives here.
"""

from __future__ import annotations

import asyncio
import csv
import io
import re
from collections.abc import Callable, Sequence
from typing import Any

from aiohttp import web

from ..hub import (
    ClientError,
    DeviceIsOnline,
    ErrorCode,
    Role,
    dumps,
    parse_command,
    telemetry_message,
)
from ..hub.commands import STORAGE_UNAVAILABLE, is_storage_unavailable
from ..hub.records import StorageUnavailable, StoreError, TelemetryRecord
from ..hub.registry import check_labels
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


def _no_such_device() -> web.HTTPException:
    return http_error(web.HTTPNotFound, ErrorCode.NOT_FOUND, "no such device")


async def get_device(request: web.Request) -> web.Response:
    """``GET /api/devices/{id}``."""
    require(request)
    entry = request.app[WEB].hub.device_entry(request.match_info["id"])
    if entry is None:
        raise _no_such_device()
    return web.json_response(entry, dumps=dumps)


async def put_labels(request: web.Request) -> web.Response:
    """``PUT /api/devices/{id}/labels`` (operator): set a device's labels -> 200 + its entry."""
    require(request, Role.OPERATOR)
    hub = request.app[WEB].hub
    device = request.match_info["id"]
    if device not in hub.registry:
        raise _no_such_device()
    body = await _json_body(request)
    try:
        labels = check_labels(body)
    except ValueError as e:
        raise http_error(web.HTTPBadRequest, ErrorCode.BAD_REQUEST, str(e)) from None
    try:
        entry = await hub.set_labels(device, labels)
    except KeyError:
        raise _no_such_device() from None
    except StorageUnavailable as e:
        raise _storage_unavailable(str(e)) from None
    return web.json_response(entry, dumps=dumps)


async def delete_device(request: web.Request) -> web.Response:
    """``DELETE /api/devices/{id}`` (operator): forget an offline device and its data.

    200 ``{"device", "deleted": true}``; 409 ``conflict`` while it is online.
    """
    require(request, Role.OPERATOR)
    hub = request.app[WEB].hub
    device = request.match_info["id"]
    try:
        await hub.delete_device(device)
    except KeyError:
        raise _no_such_device() from None
    except DeviceIsOnline:
        raise http_error(
            web.HTTPConflict,
            "conflict",
            "the device is online: only an offline device can be deleted",
        ) from None
    except StorageUnavailable as e:
        raise _storage_unavailable(str(e)) from None
    return web.json_response({"device": device, "deleted": True}, dumps=dumps)


# A command_id as the gateway makes them (32 hex digits), with room for other nodes' forms.
_COMMAND_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


async def get_command(request: web.Request) -> web.Response:
    """``GET /api/commands/{command_id}``: a command's latest status and its history."""
    require(request)
    hub = request.app[WEB].hub
    command_id = request.match_info["command_id"]
    if not _COMMAND_ID.fullmatch(command_id):
        raise http_error(
            web.HTTPBadRequest,
            ErrorCode.BAD_REQUEST,
            "a command_id has 1 to 64 characters of A-Za-z0-9._:-",
        )
    try:
        found = await hub.command_log(command_id)
    except StorageUnavailable as e:
        raise _storage_unavailable(str(e)) from None
    if found is None:
        raise http_error(
            web.HTTPNotFound,
            ErrorCode.NOT_FOUND,
            "no such command (unknown, or its last status is over a day old)",
        )
    return web.json_response(
        {
            "command_id": found.gateway_id,
            "id": found.request_id,
            "device": found.device,
            "status": found.status,
            "history": found.history,
        },
        dumps=dumps,
    )


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


# The largest page of history, for ``limit`` and ``last``.
MAX_HISTORY_PAGE = 1000
MAX_MS = 2**63 - 1


def _wants_csv(request: web.Request) -> bool:
    """``format=csv``, or ``Accept: text/csv`` without ``format`` (docs/api.md §4)."""
    fmt = request.query.get("format")
    if fmt is not None:
        if fmt not in ("csv", "json"):
            raise http_error(
                web.HTTPBadRequest, ErrorCode.BAD_REQUEST, "format must be json or csv"
            )
        return fmt == "csv"
    return "text/csv" in request.headers.get("Accept", "")


async def device_telemetry(request: web.Request) -> web.StreamResponse:
    """``GET /api/devices/{id}/telemetry``: stored telemetry, oldest first, JSON or CSV.

    ``since``/``limit`` page forward by offset; ``last=N`` gives the newest N;
    ``from``/``to`` (unix ms, from inclusive, to exclusive) keep a time range,
    alone or with either. ``next`` is the ``since`` of the following page, null
    when there is none (docs/api.md §4).
    """
    require(request)
    hub = request.app[WEB].hub
    device = request.match_info["id"]
    csv_wanted = _wants_csv(request)  # a bad format is refused before anything is read
    if device not in hub.registry:
        raise _no_such_device()
    since = _int_param(request, "since", 0, -1, MAX_MS)
    limit = _int_param(request, "limit", 100, 1, MAX_HISTORY_PAGE)
    last = _int_param(request, "last", 0, 1, MAX_HISTORY_PAGE) if "last" in request.query else 0
    from_ts = _int_param(request, "from", 0, 0, MAX_MS) if "from" in request.query else None
    to_ts = _int_param(request, "to", 0, 0, MAX_MS) if "to" in request.query else None
    if last and ("since" in request.query or "limit" in request.query):
        raise http_error(
            web.HTTPBadRequest,
            ErrorCode.BAD_REQUEST,
            "last gives the newest N: it takes neither since nor limit",
        )
    if from_ts is not None and to_ts is not None and to_ts < from_ts:
        raise http_error(web.HTTPBadRequest, ErrorCode.BAD_REQUEST, "to must not be before from")
    try:
        records = await hub.history(
            device,
            since,
            last or limit,
            from_ts=from_ts,
            to_ts=to_ts,
            newest=bool(last),
        )
    except StoreError:
        # A full disk or a damaged file: what was asked may be unreadable or not
        # yet written, and the storage heals by itself (``/healthz`` says when).
        # The storage's own message names its file: the caller gets the reason only.
        why = hub.engine.health().failing or "the telemetry history could not be read"
        raise _storage_unavailable(f"{STORAGE_UNAVAILABLE}: {why}") from None
    # A full page may have a following one; "last" is one page by definition.
    following = records[-1].offset if records and not last and len(records) == limit else None
    if csv_wanted:
        return _csv_response(device, records, hub.out_of_range, following)
    return web.json_response(
        {
            "device": device,
            "telemetry": [telemetry_message(r, hub.out_of_range(r)) for r in records],
            "next": following,
        },
        dumps=dumps,
    )


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    """``{"a": {"b": 1}, "c": [x, y]}`` -> ``a.b``, ``c.0``, ``c.1`` (CSV columns)."""
    if isinstance(value, dict) and value:
        for key, inner in value.items():
            _flatten(inner, f"{prefix}.{key}" if prefix else str(key), out)
    elif isinstance(value, list) and value:
        for i, inner in enumerate(value):
            _flatten(inner, f"{prefix}.{i}" if prefix else str(i), out)
    else:
        out[prefix] = value


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return dumps(value)  # an empty one
    return str(value)


def _csv_response(
    device: str,
    records: Sequence[TelemetryRecord],
    flag: Callable[[TelemetryRecord], Sequence[str] | None],
    following: int | None,
) -> web.Response:
    """The history as CSV: ``offset,ts,seq``, the data fields flattened, ``out_of_range``.

    The columns are every data field met, in the order first met; a message
    without a field leaves its cell empty. ``out_of_range`` lists the fields
    separated by spaces. ``next`` is in the ``X-Next`` header (empty on the last page).
    """
    rows: list[tuple[TelemetryRecord, dict[str, Any], Sequence[str] | None]] = []
    columns: dict[str, None] = {}
    for record in records:
        flat: dict[str, Any] = {}
        _flatten(record.data, "", flat)
        columns.update(dict.fromkeys(flat))
        rows.append((record, flat, flag(record)))
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(["offset", "ts", "seq", *columns, "out_of_range"])
    for record, flat, bad in rows:
        writer.writerow(
            [
                record.offset,
                record.ts,
                record.seq,
                *(_cell(flat.get(c)) for c in columns),
                " ".join(bad or ()),
            ]
        )
    return web.Response(
        text=out.getvalue(),
        content_type="text/csv",
        charset="utf-8",
        headers={
            "Content-Disposition": f'attachment; filename="{device}.csv"',
            "X-Next": "" if following is None else str(following),
        },
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
    body = await _json_body(request)
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


async def _json_body(request: web.Request) -> Any:
    """The request's JSON body: 413 over ``dashboards.max_message``, 408 when it does not
    arrive within ``http.idle_timeout``, 400 when it is not JSON (docs/api.md §2)."""
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
    return body


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
    if ctx.mqtt_state is not None:
        # A broker away is shown, not a failure of the node: devices and dashboards carry on.
        body["mqtt"] = ctx.mqtt_state()
    cluster = getattr(ctx.hub.engine, "cluster_status", None)
    if cluster is not None:
        # docs/cluster.md: degraded while Redis is unreachable, so a load
        # balancer sends new devices to another node.
        body["cluster"] = cluster()
        if body["cluster"]["state"] != "ok" and ctx.accepting:
            body["status"] = "degraded"
    if health.ok:
        return web.json_response(body, status=503 if body["status"] == "degraded" else 200)
    body["storage"] = {"status": "failing", "error": health.failing, "since": health.since_ms}
    if ctx.accepting:
        body["status"] = "degraded"
    return web.json_response(body, status=503)


async def metrics(request: web.Request) -> web.Response:
    """``GET /metrics``: Prometheus text format."""
    return web.Response(
        body=request.app[WEB].metrics.render(), headers={"Content-Type": CONTENT_TYPE}
    )
