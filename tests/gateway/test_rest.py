"""The HTTP API, /metrics and the page end to end (docs/api.md §4)."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import frames
from gateway.storage import SQLiteStorage, StorageError
from tests.gateway.conftest import OPERATOR, VIEWER, AppFactory
from tests.gateway.storage_support import DiskFull
from tests.gateway.support import ENV_DATA, dash, device, runtime_of
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
    # An old link's ?token= must not travel on in a Referer.
    assert page.headers["Referrer-Policy"] == "no-referrer"
    api = await client.get("/healthz")
    assert "Content-Security-Policy" not in api.headers


# ---- every /api answer is JSON (docs/api.md §2) ------------------------------------------------


async def test_unknown_paths_and_methods_under_api_are_json(make_app: AppFactory) -> None:
    client = await make_app()
    auth = {"Authorization": f"Bearer {OPERATOR}"}
    for method, path, status, code in [
        ("GET", "/api/nope", 404, "not_found"),
        ("GET", "/api", 404, "not_found"),
        ("GET", "/api/devices/x/y/z", 404, "not_found"),
        ("DELETE", "/api/devices", 405, "method_not_allowed"),
        ("GET", "/api/devices/x/commands", 405, "method_not_allowed"),
        ("PUT", "/api/devices/x", 405, "method_not_allowed"),
    ]:
        resp = await client.request(method, path, headers=auth)
        assert resp.status == status, (method, path)
        assert resp.content_type == "application/json", (method, path)
        body = await resp.json()
        assert body["code"] == code, (method, path, body)
        assert body["message"]
    # 405 still says what is allowed.
    resp = await client.delete("/api/devices", headers=auth)
    assert resp.headers["Allow"] == "GET,HEAD"
    # The page's paths are no API: aiohttp's own answer stands there.
    assert (await client.get("/static/nope.js")).content_type != "application/json"


async def test_an_unexpected_error_is_a_json_500_logged_once(
    make_app: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    client = await make_app()
    rt = runtime_of(client)

    def broken(*args: object) -> list[dict[str, object]]:
        raise KeyError("a bug")

    rt.hub.devices_page = broken  # type: ignore[method-assign,assignment]
    with caplog.at_level(logging.ERROR):
        resp = await client.get("/api/devices", headers={"Authorization": f"Bearer {OPERATOR}"})
    assert resp.status == 500
    assert resp.content_type == "application/json"
    assert (await resp.json())["code"] == "internal_error"
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    assert errors[0].exc_info is not None
    assert "GET /api/devices" in errors[0].getMessage()


async def test_a_connection_error_of_the_gateway_is_a_500_not_a_client_gone(
    make_app: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    # A device link's ConnectionResetError must not pass for the HTTP client leaving.
    client = await make_app()
    rt = runtime_of(client)

    async def link_reset(*args: object) -> object:
        raise ConnectionResetError("a device link reset")

    rt.hub.submit_command = link_reset  # type: ignore[method-assign,assignment]
    with caplog.at_level(logging.ERROR):
        resp = await client.post(
            "/api/devices/x/commands",
            json={"command": {"hex": "00"}},
            headers={"Authorization": f"Bearer {OPERATOR}"},
        )
    assert resp.status == 500
    assert (await resp.json())["code"] == "internal_error"
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1


async def test_a_deeply_nested_body_is_400_not_500(make_app: AppFactory) -> None:
    # dc04a44: json.loads raised RecursionError, a plain-text 500.
    client = await make_app()
    depth = 30_000  # 60,000 bytes: under the 64 KiB body limit
    for body in ("[" * depth + "]" * depth, '{"command":' + "[" * depth + "]" * depth + "}"):
        resp = await client.post(
            "/api/devices/x/commands",
            data=body,
            headers={"Authorization": f"Bearer {OPERATOR}", "Content-Type": "application/json"},
        )
        assert resp.status == 400
        assert await resp.json() == {"code": "bad_request", "message": "body is nested too deeply"}


# ---- the command rate of HTTP callers (docs/api.md §4) -----------------------------------------


async def test_commands_over_http_are_rate_limited_per_token(make_app: AppFactory) -> None:
    client = await make_app(dashboards={"commands_per_second": 2.0})
    rt = runtime_of(client)
    await device(rt, "r1")
    auth = {"Authorization": f"Bearer {OPERATOR}"}
    cmd = {"command": {"name": "reboot"}}
    answers = [
        await client.post("/api/devices/r1/commands", json=cmd, headers=auth) for _ in range(6)
    ]
    statuses = [a.status for a in answers]
    # A burst of one second's worth (2), then refusals: the test runs well within a second
    # of refills, so at most one more may have been earned meanwhile.
    assert statuses[:2] == [202, 202]
    refused = [a for a in answers if a.status == 429]
    assert len(refused) >= 3, statuses
    for a in refused:
        assert a.headers["Retry-After"] == "1"
        assert await a.json() == {
            "code": "rate_limited",
            "message": "over 2 commands per second for this token",
        }
    metrics = await (await client.get("/metrics")).text()
    assert f'iot_refused_total{{limit="command_rate"}} {float(len(refused))}' in metrics
    # Another connection with the same token shares the allowance ...
    async with aiohttp.ClientSession() as other:
        url = str(client.make_url("/api/devices/r1/commands"))
        async with other.post(url, json=cmd, headers=auth) as resp:
            assert resp.status in (202, 429)
    # ... while a WebSocket dashboard keeps its own (docs/api.md §3.2).
    d = await dash(client)
    await d.send({"op": "command", "id": "w", "device": "r1", "command": {"name": "reboot"}})
    assert (await d.expect("command_status", id="w"))["status"] == "sent"
    # A viewer gets 403 before any allowance is spent.
    viewer = {"Authorization": f"Bearer {VIEWER}"}
    assert (await client.post("/api/devices/r1/commands", json=cmd, headers=viewer)).status == 403


# ---- GET /api/devices by page (docs/api.md §4) -------------------------------------------------


async def test_the_device_listing_comes_by_page(make_app: AppFactory) -> None:
    """dc04a44 listed every known device in one answer (31 MB at 100,000), with no ``next``."""
    client = await make_app(dashboards={"devices_page_size": 2})
    rt = runtime_of(client)
    names = ["pg-a", "pg-b", "pg-c", "pg-d", "pg-e"]
    for name in reversed(names):
        await device(rt, name)
    auth = {"Authorization": f"Bearer {VIEWER}"}

    async def page(query: str) -> dict[str, Any]:
        resp = await client.get(f"/api/devices{query}", headers=auth)
        assert resp.status == 200, await resp.text()
        body: dict[str, Any] = await resp.json()
        assert set(body) == {"devices", "next"}
        return body

    # Followed by ``next``, each device once, by id; ``next`` is null on the last page.
    seen: list[list[str]] = []
    query = ""
    while True:
        body = await page(query)
        seen.append([d["device"] for d in body["devices"]])
        if body["next"] is None:
            break
        assert body["next"] == seen[-1][-1]
        query = f"?after={body['next']}"
    assert seen == [["pg-a", "pg-b"], ["pg-c", "pg-d"], ["pg-e"]]
    # The entries are those of the WebSocket's devices reply.
    first = (await page(""))["devices"][0]
    assert first == rt.hub.registry.get("pg-a").listing()  # type: ignore[union-attr]
    # Smaller pages on request; a larger limit than the page size gives a full page.
    assert await page("?limit=1") == {"devices": [first], "next": "pg-a"}
    assert [d["device"] for d in (await page("?limit=500"))["devices"]] == ["pg-a", "pg-b"]
    assert await page("?after=pg-d&limit=1") == {
        "devices": [rt.hub.registry.get("pg-e").listing()],  # type: ignore[union-attr]
        "next": None,
    }
    # An id between devices, or after the last one.
    assert [d["device"] for d in (await page("?after=pg-bb"))["devices"]] == ["pg-c", "pg-d"]
    assert await page("?after=zzz") == {"devices": [], "next": None}


@pytest.mark.parametrize(
    "query",
    [
        "limit=0",
        "limit=-1",
        "limit=x",
        "limit=",
        "limit=1.5",
        "limit=%205",
        "after=",
        "after=" + "a" * 65,
    ],
)
async def test_bad_listing_parameters_are_400(make_app: AppFactory, query: str) -> None:
    client = await make_app()
    resp = await client.get(f"/api/devices?{query}", headers={"Authorization": f"Bearer {VIEWER}"})
    assert resp.status == 400
    body = await resp.json()
    assert body["code"] == "bad_request"
    assert body["message"]


# ---- the telemetry history while the storage fails (docs/api.md §4) ----------------------------


async def test_history_while_the_storage_fails_is_503_and_heals(make_app: AppFactory) -> None:
    """dc04a44 answered a JSON 500 (``internal_error``), as for a bug of the gateway."""
    client = await make_app()
    rt = runtime_of(client)
    assert isinstance(rt.storage, SQLiteStorage)
    disk = DiskFull(rt.storage)
    auth = {"Authorization": f"Bearer {VIEWER}"}
    dev = await device(rt, "hist")
    dev.send(frames.Data(1, ENV_DATA))
    await wait_until(lambda: rt.hub.devices["hist"].last is not None, "the first reading")

    disk.on.set()
    dev.send(frames.Data(2, ENV_DATA))  # a batch to fail

    async def degraded() -> bool:
        status: int = (await client.get("/healthz")).status
        return status == 503

    await wait_until(degraded, "/healthz degraded", timeout=10)
    resp = await client.get("/api/devices/hist/telemetry", headers=auth)
    assert resp.status == 503
    assert resp.content_type == "application/json"
    assert resp.headers["Retry-After"] == "5"
    body = await resp.json()
    assert body["code"] == "storage_unavailable"
    assert body["message"].startswith("storage unavailable: database or disk is full")
    assert str(rt.storage.path) not in body["message"]

    disk.on.clear()

    async def answered() -> bool:
        status: int = (await client.get("/api/devices/hist/telemetry", headers=auth)).status
        return status == 200

    await wait_until(answered, "the history readable again", timeout=10)
    tel = await (await client.get("/api/devices/hist/telemetry", headers=auth)).json()
    assert [t["seq"] for t in tel["telemetry"]] == [1, 2]  # what waited was kept


async def test_a_failed_history_read_is_503_without_the_file_name(make_app: AppFactory) -> None:
    """A read that fails (a damaged page, an I/O error) while writes still succeed."""
    client = await make_app()
    rt = runtime_of(client)
    await device(rt, "rd")
    path = str(getattr(rt.storage, "path", "gateway.sqlite3"))

    async def read_fails(*args: object, **kwargs: object) -> list[object]:
        raise StorageError(f"{path}: read failed: database disk image is malformed")

    rt.storage.telemetry_since = read_fails  # type: ignore[method-assign,assignment]
    resp = await client.get(
        "/api/devices/rd/telemetry", headers={"Authorization": f"Bearer {VIEWER}"}
    )
    assert resp.status == 503
    assert resp.headers["Retry-After"] == "5"
    body = await resp.json()
    assert body["code"] == "storage_unavailable"
    assert path not in body["message"]


async def test_the_health_answers_in_deployment_md_are_the_real_ones(make_app: AppFactory) -> None:
    """docs/deployment.md showed a /healthz body the gateway no longer gave (no ``storage``)."""
    doc = (Path(__file__).parents[2] / "docs" / "deployment.md").read_text(encoding="utf-8")
    shown = [json.loads(line) for line in doc.splitlines() if line.startswith('    {"status": ')]
    examples = {body["status"]: body for body in shown}
    assert set(examples) == {"ok", "degraded"}, shown

    def shape(body: dict[str, Any]) -> dict[str, Any]:
        return {k: shape(v) if isinstance(v, dict) else type(v).__name__ for k, v in body.items()}

    client = await make_app()
    rt = runtime_of(client)
    assert isinstance(rt.storage, SQLiteStorage)
    disk = DiskFull(rt.storage)
    ok = await client.get("/healthz")
    assert ok.status == 200
    assert shape(await ok.json()) == shape(examples["ok"])
    dev = await device(rt, "hz")
    disk.on.set()
    dev.send(frames.Data(1, ENV_DATA))
    answers: list[Any] = []

    async def degraded() -> bool:
        resp = await client.get("/healthz")
        status: int = resp.status
        answers[:] = [status, await resp.json()]
        return status == 503

    await wait_until(degraded, "/healthz degraded", timeout=10)
    assert shape(answers[1]) == shape(examples["degraded"])
    disk.on.clear()
