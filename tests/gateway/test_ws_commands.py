"""Commands from a dashboard to real TCP devices and every status back (docs/api.md §3.1)."""

from __future__ import annotations

from typing import Any

import pytest

import frames
from tests.gateway.conftest import VIEWER, AppFactory
from tests.gateway.support import dash, device, runtime_of
from tests.support.wait import wait_until


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
