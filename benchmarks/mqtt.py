"""MQTT pieces of the reference pipeline: paho-mqtt on an asyncio loop, and a lean subscriber.

The bridge publishes with paho-mqtt, the client a user would pick, driven by
the bridge's own asyncio loop through paho's external-loop hooks
(``on_socket_open``, ``on_socket_register_write``, ...) rather than by a
second thread, so publishing costs no thread hand-off.

The dashboards subscribe with ``LeanSubscriber``, a minimal MQTT 3.1.1 QoS 0
client written here, not with paho: paho reads each incoming packet with three
``recv`` calls and one packet per wake-up, and at the fan-out scenario's 50,000
deliveries/s that client cost alone would saturate a core of this 2-core
machine and charge the broker's latency with the client's queueing. The
gateway's dashboards use aiohttp's WebSocket client, whose reader is compiled;
the lean subscriber keeps the two sides' client costs comparable.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import Callable
from typing import Any, cast

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion


def attach_paho(client: paho.Client, loop: asyncio.AbstractEventLoop) -> Callable[[], None]:
    """Drive ``client``'s socket from ``loop``; returns a function that detaches it."""

    def on_open(c: paho.Client, _userdata: Any, sock: Any) -> None:
        s: socket.socket = sock
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        loop.add_reader(s, c.loop_read)

    def on_close(_c: paho.Client, _userdata: Any, sock: Any) -> None:
        loop.remove_reader(sock)
        loop.remove_writer(sock)

    def on_want_write(c: paho.Client, _userdata: Any, sock: Any) -> None:
        loop.add_writer(sock, c.loop_write)

    def on_done_write(_c: paho.Client, _userdata: Any, sock: Any) -> None:
        loop.remove_writer(sock)

    client.on_socket_open = on_open
    client.on_socket_close = on_close
    client.on_socket_register_write = on_want_write
    client.on_socket_unregister_write = on_done_write

    async def misc() -> None:
        while True:
            await asyncio.sleep(1.0)
            client.loop_misc()

    task = loop.create_task(misc())

    def detach() -> None:
        task.cancel()

    return detach


async def paho_publisher(
    host: str, port: int, client_id: str
) -> tuple[paho.Client, Callable[[], None]]:
    """A connected paho client driven by the running loop (CONNACK received)."""
    loop = asyncio.get_running_loop()
    connected: asyncio.Future[None] = loop.create_future()
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv311)

    def on_connect(_c: paho.Client, _u: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if not connected.done():
            if reason.is_failure:
                connected.set_exception(ConnectionError(f"MQTT CONNACK: {reason}"))
            else:
                connected.set_result(None)

    client.on_connect = on_connect
    detach = attach_paho(client, loop)
    client.connect(host, port, keepalive=60)
    await asyncio.wait_for(connected, 10.0)
    return client, detach


# ---- a lean MQTT 3.1.1 QoS 0 subscriber ------------------------------------------------------

CONNECT = 0x10
CONNACK = 0x20
PUBLISH = 0x30
SUBSCRIBE = 0x82
SUBACK = 0x90


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        digit, n = n % 128, n // 128
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _utf8(text: str) -> bytes:
    raw = text.encode()
    return struct.pack(">H", len(raw)) + raw


def connect_packet(client_id: str, keepalive: int = 300) -> bytes:
    """CONNECT, MQTT 3.1.1, clean session."""
    body = _utf8("MQTT") + bytes((4, 0x02)) + struct.pack(">H", keepalive) + _utf8(client_id)
    return bytes((CONNECT,)) + _remaining_length(len(body)) + body


def subscribe_packet(topic: str, packet_id: int = 1) -> bytes:
    """SUBSCRIBE to one filter at QoS 0."""
    body = struct.pack(">H", packet_id) + _utf8(topic) + b"\x00"
    return bytes((SUBSCRIBE,)) + _remaining_length(len(body)) + body


class LeanSubscriber(asyncio.Protocol):
    """Connects, subscribes to one filter, hands each PUBLISH payload to ``on_batch``.

    ``on_batch(payloads, received_ns)`` gets every message of one socket read
    at once, as the WebSocket dashboards get every object of one frame.
    """

    def __init__(
        self, client_id: str, topic: str, on_batch: Callable[[list[bytes], int], None]
    ) -> None:
        self.client_id = client_id
        self.topic = topic
        self.on_batch = on_batch
        self.buf = bytearray()
        self.subscribed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(connect_packet(self.client_id))

    def data_received(self, data: bytes) -> None:
        now = time.time_ns()
        buf = self.buf
        buf += data
        pos = 0
        end = len(buf)
        batch: list[bytes] = []
        while end - pos >= 2:
            # Remaining length: 1..4 bytes of 7 bits each, least significant first.
            length = shift = 0
            i = pos + 1
            complete = False
            while i < end and i <= pos + 4:
                byte = buf[i]
                i += 1
                length |= (byte & 0x7F) << shift
                shift += 7
                if not byte & 0x80:
                    complete = True
                    break
            if not complete or end - i < length:
                break
            kind = buf[pos] & 0xF0
            if kind == PUBLISH:
                topic_len = (buf[i] << 8) | buf[i + 1]
                start = i + 2 + topic_len
                if buf[pos] & 0x06:  # QoS 1/2 carry a packet id
                    start += 2
                batch.append(bytes(buf[start : i + length]))
            elif kind == CONNACK:
                if buf[i + 1] != 0:
                    self._fail(ConnectionError(f"MQTT CONNACK refused: {buf[i + 1]}"))
                    return
                assert self.transport is not None
                self.transport.write(subscribe_packet(self.topic))
            elif kind == SUBACK and not self.subscribed.done():
                self.subscribed.set_result(None)
            pos = i + length
        if pos:
            del buf[:pos]
        if batch:
            self.on_batch(batch, now)

    def _fail(self, exc: Exception) -> None:
        if not self.subscribed.done():
            self.subscribed.set_exception(exc)
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionError("MQTT connection closed"))
        if not self.closed.done():
            self.closed.set_result(None)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.write(b"\xe0\x00")  # DISCONNECT
            self.transport.close()
