"""The dashboard WebSocket end to end: tokens, Origin, routing, bad input (docs/api.md §3).

Real TCP devices, a real WebSocket dashboard, real SQLite.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import WSServerHandshakeError

import frames
from tests.gateway.conftest import OPERATOR, VIEWER, AppFactory
from tests.gateway.support import ENV_DATA, dash, device, runtime_of


async def test_welcome_carries_session_and_role(make_app: AppFactory) -> None:
    client = await make_app()
    op = await client.ws_connect(f"/ws?token={OPERATOR}")
    first = json.loads((await op.receive()).data)
    assert first["op"] == "welcome"
    assert first["role"] == "operator"
    assert len(first["session"]) == 36
    viewer = await client.ws_connect("/ws", headers={"Authorization": f"Bearer {VIEWER}"})
    assert json.loads((await viewer.receive()).data)["role"] == "viewer"


@pytest.mark.parametrize("query", ["", "?token=nope", "?token="])
async def test_missing_or_wrong_token_is_401_before_upgrade(
    make_app: AppFactory, query: str
) -> None:
    client = await make_app()
    with pytest.raises(WSServerHandshakeError) as info:
        await client.ws_connect(f"/ws{query}")
    assert info.value.status == 401
    resp = await client.get(f"/ws{query}")
    assert resp.status == 401


async def test_origin_rules(make_app: AppFactory) -> None:
    client = await make_app(auth={"allowed_origins": ["https://ops.example"]})
    host = f"{client.host}:{client.port}"
    for origin, status in [
        ("http://evil.example", 403),
        (f"http://{host}", None),  # same origin
        ("https://ops.example", None),  # allow-listed
    ]:
        if status is None:
            ws = await client.ws_connect(f"/ws?token={OPERATOR}", headers={"Origin": origin})
            await ws.close()
        else:
            with pytest.raises(WSServerHandshakeError) as info:
                await client.ws_connect(f"/ws?token={OPERATOR}", headers={"Origin": origin})
            assert info.value.status == status


async def test_subscriptions_route_exactly(make_app: AppFactory) -> None:
    client = await make_app()
    rt = runtime_of(client)
    by_device = await dash(client)
    by_protocol = await dash(client)
    everything = await dash(client)
    await by_device.request({"op": "subscribe", "device": "s1", "id": "a"}, "subscribed")
    reply = await by_protocol.request({"op": "subscribe", "protocol": "relay-4"}, "subscribed")
    assert reply == {"op": "subscribed", "protocol": "relay-4"}
    await everything.request({"op": "subscribe", "all": True}, "subscribed")
    s1 = await device(rt, "s1")
    s2 = await device(rt, "s2")
    r1 = await device(rt, "r1", "relay-4")
    s1.send(frames.Data(1, ENV_DATA))
    s2.send(frames.Data(2, ENV_DATA))
    r1.send(frames.Data(3, b"\x05"))
    got = [await everything.expect("telemetry") for _ in range(3)]
    assert sorted(m["device"] for m in got) == ["r1", "s1", "s2"]
    t = await by_device.expect("telemetry")
    assert t["device"] == "s1"
    assert t["data"] == {"temperature_c": 21.37, "humidity_pct": 45.5, "battery_pct": 97}
    assert isinstance(t["offset"], int)
    assert isinstance(t["ts"], int)
    assert t["seq"] == 1
    r = await by_protocol.expect("telemetry")
    assert (r["device"], r["data"]) == ("r1", {"channels": [True, False, True, False]})
    # Nothing else reached the narrow subscribers.
    await by_device.request({"op": "devices"}, "devices")
    assert not [m for m in by_device.seen if m.get("op") == "telemetry" and m["device"] != "s1"]
    await by_protocol.request({"op": "devices"}, "devices")
    assert [m["device"] for m in by_protocol.seen if m.get("op") == "telemetry"] == ["r1"]


async def test_offsets_strictly_increase(make_app: AppFactory) -> None:
    client = await make_app()
    rt = runtime_of(client)
    d = await dash(client)
    await d.request({"op": "subscribe", "all": True}, "subscribed")
    dev = await device(rt, "inc")
    for i in range(50):
        dev.send(frames.Data(i, ENV_DATA))
    offsets = [(await d.expect("telemetry"))["offset"] for _ in range(50)]
    assert offsets == sorted(set(offsets))


async def test_unsubscribe_stops_delivery(make_app: AppFactory) -> None:
    client = await make_app()
    rt = runtime_of(client)
    d = await dash(client)
    await d.request({"op": "subscribe", "device": "u1"}, "subscribed")
    dev = await device(rt, "u1")
    dev.send(frames.Data(1, ENV_DATA))
    await d.expect("telemetry")
    reply = await d.request({"op": "unsubscribe", "device": "u1", "id": 9}, "unsubscribed")
    assert reply == {"op": "unsubscribed", "id": 9, "device": "u1"}
    dev.send(frames.Data(2, ENV_DATA))
    await d.request({"op": "devices"}, "devices")  # a round trip after the DATA
    await runtime_of(client).storage.flush()
    assert [m["seq"] for m in d.seen if m.get("op") == "telemetry"] == [1]


async def test_presence_and_devices_listing(make_app: AppFactory) -> None:
    client = await make_app()
    rt = runtime_of(client)
    d = await dash(client)
    await d.request({"op": "subscribe", "all": True}, "subscribed")
    dev = await device(rt, "p1")
    on = await d.expect("presence")
    assert (on["device"], on["protocol"], on["online"]) == ("p1", "env-sensor", True)
    dev.send(frames.Data(4, ENV_DATA))
    t = await d.expect("telemetry")
    listing = await d.request({"op": "devices", "id": "l"}, "devices")
    assert listing["id"] == "l"
    (entry,) = listing["devices"]
    assert entry["device"] == "p1"
    assert entry["online"] is True
    assert entry["transport"] == "tcp"
    assert entry["peer"].startswith("127.0.0.1:")
    assert len(entry["session"]) == 36
    assert entry["last"] == t
    assert set(entry) == {
        "device", "protocol", "online", "transport", "peer",
        "session", "connected_at", "last_seen", "last",
        "labels", "offline_since", "offline_reason", "counters",
    }  # fmt: skip
    assert (entry["offline_since"], entry["offline_reason"]) == (None, None)
    await dev.aclose()
    off = await d.expect("presence", online=False)
    assert off["reason"] in ("closed", "lost")
    listing = await d.request({"op": "devices"}, "devices")
    assert listing["devices"][0]["online"] is False
    # Offline: since when and why, as the presence said (docs/api.md §3.2).
    assert listing["devices"][0]["offline_since"] == off["ts"]
    assert listing["devices"][0]["offline_reason"] == off["reason"]


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        ("not json", "bad_request"),
        ("[1, 2]", "bad_request"),
        ('{"op": "dance"}', "bad_request"),
        ('{"no": "op"}', "bad_request"),
        ('{"op": "subscribe"}', "bad_request"),
        ('{"op": "subscribe", "device": 5}', "bad_request"),
        ('{"op": "subscribe", "all": false}', "bad_request"),
        ('{"op": "subscribe", "all": true, "since": "x"}', "bad_request"),
        ('{"op": "subscribe", "device": "a", "protocol": "b"}', "bad_request"),
        ('{"op": "command", "device": "a"}', "bad_request"),
        ('{"op": "command", "command": {}}', "bad_request"),
    ],
)
async def test_bad_requests_get_errors_and_the_socket_stays(
    make_app: AppFactory, raw: str, code: str
) -> None:
    client = await make_app()
    d = await dash(client)
    await d.ws.send_str(raw)
    err = await d.expect("error")
    assert err["code"] == code
    assert err["message"]
    await d.request({"op": "devices"}, "devices")


async def test_oversized_message_closes_with_1009(make_app: AppFactory) -> None:
    client = await make_app()
    d = await dash(client)
    await d.ws.send_str(json.dumps({"op": "devices", "pad": "x" * (64 * 1024)}))
    assert await d.closed() == 1009


async def test_same_host_other_scheme_is_not_same_origin(make_app: AppFactory) -> None:
    client = await make_app()
    with pytest.raises(WSServerHandshakeError) as info:
        await client.ws_connect(
            f"/ws?token={OPERATOR}", headers={"Origin": f"https://{client.host}:{client.port}"}
        )
    assert info.value.status == 403


@pytest.mark.parametrize("enabled", [False, True])
async def test_permessage_deflate_only_when_configured(make_app: AppFactory, enabled: bool) -> None:
    client = await make_app(dashboards={"compression": enabled})
    ws = await client.ws_connect(f"/ws?token={OPERATOR}", compress=15)
    assert bool(ws.compress) is enabled
    assert json.loads((await ws.receive()).data)["op"] == "welcome"
    await ws.close()


async def test_max_dashboards_refused_before_upgrade(make_app: AppFactory) -> None:
    client = await make_app(dashboards={"max_dashboards": 1})
    await dash(client)
    with pytest.raises(WSServerHandshakeError) as info:
        await client.ws_connect(f"/ws?token={OPERATOR}")
    assert info.value.status == 503


async def test_shutdown_closes_dashboards_with_1001(make_app: AppFactory) -> None:
    client = await make_app()
    d = await dash(client)
    closing = asyncio.create_task(d.closed())
    await client.server.close()
    assert await closing == 1001
