"""Fixtures for device-link tests: a real gateway device port on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from devices import DeviceManager, DeviceServer, SessionConfig
from tests.devices.support import Gateway, GatewayFactory, Recorder


@pytest.fixture
async def make_gateway() -> AsyncIterator[GatewayFactory]:
    started: list[Gateway] = []

    async def factory(**config: Any) -> Gateway:
        sink = Recorder()
        manager = DeviceManager(sink, SessionConfig(**config))
        server = DeviceServer(manager, "127.0.0.1", 0)
        await server.start()
        gw = Gateway(manager, server, sink, port=server.address[1])
        started.append(gw)
        return gw

    yield factory
    for gw in started:
        for c in gw.clients:
            await c.aclose()
        await gw.server.close()


@pytest.fixture
async def gateway(make_gateway: GatewayFactory) -> Gateway:
    gw: Gateway = await make_gateway()
    return gw
