"""Drivers that move a simulated device's frames over a real byte stream.

The models and the fault layer are pure; this module is the thin asyncio
skin that gives them a clock (the event loop's), a link and a reconnect
policy. One pump serves both links:

- ``TcpDevice`` connects to the gateway's device port and reconnects with
  ``frames.backoff`` (capped exponential, full jitter) whenever the gateway
  goes away or the link is dropped;
- ``PtyDevice`` opens a pseudo-terminal pair and speaks on its master end;
  a gateway opens the slave (``.path``) as a serial port, exactly as it
  would a USB adapter.

A ``TlsClient`` makes the TCP devices connect with TLS, each with its own
client certificate if the paths name ``{client_id}`` (docs/tls.md).
"""

from __future__ import annotations

import abc
import asyncio
import enum
import errno
import os
import random
import socket
import ssl
import tty
from collections.abc import Awaitable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

from frames import FrameDecoder, Message
from frames.backoff import Backoff, BackoffPolicy

from .handshake import MessageReader
from .spec import DeviceSpec

CONNECT_TIMEOUT: Final = 5.0  # a gateway that accepts nothing in 5 s counts as down
CLOSE_TIMEOUT: Final = 1.0  # how long a polite close may wait for the peer
READ_SIZE: Final = 4096
# What a pty keeps for a gateway that is not reading, beyond the kernel's own
# buffer; more is dropped, as a UART with nobody listening would lose it.
PTY_BACKLOG: Final = 4096

T = TypeVar("T")


class TlsSetupError(ValueError):
    """A CA, certificate or key the simulated devices cannot use; the message is one line."""


@dataclass
class TlsClient:
    """TLS for simulated TCP devices: trust ``ca`` (None: the system's CAs), and present
    ``cert``/``key`` when given. ``{client_id}`` in a path is each device's own id, so
    each device may have its own certificate (its CN must be its client_id)."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    # Accept any server certificate: only for devices that connect to their own process
    # over loopback (``serve --demo``), where there is nobody in between to check.
    insecure: bool = False
    _contexts: dict[tuple[str | None, str | None], ssl.SSLContext] = field(
        default_factory=dict, repr=False
    )

    def context(self, client_id: str) -> ssl.SSLContext:
        """The context device ``client_id`` connects with (one per certificate file)."""
        cert = None if self.cert is None else self.cert.replace("{client_id}", client_id)
        key = None if self.key is None else self.key.replace("{client_id}", client_id)
        found = self._contexts.get((cert, key))
        if found is not None:
            return found
        try:
            ctx = ssl.create_default_context(cafile=self.ca)
        except (OSError, ssl.SSLError) as e:
            raise TlsSetupError(f"--tls-ca {self.ca}: cannot be used: {e}") from None
        if self.insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if cert is not None:
            try:
                ctx.load_cert_chain(cert, key)
            except (OSError, ssl.SSLError) as e:
                raise TlsSetupError(
                    f"--tls-cert {cert} / --tls-key {key}: cannot be used: {e}"
                ) from None
        self._contexts[(cert, key)] = ctx
        return ctx


class LinkEnd(enum.Enum):
    """Why one link's session ended."""

    STOP = "stop"  # the caller asked us to stop
    EOF = "eof"  # the peer closed the link or it failed
    DROPPED = "dropped"  # the drop fault cut it
    FATAL = "fatal"  # the model got a fatal ERROR


class _Link(abc.ABC):
    """The byte stream under one session: what TCP and a pty have in common."""

    @abc.abstractmethod
    async def read(self) -> bytes:
        """The next bytes from the peer; b"" when the link is gone."""

    @abc.abstractmethod
    async def write(self, data: bytes) -> None:
        """Send ``data``, as one write, before anything written later."""


class DeviceDriver:
    """A model, its fault injector and its reconnect state, plus the pump they share."""

    def __init__(self, spec: DeviceSpec, *, backoff: BackoffPolicy | None = None) -> None:
        self.spec = spec
        self.model = spec.build_model()
        self.injector = spec.build_injector()
        self.backoff = Backoff(backoff or BackoffPolicy(), random.Random(f"backoff:{spec.seed}"))
        self.link_up = False
        self.links = 0  # links brought up
        self.connect_failures = 0
        self.last_failure: str | None = None
        self.reader = MessageReader()  # the gateway's messages, on the current link

    @property
    def bad_messages(self) -> int:
        """Frames from the gateway that were not valid messages."""
        return self.reader.bad_messages

    @property
    def decoder(self) -> FrameDecoder:
        """The current link's frame decoder, for its counters."""
        return self.reader.decoder

    async def run(self, stop: asyncio.Event) -> None:
        """Run the device until ``stop`` is set or it gets a fatal ERROR."""
        raise NotImplementedError

    async def _session(self, link: _Link, stop: asyncio.Event) -> LinkEnd:
        """Run the model over ``link`` until the link ends, the caller stops, or a fatal ERROR."""
        loop = asyncio.get_running_loop()
        reader = self.reader
        reader.new_link()
        self.link_up = True
        self.links += 1
        now = loop.time()
        self.injector.link_up(now)
        stopping: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
        reading: asyncio.Future[Any] | None = None
        try:
            await self._send(link, self.model.connect(now), now)
            while True:
                now = loop.time()
                if self.injector.drop_due(now):
                    return LinkEnd.DROPPED
                await self._send(link, self.model.tick(now), now)
                if self.model.stopped:
                    return LinkEnd.FATAL
                deadline = _earliest(self.model.next_deadline(), self.injector.deadline)
                timeout = None if deadline is None else max(0.0, deadline - loop.time())
                if reading is None:
                    reading = asyncio.ensure_future(link.read())
                done, _ = await asyncio.wait(
                    {reading, stopping}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                if stopping in done:
                    return LinkEnd.STOP
                if reading not in done:
                    continue  # a deadline passed: tick
                data: bytes = reading.result()
                reading = None
                if not data:
                    return LinkEnd.EOF
                now = loop.time()
                for msg in reader.feed(data, now):
                    await self._send(link, self.model.on_message(msg, now), now)
                if self.model.stopped:
                    return LinkEnd.FATAL
        except OSError as e:
            self.last_failure = f"link failed: {e}"
            return LinkEnd.EOF
        finally:
            for fut in (reading, stopping):
                if fut is not None and not fut.done():
                    fut.cancel()
            self.link_up = False
            self.model.disconnected()

    async def _send(self, link: _Link, messages: Sequence[Message], now: float) -> None:
        chunks = self.injector.outgoing(messages, now) if messages else []
        chunks += self.injector.poll(now)
        for chunk in chunks:
            await link.write(chunk)

    def _after_session(self, sessions_before: int) -> bool:
        """Decide whether to try again after a link ended; reset the backoff after a success."""
        if self.model.counters.sessions > sessions_before:
            self.backoff.reset()
        if self.model.stopped:
            if not self.injector.tampered_hello:
                return False
            # The fatal AUTH_FAILED was our own bad-token fault: log in properly next time.
            self.model.revive()
        return True


class TcpDevice(DeviceDriver):
    """A simulated device on the gateway's TCP device port, reconnecting when it goes away."""

    def __init__(
        self,
        spec: DeviceSpec,
        host: str,
        port: int,
        *,
        backoff: BackoffPolicy | None = None,
        tls: TlsClient | None = None,
    ) -> None:
        if not spec.hello:
            raise ValueError(f"{spec.client_id}: a TCP device must send HELLO (hello=True)")
        super().__init__(spec, backoff=backoff)
        self.host = host
        self.port = port
        # Made now, so a certificate that cannot be used fails before anything runs.
        self.ssl = None if tls is None else tls.context(spec.client_id)

    async def run(self, stop: asyncio.Event) -> None:
        """Connect, run sessions and reconnect until ``stop`` is set or a fatal ERROR."""
        while not stop.is_set():
            try:
                opened = await _unless_stopped(
                    asyncio.wait_for(
                        asyncio.open_connection(self.host, self.port, ssl=self.ssl),
                        CONNECT_TIMEOUT,
                    ),
                    stop,
                )
            except (OSError, TimeoutError) as e:
                self.connect_failures += 1
                self.last_failure = (
                    f"cannot connect to {self.host}:{self.port}: {str(e) or 'timed out'}"
                )
                if await _sleep_unless_stopped(self.backoff.next_delay(), stop):
                    return
                continue
            if opened is None:
                return
            reader, writer = opened
            sock = writer.get_extra_info("socket")
            if sock is not None:
                # Each write its own segment, so split and merge faults reach the wire as made.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sessions = self.model.counters.sessions
            end = LinkEnd.EOF
            try:
                end = await self._session(_StreamLink(reader, writer), stop)
            finally:
                await _close(writer, abort=end is LinkEnd.DROPPED)
            if end is LinkEnd.STOP or not self._after_session(sessions):
                return
            if await _sleep_unless_stopped(self.backoff.next_delay(), stop):
                return


class _StreamLink(_Link):
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    async def read(self) -> bytes:
        return await self._reader.read(READ_SIZE)

    async def write(self, data: bytes) -> None:
        self._writer.write(data)
        await self._writer.drain()


class PtyDevice(DeviceDriver):
    """A simulated device on the master side of a pseudo-terminal.

    Opening happens at construction, so ``path`` (the slave, e.g.
    ``/dev/pts/7``) can be handed to a gateway's ``--serial`` before ``run``
    starts. With ``spec.hello`` false the gateway's serial link must be
    configured with ``spec.client_id`` and ``spec.protocol`` (``serial_spec``
    spells that out). ``run`` closes the pty when it returns; ``close`` does
    so for a device that never ran.
    """

    def __init__(self, spec: DeviceSpec, *, backoff: BackoffPolicy | None = None) -> None:
        super().__init__(spec, backoff=backoff)
        self.overflow_bytes = 0  # written while nobody read the port, and lost
        self._closed = False
        self._master, self._slave = os.openpty()
        try:
            # Raw: no echo, no line editing, no CR/LF translation; bytes pass unchanged.
            tty.setraw(self._slave)
            os.set_blocking(self._master, False)
            self.path = os.ttyname(self._slave)
        except BaseException:
            self.close()
            raise

    @property
    def serial_spec(self) -> str:
        """The gateway's ``--serial`` value for this device on a fixed-client_id link."""
        return f"{self.path},client_id={self.spec.client_id},protocol={self.spec.protocol}"

    def close(self) -> None:
        """Close both ends of the pty (a gateway reading the slave sees the port vanish)."""
        for fd in (getattr(self, "_master", -1), getattr(self, "_slave", -1)):
            if fd >= 0:
                with suppress(OSError):
                    os.close(fd)
        self._master = self._slave = -1
        self._closed = True

    def __enter__(self) -> PtyDevice:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def run(self, stop: asyncio.Event) -> None:
        """Talk on the pty until ``stop`` is set or a fatal ERROR; then close it.

        We hold the slave open ourselves, so a gateway closing and reopening the
        port never hangs the pty up. The drop fault here means the device
        power-cycles: it starts a new session (HELLO again) after a backoff.
        """
        if self._closed:
            raise RuntimeError(f"{self.spec.client_id}: the pty is closed")
        link = _PtyLink(self, asyncio.get_running_loop())
        try:
            while not stop.is_set():
                sessions = self.model.counters.sessions
                end = await self._session(link, stop)
                if end in (LinkEnd.STOP, LinkEnd.EOF) or not self._after_session(sessions):
                    return
                if await _sleep_unless_stopped(self.backoff.next_delay(), stop):
                    return
        finally:
            link.detach()
            self.close()


class _PtyLink(_Link):
    """The master fd of a pty as a link, through the loop's reader and writer callbacks."""

    def __init__(self, device: PtyDevice, loop: asyncio.AbstractEventLoop) -> None:
        self._device = device
        self._fd = device._master
        self._loop = loop
        self._inbox: asyncio.Queue[bytes] = asyncio.Queue()
        self._out = bytearray()
        self._writing = False
        loop.add_reader(self._fd, self._readable)

    def detach(self) -> None:
        self._loop.remove_reader(self._fd)
        if self._writing:
            self._loop.remove_writer(self._fd)
            self._writing = False

    def _readable(self) -> None:
        try:
            data = os.read(self._fd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError as e:
            # EIO: the slave side is gone for good (it cannot be while we hold it,
            # but a closed master gets here too).
            self._loop.remove_reader(self._fd)
            self._device.last_failure = f"pty read failed: {e}"
            data = b""
        if not data:
            self._loop.remove_reader(self._fd)
        self._inbox.put_nowait(data)

    async def read(self) -> bytes:
        return await self._inbox.get()

    async def write(self, data: bytes) -> None:
        if self._out:
            self._queue(data)
            return
        try:
            sent = os.write(self._fd, data)
        except BlockingIOError:
            sent = 0
        except OSError as e:
            if e.errno != errno.EIO:
                raise
            sent = 0
        if sent < len(data):
            self._queue(data[sent:])

    def _queue(self, data: bytes) -> None:
        room = PTY_BACKLOG - len(self._out)
        if len(data) > room:
            self._device.overflow_bytes += len(data) - max(room, 0)
            data = data[: max(room, 0)]
        self._out += data
        if self._out and not self._writing:
            self._loop.add_writer(self._fd, self._writable)
            self._writing = True

    def _writable(self) -> None:
        try:
            sent = os.write(self._fd, self._out)
        except BlockingIOError:
            return
        except OSError as e:
            self._device.last_failure = f"pty write failed: {e}"
            sent = len(self._out)
        del self._out[:sent]
        if not self._out:
            self._loop.remove_writer(self._fd)
            self._writing = False


# ---- small asyncio helpers ---------------------------------------------------------------


def _earliest(*times: float | None) -> float | None:
    return min((t for t in times if t is not None), default=None)


async def _unless_stopped(aw: Awaitable[T], stop: asyncio.Event) -> T | None:
    """Await ``aw`` unless ``stop`` is set first (then cancel it and return None)."""
    task = asyncio.ensure_future(aw)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with suppress(asyncio.CancelledError, OSError, TimeoutError):
        await task
    return None


async def _sleep_unless_stopped(delay: float, stop: asyncio.Event) -> bool:
    """Wait ``delay`` seconds; True if ``stop`` was set meanwhile (or already)."""
    with suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), delay)
    return stop.is_set()


async def _close(writer: asyncio.StreamWriter, *, abort: bool) -> None:
    # A dropped link is cut (RST), as a pulled cable would be; otherwise close
    # politely but never wait long on a peer that does not read.
    if abort:
        writer.transport.abort()
    else:
        writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), CLOSE_TIMEOUT)
    except (OSError, TimeoutError):
        writer.transport.abort()
