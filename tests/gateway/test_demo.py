"""``iot-gateway serve --demo N`` as a user runs it: a real process, real sockets, a real pty."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.support.gateway import GatewayProcess
from tests.support.wait import wait_until


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
async def test_demo_five_devices_one_serial_and_clean_exit(tmp_path: Path, loop: str) -> None:
    # No token: the demo makes one and prints the dashboard URL with it.
    gw = GatewayProcess(tmp_path, args=["--demo", "5"], env={"IOT_GATEWAY_LOOP": loop})
    try:
        await gw.start(timeout=20)
        assert gw.token, gw.stderr()
        online: list[dict[str, Any]] = []

        async def five_online() -> bool:
            listing = (await gw.get_json("/api/devices"))["devices"]
            online[:] = [d for d in listing if d["online"] and d["last"] is not None]
            return len(online) == 5

        # Polling the API, as a user would.
        await wait_until(five_online, "five demo devices online with telemetry", timeout=30)
        assert sorted(d["transport"] for d in online) == ["serial", "tcp", "tcp", "tcp", "tcp"]
        assert {d["protocol"] for d in online} == {"env-sensor", "relay-4"}
        exit = await gw.stop(timeout=5)
        assert exit.code == 0, exit
    finally:
        await gw.kill()
