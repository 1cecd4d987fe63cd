"""The hub end to end: real TCP devices, a real WebSocket dashboard, real SQLite."""

from __future__ import annotations

import asyncio
import json
import re
import socket
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import WSServerHandshakeError

import frames
from tests.gateway.conftest import OPERATOR, VIEWER, AppFactory
from tests.gateway.support import Dash, device, runtime_of
from tests.support.wait import wait_until

ENV_DATA = bytes.fromhex("085911c661")


async def dash(client: Any, token: str = OPERATOR) -> Dash:
    d = Dash(await client.ws_connect(f"/ws?token={token}"))
    welcome = await d.recv()
    assert welcome["op"] == "welcome"
    return d


# ---- auth and origin -------------------------------------------------------------------------


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


# ---- routing ---------------------------------------------------------------------------------


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
    }  # fmt: skip
    await dev.aclose()
    off = await d.expect("presence", online=False)
    assert off["reason"] in ("closed", "lost")
    listing = await d.request({"op": "devices"}, "devices")
    assert listing["devices"][0]["online"] is False


# ---- commands --------------------------------------------------------------------------------


async def test_command_sent_then_acked(make_app: AppFactory) -> None:
    client = await make_app()
    rt = runtime_of(client)
    d = await dash(client)
    dev = await device(rt, "c1", "relay-4")
    await d.send(
        {
            "op": "command",
            "id": "x1",
            "device": "c1",
            "command": {"name": "set", "args": {"channel": 2, "on": True}},
        }
    )
    sent = await d.expect("command_status")
    assert sent == {"op": "command_status", "id": "x1", "device": "c1", "status": "sent"}
    cmd = await dev.expect(frames.Command)
    assert cmd.body == bytes.fromhex("010201")
    dev.send(frames.Ack(cmd.seq, 0))
    acked = await d.expect("command_status")
    assert acked["status"] == "acked"
    assert acked["id"] == "x1"


async def test_command_nacked_and_timeout(make_app: AppFactory) -> None:
    client = await make_app(devices={"ack_timeout": 0.3})
    rt = runtime_of(client)
    d = await dash(client)
    dev = await device(rt, "c2")
    await d.send({"op": "command", "id": 1, "device": "c2", "command": {"name": "reboot"}})
    await d.expect("command_status", status="sent")
    cmd = await dev.expect(frames.Command)
    dev.send(frames.Ack(cmd.seq, 9))
    nack = await d.expect("command_status", id=1)
    assert (nack["status"], nack["code"]) == ("nacked", 9)
    await d.send({"op": "command", "id": 2, "device": "c2", "command": {"name": "reboot"}})
    await d.expect("command_status", id=2, status="sent")
    assert (await d.expect("command_status", id=2))["status"] == "timeout"


@pytest.mark.parametrize(
    ("command", "device_id", "words"),
    [
        ({"name": "reboot"}, "never-seen", "never been seen"),
        ({"name": "explode"}, "c3", "no command 'explode'"),
        ({"name": "set_interval", "args": {"seconds": 70000}}, "c3", "args.seconds"),
    ],
)
async def test_command_rejected(
    make_app: AppFactory, command: dict[str, Any], device_id: str, words: str
) -> None:
    client = await make_app()
    rt = runtime_of(client)
    d = await dash(client)
    await device(rt, "c3")
    await d.send({"op": "command", "id": "r", "device": device_id, "command": command})
    status = await d.expect("command_status")
    assert status["status"] == "rejected"
    assert words in status["error"]


async def test_viewer_cannot_command(make_app: AppFactory) -> None:
    client = await make_app()
    d = await dash(client, VIEWER)
    await d.send({"op": "command", "id": "v", "device": "x", "command": {"name": "reboot"}})
    err = await d.expect("error")
    assert (err["id"], err["code"]) == ("v", "forbidden")


async def test_protocol_group_command_one_status_per_device(make_app: AppFactory) -> None:
    client = await make_app()
    rt = runtime_of(client)
    d = await dash(client)
    relays = [await device(rt, f"g{i}", "relay-4") for i in range(3)]
    await device(rt, "not-a-relay")
    await d.send(
        {
            "op": "command",
            "id": "grp",
            "protocol": "relay-4",
            "command": {"name": "set", "args": {"channel": 0, "on": False}},
        }
    )
    sent = [await d.expect("command_status", status="sent") for _ in relays]
    assert sorted(s["device"] for s in sent) == ["g0", "g1", "g2"]
    for r in relays:
        cmd = await r.expect(frames.Command)
        r.send(frames.Ack(cmd.seq, 0))
    acked = [await d.expect("command_status", status="acked") for _ in relays]
    assert sorted(s["device"] for s in acked) == ["g0", "g1", "g2"]
    await d.send({"op": "command", "id": "none", "protocol": "pump", "command": {"hex": "00"}})
    err = await d.expect("error")
    assert (err["id"], err["code"]) == ("none", "not_found")


async def test_offline_command_is_queued_then_delivered_oldest_first(make_app: AppFactory) -> None:
    client = await make_app()
    rt = runtime_of(client)
    d = await dash(client)
    dev = await device(rt, "q1")
    await dev.aclose()
    await d.request({"op": "devices"}, "devices")
    await wait_until(
        lambda: not rt.hub.devices["q1"].online, "not rt.hub.devices['q1'].online", timeout=10
    )
    for n in (1, 2):
        await d.send({"op": "command", "id": f"q{n}", "device": "q1", "command": {"hex": f"0{n}"}})
        assert (await d.expect("command_status", id=f"q{n}"))["status"] == "queued"
    back = await device(rt, "q1")
    first = await back.expect(frames.Command)
    second = await back.expect(frames.Command)
    assert (first.body, second.body) == (b"\x01", b"\x02")
    await d.expect("command_status", id="q1", status="sent")
    back.send(frames.Ack(first.seq, 0))
    assert (await d.expect("command_status", id="q1", status="acked"))["device"] == "q1"


async def test_queued_command_expires(make_app: AppFactory) -> None:
    client = await make_app(dashboards={"command_ttl": 0.2})
    rt = runtime_of(client)
    rt.hub.config = type(rt.hub.config)(command_ttl=0.2, expiry_interval=0.05)
    d = await dash(client)
    dev = await device(rt, "e1")
    await dev.aclose()
    await wait_until(
        lambda: not rt.hub.devices["e1"].online, "not rt.hub.devices['e1'].online", timeout=10
    )
    await d.send({"op": "command", "id": "old", "device": "e1", "command": {"name": "reboot"}})
    await d.expect("command_status", id="old", status="queued")
    await d.expect("command_status", id="old", status="expired")


async def test_command_rate_limit(make_app: AppFactory) -> None:
    client = await make_app(dashboards={"commands_per_second": 2})
    rt = runtime_of(client)
    d = await dash(client)
    await device(rt, "rl")
    for i in range(5):
        await d.send({"op": "command", "id": i, "device": "rl", "command": {"name": "reboot"}})
    err = await d.expect("error")
    assert err["code"] == "rate_limited"


# ---- bad input -------------------------------------------------------------------------------


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


# ---- slow consumers --------------------------------------------------------------------------


def _stalled_dashboard(host: str, port: int) -> socket.socket:
    """A WebSocket client that completes the upgrade and then never reads."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect((host, port))
    s.sendall(
        (
            f"GET /ws?token={OPERATOR} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    body = b'{"op":"subscribe","all":true}'
    # One masked text frame (an all-zero mask leaves the payload as it is).
    s.sendall(bytes([0x81, 0x80 | len(body)]) + b"\x00\x00\x00\x00" + body)
    return s


async def test_stalled_dashboard_does_not_slow_the_others(make_app: AppFactory) -> None:
    client = await make_app(
        dashboards={"queue_size": 256}, devices={"max_frames_per_second": 1e6, "rate_burst": 1e6}
    )
    rt = runtime_of(client)
    reader = await dash(client)
    await reader.request({"op": "subscribe", "all": True}, "subscribed")
    stalled = _stalled_dashboard(client.host, client.port)
    try:
        await wait_until(
            lambda: len(rt.hub.subscriptions.all_subscribers()) == 2,
            "len(rt.hub.subscriptions.all_subscribers()) == 2",
            timeout=10,
        )
        slow = next(
            d
            for d in rt.hub.subscriptions.all_subscribers()
            if d.id != min(x.id for x in rt.hub.subscriptions.all_subscribers())
        )
        dev = await device(rt, "flood")
        # Paced by the reading dashboard: 100 rounds of 200 messages, each read in
        # full before the next, while the stalled one's buffers fill and overflow.
        got = 0
        for _ in range(100):
            for i in range(200):
                dev.send(frames.Data(i, ENV_DATA))
            await dev.writer.drain()
            target = got + 200
            while got < target:
                msg = await reader.recv()
                if msg["op"] == "telemetry":
                    got += 1
        # The stalled one's queue stayed bounded and it lost telemetry, not the reader.
        assert slow.telemetry_queued <= 256
        assert slow.dropped_total > 0
        assert rt.metrics.telemetry_dropped._value.get() > 0
        assert not [m for m in reader.seen if m.get("op") == "lagged"]
    finally:
        stalled.close()


# ---- replay ----------------------------------------------------------------------------------


async def test_replay_seam_has_no_gap_and_no_duplicate_under_live_traffic(
    make_app: AppFactory,
) -> None:
    client = await make_app(devices={"max_frames_per_second": 1e6, "rate_burst": 1e6})
    rt = runtime_of(client)
    dev = await device(rt, "live")
    total = 3000
    joined = asyncio.Event()

    async def produce() -> None:
        for i in range(total):
            dev.send(frames.Data(i % 256, ENV_DATA))
            if i % 50 == 0:
                await dev.writer.drain()
                await asyncio.sleep(0)
            if i == total // 2:
                joined.set()

    producer = asyncio.create_task(produce())
    await joined.wait()
    d = await dash(client)
    await d.send({"op": "subscribe", "device": "live", "since": 0})
    received: list[int] = []

    async def consume() -> None:  # read as a live dashboard does, while traffic flows
        while len(received) < total:
            msg = await d.recv()
            assert msg["op"] != "lagged", "a reading dashboard must not lag here"
            if msg["op"] == "telemetry":
                received.append(msg["offset"])

    consumer = asyncio.create_task(consume())
    await producer
    await wait_until(
        lambda: rt.hub.devices["live"].last is not None and rt.storage.stats.pending == 0,
        "the live value stored",
        timeout=10,
    )
    await rt.storage.flush()
    stored = []
    after = 0
    while batch := await rt.storage.telemetry_since(after, device="live", limit=1000):
        stored += [r.offset for r in batch]
        after = batch[-1].offset
    assert len(stored) == total
    await asyncio.wait_for(consumer, 30)
    assert received == stored


async def test_restart_keeps_offsets_history_and_queued_commands(
    make_app: AppFactory, tmp_path: Path
) -> None:
    data = tmp_path / "kept"
    first = await make_app(data_dir=data)
    rt = runtime_of(first)
    dev = await device(rt, "r")
    for i in range(5):
        dev.send(frames.Data(i, ENV_DATA))
    d = await dash(first)
    await d.request({"op": "subscribe", "device": "r", "since": 0}, "subscribed")
    before = [(await d.expect("telemetry"))["offset"] for _ in range(5)]
    await dev.aclose()
    await wait_until(
        lambda: not rt.hub.devices["r"].online, "not rt.hub.devices['r'].online", timeout=10
    )
    await d.send({"op": "command", "id": "later", "device": "r", "command": {"name": "reboot"}})
    await d.expect("command_status", status="queued")
    await first.close()

    second = await make_app(data_dir=data)
    rt2 = runtime_of(second)
    listing = await (
        await second.get("/api/devices/r", headers={"Authorization": f"Bearer {OPERATOR}"})
    ).json()
    assert listing["online"] is False
    assert listing["last"]["offset"] == before[-1]
    d2 = await dash(second)
    await d2.request({"op": "subscribe", "device": "r", "since": 0}, "subscribed")
    replayed = [(await d2.expect("telemetry"))["offset"] for _ in range(5)]
    assert replayed == before
    back = await device(rt2, "r")
    cmd = await back.expect(frames.Command)
    assert cmd.body == b"\x02"
    back.send(frames.Data(9, ENV_DATA))
    new = await d2.expect("telemetry")
    assert new["offset"] > before[-1]


# ---- HTTP API --------------------------------------------------------------------------------


async def test_http_api(make_app: AppFactory) -> None:
    client = await make_app()
    rt = runtime_of(client)
    auth = {"Authorization": f"Bearer {OPERATOR}"}
    view = {"Authorization": f"Bearer {VIEWER}"}
    assert (await client.get("/api/devices")).status == 401
    dev = await device(rt, "h1")
    for i in range(5):
        dev.send(frames.Data(i, ENV_DATA))
    await wait_until(
        lambda: rt.hub.devices["h1"].last is not None,
        "rt.hub.devices['h1'].last is not None",
        timeout=10,
    )
    body = await (await client.get("/api/devices", headers=view)).json()
    assert [d["device"] for d in body["devices"]] == ["h1"]
    one = await client.get("/api/devices/h1", headers=view)
    assert (await one.json())["online"] is True
    assert (await client.get("/api/devices/nope", headers=view)).status == 404
    await wait_until(
        lambda: rt.hub.devices["h1"].last is not None,
        "rt.hub.devices['h1'].last is not None",
        timeout=10,
    )
    tel = await (await client.get("/api/devices/h1/telemetry?limit=3", headers=view)).json()
    seqs = [t["seq"] for t in tel["telemetry"]]
    offsets = [t["offset"] for t in tel["telemetry"]]
    assert len(seqs) <= 3
    rest = await (
        await client.get(f"/api/devices/h1/telemetry?since={offsets[-1]}", headers=view)
    ).json()
    assert [t["seq"] for t in tel["telemetry"] + rest["telemetry"]] == [0, 1, 2, 3, 4]
    for bad in ("since=x", "limit=0", "limit=5000"):
        assert (await client.get(f"/api/devices/h1/telemetry?{bad}", headers=view)).status == 400
    # Commands: operator only; 202 with the first status.
    cmd = {"command": {"name": "reboot"}}
    assert (await client.post("/api/devices/h1/commands", json=cmd, headers=view)).status == 403
    resp = await client.post("/api/devices/h1/commands", json=cmd, headers=auth)
    assert resp.status == 202
    assert (await resp.json())["status"] == "sent"
    resp = await client.post("/api/devices/ghost/commands", json=cmd, headers=auth)
    assert resp.status == 404
    assert (await resp.json())["status"] == "rejected"
    resp = await client.post("/api/devices/h1/commands", data="nope", headers=auth)
    assert resp.status == 400
    resp = await client.post(
        "/api/devices/h1/commands", json={"command": {"name": "boom"}}, headers=auth
    )
    assert resp.status == 400
    health = await client.get("/healthz")
    assert health.status == 200
    assert (await health.json())["devices_online"] == 1
    metrics = await (await client.get("/metrics")).text()
    for name in (
        "iot_devices_online 1.0",
        "iot_dashboards",
        "iot_frames_in_total",
        "iot_crc_errors_total",
        "iot_discarded_bytes_total",
        "iot_telemetry_dropped_total",
        'iot_command_results_total{status="sent"}',
        "iot_storage_batch_seconds_bucket",
        "iot_frame_to_dashboard_seconds_bucket",
    ):
        assert name in metrics, name


async def test_every_metric_in_the_api_doc_is_exported(make_app: AppFactory) -> None:
    client = await make_app()
    exported = await (await client.get("/metrics")).text()
    doc = (Path(__file__).parents[2] / "docs" / "api.md").read_text(encoding="utf-8")
    names = [
        name.split("{")[0]
        for cell in re.findall(r"^\| (`iot_[^|]+) \|", doc, flags=re.MULTILINE)
        for name in re.findall(r"`([a-z_{}]+)`", cell)
    ]
    assert len(names) > 20
    for name in names:
        # A counter's TYPE line names it with or without ``_total``, by the collector.
        family = name.removesuffix("_total")
        assert f"# TYPE {family} " in exported or f"# TYPE {family}_total " in exported, name


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


async def test_loop_is_not_blocked_by_storage_during_a_write_burst(make_app: AppFactory) -> None:
    client = await make_app(devices={"max_frames_per_second": 1e6, "rate_burst": 1e6})
    rt = runtime_of(client)
    dev = await device(rt, "burst")
    loop = asyncio.get_running_loop()
    worst = 0.0
    done = asyncio.Event()

    async def ticker() -> None:
        nonlocal worst
        while not done.is_set():
            t0 = loop.time()
            await asyncio.sleep(0.001)
            worst = max(worst, loop.time() - t0)

    tick = asyncio.create_task(ticker())
    for i in range(20_000):
        dev.send(frames.Data(i % 256, ENV_DATA))
        if i % 500 == 0:
            await dev.writer.drain()
    await dev.writer.drain()
    await wait_until(
        lambda: rt.storage.stats.rows_written >= 20_000,
        "rt.storage.stats.rows_written >= 20_000",
        timeout=30,
    )
    done.set()
    await tick
    # A lag check, not a speed test: generous for a noisy 2-core machine.
    assert worst < 2.0, worst


async def test_device_never_sent_anything_is_unknown_to_http(make_app: AppFactory) -> None:
    client = await make_app()
    resp = await client.get(
        "/api/devices/x/telemetry", headers={"Authorization": f"Bearer {OPERATOR}"}
    )
    assert resp.status == 404
    assert (await resp.json())["code"] == "not_found"


_ = aiohttp


async def test_oversized_command_body_is_413(make_app: AppFactory) -> None:
    client = await make_app()
    resp = await client.post(
        "/api/devices/x/commands",
        data=json.dumps({"command": {"hex": "00"}, "pad": "x" * 70_000}),
        headers={"Authorization": f"Bearer {OPERATOR}", "Content-Type": "application/json"},
    )
    assert resp.status == 413
    assert (await resp.json())["code"] == "too_large"


async def test_same_host_other_scheme_is_not_same_origin(make_app: AppFactory) -> None:
    client = await make_app()
    with pytest.raises(WSServerHandshakeError) as info:
        await client.ws_connect(
            f"/ws?token={OPERATOR}", headers={"Origin": f"https://{client.host}:{client.port}"}
        )
    assert info.value.status == 403


async def test_link_lost_before_ack_reports_timeout(make_app: AppFactory) -> None:
    client = await make_app()
    rt = runtime_of(client)
    d = await dash(client)
    dev = await device(rt, "drop")
    await d.send({"op": "command", "id": "z", "device": "drop", "command": {"name": "reboot"}})
    await d.expect("command_status", id="z", status="sent")
    await dev.expect(frames.Command)
    await dev.aclose()
    final = await d.expect("command_status", id="z")
    assert final["status"] == "timeout"
    assert "link lost" in final["error"]


async def test_device_refusals_are_on_metrics(make_app: AppFactory) -> None:
    client = await make_app(devices={"max_devices": 1})
    rt = runtime_of(client)
    await device(rt, "only")
    host, port = rt.device_server.address
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(frames.encode_frame(frames.Hello(1, "second", "env-sensor").encode()))
    assert await reader.read() is not None  # closed by the gateway after its ERROR
    writer.close()
    await writer.wait_closed()
    text = await (await client.get("/metrics")).text()
    assert 'iot_device_refused_total{limit="max_devices"} 1.0' in text


async def test_socket_that_does_not_drain_is_closed_and_counted(make_app: AppFactory) -> None:
    client = await make_app(
        dashboards={"drain_timeout": 0.5},
        devices={"max_frames_per_second": 1e6, "rate_burst": 1e6},
    )
    rt = runtime_of(client)
    stalled = _stalled_dashboard(client.host, client.port)
    try:
        await wait_until(
            lambda: len(rt.hub.subscriptions.all_subscribers()) == 1,
            "len(rt.hub.subscriptions.all_subscribers()) == 1",
            timeout=10,
        )
        dev = await device(rt, "firehose")
        closed = rt.metrics.slow_dashboards_closed
        for _ in range(200):  # until the stalled socket's buffers are full
            for i in range(500):
                dev.send(frames.Data(i % 256, ENV_DATA))
            await dev.writer.drain()
            if closed._value.get() >= 1:
                break
            await asyncio.sleep(0.05)  # let the writer's drain timeout run
        await wait_until(lambda: closed._value.get() >= 1, "closed._value.get() >= 1", timeout=10)
        await wait_until(
            lambda: not rt.hub.subscriptions.all_subscribers(),
            "not rt.hub.subscriptions.all_subscribers()",
            timeout=10,
        )
    finally:
        stalled.close()


@pytest.mark.parametrize("enabled", [False, True])
async def test_permessage_deflate_only_when_configured(make_app: AppFactory, enabled: bool) -> None:
    client = await make_app(dashboards={"compression": enabled})
    ws = await client.ws_connect(f"/ws?token={OPERATOR}", compress=15)
    assert bool(ws.compress) is enabled
    assert json.loads((await ws.receive()).data)["op"] == "welcome"
    await ws.close()


async def test_page_is_served_with_no_cache_and_a_strict_policy(make_app: AppFactory) -> None:
    client = await make_app()
    page = await client.get("/")
    assert page.status == 200
    assert "<html" in (await page.text()).lower()
    assert page.headers["Cache-Control"] == "no-cache"
    assert "default-src 'self'" in page.headers["Content-Security-Policy"]
    module = await client.get("/static/app.js")
    assert module.status == 200
    assert module.headers["X-Content-Type-Options"] == "nosniff"
    api = await client.get("/healthz")
    assert "Content-Security-Policy" not in api.headers
