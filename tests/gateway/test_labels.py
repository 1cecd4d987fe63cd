"""Device labels: from the config file's [labels], set over the API (PUT
/api/devices/{id}/labels), kept across restarts, told to dashboards (docs/api.md
§3.1, §3.2, §4; docs/configuration.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.config import ConfigError, build_config
from gateway.hub.registry import check_labels
from tests.gateway.conftest import OPERATOR, VIEWER, AppFactory
from tests.gateway.storage_support import DiskFull
from tests.gateway.support import dash, device, runtime_of

AUTH = {"Authorization": f"Bearer {OPERATOR}"}
VIEW = {"Authorization": f"Bearer {VIEWER}"}
NONE = {"name": None, "location": None, "channels": None}
CONFIG_LABELS = {
    "r1": {"name": "Greenhouse", "location": "North bed", "channels": ["pump", "fan", "light"]}
}


async def entry(client: Any, device_id: str) -> dict[str, Any]:
    resp = await client.get(f"/api/devices/{device_id}", headers=VIEW)
    assert resp.status == 200
    body: dict[str, Any] = await resp.json()
    return body


async def test_config_labels_show_in_every_listing(make_app: AppFactory) -> None:
    client = await make_app(labels=CONFIG_LABELS)
    rt = runtime_of(client)
    await device(rt, "r1", "relay-4")
    await device(rt, "r2", "relay-4")
    assert (await entry(client, "r1"))["labels"] == CONFIG_LABELS["r1"]
    assert (await entry(client, "r2"))["labels"] == NONE
    page = await (await client.get("/api/devices", headers=VIEW)).json()
    assert [d["labels"] for d in page["devices"]] == [CONFIG_LABELS["r1"], NONE]
    d = await dash(client)
    listing = await d.request({"op": "devices"}, "devices")
    assert listing["devices"][0]["labels"] == CONFIG_LABELS["r1"]


async def test_put_labels_overrides_the_config_field_by_field_and_tells_dashboards(
    make_app: AppFactory,
) -> None:
    client = await make_app(labels=CONFIG_LABELS)
    rt = runtime_of(client)
    await device(rt, "r1", "relay-4")
    d = await dash(client)
    await d.request({"op": "subscribe", "device": "r1"}, "subscribed")
    resp = await client.put(
        "/api/devices/r1/labels", json={"name": "Tomatoes", "location": None}, headers=AUTH
    )
    assert resp.status == 200
    body = await resp.json()
    # The API's name wins; the location and channels the API leaves null are the file's.
    expected = {**CONFIG_LABELS["r1"], "name": "Tomatoes"}
    assert body["device"] == "r1"
    assert body["labels"] == expected
    told = await d.expect("labels")
    assert told == {"op": "labels", "device": "r1", "labels": expected}
    # Nulls everywhere: back to the file's labels.
    resp = await client.put("/api/devices/r1/labels", json={}, headers=AUTH)
    assert (await resp.json())["labels"] == CONFIG_LABELS["r1"]
    assert (await d.expect("labels"))["labels"] == CONFIG_LABELS["r1"]


async def test_api_labels_survive_a_restart(make_app: AppFactory, tmp_path: Path) -> None:
    data = tmp_path / "kept"
    client = await make_app(data_dir=data)
    rt = runtime_of(client)
    dev = await device(rt, "s1")
    labels = {"name": "Cellar", "location": "House", "channels": None}
    resp = await client.put("/api/devices/s1/labels", json=labels, headers=AUTH)
    assert resp.status == 200
    await dev.aclose()
    await client.close()
    again = await make_app(data_dir=data)
    assert (await entry(again, "s1"))["labels"] == labels


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"name": ""}, "name must be a string"),
        ({"name": 5}, "name must be a string"),
        ({"location": "x" * 101}, "location must be a string"),
        ({"channels": "pump"}, "channels must be a list"),
        ({"channels": [1, 2]}, "channels must be a list"),
        ({"channels": ["c"] * 33}, "channels must be a list"),
        ({"colour": "red"}, "unknown label 'colour'"),
        ([], "labels must be an object"),
    ],
)
async def test_bad_labels_are_refused_with_a_reason(
    make_app: AppFactory, body: Any, words: str
) -> None:
    client = await make_app()
    await device(runtime_of(client), "b1")
    resp = await client.put("/api/devices/b1/labels", json=body, headers=AUTH)
    assert resp.status == 400
    answer = await resp.json()
    assert answer["code"] == "bad_request"
    assert words in answer["message"]
    assert (await entry(client, "b1"))["labels"] == NONE


async def test_labels_need_an_operator_and_a_known_device(make_app: AppFactory) -> None:
    client = await make_app()
    await device(runtime_of(client), "v1")
    body = {"name": "x"}
    assert (await client.put("/api/devices/v1/labels", json=body)).status == 401
    assert (await client.put("/api/devices/v1/labels", json=body, headers=VIEW)).status == 403
    missing = await client.put("/api/devices/ghost/labels", json=body, headers=AUTH)
    assert missing.status == 404
    assert (await missing.json())["code"] == "not_found"
    bad_json = await client.put("/api/devices/v1/labels", data="{", headers=AUTH)
    assert bad_json.status == 400


async def test_labels_while_the_storage_fails_are_503(make_app: AppFactory) -> None:
    client = await make_app()
    rt = runtime_of(client)
    await device(rt, "f1")
    disk = DiskFull(rt.storage)  # type: ignore[arg-type]
    disk.on.set()
    resp = await client.put("/api/devices/f1/labels", json={"name": "x"}, headers=AUTH)
    assert resp.status == 503
    assert (await resp.json())["code"] == "storage_unavailable"
    assert resp.headers["Retry-After"] == "5"
    disk.on.clear()
    assert (await entry(client, "f1"))["labels"] == NONE


def test_config_labels_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"labels\.x: name must be a string"):
        build_config({"labels": {"x": {"name": ""}}}, environ={})
    with pytest.raises(ConfigError, match=r"labels\.bad id: not a device id"):
        build_config({"labels": {"bad id": {"name": "a"}}}, environ={})
    with pytest.raises(ConfigError, match=r"unknown key 'labels\.x\.colour'"):
        build_config({"labels": {"x": {"colour": "red"}}}, environ={})
    config = build_config({"labels": CONFIG_LABELS}, environ={})
    assert config.hub_config().labels == CONFIG_LABELS


def test_check_labels_fills_every_field() -> None:
    assert check_labels({}) == NONE
    assert check_labels({"channels": []}) == {**NONE, "channels": []}
