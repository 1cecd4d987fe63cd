"""Serial links over pyserial-asyncio that come back by themselves after an unplug.

A port is any pyserial URL (``/dev/ttyUSB0``, ``/dev/serial/by-id/...``,
``socket://host:port``, ``rfc2217://host:port``). A port that fails to open or
is lost is retried with capped exponential backoff and full jitter; one log
line per change of state, not per retry.

Two traps of pyserial-asyncio are handled here: ``connection_lost`` may come
before the port is closed (so we close it ourselves before reopening), and on
some unplugs it never comes at all (so a health check watches the port: its
device node gone or replaced, or the port closed under us, counts as lost).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
from typing import Any

import serial
import serial_asyncio

from frames.backoff import Backoff

from .config import SerialPortConfig
from .events import CloseReason, Transport
from .manager import DeviceManager, PortState
from .policy import LinkPolicy
from .session import DeviceSession
from .writer import LinkWriter

log = logging.getLogger(__name__)


def _node_identity(url: str) -> tuple[int, int] | None:
    """(st_dev, st_rdev + inode) of a device path after symlinks, None if absent or a URL."""
    if "://" in url:
        return None
    try:
        st = os.stat(url)
    except OSError:
        return None
    return (st.st_rdev, st.st_ino)


class _SerialProtocol(asyncio.Protocol):
    def __init__(self, link: SerialLink) -> None:
        self.link = link
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        session = self.link.session
        if session is not None:
            session.data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)

    def pause_writing(self) -> None:
        self.link.pause()

    def resume_writing(self) -> None:
        self.link.resume()


class SerialLink(LinkWriter):
    """One configured serial port, kept open for the gateway's lifetime (the LinkPort of
    each session on it)."""

    kind = Transport.SERIAL

    def __init__(
        self, manager: DeviceManager, config: SerialPortConfig, *, rng: random.Random | None = None
    ) -> None:
        super().__init__()
        self.manager = manager
        self.config = config
        self.peer = config.url
        self.counters = manager.port_counters(config.url)
        self.policy = LinkPolicy.serial(manager.config, config)
        self.session: DeviceSession | None = None
        # Listed (GET /api/serial, /healthz) from now on, before any attempt to open it.
        self.status = manager.add_serial_port(config)
        self.state = "closed"  # closed -> open -> lost/failed/missing -> open ...
        self.last_error: str | None = None
        self.opened = asyncio.Event()  # set each time the port opens (tests await it)
        self._backoff = Backoff(config.backoff, rng or random.Random())
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    # Life cycle.
    def start(self) -> None:
        """Open the port in the background, and keep reopening it when lost."""
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"serial {self.config.url}"
        )

    async def stop(self) -> None:
        """Close the port for good."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def _set_state(self, state: str, error: str | None = None) -> None:
        if state != "closed":  # at shutdown the last state is kept for the listing
            self.manager.serial_port_changed(self.config.url, _PORT_STATES[state], error)
        if state == self.state and error == self.last_error:
            return  # one log line per change of state, not per retry
        self.state = state
        self.last_error = error
        if state == "open":
            log.info("serial %s: open", self.config.url)
        elif error:
            log.warning("serial %s: %s (%s); retrying with backoff", self.config.url, state, error)
        else:
            log.info("serial %s: %s", self.config.url, state)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while not self._stopping:
                protocol = _SerialProtocol(self)
                try:
                    transport, _ = await serial_asyncio.create_serial_connection(
                        loop,
                        lambda p=protocol: p,
                        self.config.url,
                        baudrate=self.config.baud,
                    )
                except (serial.SerialException, OSError, ValueError) as e:
                    self._set_state("missing" if self._missing() else "failed", _short(e))
                    await asyncio.sleep(self._backoff.next_delay())
                    continue
                await self._serve(transport, protocol)
                if self._stopping:
                    break
                self.counters.reconnects += 1
                await asyncio.sleep(self._backoff.next_delay())
        finally:
            self._set_state("closed")

    async def _serve(self, transport: Any, protocol: _SerialProtocol) -> None:
        self.transport = transport
        identity = _node_identity(self.config.url)
        self.session = DeviceSession(self.manager, self, policy=self.policy, counters=self.counters)
        self.session.start()
        self._backoff.reset()
        self._set_state("open")
        self.opened.set()
        try:
            while True:
                done, _ = await asyncio.wait({protocol.lost}, timeout=self.config.health_interval)
                if done:
                    exc = protocol.lost.result()
                    self._set_state("lost", _short(exc) if exc else "port closed")
                    break
                problem = self._health_problem(transport, identity)
                if problem is not None:
                    # connection_lost never came (a known pyserial-asyncio trap).
                    self._set_state("lost", problem)
                    break
        finally:
            self.opened.clear()
            session, self.session = self.session, None
            if session is not None:
                session.link_lost(CloseReason.SHUTDOWN if self._stopping else CloseReason.LOST)
            await self._close_port(protocol)
            self.resume()

    def _missing(self) -> bool:
        """True when the port is a device path that does not exist (not a pyserial URL)."""
        url = self.config.url
        return "://" not in url and not os.path.exists(url)

    def _health_problem(self, transport: Any, identity: tuple[int, int] | None) -> str | None:
        port = getattr(transport, "serial", None)
        if port is None or not port.is_open:
            return "port closed under the link"
        if identity is not None and _node_identity(self.config.url) != identity:
            return "device node gone or replaced"
        return None

    async def _close_port(self, protocol: _SerialProtocol) -> None:
        # Make sure the port is closed before any reopen: pyserial-asyncio may
        # report the loss before it has closed the file descriptor, or never.
        transport, self.transport = self.transport, None
        if transport is None:
            return
        port = getattr(transport, "serial", None)
        if not transport.is_closing():
            transport.abort()
        if not protocol.lost.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(protocol.lost), 1.0)
        if port is not None and port.is_open:
            with contextlib.suppress(Exception):
                port.close()


# This link's states, as the manager lists them: lost and failed ports are retried.
_PORT_STATES = {
    "open": PortState.OPEN,
    "failed": PortState.RETRYING,
    "lost": PortState.RETRYING,
    "missing": PortState.MISSING,
}


def _short(exc: BaseException | None) -> str:
    text = str(exc) if exc is not None else ""
    return text.splitlines()[0][:200] if text else type(exc).__name__
