"""The TCP listener for devices: one asyncio Protocol and one DeviceSession per connection.

asyncio's Protocol API (callbacks, no task per connection) is used rather than
streams: at tens of thousands of small frames per second a coroutine and a
``StreamReader`` per connection cost CPU the gateway can spend on routing.
The connection is the session's ``ReadFlow`` too: a device over its frame rate
is not read from for a while (docs/protocol.md §4).

Anonymous devices (docs/protocol.md §4): a port that listens on an address
other than loopback refuses a HELLO for which no device token is configured,
unless ``allow_anonymous`` is set. The rule is decided from the addresses
actually bound, once, and logged at start.

With a ``TlsDoor`` (devices/tls.py, docs/tls.md) each connection is made only
once its TLS handshake has succeeded; when the door asks for client
certificates, the certificate's subject CN is the only client_id the link's
HELLO may give, and it needs no device token.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import ipaddress
import logging
import ssl
from collections.abc import Callable, Iterable
from typing import Any, cast

from frames import FrameOptions

from .config import MAX_CONNECTIONS
from .events import CloseReason, Transport
from .manager import DeviceManager
from .policy import LinkPolicy
from .session import DeviceSession
from .strikes import FailedLinks
from .tls import TlsDoor, subject_cn
from .writer import LinkWriter

log = logging.getLogger(__name__)


class _DeviceConnection(asyncio.Protocol, LinkWriter):
    """Moves bytes between one TCP connection and its session (it is the session's LinkPort)."""

    def __init__(self, server: DeviceServer) -> None:
        LinkWriter.__init__(self)
        self.server = server
        self.kind = Transport.TCP
        self.peer = "?"
        self.host = ""
        self._session: DeviceSession | None = None
        self._release: asyncio.TimerHandle | None = None  # set while held at the door
        self._opened = 0.0  # loop time of connection_made

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        peer: Any = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.host = str(peer[0]) if isinstance(peer, tuple) else self.peer
        server = self.server
        self._opened = asyncio.get_running_loop().time()
        if server.failed_links.max_failed and self._hold():
            return
        if len(server.connections) >= server.max_connections:
            server.manager.counters.refused_connections += 1
            server.manager.logs.log(
                "refused",
                logging.DEBUG,
                "refusing %s: %d device connections",
                self.peer,
                server.max_connections,
            )
            self.transport.abort()
            return
        server.connections.add(self)
        policy = server.policy
        tls = server.tls
        if tls is not None and tls.context.verify_mode == ssl.CERT_REQUIRED:
            # Verified by the handshake: the CN is this link's identity (docs/tls.md).
            cn = subject_cn(transport.get_extra_info("peercert")) or ""
            policy = dataclasses.replace(policy, certified_id=cn)
        self._session = DeviceSession(server.manager, self, policy=policy)
        self._session.start()

    def _hold(self) -> bool:
        """Hold the connection unread if its address failed too often (devices/strikes.py)."""
        server = self.server
        loop = asyncio.get_running_loop()
        now = loop.time()
        until = server.failed_links.held_until(self.host, now)
        if not until:
            return False
        counters = server.manager.counters
        counters.refused_failed_links += 1
        server.manager.logs.log(
            "held",
            logging.WARNING,
            "holding connections from %s: %d links failed before HELLO within %g s "
            "(devices.max_failed_links)",
            self.host,
            server.failed_links.max_failed,
            server.failed_links.window,
        )
        if len(server.held) >= server.max_held:
            self.transport.abort()  # the waiting room is full: not even a file descriptor
            return True
        # Never read, closed once the address may connect again: a client that
        # reconnects in a loop waits here instead of costing a budget's decoding.
        # uvloop starts reading after connection_made whatever was asked in it,
        # so the pause is asked again once that has happened (and data_received
        # pauses whatever slips through before).
        self.transport.pause_reading()
        loop.call_soon(self._keep_paused)
        server.held.add(self)
        self._release = loop.call_at(until, self._let_go)
        return True

    def _keep_paused(self) -> None:
        if self.transport is not None and self._release is not None:
            self.transport.pause_reading()

    def _let_go(self) -> None:
        self._release = None
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if self._session is not None:
            self._session.data_received(data)
        elif self._release is not None:
            self._keep_paused()  # held: dropped unread, and no more of it

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.resume()
        server = self.server
        server.connections.discard(self)
        if self._release is not None:
            self._release.cancel()
            self._release = None
        server.held.discard(self)
        session = self._session
        if session is not None:
            session.link_lost(CloseReason.CLOSED if exc is None else CloseReason.LOST)
            if not server.closing and _failed(session, self._opened, server.failed_links.window):
                server.failed_links.failed(self.host, asyncio.get_running_loop().time())
        self.transport = None

    def shut_down(self) -> None:
        """Close the connection because the gateway is stopping."""
        if self._session is not None:
            self._session.close(CloseReason.SHUTDOWN)

    def pause_writing(self) -> None:
        self.pause()

    def resume_writing(self) -> None:
        self.resume()


def _failed(session: DeviceSession, opened: float, window: float) -> bool:
    """Whether a link that ended counts as failed (devices/strikes.py, docs/devices.md).

    A link that never went online (over the budget, no HELLO, refused, or
    silent) has failed; so has an *empty session*: online, then closed within
    ``window`` of connecting without one frame after its HELLO. It cost the
    gateway a session (registry, presence to every dashboard, a storage row)
    and delivered nothing: a client that opens such sessions in a loop, over
    many client_ids, is held at the door like one that never says HELLO. A
    device that sends anything (DATA, an ACK, a PING), or stays longer, is not.
    """
    if session.info is None:
        return True
    frames_after_hello = session.core.counters.frames_in - 1
    return frames_after_hello <= 0 and asyncio.get_running_loop().time() - opened < window


def is_loopback(address: str) -> bool:
    """True for 127.0.0.0/8 and ::1 (also IPv4-mapped); False for a wildcard or a name."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def anonymous_allowed(addresses: Iterable[str], allow_anonymous: bool) -> bool:
    """Whether a port bound to ``addresses`` takes devices with no token configured."""
    bound = list(addresses)
    return allow_anonymous or (bool(bound) and all(is_loopback(a) for a in bound))


class DeviceServer:
    """Accepts device connections on a TCP port."""

    def __init__(
        self,
        manager: DeviceManager,
        host: str = "127.0.0.1",
        port: int = 7000,
        *,
        frame_options: FrameOptions | None = None,
        max_connections: int = MAX_CONNECTIONS,
        backlog: int = 1024,
        max_held: int = 1024,
        tls: TlsDoor | None = None,
    ) -> None:
        self.manager = manager
        self.host = host
        self.port = port
        self.frame_options = frame_options or FrameOptions()
        # Until start() knows the addresses bound: refuse anonymous devices, the safe side.
        self.policy = LinkPolicy.tcp(manager.config, self.frame_options, allow_anonymous=False)
        self.max_connections = max_connections
        self.backlog = backlog
        # This port's open connections: what max_connections bounds and close() ends.
        self.connections: set[_DeviceConnection] = set()
        # Connections held unread at the door (devices/strikes.py); at most max_held.
        config = manager.config
        self.failed_links = FailedLinks(config.max_failed_links, config.failed_links_window)
        self.held: set[_DeviceConnection] = set()
        self.max_held = max_held
        self.closing = False
        self.tls = tls  # None: plain TCP
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        """Start listening; ``port`` 0 lets the system choose (see ``address``)."""
        loop = asyncio.get_running_loop()
        factory: Callable[[], asyncio.BaseProtocol] = functools.partial(_DeviceConnection, self)
        if self.tls is not None:
            factory = self.tls.wrap(factory)
            # A failed handshake is a link that never went online (devices/strikes.py); an
            # address past max_failed_links is closed before its handshake, not after.
            self.tls.on_failure = self._handshake_failed
            self.tls.admit = self._admit
        self._server = await loop.create_server(
            factory,
            self.host,
            self.port,
            backlog=self.backlog,
            start_serving=False,  # the policy depends on the addresses bound: decide first
        )
        config = self.manager.config
        bound = [str(s.getsockname()[0]) for s in self._server.sockets]
        anonymous = anonymous_allowed(bound, config.allow_anonymous)
        self.policy = LinkPolicy.tcp(config, self.frame_options, allow_anonymous=anonymous)
        host, port = self.address
        log.info("listening for devices on %s:%d%s", host, port, " (TLS)" if self.tls else "")
        self._log_rule(host, port, anonymous, loopback=anonymous_allowed(bound, False))
        await self._server.start_serving()

    def _handshake_failed(self, host: str) -> None:
        if not self.closing:
            self.failed_links.failed(host, asyncio.get_running_loop().time())

    def _admit(self, host: str) -> bool:
        tls = self.tls
        if tls is not None and len(self.connections) + tls.handshaking >= self.max_connections:
            # Connections in their handshake hold a descriptor too: max_connections bounds both.
            self.manager.counters.refused_connections += 1
            return False
        if not self.failed_links.max_failed:
            return True
        if not self.failed_links.held_until(host, asyncio.get_running_loop().time()):
            return True
        self.manager.counters.refused_failed_links += 1
        self.manager.logs.log(
            "held",
            logging.WARNING,
            "closing TLS connections from %s before their handshake: %d links failed "
            "within %g s (devices.max_failed_links)",
            host,
            self.failed_links.max_failed,
            self.failed_links.window,
        )
        return False

    def _log_rule(self, host: str, port: int, anonymous: bool, *, loopback: bool) -> None:
        """Say at start which rule applies to devices without a token (docs/devices.md)."""
        config = self.manager.config
        where = f"device port {host}:{port}"
        if config.token is not None:
            log.info("%s: every device needs a device token", where)
        elif loopback:
            log.info("%s is loopback only: devices without a token are accepted", where)
        elif anonymous:
            log.warning(
                "%s is not loopback and devices without a token are accepted "
                "(devices.allow_anonymous = true)",
                where,
            )
        else:
            log.warning(
                "%s is not loopback: devices without a token are refused with AUTH_FAILED; "
                "configure device tokens, or set devices.allow_anonymous = true",
                where,
            )

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) actually bound."""
        assert self._server is not None, "start() first"
        sockname = self._server.sockets[0].getsockname()
        return str(sockname[0]), int(sockname[1])

    async def stop_accepting(self) -> None:
        """Stop accepting new connections (existing links stay up)."""
        if self._server is not None:
            self._server.close()

    async def close(self) -> None:
        """Stop accepting and close every device connection."""
        self.closing = True
        await self.stop_accepting()
        if self.tls is not None:
            self.tls.abort_handshakes()
        for connection in list(self.held):
            connection._let_go()
        for connection in list(self.connections):
            connection.shut_down()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
