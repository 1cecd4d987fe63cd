"""Bounds on the HTTP port's connections and on the process's file descriptors.

Every connection, on either port, costs one file descriptor, and the process
has a fixed number of them (``ulimit -n``). Without a bound, a few hundred
clients that open HTTP connections and send their headers a byte at a time
(slow-loris) use them all up; the device port then cannot accept, and a
gateway whose API is merely being abused stops taking device data. So:

* at start the soft descriptor limit is raised to the hard one, and the two
  connection limits (``devices.max_connections``, ``http.max_connections``)
  are fitted inside it, with a warning that says what was lowered;
* at ``http.max_connections`` a new HTTP connection first evicts the oldest
  one that has no request in progress (idle keep-alive, or headers still
  trickling in); only when every connection is busy is it refused with a 503;
* a connection with no request in progress is closed after
  ``http.idle_timeout`` (aiohttp's keep-alive timer, which also runs before
  the first request), and a request body must arrive within the same time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import resource
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from aiohttp.web_protocol import RequestHandler

    from ..config import GatewayConfig

log = logging.getLogger(__name__)

# Descriptors the process needs besides connections: SQLite (database, WAL and
# shared memory, for the writer and the readers), the listening sockets, the
# event loop's own, log files, a thread pool's pipes. Measured here at about
# 30; twice that leaves room.
RESERVED_FDS = 64
# When the configured limits do not fit, the HTTP port gets at most this share
# of what is left: the device port is what the gateway is for.
HTTP_SHARE = 0.2
# Cap on how far the soft limit is raised (some systems report a huge hard limit).
FD_CEILING = 1 << 20

_REFUSAL_BODY = b'{"code":"unavailable","message":"too many HTTP connections, try again shortly"}'
REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Content-Type: application/json\r\n"
    b"Connection: close\r\n"
    b"Retry-After: 1\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(_REFUSAL_BODY), _REFUSAL_BODY)
)


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (at most ``FD_CEILING``); return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = FD_CEILING if hard == resource.RLIM_INFINITY else min(hard, FD_CEILING)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError) as e:  # a sandbox may forbid it: live with the soft limit
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, want, e)
    return FD_CEILING if soft == resource.RLIM_INFINITY else soft


def fit_to_fd_limit(config: GatewayConfig, fd_limit: int) -> tuple[GatewayConfig, list[str]]:
    """Lower the connection limits so that they fit in ``fd_limit`` descriptors.

    Returns the (possibly) adjusted config and one warning per lowered limit.
    Dashboards are HTTP connections too, so ``dashboards.max_dashboards`` stays
    below ``http.max_connections`` with a quarter of it (at most 256) spare
    for the page and the API.
    """
    devices = config.devices.max_connections
    http = config.http.max_connections
    dashboards = config.dashboards.max_dashboards
    available = max(fd_limit - RESERVED_FDS - len(config.serial), 16)
    if devices + http <= available:
        return config, []
    new_http = min(http, max(8, int(available * HTTP_SHARE)))
    new_devices = min(devices, available - new_http)
    new_dashboards = dashboards
    if dashboards >= new_http:
        new_dashboards = new_http - min(256, max(1, new_http // 4))
    notes = []
    why = f"to fit the open-file limit of {fd_limit} (raise it with ulimit -n)"
    for key, old, new in (
        ("devices.max_connections", devices, new_devices),
        ("http.max_connections", http, new_http),
        ("dashboards.max_dashboards", dashboards, new_dashboards),
    ):
        if new < old:
            notes.append(f"{key} lowered from {old} to {new} {why}")
    fitted = dataclasses.replace(
        config,
        devices=dataclasses.replace(config.devices, max_connections=new_devices),
        http=dataclasses.replace(config.http, max_connections=new_http),
        dashboards=dataclasses.replace(config.dashboards, max_dashboards=new_dashboards),
    )
    return fitted, notes


class _Refuse(asyncio.Protocol):
    """Answers one connection with a 503 and closes it (nothing is read)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(REFUSAL)
        transport.close()


@dataclasses.dataclass(slots=True)
class HttpConnectionStats:
    """What the HTTP connection cap did (exported on /metrics)."""

    refused: int = 0
    evicted: int = 0


class HttpConnectionCap:
    """At most ``limit`` HTTP connections; idle ones make room for new ones.

    ``busy`` holds the connections with a request in progress (the
    ``middleware`` keeps it: a WebSocket stays busy for its whole life).
    ``factory(server)`` wraps aiohttp's protocol factory for ``create_server``.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.busy: set[RequestHandler] = set()
        self.stats = HttpConnectionStats()
        self.on_refused: Callable[[], None] = lambda: None
        self._server: web.Server | None = None

    def open_connections(self) -> int:
        """HTTP connections open now (those closing excluded)."""
        if self._server is None:
            return 0
        return sum(1 for h in self._server.connections if h.transport is not None)

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Marks the connection busy while ``handler`` runs."""
        protocol = request.protocol
        self.busy.add(protocol)
        try:
            return await handler(request)
        finally:
            self.busy.discard(protocol)

    def factory(self, server: web.Server) -> Callable[[], asyncio.BaseProtocol]:
        """The protocol factory to listen with: ``server()`` unless the cap says otherwise."""
        self._server = server

        def make() -> asyncio.BaseProtocol:
            # server.connections keeps a handler until its task ends; one that
            # is already closing (transport None) holds no slot any more.
            live = [h for h in server.connections if h.transport is not None]
            if len(live) >= self.limit:
                idle = next((h for h in live if h not in self.busy), None)
                if idle is None:
                    self.stats.refused += 1
                    self.on_refused()
                    return _Refuse()
                self.stats.evicted += 1
                idle.force_close()
            return server()

        return make


class CappedSite(web.BaseSite):
    """A TCP site, as aiohttp's ``TCPSite``, whose connections pass an ``HttpConnectionCap``."""

    def __init__(
        self, runner: web.BaseRunner, host: str, port: int, cap: HttpConnectionCap
    ) -> None:
        super().__init__(runner, backlog=1024)
        self._host = host
        self._port = port
        self._cap = cap
        self._listener: asyncio.Server | None = None

    @property
    def name(self) -> str:
        """The URL it serves, as aiohttp's sites name themselves."""
        host, port = self.address if self._listener is not None else (self._host, self._port)
        return f"http://{host}:{port}"

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) actually bound (``port`` 0 asks the system for one)."""
        assert self._listener is not None, "start() first"
        name = self._listener.sockets[0].getsockname()
        return str(name[0]), int(name[1])

    async def start(self) -> None:
        """Listen on (host, port) with the capped protocol factory."""
        await super().start()  # registers the site with the runner
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        self._listener = await loop.create_server(
            self._cap.factory(server), self._host, self._port, backlog=self._backlog
        )
        self._server = self._listener  # what BaseSite.stop closes
