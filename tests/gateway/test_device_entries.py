"""Device entries across a restart: why and since when a device is offline
(docs/api.md §3.2 ``offline_since``, ``offline_reason``)."""

from __future__ import annotations

from pathlib import Path

from tests.gateway.conftest import VIEWER, AppFactory
from tests.gateway.support import device, runtime_of

VIEW = {"Authorization": f"Bearer {VIEWER}"}


async def test_a_device_online_when_the_gateway_stops_is_offline_for_shutdown(
    make_app: AppFactory, tmp_path: Path
) -> None:
    data = tmp_path / "kept"
    client = await make_app(data_dir=data)
    await device(runtime_of(client), "s1")
    entry = await (await client.get("/api/devices/s1", headers=VIEW)).json()
    assert (entry["online"], entry["offline_since"], entry["offline_reason"]) == (True, None, None)
    await client.close()
    again = await make_app(data_dir=data)
    entry = await (await again.get("/api/devices/s1", headers=VIEW)).json()
    assert entry["online"] is False
    assert entry["offline_reason"] == "shutdown"
    assert entry["offline_since"] == entry["last_seen"]
    # Counted since this start: nothing yet.
    assert entry["counters"] == {"telemetry": 0, "out_of_range": 0, "commands": 0, "nacks": 0}
