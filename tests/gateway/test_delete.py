"""Deleting a device (DELETE /api/devices/{id}) and forgetting unseen ones: what
goes, what dashboards are told (docs/api.md §3.1 ``removed``, §4). End to end: a
real app, SQLite file, loopback devices."""

from __future__ import annotations

from pathlib import Path

import frames
from gateway.app import Runtime
from tests.gateway.conftest import OPERATOR, VIEWER, AppFactory
from tests.gateway.storage_support import DiskFull
from tests.gateway.support import ENV_DATA, dash, device, runtime_of
from tests.support.wait import wait_until

AUTH = {"Authorization": f"Bearer {OPERATOR}"}
VIEW = {"Authorization": f"Bearer {VIEWER}"}


async def known_offline(rt: Runtime, client_id: str, readings: int = 0) -> None:
    """``client_id`` known, with ``readings`` telemetry messages stored, and offline."""
    dev = await device(rt, client_id)
    for seq in range(readings):
        dev.send(frames.Data(seq, ENV_DATA))
    await wait_until(
        lambda: rt.hub.devices[client_id].telemetry_count == readings, "readings", timeout=10
    )
    await dev.aclose()
    await wait_until(
        lambda: not rt.hub.devices[client_id].online, f"{client_id} offline", timeout=10
    )


async def test_deleting_an_offline_device_takes_everything_with_it(make_app: AppFactory) -> None:
    client = await make_app()
    rt = runtime_of(client)
    await known_offline(rt, "d1", readings=3)
    await known_offline(rt, "d2", readings=2)
    d = await dash(client)
    await d.request({"op": "subscribe", "all": True}, "subscribed")
    resp = await client.put("/api/devices/d1/labels", json={"name": "Old"}, headers=AUTH)
    assert resp.status == 200
    # Two commands wait for d1: one from this dashboard, one over HTTP.
    await d.send({"op": "command", "id": "w", "device": "d1", "command": {"name": "reboot"}})
    queued = await d.expect("command_status", id="w", status="queued")
    posted = await client.post(
        "/api/devices/d1/commands", json={"command": {"name": "reboot"}}, headers=AUTH
    )
    assert (await posted.json())["status"] == "queued"

    resp = await client.delete("/api/devices/d1", headers=AUTH)
    assert resp.status == 200
    assert await resp.json() == {"device": "d1", "deleted": True}
    # Its queued commands end first, then the device is gone.
    expired = await d.expect("command_status", id="w")
    assert expired["status"] == "expired"
    assert expired["error"] == "device deleted"
    assert expired["command_id"] == queued["command_id"]
    assert await d.recv() == {"op": "removed", "device": "d1", "reason": "deleted"}
    log = await (await client.get(f"/api/commands/{queued['command_id']}", headers=VIEW)).json()
    assert [h["status"] for h in log["history"]] == ["queued", "expired"]

    # Gone from the listing, the API and the storage; the other device untouched.
    assert (await client.get("/api/devices/d1", headers=VIEW)).status == 404
    assert (await client.get("/api/devices/d1/telemetry", headers=VIEW)).status == 404
    page = await (await client.get("/api/devices", headers=VIEW)).json()
    assert [e["device"] for e in page["devices"]] == ["d2"]
    assert await rt.storage.telemetry_since(0, device="d1") == []
    assert len(await rt.storage.telemetry_since(0, device="d2")) == 2
    assert await rt.storage.pending_commands("d1", 0) == []
    assert "d1" not in await rt.storage.labels()
    await rt.storage.flush()
    assert [r.device for r in await rt.storage.devices()] == ["d2"]
    sample = rt.metrics.registry.get_sample_value(
        "iot_queued_command_results_total", {"status": "expired"}
    )
    assert sample == 2

    # A HELLO brings it back as a new device: no history, no labels.
    await known_offline(rt, "d1", readings=1)
    body = await (await client.get("/api/devices/d1/telemetry", headers=VIEW)).json()
    assert len(body["telemetry"]) == 1
    assert (await (await client.get("/api/devices/d1", headers=VIEW)).json())["labels"][
        "name"
    ] is None


async def test_an_online_device_is_not_deleted(make_app: AppFactory) -> None:
    client = await make_app()
    rt = runtime_of(client)
    await device(rt, "on1")
    resp = await client.delete("/api/devices/on1", headers=AUTH)
    assert resp.status == 409
    body = await resp.json()
    assert body["code"] == "conflict"
    assert "online" in body["message"]
    assert rt.hub.devices["on1"].online


async def test_delete_needs_an_operator_and_a_known_device(make_app: AppFactory) -> None:
    client = await make_app()
    rt = runtime_of(client)
    await known_offline(rt, "x1")
    assert (await client.delete("/api/devices/x1")).status == 401
    assert (await client.delete("/api/devices/x1", headers=VIEW)).status == 403
    missing = await client.delete("/api/devices/ghost", headers=AUTH)
    assert missing.status == 404
    assert (await missing.json())["code"] == "not_found"
    assert "x1" in rt.hub.devices


async def test_a_deleted_device_stays_deleted_across_a_restart(
    make_app: AppFactory, tmp_path: Path
) -> None:
    data = tmp_path / "kept"
    client = await make_app(data_dir=data)
    rt = runtime_of(client)
    await known_offline(rt, "r1", readings=2)
    await known_offline(rt, "r2")
    assert (await client.delete("/api/devices/r1", headers=AUTH)).status == 200
    await client.close()
    again = await make_app(data_dir=data)
    page = await (await again.get("/api/devices", headers=VIEW)).json()
    assert [e["device"] for e in page["devices"]] == ["r2"]
    # r2 stopped with the gateway's own stop or its link's close: a reason either way.
    assert page["devices"][0]["offline_reason"] in ("closed", "lost", "shutdown")


async def test_a_delete_the_storage_cannot_do_keeps_the_device(make_app: AppFactory) -> None:
    client = await make_app()
    rt = runtime_of(client)
    await known_offline(rt, "f1")
    disk = DiskFull(rt.storage)  # type: ignore[arg-type]
    disk.on.set()
    resp = await client.delete("/api/devices/f1", headers=AUTH)
    assert resp.status == 503
    assert (await resp.json())["code"] == "storage_unavailable"
    disk.on.clear()
    assert (await client.get("/api/devices/f1", headers=VIEW)).status == 200
    assert (await client.delete("/api/devices/f1", headers=AUTH)).status == 200


async def test_devices_forgotten_for_being_unseen_are_removed_from_dashboards(
    make_app: AppFactory,
) -> None:
    client = await make_app(dashboards={"forget_after": 0.3})
    rt = runtime_of(client)
    d = await dash(client)
    await d.request({"op": "subscribe", "all": True}, "subscribed")
    await known_offline(rt, "u1")
    removed = await d.expect("removed", timeout=10)
    assert removed == {"op": "removed", "device": "u1", "reason": "unseen"}
    assert "u1" not in rt.hub.devices
