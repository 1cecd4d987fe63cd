"""HTTP errors as JSON bodies, and the token check every handler starts with (docs/api.md §1-2).

Every answer under ``/api/`` is JSON, errors included: the handlers' own
refusals are built with ``http_error``, and ``json_errors`` (a middleware)
turns what aiohttp raises by itself (404 for an unknown path, 405, 413) and
any unexpected exception (500, its traceback logged once) into the same
``{"code", "message"}`` body.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Awaitable, Callable

from aiohttp import hdrs, web

from ..auth import bearer
from ..hub import ErrorCode, Role, dumps
from .context import WEB

log = logging.getLogger(__name__)

# The WebSocket subprotocol a dashboard asks for, and the prefix of the one
# that carries its token (docs/api.md §1): the page cannot put a token in a
# header of its WebSocket, and must not put it in the URL.
SUBPROTOCOL = "iot-gateway"
TOKEN_SUBPROTOCOL = "token."

# The ``code`` of each status aiohttp may raise by itself (docs/api.md §2).
_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "timeout",
    413: "too_large",
    429: "rate_limited",
    500: "internal_error",
    503: "unavailable",
}

# Headers of an aiohttp exception that describe its plain-text body.
_BODY_HEADERS = frozenset({hdrs.CONTENT_TYPE, hdrs.CONTENT_LENGTH, hdrs.CONTENT_ENCODING})


def http_error(
    cls: type[web.HTTPException],
    code: ErrorCode | str,
    message: str,
    headers: dict[str, str] | None = None,
) -> web.HTTPException:
    """An aiohttp HTTP exception whose body is ``{"code", "message"}``."""
    return cls(
        text=dumps({"code": str(code), "message": message}),
        content_type="application/json",
        headers=headers,
    )


def _is_json_path(path: str) -> bool:
    return path == "/api" or path.startswith("/api/")


def _json_answer(status: int, message: str, headers: dict[str, str]) -> web.Response:
    code = _CODES.get(status, "bad_request" if status < 500 else "internal_error")
    return web.Response(
        status=status,
        text=dumps({"code": code, "message": message}),
        content_type="application/json",
        headers=headers,
    )


@web.middleware
async def json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Under ``/api/``: every error answer as ``{"code", "message"}``; 500 for a crash.

    Elsewhere (the page, its files) aiohttp's own answers stand.
    """
    if not _is_json_path(request.path):
        return await handler(request)
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400 or e.content_type == "application/json":
            raise  # a redirect, or already one of ours
        headers = {k: v for k, v in e.headers.items() if k not in _BODY_HEADERS}
        return _json_answer(e.status, e.reason, headers)
    except ConnectionResetError:
        transport = request.transport
        if transport is not None and not transport.is_closing():
            # The client is still there: a link of the gateway's own failed (a bug).
            log.exception("error handling %s %s", request.method, request.path)
            return _json_answer(500, "internal error (logged by the gateway)", {})
        # The client went away mid-request (say, halfway through its body):
        # nobody is left to answer, and it is no fault of the gateway.
        log.debug("%s %s: the client closed the connection", request.method, request.path)
        return _json_answer(400, "the request was cut off", {})
    except Exception:
        # Logged here, once, with the traceback; aiohttp sees an answer, not a crash.
        log.exception("error handling %s %s", request.method, request.path)
        return _json_answer(500, "internal error (logged by the gateway)", {})


def subprotocol_token(request: web.Request) -> str | None:
    """The token a WebSocket offers as the subprotocol ``token.<base64url of the token>``.

    Read from the first ``Sec-WebSocket-Protocol`` header, the one aiohttp
    negotiates from: it must also offer ``iot-gateway`` (the protocol the
    gateway picks and echoes), else 400. Without an overlap aiohttp would log
    every offered protocol, the token among them, and a browser would refuse
    an answer that picks none.
    """
    header = request.headers.get(hdrs.SEC_WEBSOCKET_PROTOCOL)
    if not header:
        return None
    offered = [p.strip() for p in header.split(",")]
    carrying = [p for p in offered if p.startswith(TOKEN_SUBPROTOCOL)]
    if not carrying:
        return None
    if SUBPROTOCOL not in offered:
        raise http_error(
            web.HTTPBadRequest,
            ErrorCode.BAD_REQUEST,
            f"offer the {SUBPROTOCOL!r} subprotocol beside the token",
        )
    encoded = carrying[0][len(TOKEN_SUBPROTOCOL) :]
    try:
        return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()
    except (binascii.Error, ValueError):
        return None  # offered, but not base64url of UTF-8: no token, so 401


def presented_token(request: web.Request, *, websocket: bool = False) -> str | None:
    """The token of ``Authorization: Bearer``, of the subprotocol (``websocket``), or ``?token=``.

    ``?token=`` is for scripts; the page never puts a token in a URL.
    """
    return (
        bearer(request.headers.get(hdrs.AUTHORIZATION))
        or (subprotocol_token(request) if websocket else None)
        or request.query.get("token")
    )


def presented(request: web.Request, *, websocket: bool = False) -> tuple[Role, str]:
    """The caller's role and the configured token that grants it; 401 without one."""
    ctx = request.app[WEB]
    grant = ctx.tokens.grant(presented_token(request, websocket=websocket))
    if grant is None:
        raise http_error(
            web.HTTPUnauthorized,
            "unauthorized",
            "missing or wrong token",
            headers={"WWW-Authenticate": 'Bearer realm="iot-gateway"'},
        )
    return grant


def require(request: web.Request, role: Role | None = None, *, websocket: bool = False) -> Role:
    """The caller's role; 401 without a valid token, 403 when ``role`` is operator and it is not.

    ``websocket``: the token may also come as a subprotocol (``GET /ws``).
    """
    granted, _ = presented(request, websocket=websocket)
    if role is Role.OPERATOR and granted is not Role.OPERATOR:
        raise http_error(web.HTTPForbidden, ErrorCode.FORBIDDEN, "this needs an operator token")
    return granted
