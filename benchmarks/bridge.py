"""The reference a user would otherwise build: device TCP frames -> JSON -> MQTT (Mosquitto).

A small bridge, as the end-to-end benchmark's baseline. It accepts the same
device connections as the gateway's device port (docs/protocol.md §1-4:
HELLO -> WELCOME, PING -> PONG, DATA), decodes frames and bodies with the same
codec (``frames``), and publishes each telemetry message as the same JSON the
gateway sends dashboards, at QoS 0, on ``telemetry/<protocol>/<client_id>``, to
a Mosquitto broker; dashboards are MQTT subscribers of ``telemetry/#``.

It does less than the gateway, on purpose, as a quick bridge would: no
history, no offsets kept across restarts, no rate limits, no sessions
timeouts, no metrics. One asyncio Protocol per device connection (as the
gateway), one paho-mqtt client driven by the same loop (``benchmarks.mqtt``).

Prints ``{"event":"ready","host":...,"port":...}`` when listening; SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
import uuid
from collections.abc import Sequence
from typing import Any, cast

from benchmarks import harness
from benchmarks.mqtt import paho_publisher
from frames import (
    Data,
    Error,
    ErrorCode,
    Frame,
    FrameDecoder,
    Hello,
    Ping,
    Pong,
    RemoteProtocolError,
    Welcome,
    decode_message,
    encode_frame,
    get_protocol,
)
from frames.protocols import Protocol as DeviceProtocol

HEARTBEAT = 30


class Bridge:
    """What the device connections share: the MQTT client and a message counter."""

    def __init__(self, publish: Any) -> None:
        self.publish = publish
        self.offset = 0
        self.connections = 0


class DeviceConnection(asyncio.Protocol):
    """One device: frames in, WELCOME/PONG out, telemetry published."""

    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge
        self.decoder = FrameDecoder()
        self.transport: asyncio.Transport | None = None
        self.client_id: str | None = None
        self.protocol: DeviceProtocol | None = None
        self.topic = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.bridge.connections += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.bridge.connections -= 1
        self.transport = None

    def _send(self, payload: bytes) -> None:
        if self.transport is not None:
            self.transport.write(encode_frame(payload))

    def data_received(self, data: bytes) -> None:
        for event in self.decoder.feed(data):
            if not isinstance(event, Frame):
                continue
            try:
                msg = decode_message(event.payload)
            except RemoteProtocolError:
                continue
            if isinstance(msg, Data):
                self._on_data(msg)
            elif isinstance(msg, Hello):
                self.client_id = msg.client_id
                self.protocol = get_protocol(msg.protocol)
                self.topic = f"telemetry/{msg.protocol}/{msg.client_id}"
                self._send(Welcome(msg.seq, uuid.uuid4(), HEARTBEAT).encode())
            elif isinstance(msg, Ping):
                self._send(Pong(msg.seq).encode())

    def _on_data(self, msg: Data) -> None:
        if self.protocol is None or self.client_id is None:
            self._send(Error.make(0, ErrorCode.NOT_REGISTERED, "send HELLO first").encode())
            return
        try:
            data = self.protocol.decode_data(msg.body)
        except RemoteProtocolError:
            return
        bridge = self.bridge
        bridge.offset += 1
        text = json.dumps(
            {
                "op": "telemetry",
                "device": self.client_id,
                "protocol": self.protocol.name,
                "offset": bridge.offset,
                "ts": int(time.time() * 1000),
                "seq": msg.seq,
                "data": data,
            },
            separators=(",", ":"),
        )
        bridge.publish(self.topic, text, qos=0)


async def main_async(args: argparse.Namespace) -> int:
    host, _, port_text = args.mqtt.rpartition(":")
    client, detach = await paho_publisher(host, int(port_text), "bridge")
    bridge = Bridge(client.publish)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: DeviceConnection(bridge), args.host, args.port, backlog=4096
    )
    bound = server.sockets[0].getsockname()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(json.dumps({"event": "ready", "host": bound[0], "port": bound[1]}), flush=True)
    await stop.wait()
    server.close()
    client.disconnect()
    detach()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--mqtt", required=True, metavar="HOST:PORT", help="the broker")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--loop", choices=harness.LOOPS, default="uvloop")
    args = p.parse_args(argv)
    return harness.run(main_async(args), args.loop)


if __name__ == "__main__":
    sys.exit(main())
