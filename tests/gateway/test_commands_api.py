"""Commands followed to their end over HTTP: the gateway's command_id, ``GET
/api/commands/{id}``, queued results logged and counted, NACK codes in words
(docs/api.md §3.1, §4). End to end: a real app, SQLite file, loopback devices."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

import frames
from gateway.app import Runtime
from tests.gateway.conftest import OPERATOR, VIEWER, AppFactory
from tests.gateway.storage_support import DiskFull
from tests.gateway.support import dash, device, runtime_of
from tests.support.wait import wait_until

AUTH = {"Authorization": f"Bearer {OPERATOR}"}
VIEW = {"Authorization": f"Bearer {VIEWER}"}
pytestmark = pytest.mark.timeout(60)


async def offline(rt: Runtime, client_id: str, protocol: str = "env-sensor") -> None:
    """Make ``client_id`` known and offline: one session, then its link closed."""
    dev = await device(rt, client_id, protocol)
    await dev.aclose()
    await wait_until(
        lambda: not rt.hub.devices[client_id].online, f"{client_id} offline", timeout=10
    )


async def history(client: Any, command_id: str) -> dict[str, Any]:
    resp = await client.get(f"/api/commands/{command_id}", headers=VIEW)
    assert resp.status == 200, await resp.text()
    body: dict[str, Any] = await resp.json()
    return body


def sample(rt: Runtime, name: str, **labels: str) -> float:
    value = rt.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def test_a_command_has_a_command_id_and_its_history_over_http(make_app: AppFactory) -> None:
    client = await make_app()
    rt = runtime_of(client)
    dev = await device(rt, "c1", "relay-4")
    resp = await client.post(
        "/api/devices/c1/commands",
        json={"id": 7, "command": {"name": "set", "args": {"channel": 1, "on": True}}},
        headers=AUTH,
    )
    assert resp.status == 202
    first = await resp.json()
    command_id = first["command_id"]
    assert len(command_id) == 32
    assert int(command_id, 16) >= 0
    assert (first["id"], first["status"]) == (7, "sent")
    # While it waits for its ACK: sent.
    body = await history(client, command_id)
    assert body["status"] == "sent"
    assert [h["status"] for h in body["history"]] == ["sent"]
    cmd = await dev.expect(frames.Command)
    dev.send(frames.Ack(cmd.seq, 0))
    await wait_until(
        lambda: sample(rt, "iot_command_results_total", status="acked") == 1,
        "acked",
        timeout=10,
    )
    assert rt.hub.devices["c1"].commands_count == 1
    # Whatever was reported before the request is in the answer.
    body = await history(client, command_id)
    assert {k: body[k] for k in ("command_id", "id", "device", "status")} == {
        "command_id": command_id,
        "id": 7,  # a number stays a number
        "device": "c1",
        "status": "acked",
    }
    assert [h["status"] for h in body["history"]] == ["sent", "acked"]
    assert all(isinstance(h["ts"], int) for h in body["history"])
    assert body["history"][0]["ts"] <= body["history"][1]["ts"]


async def test_unknown_and_malformed_command_ids(make_app: AppFactory) -> None:
    client = await make_app()
    missing = await client.get("/api/commands/" + "0" * 32, headers=VIEW)
    assert missing.status == 404
    assert (await missing.json())["code"] == "not_found"
    bad = await client.get("/api/commands/" + "x" * 65, headers=VIEW)
    assert bad.status == 400
    assert (await bad.json())["code"] == "bad_request"
    assert (await client.get("/api/commands/abc")).status == 401


async def test_a_rejected_command_is_in_the_log_too(make_app: AppFactory) -> None:
    client = await make_app()
    resp = await client.post(
        "/api/devices/ghost/commands", json={"command": {"name": "reboot"}}, headers=AUTH
    )
    assert resp.status == 404
    rejected = await resp.json()
    body = await history(client, rejected["command_id"])
    assert body["status"] == "rejected"
    assert body["history"][0]["error"] == "device 'ghost' has never been seen"


async def test_a_queued_command_ends_in_the_log_logged_and_counted(
    make_app: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    client = await make_app()
    rt = runtime_of(client)
    await offline(rt, "q1")
    resp = await client.post(
        "/api/devices/q1/commands",
        json={"id": "h1", "command": {"name": "reboot"}},
        headers=AUTH,
    )
    assert resp.status == 202
    queued = await resp.json()
    assert queued["status"] == "queued"
    command_id = queued["command_id"]
    assert (await history(client, command_id))["status"] == "queued"
    # The HTTP caller is long gone when the device comes back and NACKs it.
    caplog.set_level(logging.INFO, logger="gateway.hub.commands")
    dev = await device(rt, "q1")
    cmd = await dev.expect(frames.Command)
    dev.send(frames.Ack(cmd.seq, 2))
    await wait_until(
        lambda: sample(rt, "iot_queued_command_results_total", status="nacked") == 1,
        "queued result counted",
        timeout=10,
    )
    body = await history(client, command_id)
    assert body["id"] == "h1"
    assert [h["status"] for h in body["history"]] == ["queued", "sent", "nacked"]
    assert body["history"][2]["code"] == 2
    assert body["history"][2]["message"] == "bad argument"
    assert any(command_id in r.getMessage() and "nacked" in r.getMessage() for r in caplog.records)
    assert rt.hub.devices["q1"].nacks_count == 1
    entry = await (await client.get("/api/devices/q1", headers=VIEW)).json()
    assert entry["counters"]["nacks"] == 1
    assert entry["counters"]["commands"] == 1


async def test_a_queued_command_that_expires_is_logged_and_counted(
    make_app: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    client = await make_app(dashboards={"command_ttl": 0.2, "expiry_interval": 0.05})
    rt = runtime_of(client)
    await offline(rt, "e1")
    caplog.set_level(logging.INFO, logger="gateway.hub.commands")
    resp = await client.post(
        "/api/devices/e1/commands", json={"command": {"name": "reboot"}}, headers=AUTH
    )
    command_id = (await resp.json())["command_id"]
    await wait_until(
        lambda: sample(rt, "iot_queued_command_results_total", status="expired") == 1,
        "expiry counted",
        timeout=10,
    )
    body = await history(client, command_id)
    assert [h["status"] for h in body["history"]] == ["queued", "expired"]
    assert any("expired" in r.getMessage() and command_id in r.getMessage() for r in caplog.records)


async def test_nack_codes_in_words_over_the_websocket(make_app: AppFactory) -> None:
    client = await make_app()
    rt = runtime_of(client)
    d = await dash(client)
    dev = await device(rt, "n1")
    for request_id, code, words in [
        ("a", 1, "unknown command"),
        ("b", 2, "bad argument"),
        ("c", 9, "device error code 9"),
    ]:
        await d.send({"op": "command", "id": request_id, "device": "n1", "command": {"hex": "02"}})
        sent = await d.expect("command_status", id=request_id, status="sent")
        cmd = await dev.expect(frames.Command)
        dev.send(frames.Ack(cmd.seq, code))
        nacked = await d.expect("command_status", id=request_id, status="nacked")
        assert (nacked["code"], nacked["message"]) == (code, words)
        assert nacked["command_id"] == sent["command_id"]


async def test_a_protocol_command_has_one_command_id_per_device(make_app: AppFactory) -> None:
    client = await make_app()
    rt = runtime_of(client)
    d = await dash(client)
    for name in ("r1", "r2", "r3"):
        await device(rt, name, "relay-4")
    await d.send(
        {
            "op": "command",
            "id": "g",
            "protocol": "relay-4",
            "command": {"name": "set", "args": {"channel": 0, "on": True}},
        }
    )
    sent = [await d.expect("command_status", id="g", status="sent") for _ in range(3)]
    assert sorted(s["device"] for s in sent) == ["r1", "r2", "r3"]
    assert len({s["command_id"] for s in sent}) == 3
    for s in sent:
        assert (await history(client, s["command_id"]))["device"] == s["device"]


async def test_the_command_log_survives_a_restart(make_app: AppFactory, tmp_path: Path) -> None:
    data = tmp_path / "kept"
    client = await make_app(data_dir=data)
    rt = runtime_of(client)
    await offline(rt, "k1")
    resp = await client.post(
        "/api/devices/k1/commands", json={"command": {"name": "reboot"}}, headers=AUTH
    )
    command_id = (await resp.json())["command_id"]
    await client.close()
    again = await make_app(data_dir=data)
    body = await history(again, command_id)
    assert (body["device"], body["status"]) == ("k1", "queued")
    # Delivered by the new process, the command keeps its command_id.
    rt2 = runtime_of(again)
    dev = await device(rt2, "k1")
    cmd = await dev.expect(frames.Command)
    dev.send(frames.Ack(cmd.seq, 0))
    await wait_until(
        lambda: sample(rt2, "iot_queued_command_results_total", status="acked") == 1,
        "delivered after the restart",
        timeout=10,
    )
    body = await history(again, command_id)
    assert [h["status"] for h in body["history"]] == ["queued", "sent", "acked"]


async def test_the_command_log_while_the_storage_fails_is_503(make_app: AppFactory) -> None:
    client = await make_app()
    rt = runtime_of(client)
    resp = await client.post(
        "/api/devices/ghost/commands", json={"command": {"name": "reboot"}}, headers=AUTH
    )
    command_id = (await resp.json())["command_id"]
    disk = DiskFull(rt.storage)  # type: ignore[arg-type]
    disk.on.set()
    failing = await client.get(f"/api/commands/{command_id}", headers=VIEW)
    assert failing.status == 503
    assert (await failing.json())["code"] == "storage_unavailable"
    assert failing.headers["Retry-After"] == "5"
    disk.on.clear()
    # What waited in memory meanwhile is written once the disk works again.
    assert (await history(client, command_id))["status"] == "rejected"
