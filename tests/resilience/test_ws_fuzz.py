"""The dashboard WebSocket API under hypothesis-generated requests (docs/api.md §3).

Whatever a client sends (wrong types, huge numbers, NaN, deep nesting,
unknown ops, text that is not JSON, binary frames, messages over 64 KiB), the
gateway answers each request with an ``error`` (or the request's documented
reply), or closes with 1009 for an oversized message; it never lets an
exception escape, and a second dashboard watching a live device never stalls.

The gateway runs in-process (``create_app`` on pytest-aiohttp's server) so
that an escaped exception shows in its log records, not only as a dropped socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.app import create_app
from gateway.auth import TokenTable
from gateway.config import build_config
from tests.devices.support import Client
from tests.gateway.support import Dash, runtime_of
from tests.resilience.support import Telemetry, stream
from tests.support.gateway import OPERATOR, VIEWER

pytestmark = pytest.mark.resilience

MAX_MESSAGE = 64 * 1024  # docs/api.md §3: a client message over 64 KiB closes with 1009
CANARY = "canary-dev"
CANARY_RATE = 50.0
REPLIES = {"error", "subscribed", "unsubscribed", "devices", "command_status"}
KNOWN_OPS = REPLIES | {"telemetry", "presence", "lagged", "welcome"}
ERROR_CODES = {"bad_request", "forbidden", "not_found", "rate_limited", "too_large"}
STALL = 2.5  # seconds without canary telemetry that count as a stall


# ---- what a client might send ----------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
ops = (
    st.sampled_from(
        ["subscribe", "unsubscribe", "command", "devices", "welcome", "telemetry", "", "SUBSCRIBE"]
    )
    | st.text(max_size=30)
    | values
)
names = st.sampled_from([CANARY, "nobody", "", "a" * 65, "bad id!", "env-sensor", "x"]) | values
# Offsets are 64-bit; numbers beyond that (and far below -1) must be refused, not crash.
since = (
    st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.integers(min_value=2**63, max_value=2**256)
    | st.integers(max_value=-(2**63))
    | values
)
commands = (
    st.fixed_dictionaries({"name": st.sampled_from(["reboot", "set_interval", "nope"]) | values})
    | st.fixed_dictionaries({"name": st.just("set_interval"), "args": values})
    | st.fixed_dictionaries({"hex": st.text(max_size=20) | values})
    | values
)
requests = st.fixed_dictionaries(
    {"op": ops},
    optional={
        "id": values,
        "device": names,
        "protocol": names,
        "all": st.booleans() | values,
        "since": since,
        "command": commands,
    },
)
raw_text = st.text(max_size=300) | st.binary(max_size=300).map(lambda b: b.decode("latin-1"))
huge = st.sampled_from(
    [
        "[" * 30_000 + "]" * 30_000,  # deep nesting, just under 64 KiB
        '{"op":' * 10_000 + "1" + "}" * 10_000,
        '{"op":"subscribe","all":true,"since":' + "9" * 5000 + "}",  # beyond int digits limit
        '{"op":"subscribe","all":true,"since":1e999999}',
        '{"op":"devices","id":' + "9" * 4000 + "}",
        json.dumps({"op": "devices", "pad": "x" * (MAX_MESSAGE + 10)}),  # oversized: 1009
        json.dumps({"op": "subscribe", "all": True, "id": "y" * (MAX_MESSAGE - 100)}),
    ]
)
documents = (
    requests.map(lambda r: json.dumps(r, allow_nan=True))
    | values.map(lambda v: json.dumps(v, allow_nan=True))
    | raw_text
    | huge
)


# ---- the gateway under test ------------------------------------------------------------------


@dataclass
class Target:
    client: TestClient[Any, Any]
    canary: Telemetry
    sent: list[float]
    examples: int = 0
    closes_1009: int = 0
    ws: aiohttp.ClientWebSocketResponse | None = None
    started: float = field(default_factory=time.monotonic)

    async def fuzz_ws(self) -> aiohttp.ClientWebSocketResponse:
        if self.ws is None or self.ws.closed:
            self.ws = await self.client.ws_connect(f"/ws?token={OPERATOR}")
            msg = await self.ws.receive_json(timeout=10)
            assert msg["op"] == "welcome"
        return self.ws


@pytest.fixture
async def target(
    tmp_path: Path, aiohttp_client: Any, caplog: pytest.LogCaptureFixture
) -> AsyncIterator[Target]:
    caplog.set_level(logging.WARNING)
    config = build_config({"data_dir": str(tmp_path / "data"), "device_port": 0}, environ={})
    client: TestClient[Any, Any] = await aiohttp_client(
        create_app(config, TokenTable.make(OPERATOR, VIEWER))
    )
    rt = runtime_of(client)
    host, port = rt.device_server.address
    reader, writer = await asyncio.open_connection(host, port)
    device = Client(reader, writer)
    await device.hello(CANARY)
    stop = asyncio.Event()
    sent: list[float] = []
    streamer = asyncio.ensure_future(stream(device, CANARY_RATE, stop, sent))
    canary_ws = await client.ws_connect(f"/ws?token={VIEWER}")
    dash = Dash(canary_ws)
    await dash.expect("welcome")
    await dash.request({"op": "subscribe", "device": CANARY}, "subscribed")
    canary = Telemetry(dash)
    await canary.wait_for(lambda: canary.count(CANARY) >= 3)
    t = Target(client, canary, sent)
    yield t
    stop.set()
    await streamer
    if t.ws is not None:
        await t.ws.close()
    await canary.aclose()
    await device.aclose()


async def exchange(t: Target, text: str) -> tuple[list[dict[str, Any]], int | None]:
    """Send ``text``, then a sentinel request; the messages before its reply, or the close code."""
    ws = await t.fuzz_ws()
    t.examples += 1
    sentinel = f"sentinel-{t.examples}"
    await ws.send_str(text)
    with contextlib.suppress(ConnectionError):
        await ws.send_str(json.dumps({"op": "devices", "id": sentinel}))
    got: list[dict[str, Any]] = []
    async with asyncio.timeout(10):
        while True:
            msg = await ws.receive()
            if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                return got, ws.close_code
            assert msg.type is WSMsgType.TEXT, (msg.type, msg.data)
            for line in msg.data.split("\n"):
                obj = json.loads(line)
                if obj.get("op") == "devices" and obj.get("id") == sentinel:
                    if _late_status(text, got):
                        sentinel = ""  # read on: the status follows (docs/api.md §3.2)
                        continue
                    return got, None
                got.append(obj)
                if not sentinel and obj.get("op") in REPLIES:
                    return got, None


def _late_status(text: str, got: list[dict[str, Any]]) -> bool:
    """A command whose first status may come after the sentinel's reply, and has not yet.

    A command does not hold up later requests (docs/api.md §3.2), so its
    ``command_status`` (or its ``error``) may follow the reply to the sentinel.
    """
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        return False
    if not isinstance(obj, dict) or obj.get("op") != "command":
        return False
    return not any(m.get("op") in REPLIES for m in got)


def check_answer(text: str, got: list[dict[str, Any]], close_code: int | None) -> None:
    if len(text.encode()) > MAX_MESSAGE:
        assert close_code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG, (close_code, got[:3])
        return
    assert close_code is None, f"closed with {close_code} after {text[:200]!r}"
    for msg in got:
        assert msg.get("op") in KNOWN_OPS, msg
        if msg["op"] == "error":
            assert msg["code"] in ERROR_CODES, msg
            assert isinstance(msg["message"], str), msg
    assert any(m["op"] in REPLIES for m in got), f"no reply to {text[:200]!r}: {got[:5]}"


def no_errors_logged(caplog: pytest.LogCaptureFixture) -> None:
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not bad, "\n".join(f"{r.name}: {r.getMessage()}" for r in bad[:5])


def canary_flowed(t: Target) -> None:
    canary = t.canary
    arrivals = [at for _, at in canary.by_device.get(CANARY, []) if at >= t.started]
    now = time.monotonic()
    gaps = [b - a for a, b in zip([t.started, *arrivals], [*arrivals, now], strict=True)]
    assert max(gaps) < STALL, f"the canary dashboard stalled for {max(gaps):.2f} s"


@settings(
    max_examples=300,
    deadline=None,
    # One gateway serves every example (that is the point: it must survive them
    # all), so the function-scoped fixture is shared on purpose.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(text=documents)
async def test_any_request_gets_an_error_or_its_reply(
    target: Target, caplog: pytest.LogCaptureFixture, text: str
) -> None:
    got, close_code = await exchange(target, text)
    check_answer(text, got, close_code)
    no_errors_logged(caplog)
    canary_flowed(target)


async def test_binary_and_oversized_frames(
    target: Target, caplog: pytest.LogCaptureFixture
) -> None:
    ws = await target.fuzz_ws()
    await ws.send_bytes(b"\x00\x01 not json")
    reply = await ws.receive_json(timeout=10)
    assert reply["op"] == "error"
    assert reply["code"] == "bad_request"
    await ws.send_str("z" * (MAX_MESSAGE + 1))
    msg = await ws.receive(timeout=10)
    assert msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING)
    assert ws.close_code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
    # A new dashboard is served as before, and the canary never noticed.
    got, close_code = await exchange(target, json.dumps({"op": "subscribe", "all": True}))
    check_answer("{}", got, close_code)
    no_errors_logged(caplog)
    canary_flowed(target)


@pytest.mark.parametrize("offset", [2**63, 2**70])
async def test_since_beyond_64_bits(
    target: Target, caplog: pytest.LogCaptureFixture, offset: int
) -> None:
    text = json.dumps({"op": "subscribe", "all": True, "since": offset, "id": "big"})
    got, close_code = await exchange(target, text)
    check_answer(text, got, close_code)
    errors = [m for m in got if m["op"] == "error"]
    assert [(e["id"], e["code"]) for e in errors] == [("big", "bad_request")], got
    no_errors_logged(caplog)


# Header-safe text (no CR, LF or NUL), commas and the token prefix likely.
protocol_headers = st.lists(
    st.one_of(
        st.just("iot-gateway"),
        st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=60).map(
            lambda s: "token." + s
        ),
        st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60),
    ),
    min_size=1,
    max_size=8,
).map(", ".join)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(header=protocol_headers)
async def test_any_subprotocol_header_is_refused_or_served_never_echoing_a_token(
    target: Target, caplog: pytest.LogCaptureFixture, header: str
) -> None:
    """docs/api.md §1: 101 with ``iot-gateway``, 400, or 401; never a 500, never a token echoed."""
    resp = await target.client.get(
        "/ws",
        headers={
            "Upgrade": "websocket",
            "Connection": "Upgrade",
            "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Protocol": header,
        },
    )
    try:
        assert resp.status in (101, 400, 401), (resp.status, header)
        echoed = resp.headers.getall("Sec-WebSocket-Protocol", [])
        assert echoed in ([], ["iot-gateway"]), echoed
        if resp.status != 101:
            assert (await resp.json())["code"] in ("bad_request", "unauthorized")
    finally:
        resp.close()
    no_errors_logged(caplog)
    # Nothing the client offered reaches the log, whatever the outcome.
    assert not [r for r in caplog.records if "token." in r.getMessage()]
    canary_flowed(target)
