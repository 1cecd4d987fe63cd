"""Helpers for hub tests: a running gateway app, raw TCP devices, a dashboard client."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp

from gateway.app import RUNTIME, Runtime
from tests.devices.support import Client

OPERATOR = "op-token"
VIEWER = "view-token"
# An env-sensor DATA body: 21.37 degC, 45.5 %, battery 97 % (docs/protocols.md).
ENV_DATA = bytes.fromhex("085911c661")


class Dash:
    """A plain WebSocket dashboard: splits batched frames on newlines, keeps an inbox."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.inbox: list[dict[str, Any]] = []
        self.seen: list[dict[str, Any]] = []
        self.closed_code: int | None = None

    async def send(self, obj: dict[str, Any]) -> None:
        await self.ws.send_str(json.dumps(obj))

    async def _fill(self) -> None:
        msg = await self.ws.receive()
        if msg.type is aiohttp.WSMsgType.TEXT:
            for line in msg.data.split("\n"):
                obj = json.loads(line)
                self.inbox.append(obj)
                self.seen.append(obj)
        elif msg.type in (
            aiohttp.WSMsgType.CLOSE,
            aiohttp.WSMsgType.CLOSING,
            aiohttp.WSMsgType.CLOSED,
        ):
            self.closed_code = self.ws.close_code
            raise EOFError(f"closed with {self.ws.close_code}")
        else:
            raise AssertionError(f"unexpected {msg.type}: {msg.data!r}")

    async def recv(self, timeout: float = 10.0) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            while not self.inbox:
                await self._fill()
        return self.inbox.pop(0)

    async def expect(self, op: str, timeout: float = 10.0, **fields: Any) -> dict[str, Any]:
        """Skip messages until one with this op (and these field values) arrives."""
        async with asyncio.timeout(timeout):
            while True:
                msg = await self.recv(timeout)
                if msg.get("op") == op and all(msg.get(k) == v for k, v in fields.items()):
                    return msg

    async def request(self, obj: dict[str, Any], op: str) -> dict[str, Any]:
        await self.send(obj)
        return await self.expect(op)

    async def closed(self, timeout: float = 10.0) -> int | None:
        try:
            async with asyncio.timeout(timeout):
                while True:
                    await self._fill()
        except EOFError:
            return self.closed_code


def runtime_of(client: Any) -> Runtime:
    rt: Runtime = client.server.app[RUNTIME]
    return rt


# Device clients opened by a test; the autouse fixture in conftest closes them.
OPEN_DEVICES: list[Client] = []


async def device(rt: Runtime, client_id: str, protocol: str = "env-sensor") -> Client:
    host, port = rt.device_server.address
    reader, writer = await asyncio.open_connection(host, port)
    c = Client(reader, writer)
    OPEN_DEVICES.append(c)
    await c.hello(client_id, protocol)
    return c


async def dash(client: Any, token: str = OPERATOR) -> Dash:
    """A dashboard connected with ``token``, its welcome already read."""
    d = Dash(await client.ws_connect(f"/ws?token={token}"))
    welcome = await d.recv()
    assert welcome["op"] == "welcome"
    return d
