"""Commands from a dashboard to real TCP devices and every status back (docs/api.md §3.1).

Also what a dashboard and an HTTP caller get while the storage fails
(docs/api.md §4): a ``rejected`` status or a 503 ``storage_unavailable``, a
503 ``degraded`` ``/healthz`` and the fault on ``/metrics``; never a closed
socket or a plain-text 500. The fault is injected into the storage writer's
transactions here; tests/resilience/test_storage_faults.py makes real ones.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import frames
from gateway.app import Runtime
from gateway.hub import now_ms
from gateway.storage import SQLiteStorage
from tests.devices.support import Client
from tests.gateway.conftest import OPERATOR, VIEWER, AppFactory
from tests.gateway.storage_support import DiskFull
from tests.gateway.support import ENV_DATA, OPEN_DEVICES, Dash, dash, device, runtime_of
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
    command_id = sent.pop("command_id")
    assert sent == {"op": "command_status", "id": "x1", "device": "c1", "status": "sent"}
    assert len(command_id) == 32
    assert int(command_id, 16) >= 0
    cmd = await dev.expect(frames.Command)
    assert cmd.body == bytes.fromhex("010201")
    dev.send(frames.Ack(cmd.seq, 0))
    acked = await d.expect("command_status")
    assert acked["status"] == "acked"
    assert acked["id"] == "x1"
    assert acked["command_id"] == command_id  # the same command, every status


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


async def test_while_the_storage_fails_every_caller_gets_an_answer(make_app: AppFactory) -> None:
    client = await make_app()
    rt = runtime_of(client)
    assert isinstance(rt.storage, SQLiteStorage)
    disk = DiskFull(rt.storage)
    d = await dash(client)
    dev = await device(rt, "sf")
    await dev.aclose()
    await wait_until(lambda: not rt.hub.devices["sf"].online, "sf offline", timeout=10)
    auth = {"Authorization": f"Bearer {OPERATOR}"}

    disk.on.set()
    # A command to the offline device needs the storage: a status, the socket stays.
    await d.send({"op": "command", "id": "w", "device": "sf", "command": {"name": "reboot"}})
    status = await d.expect("command_status", id="w")
    assert status["status"] == "rejected"
    assert status["error"].startswith("storage unavailable: database or disk is full")
    assert (await d.request({"op": "devices", "id": "after"}, "devices"))["id"] == "after"

    resp = await client.post(
        "/api/devices/sf/commands", json={"command": {"name": "reboot"}}, headers=auth
    )
    assert resp.status == 503
    assert resp.headers["Content-Type"].startswith("application/json")
    assert resp.headers["Retry-After"] == "5"
    body = await resp.json()
    assert body["code"] == "storage_unavailable"
    assert "database or disk is full" in body["message"]

    health = await client.get("/healthz")
    assert health.status == 503
    report = await health.json()
    assert report["status"] == "degraded"
    assert report["storage"]["status"] == "failing"
    assert "disk is full" in report["storage"]["error"]
    metrics = await (await client.get("/metrics")).text()
    assert "iot_storage_failing 1.0" in metrics
    assert 'iot_commands_refused_total{reason="storage_unavailable"} 2.0' in metrics
    assert 'iot_command_results_total{status="rejected"} 2.0' in metrics
    failed = [
        line for line in metrics.splitlines() if line.startswith("iot_storage_failed_batches_total")
    ]
    assert float(failed[0].split()[1]) >= 1

    disk.on.clear()

    async def healed() -> bool:
        status: int = (await client.get("/healthz")).status
        return status == 200

    await wait_until(healed, "/healthz 200 again", timeout=10)
    await d.send({"op": "command", "id": "w2", "device": "sf", "command": {"name": "reboot"}})
    assert (await d.expect("command_status", id="w2"))["status"] == "queued"
    assert "iot_storage_failing 0.0" in await (await client.get("/metrics")).text()


async def test_an_id_over_128_characters_is_refused(make_app: AppFactory) -> None:
    client = await make_app()
    rt = runtime_of(client)
    d = await dash(client)
    await device(rt, "idl")
    long_id = "i" * 129
    await d.send({"op": "command", "id": long_id, "device": "idl", "command": {"hex": "01"}})
    err = await d.expect("error", id=long_id)
    assert err["code"] == "bad_request"
    assert "128" in err["message"]
    resp = await client.post(
        "/api/devices/idl/commands",
        json={"command": {"hex": "01"}, "id": long_id},
        headers={"Authorization": f"Bearer {OPERATOR}"},
    )
    assert resp.status == 400
    assert (await resp.json())["code"] == "bad_request"
    metrics = await (await client.get("/metrics")).text()
    assert 'iot_commands_refused_total{reason="max_command_id"} 2.0' in metrics


async def test_a_configured_max_command_id_holds_on_the_websocket_and_http(
    make_app: AppFactory,
) -> None:
    client = await make_app(dashboards={"max_command_id": 8})
    rt = runtime_of(client)
    assert rt.hub.config.command_settings().max_command_id == 8
    d = await dash(client)
    await device(rt, "idc")
    await d.send({"op": "command", "id": "i" * 8, "device": "idc", "command": {"hex": "01"}})
    await d.expect("command_status", id="i" * 8, status="sent")
    await d.send({"op": "command", "id": "i" * 9, "device": "idc", "command": {"hex": "01"}})
    err = await d.expect("error", id="i" * 9)
    assert err["code"] == "bad_request"
    assert "8 characters" in err["message"]
    resp = await client.post(
        "/api/devices/idc/commands",
        json={"command": {"hex": "01"}, "id": "i" * 9},
        headers={"Authorization": f"Bearer {OPERATOR}"},
    )
    assert resp.status == 400


# ---- a device whose link cannot take a command (docs/protocol.md §4) --------------------------


async def deaf_device(rt: Runtime, client_id: str) -> Client:
    """A device whose link the gateway finds full from its HELLO on, and never again free.

    The gateway side's transport is told ``pause_writing``, as asyncio tells it
    once a device that stopped reading has let the socket buffers fill; the
    real filling is in tests/resilience/test_hostile_devices.py (a gateway
    process, megabytes of unread answers). Its WELCOME still goes out: only
    commands wait for room.
    """
    host, port = rt.device_server.address
    reader, writer = await asyncio.open_connection(host, port)
    c = Client(reader, writer)
    OPEN_DEVICES.append(c)
    local = writer.get_extra_info("sockname")
    peer = f"{local[0]}:{local[1]}"

    def link() -> Any:
        return next((c for c in rt.device_server.connections if c.peer == peer), None)

    await wait_until(lambda: link() is not None, f"the gateway's end of {peer}", timeout=10)
    link().pause_writing()
    await c.hello(client_id)
    return c


def statuses(d: Dash, request_id: str) -> list[dict[str, Any]]:
    return [m for m in d.seen if m.get("op") == "command_status" and m.get("id") == request_id]


async def test_a_command_the_link_never_took_is_timeout_at_once_never_sent(
    make_app: AppFactory,
) -> None:
    """Direct and queued alike: ``timeout`` with "device not reading", no ``sent`` before it.

    The queued one was marked as being sent; never written, it leaves the queue
    with that final status, and the commands queued after it wait for the
    device's next session (docs/api.md §3.1).
    """
    client = await make_app(devices={"ack_timeout": 0.3})
    rt = runtime_of(client)
    d = await dash(client)

    await deaf_device(rt, "deaf")
    await d.send({"op": "command", "id": "direct", "device": "deaf", "command": {"hex": "01"}})
    final = await d.expect("command_status", id="direct", timeout=10)
    assert (final["status"], final["error"]) == ("timeout", "device not reading")

    first = await device(rt, "deafq")
    await first.aclose()
    await wait_until(lambda: not rt.hub.devices["deafq"].online, "deafq offline", timeout=10)
    for rid in ("q1", "q2"):
        await d.send({"op": "command", "id": rid, "device": "deafq", "command": {"hex": "02"}})
        await d.expect("command_status", id=rid, status="queued")
    await deaf_device(rt, "deafq")
    final = await d.expect("command_status", id="q1", timeout=10)
    assert (final["status"], final["error"]) == ("timeout", "device not reading")
    assert [m["status"] for m in statuses(d, "direct")] == ["timeout"]
    assert [m["status"] for m in statuses(d, "q1")] == ["queued", "timeout"]

    async def only_q2_waits() -> bool:
        waiting = await rt.hub.engine.pending_commands("deafq", now_ms())
        return [c.command_id for c in waiting] == ["q2"]

    await wait_until(only_q2_waits, "q2 unmarked, q1 gone from the queue", timeout=10)
    # The device's next session (a link that reads) gets q2, and only q2.
    again = await device(rt, "deafq")
    cmd = await again.expect(frames.Command)
    assert cmd.body == b"\x02"
    again.send(frames.Ack(cmd.seq, 0))
    await d.expect("command_status", id="q2", status="acked")
    assert [m["status"] for m in statuses(d, "q2")] == ["queued", "sent", "acked"]
    assert await rt.hub.engine.pending_commands("deafq", now_ms()) == []
    metrics = await (await client.get("/metrics")).text()
    assert 'iot_command_results_total{status="sent"} 1.0' in metrics


# ---- history while the storage fails (docs/api.md §3.2) --------------------------------------


async def test_a_subscribe_with_since_while_the_storage_fails_is_answered(
    make_app: AppFactory,
) -> None:
    client = await make_app()
    rt = runtime_of(client)
    assert isinstance(rt.storage, SQLiteStorage)
    disk = DiskFull(rt.storage)
    d = await dash(client)
    dev = await device(rt, "hs")
    dev.send(frames.Data(dev.next_seq(), ENV_DATA))
    await wait_until(lambda: rt.hub.devices["hs"].last is not None, "hs's first reading")
    await rt.hub.engine.flush()

    disk.on.set()
    # A reading the storage cannot commit: the replay cannot promise it.
    dev.send(frames.Data(dev.next_seq(), ENV_DATA))
    await wait_until(lambda: not rt.storage.health().ok, "the storage failing", timeout=10)
    await d.send({"op": "subscribe", "device": "hs", "since": 0, "id": "h"})
    await d.expect("subscribed", id="h")
    err = await d.expect("error", id="h")
    assert err["code"] == "unavailable"
    assert "database or disk is full" in err["message"]
    lagged = [m for m in d.seen if m.get("op") == "lagged"]
    assert lagged, d.seen
    assert lagged[0]["resume_from"] == 1  # nothing replayed: resume from the start
    # The socket stays and answers; live telemetry of the subscription flows.
    assert (await d.request({"op": "devices", "id": "after"}, "devices"))["id"] == "after"
    dev.send(frames.Data(dev.next_seq(), ENV_DATA))
    live = await d.expect("telemetry", device="hs")

    disk.on.clear()
    await wait_until(lambda: rt.storage.health().ok, "the storage healed", timeout=10)
    await d.send({"op": "subscribe", "device": "hs", "since": 0, "id": "h2"})
    await d.expect("subscribed", id="h2")
    replayed = [await d.expect("telemetry", device="hs") for _ in range(3)]
    assert [m["offset"] for m in replayed][-1] == live["offset"]
    assert not [m for m in d.seen if m.get("op") == "error" and m.get("id") == "h2"]
