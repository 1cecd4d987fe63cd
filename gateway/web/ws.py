"""``GET /ws``: a dashboard's WebSocket (docs/api.md §3), a thin skin over the hub.

The reader hands each JSON request to the hub; a writer task per dashboard
drains the dashboard's own queue at the pace of its socket, batching objects
into newline-separated frames. The hub never awaits a socket. When the hub
lets a dashboard go by itself (a bound reached), the writer closes the socket
with a close code that says so (docs/api.md §3, Closing).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import uuid

from aiohttp import WSCloseCode, WSMsgType, web

from ..auth import forwarded_origin, origin_allowed, parse_networks
from ..hub import Dashboard, ErrorCode, Refused, dumps, error_message
from ..hub.dashboard import CONTROL_QUEUE
from .context import WEB, WebContext
from .errors import SUBPROTOCOL, http_error, require

log = logging.getLogger(__name__)

# The close code of a dashboard the hub let go, by its ``close_reason``
# (docs/api.md §3). 1013, "try again later": the client did nothing wrong that
# a reconnect, with reading its socket, would not mend.
CLOSE_CODES: dict[str, int] = {CONTROL_QUEUE: WSCloseCode.TRY_AGAIN_LATER}
# Seconds the close frame may take to leave; past it the connection is aborted,
# so a client that stopped reading cannot hold it open.
CLOSE_TIMEOUT = 1.0
# Bytes the kernel may hold for a dashboard beyond what is in flight to it
# (TCP_NOTSENT_LOWAT, Linux and macOS). Without it a loopback or LAN socket
# whose client stopped reading takes megabytes (about 3 MB on Linux, 15,000
# messages) before the writer feels it, and the dashboard costs as much as
# one that reads until then; with it, the queue fills and the dashboard is
# parked after a few hundred kilobytes (docs/limits.md). In-flight data is
# not bounded by it, so a distant dashboard keeps its throughput.
NOTSENT_LOWAT = 128 * 1024


class _Writer:
    """Whether a dashboard's writer task has begun closing the socket itself."""

    __slots__ = ("closing",)

    def __init__(self) -> None:
        self.closing = False


async def ws_handler(request: web.Request) -> web.StreamResponse:
    """``GET /ws``: authenticate, check the Origin, then serve one dashboard."""
    ctx = request.app[WEB]
    role = require(request, websocket=True)
    # Behind a trusted reverse proxy the browser's scheme and host are the
    # forwarded ones (docs/api.md §1, docs/deployment.md).
    host, scheme = forwarded_origin(
        request.host,
        request.scheme,
        request.remote,
        request.headers,
        parse_networks(ctx.config.http.trusted_proxies),
    )
    log.debug(
        "origin check: Origin=%s Host=%s X-Forwarded-Proto=%s X-Forwarded-Host=%s "
        "X-Forwarded-For=%s peer=%s -> %s://%s",
        request.headers.get("Origin"),
        request.headers.get("Host"),
        request.headers.get("X-Forwarded-Proto"),
        request.headers.get("X-Forwarded-Host"),
        request.headers.get("X-Forwarded-For"),
        request.remote,
        scheme,
        host,
    )
    if not origin_allowed(
        request.headers.get("Origin"), host, scheme, ctx.config.auth.allowed_origins
    ):
        ctx.metrics.refused.labels("origin").inc()
        raise http_error(web.HTTPForbidden, ErrorCode.FORBIDDEN, "Origin not allowed")
    if not ctx.accepting:
        raise http_error(web.HTTPServiceUnavailable, "shutting_down", "the gateway is stopping")
    session = str(uuid.uuid4())
    try:
        dashboard = ctx.hub.connect_dashboard(role, session)
    except Refused as e:
        raise http_error(web.HTTPServiceUnavailable, "too_many_dashboards", str(e)) from None
    cfg = ctx.config.dashboards
    ws = web.WebSocketResponse(
        # Picked and echoed when offered (the page offers it with its token's
        # subprotocol); the token's own is never echoed.
        protocols=(SUBPROTOCOL,),
        compress=cfg.compression,
        max_msg_size=cfg.max_message,
        heartbeat=30.0,
    )
    try:
        await ws.prepare(request)
    except ConnectionError:
        # The client went away during the upgrade (a reset, a closed tab):
        # nothing to answer, and nothing to log past debug, since a peer that
        # does it in a loop must not fill the log with tracebacks.
        ctx.hub.disconnect_dashboard(dashboard)
        log.debug("dashboard %d left during the upgrade", dashboard.id)
        return web.Response(status=400)  # never sent: aiohttp finds the socket gone
    except BaseException:
        ctx.hub.disconnect_dashboard(dashboard)
        raise
    ctx.sockets.add(ws)
    _bound_unsent(request)
    dashboard.push_control(dumps({"op": "welcome", "session": session, "role": str(role)}))
    writer = _Writer()
    task = asyncio.create_task(
        _writer(ctx, ws, dashboard, request, writer), name=f"ws writer {dashboard.id}"
    )
    try:
        async for msg in ws:
            if msg.type is WSMsgType.TEXT:
                await _on_text(ctx, dashboard, msg.data)
            elif msg.type is WSMsgType.BINARY:
                dashboard.push_control(
                    dumps(error_message(None, ErrorCode.BAD_REQUEST, "send JSON in text frames"))
                )
            elif msg.type is WSMsgType.ERROR:
                log.debug("dashboard %d: %s", dashboard.id, ws.exception())
    finally:
        ctx.hub.disconnect_dashboard(dashboard)
        ctx.sockets.discard(ws)
        # A writer closing the socket for the hub ends within CLOSE_TIMEOUT by
        # itself; cancelled, its close frame could be cut off.
        if not writer.closing:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    return ws


def _bound_unsent(request: web.Request) -> None:
    """Set ``NOTSENT_LOWAT`` on the dashboard's socket, where the platform has it."""
    option = getattr(socket, "TCP_NOTSENT_LOWAT", None)
    transport = request.transport
    sock = None if transport is None else transport.get_extra_info("socket")
    if option is None or sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, option, NOTSENT_LOWAT)
    except (OSError, AttributeError) as e:
        # Not a TCP socket (a test transport), or refused: the queue still bounds
        # what waits here, the kernel only holds more before the writer feels it.
        log.debug("TCP_NOTSENT_LOWAT not set on a dashboard's socket: %s", e)


async def _on_text(ctx: WebContext, dashboard: Dashboard, text: str) -> None:
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        dashboard.push_control(dumps(error_message(None, ErrorCode.BAD_REQUEST, "not valid JSON")))
        return
    await ctx.hub.handle(dashboard, obj)


async def _writer(
    ctx: WebContext,
    ws: web.WebSocketResponse,
    dashboard: Dashboard,
    request: web.Request,
    state: _Writer,
) -> None:
    """Send the dashboard's queue, batching objects into newline-separated frames."""
    cfg = ctx.config.dashboards
    try:
        while True:
            await dashboard.wait()
            items = dashboard.take(cfg.batch_max_items)
            if not items:
                if dashboard.closed:
                    if dashboard.close_reason is not None:
                        state.closing = True
                        await _close_for_hub(ws, request, dashboard.close_reason)
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
                    ctx.metrics.send_latency.observe(loop_now - received)
            except TimeoutError:
                ctx.metrics.slow_dashboards_closed.inc()
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


async def _close_for_hub(ws: web.WebSocketResponse, request: web.Request, reason: str) -> None:
    """The hub let the dashboard go: close with the reason's code, never waiting long.

    Without this a client that still reads, however slowly, would keep a
    socket the hub no longer serves. The close frame gets ``CLOSE_TIMEOUT``
    to leave, and so does what is left in the transport's buffer after it.
    """
    transport = request.transport
    code = CLOSE_CODES.get(reason, WSCloseCode.TRY_AGAIN_LATER)
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT):
            await ws.close(code=code, message=reason.encode()[:123])
    except TimeoutError:
        if transport is not None:
            transport.abort()
        return
    if transport is not None and transport.get_write_buffer_size():
        # Closed gracefully, the transport would wait for a reader that may never come.
        asyncio.get_running_loop().call_later(CLOSE_TIMEOUT, transport.abort)
