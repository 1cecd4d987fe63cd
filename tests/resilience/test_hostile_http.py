"""Hostile HTTP clients against a real gateway process, on both event loops (docs/api.md §2, §4).

At the HTTP connection cap with every connection busy, each newcomer gets
the documented 503 ``unavailable`` (dc04a44 sent nothing at all on uvloop);
a script flooding ``POST .../commands`` is held to its token's command rate
with 429 ``rate_limited`` (dc04a44 took every one into the offline queue);
and whatever odd request comes to ``/api/``, the answer is JSON and nothing
escapes into the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import aiohttp
import pytest

from tests.resilience.conftest import GatewayFactory
from tests.resilience.support import connect_device, track
from tests.support.gateway import OPERATOR
from tests.support.wait import wait_until

pytestmark = pytest.mark.resilience

LOOPS = ["asyncio", "uvloop"]


def _busy_post(token: str) -> bytes:
    """A command request whose headers are complete and whose body never comes.

    With ``Expect: 100-continue``: the gateway's "100 Continue" says its handler
    has the request, so the connection is busy from then on.
    """
    return (
        "POST /api/devices/dev-1/commands HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
        "Expect: 100-continue\r\nContent-Length: 100\r\n\r\n"
    ).encode()


async def _answer(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``request`` on a new connection, read until the gateway closes it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    track(writer)
    try:
        writer.write(request)
        async with asyncio.timeout(10):
            answer = await reader.read()
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0].startswith("HTTP/1.1 "), answer[:200]
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


@pytest.mark.parametrize("loop", LOOPS)
async def test_at_the_connection_cap_every_newcomer_gets_the_503(
    gateways: GatewayFactory, loop: str
) -> None:
    gw = gateways(
        {"http": {"max_connections": 4, "idle_timeout": 30.0}, "dashboards": {"max_dashboards": 1}},
        env={"IOT_GATEWAY_LOOP": loop},
    )
    await gw.start()
    busy: list[asyncio.StreamWriter] = []
    for _ in range(4):
        reader, writer = await asyncio.open_connection(*gw.http_address)
        track(writer)
        writer.write(_busy_post(OPERATOR))
        busy.append(writer)
        async with asyncio.timeout(10):
            assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
    healthz = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    # Requests that are big and still being sent when the answer comes: the
    # answer must survive the unread request (a reset could destroy it).
    big = (
        b"POST /api/devices/x/commands HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Content-Length: 300000\r\n\r\n" + b"x" * 300_000
    )
    refused = 0
    for request in [healthz] * 10 + [big] * 3:
        status, headers, body = await _answer(gw.http_port, request)
        refused += 1
        assert status == 503, body
        assert json.loads(body) == {
            "code": "unavailable",
            "message": "too many HTTP connections, try again shortly",
        }
        assert headers["retry-after"] == "1"
        assert headers["connection"] == "close"
        assert headers["content-type"] == "application/json"
    for writer in busy:
        writer.close()
    # Room again once the busy ones have gone, and every refusal was counted (and
    # any of the polls that came before the gateway saw the busy ones go).
    await wait_until(gw.healthy, "/healthz answered again")
    assert (await gw.metrics()).value("iot_refused_total", limit="http_connections") >= refused
    assert gw.crashes() == [], gw.crashes()[:5]


@pytest.mark.parametrize("loop", LOOPS)
async def test_a_command_flood_over_http_is_held_to_the_token_rate(
    gateways: GatewayFactory, loop: str
) -> None:
    rate = 5.0
    gw = gateways({"dashboards": {"commands_per_second": rate}}, env={"IOT_GATEWAY_LOOP": loop})
    await gw.start()
    # The device is known, then offline: every accepted command would be queued on disk.
    device = await connect_device(gw, "flooded-1")
    await device.aclose()
    headers = {"Authorization": f"Bearer {OPERATOR}"}
    url = f"{gw.url}/api/devices/flooded-1/commands"
    statuses: list[int] = []
    retry_after: set[str] = set()

    async def flood(session: aiohttp.ClientSession, stop_at: float) -> None:
        while time.monotonic() < stop_at:
            async with session.post(url, json={"command": {"hex": "00"}}, headers=headers) as r:
                statuses.append(r.status)
                body = await r.json()
                if r.status == 429:
                    assert body["code"] == "rate_limited"
                    retry_after.add(r.headers["Retry-After"])

    started = time.monotonic()
    # Eight connections, as a script would open to go faster: one token, one allowance.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=8)) as session:
        await asyncio.gather(*(flood(session, started + 2.0) for _ in range(8)))
    elapsed = time.monotonic() - started
    accepted = statuses.count(202)
    # A burst of one second's worth, then the rate: generous for a busy machine.
    assert accepted <= rate + rate * elapsed + 1, (accepted, elapsed)
    assert accepted >= rate
    assert set(statuses) == {202, 429}
    assert retry_after == {"1"}
    refused = statuses.count(429)
    assert refused > 5 * accepted, (refused, accepted)
    assert (await gw.metrics()).value("iot_refused_total", limit="command_rate") == refused
    assert gw.crashes() == [], gw.crashes()[:5]


# Requests a script or an attacker might send, and the JSON code each gets.
ODD_REQUESTS: list[tuple[str, str, bytes, dict[str, str], int, str]] = [
    ("GET", "/api/nope", b"", {}, 404, "not_found"),
    ("GET", "/api/devices/..%2F..%2Fetc%2Fpasswd", b"", {}, 404, "not_found"),
    ("PATCH", "/api/devices", b"", {}, 405, "method_not_allowed"),
    ("DELETE", "/api/devices/x/commands", b"", {}, 405, "method_not_allowed"),
    ("POST", "/api/devices/x/commands", b"[" * 50_000, {}, 400, "bad_request"),
    ("POST", "/api/devices/x/commands", b'{"command":' + b"{" * 30_000, {}, 400, "bad_request"),
    ("POST", "/api/devices/x/commands", b"\xff\xfe\xfa", {}, 400, "bad_request"),
    ("POST", "/api/devices/x/commands", b"x" * 70_000, {}, 413, "too_large"),
    (
        "POST",
        "/api/devices/x/commands",
        b'{"command":{"hex":"00"}}',
        {"Content-Type": "text/plain"},
        404,
        "",
    ),
    ("GET", "/api/devices/x/telemetry?since=1e999", b"", {}, 404, "not_found"),
    ("GET", "/api/devices", b"", {"Authorization": "Bearer " + "x" * 4000}, 401, "unauthorized"),
]


@pytest.mark.parametrize("loop", LOOPS)
async def test_odd_requests_under_api_get_json_and_nothing_escapes(
    gateways: GatewayFactory, loop: str
) -> None:
    gw = gateways(env={"IOT_GATEWAY_LOOP": loop})
    await gw.start()
    async with aiohttp.ClientSession() as session:
        for method, path, body, extra, status, code in ODD_REQUESTS:
            headers = {"Authorization": f"Bearer {OPERATOR}", **extra}
            async with session.request(
                method, f"{gw.url}{path}", data=body or None, headers=headers
            ) as r:
                assert r.status == status, (method, path, r.status, await r.text())
                assert r.content_type == "application/json", (method, path)
                answer = await r.json()
                if code:
                    assert answer["code"] == code, (method, path, answer)
    assert await gw.healthy()
    assert gw.crashes() == [], gw.crashes()[:5]
