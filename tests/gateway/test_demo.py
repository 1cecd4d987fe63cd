"""``iot-gateway serve --demo N`` as a user runs it: a real process, real sockets, a real pty."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.support.gateway import ROOT, GatewayProcess
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


def _make(workdir: Path, *args: str) -> str:
    result = subprocess.run(
        ["make", "--no-print-directory", "-C", str(workdir), *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return result.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_demo_has_its_own_data_dir_which_make_clean_removes(tmp_path: Path) -> None:
    # A second `make demo` showed "16 devices, 6 online" (the old run's devices, in ./data),
    # and `make clean` left them there.
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    (tmp_path / "pyproject.toml").write_text("")
    # -n: print, do not run; -o: take the venv as installed.
    commands = _make(tmp_path, "-n", "-o", ".venv/.installed", "demo").splitlines()
    assert commands == [".venv/bin/iot-gateway serve --demo 6 --data-dir ./data-demo"]
    (tmp_path / "data-demo").mkdir()
    (tmp_path / "data-demo" / "gateway.sqlite3").write_text("")
    (tmp_path / "data").mkdir()  # a real gateway's history: never the Makefile's to remove
    _make(tmp_path, "clean")
    assert not (tmp_path / "data-demo").exists()
    assert (tmp_path / "data").is_dir()
