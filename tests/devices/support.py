"""Helpers for device tests: a fake clock and fake links for the sans-IO layers, and an
event recorder and a raw TCP device (on the shared device-side handshake) for the
end-to-end layer."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import frames
from devices import (
    DeviceEvent,
    DeviceManager,
    DeviceOffline,
    DeviceOnline,
    DeviceServer,
    DeviceTelemetry,
    Transport,
)
from simulators.handshake import DeviceHandshake, MessageReader, encode, error_name

ENV_DATA = bytes.fromhex("085911c661")  # env-sensor: 21.37 degC, 45.5 %, 97 % battery
ENV_VALUES = {"temperature_c": 21.37, "humidity_pct": 45.5, "battery_pct": 97}

# ---- the sans-IO layers -------------------------------------------------------------------


class FakeClock:
    """Monotonic seconds and unix milliseconds that move only when a test says so."""

    def __init__(self, now: float = 100.0, wall_ms: int = 1_700_000_000_000) -> None:
        self.now = now
        self._wall_base = wall_ms
        self._start = now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now

    def wall_ms(self) -> int:
        return self._wall_base + round((self.now - self._start) * 1000)


def session_ids() -> Callable[[], uuid.UUID]:
    """A session-id factory giving UUIDv4s in a known order: ...0001, ...0002, ..."""
    counter = itertools.count(1)
    return lambda: uuid.UUID(int=next(counter), version=4)


def wire(*messages: frames.Message) -> bytes:
    """The bytes of one frame per message, back to back."""
    return b"".join(encode(m) for m in messages)


def parse(data: bytes) -> list[frames.Message]:
    """The messages in bytes a gateway wrote (every frame must be a valid message)."""
    return MessageReader(strict=True).feed(data)


class FakeLink:
    """A LinkPort that keeps what is written and says when it was closed."""

    def __init__(self, peer: str = "fake:1", kind: Transport = Transport.TCP) -> None:
        self.kind = kind
        self.peer = peer
        self.written = bytearray()
        self.closed = False
        self.gone = asyncio.Event()  # set by close(), for tests that await it
        self.buffered = 0  # what write_buffer_size reports
        self.room = asyncio.Event()  # cleared: drain() waits, as for a full socket
        self.room.set()

    def write(self, data: bytes) -> None:
        if not self.closed:
            self.written += data

    async def drain(self) -> None:
        await self.room.wait()

    def write_buffer_size(self) -> int:
        return self.buffered

    def close(self) -> None:
        self.closed = True
        self.gone.set()

    def take(self) -> list[frames.Message]:
        """The messages written since the last call."""
        out = parse(bytes(self.written))
        self.written.clear()
        return out


# ---- the end-to-end layer -----------------------------------------------------------------


class Recorder:
    """A DeviceEventSink that keeps every event and lets tests await one."""

    def __init__(self) -> None:
        self.events: list[DeviceEvent] = []
        self._changed = asyncio.Event()

    def device_event(self, event: DeviceEvent) -> None:
        self.events.append(event)
        self._changed.set()

    async def wait_for(
        self, predicate: Callable[[DeviceEvent], bool], timeout: float = 10.0
    ) -> DeviceEvent:
        """The first event (already seen or coming) that matches."""
        async with asyncio.timeout(timeout):
            seen = 0
            while True:
                for ev in self.events[seen:]:
                    if predicate(ev):
                        return ev
                seen = len(self.events)
                self._changed.clear()
                await self._changed.wait()

    async def online(self, client_id: str) -> DeviceOnline:
        ev = await self.wait_for(
            lambda e: isinstance(e, DeviceOnline) and e.info.client_id == client_id
        )
        assert isinstance(ev, DeviceOnline)
        return ev

    async def offline(self, client_id: str) -> DeviceOffline:
        ev = await self.wait_for(
            lambda e: isinstance(e, DeviceOffline) and e.info.client_id == client_id
        )
        assert isinstance(ev, DeviceOffline)
        return ev

    def telemetry(self, client_id: str | None = None) -> list[DeviceTelemetry]:
        return [
            e
            for e in self.events
            if isinstance(e, DeviceTelemetry) and client_id in (None, e.client_id)
        ]


@dataclass
class Gateway:
    manager: DeviceManager
    server: DeviceServer
    sink: Recorder
    host: str = "127.0.0.1"
    port: int = 0
    clients: list[Client] = field(default_factory=list)

    async def connect(self) -> Client:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        client = Client(reader, writer)
        self.clients.append(client)
        return client


class Client:
    """A raw TCP device: the project's encoder and the shared device-side handshake.

    Every message the gateway sends is kept for the test (``recv``, ``expect``);
    nothing is answered behind its back.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.messages = MessageReader(strict=True)
        self.inbox: list[frames.Message] = []
        self.seq = 0
        self.handshake: DeviceHandshake | None = None

    def send(self, message: frames.Message) -> None:
        self.writer.write(encode(message))

    def send_raw(self, data: bytes) -> None:
        self.writer.write(data)

    def next_seq(self) -> int:
        self.seq = (self.seq + 1) % 256
        return self.seq

    async def recv(self, timeout: float = 10.0) -> frames.Message:
        """The next message from the gateway; raises EOFError when the link closes."""
        async with asyncio.timeout(timeout):
            while not self.inbox:
                data = await self.reader.read(4096)
                if not data:
                    raise EOFError("gateway closed the link")
                self.inbox.extend(self.messages.feed(data))
        return self.inbox.pop(0)

    async def expect(self, kind: type[Any], timeout: float = 10.0) -> Any:
        msg = await self.recv(timeout)
        assert isinstance(msg, kind), msg
        return msg

    async def closed(self, timeout: float = 10.0) -> list[frames.Message]:
        """Read until the gateway closes the link; return what came before."""
        got: list[frames.Message] = []
        try:
            while True:
                got.append(await self.recv(timeout))
        except (EOFError, ConnectionResetError):
            return got

    async def hello(
        self, client_id: str, protocol: str = "env-sensor", token: str = ""
    ) -> frames.Welcome:
        """Say HELLO; the gateway's next message must be the WELCOME."""
        handshake = DeviceHandshake(client_id, protocol, token, next_seq=self.next_seq)
        self.handshake = handshake
        self.send(handshake.hello())
        answer = await self.recv()
        handshake.receive(answer)
        if isinstance(answer, frames.Error):
            raise AssertionError(f"HELLO refused: {error_name(answer.code)} {answer.reason!r}")
        assert isinstance(answer, frames.Welcome), answer
        assert handshake.welcomed
        return answer

    async def aclose(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()


GatewayFactory = Callable[..., Any]
