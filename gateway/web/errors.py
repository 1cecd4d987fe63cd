"""HTTP errors as JSON bodies, and the token check every handler starts with (docs/api.md §1-2)."""

from __future__ import annotations

from aiohttp import web

from ..auth import bearer
from ..hub import ErrorCode, Role, dumps
from .context import WEB


def http_error(
    cls: type[web.HTTPException], code: ErrorCode | str, message: str
) -> web.HTTPException:
    """An aiohttp HTTP exception whose body is ``{"code", "message"}``."""
    return cls(text=dumps({"code": str(code), "message": message}), content_type="application/json")


def presented_token(request: web.Request) -> str | None:
    """The token of ``Authorization: Bearer`` or, for scripts, ``?token=``."""
    return bearer(request.headers.get("Authorization")) or request.query.get("token")


def require(request: web.Request, role: Role | None = None) -> Role:
    """The caller's role; 401 without a valid token, 403 when ``role`` is operator and it is not."""
    ctx = request.app[WEB]
    granted = ctx.tokens.role_of(presented_token(request))
    if granted is None:
        raise web.HTTPUnauthorized(
            text=dumps({"code": "unauthorized", "message": "missing or wrong token"}),
            content_type="application/json",
            headers={"WWW-Authenticate": 'Bearer realm="iot-gateway"'},
        )
    if role is Role.OPERATOR and granted is not Role.OPERATOR:
        raise http_error(web.HTTPForbidden, ErrorCode.FORBIDDEN, "this needs an operator token")
    return granted
