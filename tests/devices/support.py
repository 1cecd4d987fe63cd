"""Helpers for device-link tests: an event recorder, a raw TCP device client."""

from __future__ import annotations

import asyncio
import contextlib
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
)


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


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll a condition that has no event of its own (counters, states)."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


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
    """A raw TCP device built from the project's own encoder."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = frames.FrameDecoder()
        self.inbox: list[frames.Message] = []
        self.seq = 0

    def send(self, message: frames.Message) -> None:
        self.writer.write(frames.encode_frame(message.encode()))

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
                for ev in self.decoder.feed(data):
                    if isinstance(ev, frames.Frame):
                        self.inbox.append(frames.decode_message(ev.payload))
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
        self.send(frames.Hello(self.next_seq(), client_id, protocol, token))
        welcome: frames.Welcome = await self.expect(frames.Welcome)
        return welcome

    async def aclose(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()


GatewayFactory = Callable[..., Any]
