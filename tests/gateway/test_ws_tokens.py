"""How a dashboard presents its token on ``GET /ws`` (docs/api.md §1).

The page cannot set an ``Authorization`` header on a browser WebSocket and
must not put the token in a URL, so it offers two subprotocols:
``iot-gateway`` and ``token.<base64url of the token>``. The gateway takes the
token from the second, picks and echoes the first, and never echoes or logs
the token. ``?token=`` and ``Authorization: Bearer`` stay for scripts.
"""

from __future__ import annotations

import base64
import logging
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.app import create_app
from gateway.auth import TokenTable
from gateway.config import build_config
from tests.gateway.conftest import OPERATOR, VIEWER, AppFactory


def token_protocol(token: str) -> str:
    return "token." + base64.urlsafe_b64encode(token.encode()).decode().rstrip("=")


async def handshake(client: Any, protocols: tuple[str, ...], **kwargs: Any) -> Any:
    """A WebSocket offering ``protocols``, its welcome read."""
    ws = await client.ws_connect("/ws", protocols=protocols, **kwargs)
    welcome = await ws.receive_json()
    assert welcome["op"] == "welcome"
    return ws, welcome


async def test_the_token_as_a_subprotocol_is_accepted_and_never_echoed(
    make_app: AppFactory,
) -> None:
    client = await make_app()
    for token, role in ((OPERATOR, "operator"), (VIEWER, "viewer")):
        ws, welcome = await handshake(client, ("iot-gateway", token_protocol(token)))
        assert welcome["role"] == role
        # The gateway picked the plain protocol: the browser sees it, never the token.
        assert ws.protocol == "iot-gateway"
        await ws.close()
    # The same from a raw handshake: the answer's header names iot-gateway only.
    resp = await client.get(
        "/ws",
        headers={
            "Upgrade": "websocket",
            "Connection": "Upgrade",
            "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Protocol": f"iot-gateway, {token_protocol(OPERATOR)}",
        },
    )
    assert resp.status == 101
    assert resp.headers.getall("Sec-WebSocket-Protocol") == ["iot-gateway"]
    resp.close()


@pytest.mark.parametrize(
    "offered",
    [
        ("iot-gateway", token_protocol("not-the-token")),
        ("iot-gateway", "token.%%%not-base64"),
        ("iot-gateway", "token."),
        ("iot-gateway", "token.//79"),  # base64 of bytes that are not UTF-8
        ("iot-gateway",),
    ],
)
async def test_a_wrong_or_missing_subprotocol_token_is_401(
    make_app: AppFactory, offered: tuple[str, ...]
) -> None:
    client = await make_app()
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect("/ws", protocols=offered)
    assert refused.value.status == 401


async def test_a_token_subprotocol_without_iot_gateway_is_400_and_not_logged(
    make_app: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    client = await make_app()
    offered = token_protocol(OPERATOR)
    with caplog.at_level(logging.DEBUG):
        resp = await client.get(
            "/ws",
            headers={
                "Upgrade": "websocket",
                "Connection": "Upgrade",
                "Sec-WebSocket-Version": "13",
                "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                "Sec-WebSocket-Protocol": offered,
            },
        )
    # aiohttp would otherwise log "protocols don't overlap" with the token in it.
    assert resp.status == 400
    assert (await resp.json())["code"] == "bad_request"
    assert not any(offered in r.getMessage() or OPERATOR in r.getMessage() for r in caplog.records)


async def test_any_configured_token_fits_a_subprotocol(tmp_path: Path, aiohttp_client: Any) -> None:
    # A subprotocol allows few characters; base64url carries any token.
    token = "tök en/with+odd=chars;"
    config = build_config({"data_dir": str(tmp_path / "d"), "device_port": 0}, environ={})
    client = await aiohttp_client(create_app(config, TokenTable.make(token, None)))
    ws, welcome = await handshake(client, ("iot-gateway", token_protocol(token)))
    assert welcome["role"] == "operator"
    await ws.close()


async def test_scripts_keep_the_header_and_the_query(make_app: AppFactory) -> None:
    client = await make_app()
    ws, welcome = await handshake(client, (), headers={"Authorization": f"Bearer {OPERATOR}"})
    assert welcome["role"] == "operator"
    assert ws.protocol is None  # nothing offered, nothing picked
    await ws.close()
    ws = await client.ws_connect(f"/ws?token={VIEWER}")
    assert (await ws.receive_json())["role"] == "viewer"
    await ws.close()
    # The subprotocol is a WebSocket's way only: the HTTP API does not take it.
    resp = await client.get(
        "/api/devices",
        headers={"Sec-WebSocket-Protocol": f"iot-gateway, {token_protocol(OPERATOR)}"},
    )
    assert resp.status == 401
