"""``GET /api/serial``: every configured serial port and its state (docs/api.md §4).

The web skin does not import the device side: the composition root
(``gateway.app``) puts a function listing the ports under ``SERIAL_PORTS``,
and ``SERIAL_SUMMARY`` for the ``serial`` field of ``/healthz``. An
application without them (a test's) lists no ports.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web

from ..hub import dumps
from .errors import require

# Each port as a JSON object: url, client_id, protocol, state, since, error.
SerialPorts = Callable[[], list[dict[str, Any]]]
# How many ports are open, retrying and missing.
SerialSummary = Callable[[], dict[str, int]]

SERIAL_PORTS: web.AppKey[SerialPorts] = web.AppKey("serial_ports")
SERIAL_SUMMARY: web.AppKey[SerialSummary] = web.AppKey("serial_summary")

NO_PORTS = {"open": 0, "retrying": 0, "missing": 0}


def serial_summary(app: web.Application) -> dict[str, int]:
    """The ``serial`` field of ``/healthz``: ports open, retrying and missing."""
    summary = app.get(SERIAL_SUMMARY)
    return dict(NO_PORTS) if summary is None else summary()


async def list_serial_ports(request: web.Request) -> web.Response:
    """``GET /api/serial`` (any token): ``{"ports": [...]}``, in configuration order."""
    require(request)
    ports = request.app.get(SERIAL_PORTS)
    return web.json_response({"ports": [] if ports is None else ports()}, dumps=dumps)
