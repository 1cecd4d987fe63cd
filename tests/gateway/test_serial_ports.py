"""Configured serial ports are visible: ``GET /api/serial`` and ``/healthz`` (docs/api.md §4).

A port that never opens (``/dev/ttyUSB0`` absent) used to be a log WARNING
only; now each configured port is listed from the start with its state
(open, retrying, missing), since when and the last error, and ``/healthz``
counts them while its status stays 200.
"""

from __future__ import annotations

import contextlib
import os
import tty
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.app import create_app
from gateway.auth import TokenTable
from gateway.config import build_config
from gateway.web.serial import SERIAL_PORTS
from tests.gateway.conftest import AppFactory
from tests.gateway.support import OPERATOR, VIEWER
from tests.support.wait import wait_until

FAST = {"backoff_base": 0.05, "backoff_cap": 0.2}


@pytest.fixture
def pty_path() -> Iterator[tuple[str, list[int]]]:
    """A pseudo-terminal: its slave path for the gateway, and both fds (to unplug it)."""
    master, slave = os.openpty()
    tty.setraw(master)
    fds = [master, slave]
    yield os.ttyname(slave), fds
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _table(tmp_path: Path, pty: str) -> dict[str, Any]:
    return {
        "data_dir": str(tmp_path / "data"),
        "device_port": 0,
        "serial": [
            {"url": pty, "client_id": "boiler-1", "protocol": "env-sensor", **FAST},
            {"url": str(tmp_path / "ttyUSB-absent"), **FAST},
            # A port that exists and refuses: a TCP port nobody listens on.
            {"url": "socket://127.0.0.1:1", **FAST},
        ],
    }


def test_ports_are_listed_before_the_gateway_starts(
    tmp_path: Path, pty_path: tuple[str, list[int]]
) -> None:
    config = build_config(_table(tmp_path, pty_path[0]), environ={})
    app = create_app(config, TokenTable.make(OPERATOR, VIEWER))
    ports = app[SERIAL_PORTS]()
    assert [p["url"] for p in ports] == [p.url for p in config.serial_ports()]
    assert {p["state"] for p in ports} == {"retrying"}  # not open yet
    assert ports[0]["client_id"] == "boiler-1"
    assert ports[0]["protocol"] == "env-sensor"
    assert all(p["error"] is None and p["since"] > 0 for p in ports)


async def test_api_serial_and_healthz_show_each_ports_state(
    make_app: AppFactory, tmp_path: Path, pty_path: tuple[str, list[int]]
) -> None:
    pty, fds = pty_path
    client = await make_app(**_table(tmp_path, pty))
    auth = {"Authorization": f"Bearer {VIEWER}"}

    async def states() -> list[str]:
        response = await client.get("/api/serial", headers=auth)
        assert response.status == 200
        return [p["state"] for p in (await response.json())["ports"]]

    async def settled() -> bool:
        return await states() == ["open", "missing", "retrying"]

    await wait_until(settled, "ports open, missing and retrying", timeout=10)
    ports = (await (await client.get("/api/serial", headers=auth)).json())["ports"]
    opened, missing, refused = ports
    assert opened["error"] is None
    assert missing["url"].endswith("ttyUSB-absent")
    assert "No such file" in missing["error"]
    assert missing["client_id"] is None
    assert missing["protocol"] is None
    assert refused["error"]  # the refusal, in pyserial's words
    health = await client.get("/healthz")
    assert health.status == 200  # a missing port is shown, not a failure of the node
    body = await health.json()
    assert body["status"] == "ok"
    assert body["serial"] == {"open": 1, "retrying": 1, "missing": 1}
    metrics = await (await client.get("/metrics")).text()
    for state in ("open", "retrying", "missing"):
        assert f'iot_serial_ports{{state="{state}"}} 1.0' in metrics

    # Unplugged: the open port goes to retrying (then missing, its node gone).
    since = opened["since"]
    for fd in fds:
        os.close(fd)

    async def unplugged() -> bool:
        return (await states())[0] != "open"

    await wait_until(unplugged, "the unplugged port leaves open", timeout=10)
    after = (await (await client.get("/api/serial", headers=auth)).json())["ports"][0]
    assert after["since"] >= since
    assert after["error"]


async def test_api_serial_needs_a_token_and_lists_nothing_without_ports(
    make_app: AppFactory,
) -> None:
    client = await make_app()
    response = await client.get("/api/serial")
    assert response.status == 401
    assert (await response.json())["code"] == "unauthorized"
    response = await client.get("/api/serial", headers={"Authorization": f"Bearer {OPERATOR}"})
    assert await response.json() == {"ports": []}
    body = await (await client.get("/healthz")).json()
    assert body["serial"] == {"open": 0, "retrying": 0, "missing": 0}
