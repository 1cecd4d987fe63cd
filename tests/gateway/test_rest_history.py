"""History over HTTP: last N, a time range with paging, CSV export, out-of-range
flags (GET /api/devices/{id}/telemetry, docs/api.md §4). The rows are put in the
real SQLite storage with chosen timestamps, beside a device the hub knows."""

from __future__ import annotations

import csv
import io
from typing import Any

import pytest

from gateway.app import Runtime
from gateway.storage import TelemetryRecord
from tests.gateway.conftest import VIEWER, AppFactory
from tests.gateway.support import device, runtime_of

VIEW = {"Authorization": f"Bearer {VIEWER}"}
T0 = 1_700_000_000_000


async def stored(rt: Runtime, device_id: str, protocol: str, datas: list[dict[str, Any]]) -> None:
    """Known device ``device_id`` with these readings at T0, T0+1000, ... (then flushed)."""
    await device(rt, device_id, protocol)
    for i, data in enumerate(datas):
        rt.storage.append_telemetry(
            TelemetryRecord(rt.storage.next_offset(), device_id, protocol, T0 + 1000 * i, i, data)
        )
    await rt.storage.flush()


def env(i: int, battery: int = 90) -> dict[str, Any]:
    return {"temperature_c": 20.0 + i, "humidity_pct": 50.0, "battery_pct": battery}


async def get(client: Any, query: str, **headers: str) -> Any:
    resp = await client.get(f"/api/devices/h1/telemetry?{query}", headers={**VIEW, **headers})
    return resp


async def seqs(client: Any, query: str) -> tuple[list[int], Any]:
    resp = await get(client, query)
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    return [t["seq"] for t in body["telemetry"]], body["next"]


async def test_last_n_is_the_newest_oldest_first(make_app: AppFactory) -> None:
    client = await make_app()
    await stored(runtime_of(client), "h1", "env-sensor", [env(i) for i in range(10)])
    assert await seqs(client, "last=3") == ([7, 8, 9], None)
    assert await seqs(client, "last=1000") == (list(range(10)), None)
    # Within a time range: the newest of the range.
    assert await seqs(client, f"last=2&from={T0}&to={T0 + 5000}") == ([3, 4], None)


async def test_a_time_range_from_inclusive_to_exclusive_pages_with_next(
    make_app: AppFactory,
) -> None:
    client = await make_app()
    await stored(runtime_of(client), "h1", "env-sensor", [env(i) for i in range(10)])
    assert await seqs(client, f"from={T0 + 2000}&to={T0 + 5000}") == ([2, 3, 4], None)
    assert (await seqs(client, f"from={T0 + 8000}"))[0] == [8, 9]
    assert (await seqs(client, f"to={T0 + 2000}"))[0] == [0, 1]
    assert (await seqs(client, f"from={T0 + 2000}&to={T0 + 2000}"))[0] == []
    # Paging: a full page says where the next starts, the last page says null.
    got: list[int] = []
    query = f"from={T0 + 1000}&to={T0 + 9000}&limit=3"
    since = None
    for _ in range(5):
        page, following = await seqs(client, query + ("" if since is None else f"&since={since}"))
        got += page
        if following is None:
            break
        since = following
    assert got == list(range(1, 9))


async def test_plain_paging_gains_next(make_app: AppFactory) -> None:
    client = await make_app()
    await stored(runtime_of(client), "h1", "env-sensor", [env(i) for i in range(4)])
    first, following = await seqs(client, "limit=2")
    assert first == [0, 1]
    assert following is not None
    second, after = await seqs(client, f"limit=2&since={following}")
    assert second == [2, 3]
    # A full page cannot know it is the last: its next leads to an empty one.
    assert await seqs(client, f"limit=2&since={after}") == ([], None)


@pytest.mark.parametrize(
    "query",
    [
        "last=0",
        "last=1001",
        "last=x",
        "last=3&since=5",
        "last=3&limit=5",
        "from=-1",
        "to=abc",
        f"from={T0 + 5}&to={T0}",
        "format=xml",
    ],
)
async def test_bad_history_parameters_are_400_json(make_app: AppFactory, query: str) -> None:
    client = await make_app()
    await stored(runtime_of(client), "h1", "env-sensor", [env(0)])
    resp = await get(client, query, Accept="text/csv")
    assert resp.status == 400
    assert resp.content_type == "application/json"
    assert (await resp.json())["code"] == "bad_request"


async def test_csv_flattens_the_data_and_flags_out_of_range(make_app: AppFactory) -> None:
    client = await make_app()
    rt = runtime_of(client)
    await stored(rt, "h1", "env-sensor", [env(0), env(1, battery=255), env(2)])
    for query, headers in (("format=csv", {}), ("", {"Accept": "text/csv"})):
        resp = await get(client, query, **headers)
        assert resp.status == 200
        assert resp.content_type == "text/csv"
        assert 'filename="h1.csv"' in resp.headers["Content-Disposition"]
        rows = list(csv.reader(io.StringIO(await resp.text())))
        assert rows[0] == [
            "offset",
            "ts",
            "seq",
            "temperature_c",
            "humidity_pct",
            "battery_pct",
            "out_of_range",
        ]
        assert [r[2] for r in rows[1:]] == ["0", "1", "2"]
        assert rows[2][1] == str(T0 + 1000)
        assert rows[2][3:] == ["21.0", "50.0", "255", "battery_pct"]
        assert rows[1][-1] == ""
        assert resp.headers["X-Next"] == ""
    # format=json wins over Accept.
    resp = await get(client, "format=json", Accept="text/csv")
    assert resp.content_type == "application/json"


async def test_csv_of_a_relay_has_one_column_per_channel(make_app: AppFactory) -> None:
    client = await make_app()
    rt = runtime_of(client)
    await device(rt, "h1", "relay-4")
    rt.storage.append_telemetry(
        TelemetryRecord(
            rt.storage.next_offset(),
            "h1",
            "relay-4",
            T0,
            0,
            {"channels": [True, False, False, True]},
        )
    )
    await rt.storage.flush()
    rows = list(csv.reader(io.StringIO(await (await get(client, "format=csv")).text())))
    assert rows[0] == ["offset", "ts", "seq", *(f"channels.{i}" for i in range(4)), "out_of_range"]
    assert rows[1][3:] == ["true", "false", "false", "true", ""]


async def test_errors_stay_json_when_csv_is_asked(make_app: AppFactory) -> None:
    client = await make_app()
    resp = await client.get("/api/devices/ghost/telemetry?format=csv", headers=VIEW)
    assert resp.status == 404
    assert (await resp.json())["code"] == "not_found"
    assert (await client.get("/api/devices/ghost/telemetry?format=csv")).status == 401


async def test_json_history_flags_out_of_range_values_kept_as_sent(make_app: AppFactory) -> None:
    client = await make_app()
    await stored(
        runtime_of(client),
        "h1",
        "env-sensor",
        [env(0), {"temperature_c": -60.5, "humidity_pct": 101.0, "battery_pct": 255}],
    )
    body = await (await get(client, "")).json()
    first, second = body["telemetry"]
    assert "out_of_range" not in first
    assert second["out_of_range"] == ["battery_pct", "humidity_pct", "temperature_c"]
    assert second["data"] == {"temperature_c": -60.5, "humidity_pct": 101.0, "battery_pct": 255}
