"""The HTTP API, /metrics and the page end to end (docs/api.md §4)."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import frames
from tests.gateway.conftest import OPERATOR, VIEWER, AppFactory
from tests.gateway.support import ENV_DATA, device, runtime_of
from tests.support.wait import wait_until


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


async def test_device_never_sent_anything_is_unknown_to_http(make_app: AppFactory) -> None:
    client = await make_app()
    resp = await client.get(
        "/api/devices/x/telemetry", headers={"Authorization": f"Bearer {OPERATOR}"}
    )
    assert resp.status == 404
    assert (await resp.json())["code"] == "not_found"


async def test_oversized_command_body_is_413(make_app: AppFactory) -> None:
    client = await make_app()
    resp = await client.post(
        "/api/devices/x/commands",
        data=json.dumps({"command": {"hex": "00"}, "pad": "x" * 70_000}),
        headers={"Authorization": f"Bearer {OPERATOR}", "Content-Type": "application/json"},
    )
    assert resp.status == 413
    assert (await resp.json())["code"] == "too_large"


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
