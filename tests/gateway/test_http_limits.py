"""The HTTP port's connection cap, idle timeout and body timeout, and the descriptor budget.

A real gateway app on a loopback port, served the way ``iot-gateway serve``
serves it (``CappedSite``, aiohttp's keep-alive timer set to ``http.idle_timeout``);
the clients are raw sockets so that they can stop halfway through a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import resource
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from gateway.app import RUNTIME, create_app
from gateway.auth import TokenTable
from gateway.config import GatewayConfig, build_config
from gateway.web import connections
from gateway.web.connections import (
    RESERVED_FDS,
    CappedSite,
    HttpConnectionCap,
    fit_to_fd_limit,
    raise_fd_limit,
)
from tests.gateway.conftest import OPERATOR, VIEWER
from tests.support.metrics import parse_metrics
from tests.support.wait import wait_until


class Served:
    """One gateway listening on loopback, and raw connections to it."""

    def __init__(self, runner: web.AppRunner, site: CappedSite) -> None:
        self.runner = runner
        self.port = site.address[1]
        self.cap: HttpConnectionCap = runner.app[RUNTIME].http
        self.writers: list[asyncio.StreamWriter] = []

    async def connect(
        self, first: bytes = b""
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.writers.append(writer)
        writer.write(first)
        await writer.drain()
        return reader, writer

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        """Send ``raw`` (a whole request, Connection: close); the status and the body."""
        reader, _ = await self.connect(raw)
        answer = await reader.read()
        head, _, body = answer.partition(b"\r\n\r\n")
        return int(head.split(b" ", 2)[1]), body

    async def metric(self, name: str) -> float:
        status, body = await self.request(
            f"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {OPERATOR}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        assert status == 200, body
        return parse_metrics(body.decode()).value(name)


Serve = Callable[..., Awaitable[Served]]


@pytest.fixture
async def serve(tmp_path: Path) -> AsyncIterator[Serve]:
    started: list[Served] = []

    async def start(**table: Any) -> Served:
        table.setdefault("data_dir", str(tmp_path / "data"))
        table.setdefault("device_port", 0)
        config = build_config(table, environ={})
        app = create_app(config, TokenTable.make(OPERATOR, VIEWER))
        runner = web.AppRunner(
            app, access_log=None, shutdown_timeout=1.0, keepalive_timeout=config.http.idle_timeout
        )
        await runner.setup()
        site = CappedSite(runner, "127.0.0.1", 0, app[RUNTIME].http)
        await site.start()
        served = Served(runner, site)
        started.append(served)
        return served

    yield start
    for s in started:
        for w in s.writers:
            w.close()
        for w in s.writers:
            with contextlib.suppress(ConnectionError, OSError):
                await w.wait_closed()
        await s.runner.cleanup()


async def _closed_by_server(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes the connection."""
    with contextlib.suppress(ConnectionError):
        return await reader.read()
    return b""


HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
PARTIAL = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: aaa"
SLOW_POST = (
    "POST /api/devices/dev-1/commands HTTP/1.1\r\nHost: x\r\n"
    f"Authorization: Bearer {OPERATOR}\r\nContent-Type: application/json\r\n"
    "Content-Length: 100\r\nConnection: close\r\n\r\n"
).encode()


@pytest.mark.timeout(30)
async def test_at_the_cap_the_oldest_idle_connection_makes_room(serve: Serve) -> None:
    gw = await serve(http={"max_connections": 4}, dashboards={"max_dashboards": 2})
    slow = [await gw.connect(PARTIAL) for _ in range(4)]
    await wait_until(
        lambda: gw.cap.open_connections() == 4, "four connections open", timeout=10, every=0.01
    )
    status, body = await gw.request(HEALTHZ)
    assert status == 200, body
    # The oldest half-sent request was closed, with nothing sent; the others are still open.
    assert await asyncio.wait_for(_closed_by_server(slow[0][0]), 10) == b""
    assert all(not r.at_eof() for r, _ in slow[1:])
    assert gw.cap.stats.evicted >= 1
    assert gw.cap.stats.refused == 0
    assert await gw.metric("iot_http_idle_closed_total") >= 1


@pytest.mark.timeout(30)
async def test_when_every_connection_is_busy_a_new_one_gets_503(serve: Serve) -> None:
    gw = await serve(
        http={"max_connections": 3, "idle_timeout": 30.0}, dashboards={"max_dashboards": 1}
    )
    # Each request's headers are complete, its body never comes: busy connections.
    for _ in range(3):
        await gw.connect(SLOW_POST)
    await wait_until(
        lambda: len(gw.cap.busy) == 3, "three requests in progress", timeout=10, every=0.01
    )
    status, body = await gw.request(HEALTHZ)
    assert status == 503
    assert json.loads(body)["code"] == "unavailable"
    assert gw.cap.stats.refused == 1
    # Nothing was evicted: a request in progress is never cut off to make room.
    assert gw.cap.stats.evicted == 0
    assert len(gw.cap.busy) == 3
    counter = gw.runner.app[RUNTIME].metrics.refused.labels("http_connections")
    assert counter._value.get() == 1


@pytest.mark.timeout(30)
async def test_refused_connections_linger_a_bounded_while_in_bounded_number(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(connections, "REFUSAL_LINGER", 0.5)
    gw = await serve(
        http={"max_connections": 2, "idle_timeout": 30.0}, dashboards={"max_dashboards": 1}
    )
    for _ in range(2):
        await gw.connect(SLOW_POST)
    await wait_until(lambda: len(gw.cap.busy) == 2, "two requests in progress", timeout=10)
    # Clients that read the answer but never close their end.
    stay = [await gw.connect(HEALTHZ) for _ in range(connections.MAX_LINGERING + 8)]
    for reader, _ in stay:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 503"), head
        assert len(gw.cap.lingering) <= connections.MAX_LINGERING
    # Each is closed by the gateway within the linger time, none is left over.
    for reader, _ in stay:
        assert await asyncio.wait_for(_closed_by_server(reader), 10) is not None
    await wait_until(lambda: not gw.cap.lingering, "no refusal lingering", timeout=10)
    assert gw.cap.stats.refused == len(stay)


@pytest.mark.timeout(30)
async def test_a_client_that_leaves_halfway_through_its_body_is_no_error(
    serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    # dc04a44 logged "Error handling request" with a ConnectionResetError traceback.
    gw = await serve()
    with caplog.at_level(logging.DEBUG):
        _, writer = await gw.connect(SLOW_POST + b'{"comm')
        await wait_until(lambda: len(gw.cap.busy) == 1, "the request in progress", timeout=10)
        writer.close()
        await wait_until(lambda: not gw.cap.busy, "the request over", timeout=10)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


@pytest.mark.timeout(30)
async def test_a_request_body_that_never_comes_gets_408(serve: Serve) -> None:
    gw = await serve(http={"idle_timeout": 0.5})
    reader, _ = await gw.connect(SLOW_POST)
    # The answer comes at once; aiohttp then lingers a while for the unread body.
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 408"), head
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length")
    )
    body = await reader.readexactly(length)
    assert json.loads(body) == {
        "code": "timeout",
        "message": "request body not received within 0.5 s",
    }
    assert not gw.cap.busy


@pytest.mark.timeout(30)
async def test_headers_that_trickle_in_are_cut_off_by_the_idle_timeout(serve: Serve) -> None:
    gw = await serve(http={"idle_timeout": 0.5})
    reader, writer = await gw.connect(PARTIAL)
    closed = asyncio.ensure_future(_closed_by_server(reader))
    # Keep sending a byte now and then: activity does not extend the deadline.
    while not closed.done():
        with contextlib.suppress(ConnectionError):
            writer.write(b"a")
        await asyncio.wait([closed], timeout=0.1)
    assert closed.result() == b""
    await wait_until(
        lambda: gw.cap.open_connections() == 0, "the connection gone", timeout=10, every=0.01
    )


@pytest.mark.timeout(30)
async def test_a_dashboard_websocket_is_busy_and_never_evicted(serve: Serve) -> None:
    gw = await serve(http={"max_connections": 2}, dashboards={"max_dashboards": 1})
    reader, _ = await gw.connect(
        (
            f"GET /ws?token={OPERATOR} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
    await gw.connect(PARTIAL)
    await wait_until(
        lambda: gw.cap.open_connections() == 2, "two connections open", timeout=10, every=0.01
    )
    # The cap is reached: the half-sent request goes, the dashboard stays.
    status, _ = await gw.request(HEALTHZ)
    assert status == 200
    assert gw.cap.stats.evicted == 1
    assert not reader.at_eof()
    assert len(gw.cap.busy) == 1


# ---- the descriptor budget ---------------------------------------------------------------------


def test_limits_that_fit_are_left_alone() -> None:
    config = GatewayConfig()
    fitted, notes = fit_to_fd_limit(config, 1 << 20)
    assert fitted is config
    assert notes == []


def test_limits_that_do_not_fit_are_lowered_and_named() -> None:
    fitted, notes = fit_to_fd_limit(GatewayConfig(), 1024)
    assert fitted.devices.max_connections + fitted.http.max_connections <= 1024 - RESERVED_FDS
    # The device port keeps most of the room: it is what the gateway is for.
    assert fitted.devices.max_connections > 3 * fitted.http.max_connections
    assert fitted.dashboards.max_dashboards < fitted.http.max_connections
    assert notes == [
        f"devices.max_connections lowered from 20000 to {fitted.devices.max_connections} "
        "to fit the open-file limit of 1024 (raise it with ulimit -n)",
        f"http.max_connections lowered from 1500 to {fitted.http.max_connections} "
        "to fit the open-file limit of 1024 (raise it with ulimit -n)",
        f"dashboards.max_dashboards lowered from 1000 to {fitted.dashboards.max_dashboards} "
        "to fit the open-file limit of 1024 (raise it with ulimit -n)",
    ]


@given(
    fd_limit=st.integers(128, 200_000),
    devices=st.integers(1, 100_000),
    dashboards=st.integers(1, 5000),
    spare=st.integers(1, 5000),
)
def test_fitted_limits_always_fit_and_stay_valid(
    fd_limit: int, devices: int, dashboards: int, spare: int
) -> None:
    config = build_config(
        {
            "devices": {"max_connections": devices},
            "dashboards": {"max_dashboards": dashboards},
            "http": {"max_connections": dashboards + spare},
        },
        environ={},
    )
    fitted, _ = fit_to_fd_limit(config, fd_limit)
    d, h = fitted.devices.max_connections, fitted.http.max_connections
    assert d + h <= fd_limit - RESERVED_FDS
    assert 1 <= d <= devices
    assert 1 <= fitted.dashboards.max_dashboards < h <= dashboards + spare
    # What comes out would pass the config checks itself.
    build_config(
        {
            "devices": {"max_connections": d},
            "dashboards": {"max_dashboards": fitted.dashboards.max_dashboards},
            "http": {"max_connections": h},
        },
        environ={},
    )


def test_the_soft_descriptor_limit_is_raised_to_the_hard_one() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip("the hard limit leaves nothing to raise")
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        got = raise_fd_limit()
        assert got > 256
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == got
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
