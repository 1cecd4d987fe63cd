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
from typing import TYPE_CHECKING, cast

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

# A connection refused at http.max_connections: how long its answer may take to
# reach the client, how much of its request is read and dropped meanwhile, and
# how many such connections may wait at once (each holds a descriptor, taken
# from the RESERVED_FDS room).
REFUSAL_LINGER = 2.0
REFUSAL_DRAIN_BYTES = 64 * 1024
MAX_LINGERING = 16

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
    """Answers one connection with a 503, then closes it without destroying the answer.

    Closing a socket that still has unread input makes the kernel send a
    reset, which can discard the answer before the client has read it (the
    client has usually sent its request by then). So the answer is followed by
    a half-close (FIN), what the client still sends is read and dropped until it
    closes its end, and only then (or after ``REFUSAL_LINGER`` seconds, or
    ``REFUSAL_DRAIN_BYTES`` bytes) is the socket closed: HTTP servers call this
    a lingering close. At most ``MAX_LINGERING`` refusals linger at once; past
    that a refusal is closed at once, so a flood of refused connections holds
    no more descriptors than that.
    """

    def __init__(self, cap: HttpConnectionCap) -> None:
        self._cap = cap
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._drained = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not derive from asyncio.WriteTransport (an
        # isinstance check here once meant no answer at all on uvloop), so cast.
        t = cast(asyncio.Transport, transport)
        self._transport = t
        t.write(REFUSAL)
        if len(self._cap.lingering) >= MAX_LINGERING or not t.can_write_eof():
            t.close()
            return
        t.write_eof()
        self._cap.lingering.add(self)
        self._timer = asyncio.get_running_loop().call_later(REFUSAL_LINGER, self.close)

    def data_received(self, data: bytes) -> None:
        self._drained += len(data)
        if self._drained > REFUSAL_DRAIN_BYTES:
            self.close()

    def eof_received(self) -> bool:
        return False  # the client is done too: the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._cap.lingering.discard(self)
        if self._timer is not None:
            self._timer.cancel()

    def close(self) -> None:
        """Close now (the answer has been sent, or the linger time is over)."""
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()


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
        # Refused connections whose 503 is still on its way (see _Refuse).
        self.lingering: set[_Refuse] = set()
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

    def close_refused(self) -> None:
        """Close the refused connections still lingering (the gateway is stopping)."""
        for refusal in list(self.lingering):
            refusal.close()

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
                    return _Refuse(self)
                self.stats.evicted += 1
                idle.force_close()
            return server()

        return make


ProtocolFactory = Callable[[], asyncio.BaseProtocol]


class CappedSite(web.BaseSite):
    """A TCP site, as aiohttp's ``TCPSite``, whose connections pass an ``HttpConnectionCap``."""

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        cap: HttpConnectionCap,
        *,
        wrap: Callable[[ProtocolFactory], ProtocolFactory] | None = None,
    ) -> None:
        super().__init__(runner, backlog=1024)
        self._host = host
        self._port = port
        self._cap = cap
        # TLS (docs/tls.md): wraps the factory so each connection handshakes first.
        self._wrap = wrap
        self._listener: asyncio.Server | None = None

    @property
    def name(self) -> str:
        """The URL it serves, as aiohttp's sites name themselves."""
        host, port = self.address if self._listener is not None else (self._host, self._port)
        return f"{'https' if self._wrap else 'http'}://{host}:{port}"

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
        factory = self._cap.factory(server)
        if self._wrap is not None:
            factory = self._wrap(factory)
        self._listener = await loop.create_server(
            factory, self._host, self._port, backlog=self._backlog
        )
        self._server = self._listener  # what BaseSite.stop closes

    async def stop(self) -> None:
        """Stop listening; refused connections still lingering are closed too."""
        self._cap.close_refused()
        await super().stop()
