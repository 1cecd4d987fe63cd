"""What a new user meets at start (issue 13, rough edges): each case ran as written before.

Every failure to start is one ERROR line, no traceback, and the exit status
docs/configuration.md ("Exit statuses") gives; warnings name what to fix.
Most cases run a real ``iot-gateway serve`` (tests/support/gateway.py).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import stat
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.cli import EXIT_CONFIG, EXIT_LISTEN, EXIT_STORAGE, protocol_warnings, version
from gateway.config import build_config
from tests.gateway.test_cli import (
    GatewayFactory,
    _one_error,
    close_device,
    device_sends,
    gateways,
    get_json,
    ready,
    run_main,
    serve_args,
)
from tests.support.gateway import GatewayProcess
from tests.support.wait import wait_until

__all__ = ["gateways"]  # the fixture, used by name

ENV_BODY = struct.pack(">hHB", 2137, 4550, 97)


# ---- the command line ----------------------------------------------------------------------


def test_version_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(["--version"], capsys)
    assert code == 0
    assert out == f"iot-gateway {version()}\n"
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", version())


def test_an_unknown_serve_flag_prints_serves_usage(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(["serve", "--bogus"], capsys)
    assert code == EXIT_CONFIG
    assert out == ""
    assert err.startswith("usage: iot-gateway serve ")  # not the top level's "iot-gateway [-h]"
    assert "--data-dir" in err
    assert err.endswith("iot-gateway serve: error: unrecognized arguments: --bogus\n")


@pytest.mark.parametrize("columns", ["40", "60", "80", "100", "140"])
def test_simulate_help_never_cuts_a_fault_spec_in_two(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, columns: str
) -> None:
    # argparse used to wrap "silent=30" as "sil ent=30" at 80 columns.
    monkeypatch.setenv("COLUMNS", columns)
    code, out, _ = run_main(["simulate", "--help"], capsys)
    assert code == 0
    words = " ".join(out.split())
    for token in ("silent=30", "split,flip=0.001,silent=30", "garbage=P,", "badtoken;", "merge=K,"):
        assert token in words, (columns, out)


def test_a_config_file_that_is_not_utf8_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "gateway.toml"
    path.write_bytes('host = "127.0.0.1"\n# caf\xe9 Latin-1\n'.encode("latin-1"))
    code, out, err = run_main(["serve", "--config", str(path)], capsys)
    assert code == EXIT_CONFIG
    assert out == ""
    assert err == (
        f"iot-gateway: config file {path} is not UTF-8: byte 24 (line 2, column 6) is 0xe9; "
        "save it as UTF-8\n"
    )


# ---- protocol names ------------------------------------------------------------------------


def test_a_protocol_typo_is_a_warning_naming_the_closest_known_one() -> None:
    config = build_config(
        {
            "serial": [
                {"url": "/dev/ttyUSB0", "client_id": "s-1", "protocol": "env_sensor"},
                {"url": "/dev/ttyUSB1", "client_id": "s-2", "protocol": "env-sensor"},
                {"url": "/dev/ttyUSB2", "client_id": "s-3", "protocol": "acme-weird"},
            ],
            "devices": {"heartbeat_overrides": {"protocols": {"relay4": 300}}},
        },
        environ={},
    )
    assert protocol_warnings(config) == [
        "serial /dev/ttyUSB0: protocol 'env_sensor' is not a known protocol "
        "(did you mean 'env-sensor'?); its DATA will be carried as hex",
        "serial /dev/ttyUSB2: protocol 'acme-weird' is not a known protocol "
        "(known: env-sensor, relay-4); its DATA will be carried as hex",
        "devices.heartbeat_overrides.protocols.relay4: protocol 'relay4' is not a known "
        "protocol (did you mean 'relay-4'?); its DATA will be carried as hex",
    ]
    clean = build_config(
        {"devices": {"heartbeat_overrides": {"protocols": {"env-sensor": 300}}}}, environ={}
    )
    assert protocol_warnings(clean) == []


async def test_a_serial_protocol_typo_is_warned_at_start_and_still_accepted(
    gateways: GatewayFactory, tmp_path: Path
) -> None:
    gw = gateways(
        *serve_args(tmp_path / "d", "--token", "T"),
        "--serial",
        f"{tmp_path / 'ttyNONE'},client_id=s-1,protocol=env_sensor",
    )
    await ready(gw)  # unknown names stay legal: it starts
    warnings = [line for line in gw.stderr().splitlines() if " WARNING " in line]
    assert any("'env_sensor'" in w and "did you mean 'env-sensor'?" in w for w in warnings), (
        warnings
    )
    status, body = await get_json(f"{gw.url}/api/serial", "T")
    assert status == 200
    assert body["ports"][0]["protocol"] == "env_sensor"
    assert (await gw.stop(timeout=5.0)).code == 0


# ---- ports and offsets ---------------------------------------------------------------------


@pytest.mark.parametrize("role", ["devices", "http"])
async def test_a_failed_start_on_a_busy_port_uses_up_no_offsets(
    gateways: GatewayFactory, tmp_path: Path, role: str
) -> None:
    # Each failed start reserved a block of offsets: 1 -> 1048577 -> 2097153 ...
    data_dir = tmp_path / "data"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        for _ in range(2):
            ports = ["--device-port", port, "--http-port", "0"]
            if role == "http":
                ports = ["--device-port", "0", "--http-port", port]
            failed = gateways(*ports, "--data-dir", str(data_dir), "--token", "T")
            failed.launch()
            exit = await failed.wait_exit(timeout=10)
            assert exit.code == EXIT_LISTEN, exit
            assert f"127.0.0.1:{port} is in use" in _one_error(exit)
            assert "storage open" not in exit.stderr  # refused before the storage opened
    gw = gateways(*serve_args(data_dir, "--token", "T"))
    await ready(gw)
    _, writer = await device_sends(gw.device_address, "first-1", ENV_BODY)
    url = f"{gw.url}/api/devices/first-1/telemetry"

    async def stored() -> list[int]:
        status, body = await get_json(url, "T")
        assert status == 200, body
        return [t["offset"] for t in body["telemetry"]]

    offsets: list[int] = []

    async def arrived() -> bool:
        offsets[:] = await stored()
        return bool(offsets)

    await wait_until(arrived, "the first telemetry stored", timeout=10)
    await close_device(writer)
    assert offsets == [1]
    assert (await gw.stop(timeout=5.0)).code == 0


# ---- the data dir --------------------------------------------------------------------------


async def test_a_file_where_the_data_dir_should_be_is_named(
    gateways: GatewayFactory, tmp_path: Path
) -> None:
    not_a_dir = tmp_path / "data"
    not_a_dir.write_text("")
    gw = gateways(*serve_args(not_a_dir))
    gw.launch()
    exit = await gw.wait_exit(timeout=10)
    assert exit.code == EXIT_STORAGE, exit
    line = _one_error(exit)
    assert line.endswith(
        f"cannot start the gateway: data dir {not_a_dir} is a file, not a directory "
        "(--data-dir / data_dir)"
    ), line


def _read_only_command(data_dir: Path) -> list[str] | None:
    """``python -m gateway.cli`` with ``data_dir`` read-only for it, or None if impossible.

    As a user a chmod does it; root writes through permissions, so root gets a
    read-only bind mount of the directory in a private mount namespace.
    """
    python = [sys.executable, "-m", "gateway.cli"]
    if os.geteuid() != 0:
        data_dir.chmod(0o555)
        return python
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    script = 'mount --bind "$D" "$D" && mount -o remount,bind,ro "$D" && shift && exec "$@"'
    probe = subprocess.run(
        [unshare, "-m", "sh", "-c", script, "sh", str(data_dir), "true"],
        env={**os.environ, "D": str(data_dir)},
        capture_output=True,
        timeout=10,
        check=False,
    )
    if probe.returncode != 0:
        return None
    return [unshare, "-m", "sh", "-c", f'D="{data_dir}"; {script}', "sh", "x", *python]


async def test_a_read_only_data_dir_is_one_line_naming_it_and_exit_3(tmp_path: Path) -> None:
    data_dir = tmp_path / "ro-data"
    data_dir.mkdir()
    command = _read_only_command(data_dir)
    if command is None:
        pytest.skip("cannot make a directory read-only for root here (no unshare / mount)")
    gw = GatewayProcess(
        tmp_path / "gw", args=serve_args(data_dir), bare=True, command=command, cwd=tmp_path
    )
    try:
        gw.launch()
        exit = await gw.wait_exit(timeout=20)
    finally:
        data_dir.chmod(0o755)
        gw.kill_sync()
    assert exit.code == EXIT_STORAGE, exit
    line = _one_error(exit)
    assert f"data dir {data_dir} is not writable" in line, line
    assert line.endswith("(--data-dir / data_dir)"), line
    assert "unable to open database file" not in exit.stderr


# ---- max_connections -----------------------------------------------------------------------


@pytest.mark.parametrize("explicit", [False, True])
async def test_max_connections_lowered_is_a_warning_only_when_the_user_set_it(
    tmp_path: Path, explicit: bool
) -> None:
    config = {"devices": {"max_connections": 20000}} if explicit else {}
    gw = GatewayProcess(tmp_path / "gw", config or None, token="T", fd_limit=4096, name="limits")
    await gw.start(timeout=30)
    log = gw.stderr()
    assert (await gw.stop(timeout=5.0)).code == 0
    lowered = [line for line in log.splitlines() if "max_connections lowered from 20000" in line]
    assert len(lowered) == 1, log
    if explicit:
        assert " WARNING " in lowered[0]
    else:
        assert " INFO " in lowered[0]  # the default adapts quietly
        assert " WARNING " not in log


# ---- the operator token --------------------------------------------------------------------


async def test_a_generated_token_is_kept_in_the_data_dir_across_restarts(
    gateways: GatewayFactory, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    first = gateways(*serve_args(data_dir))
    await ready(first)
    token = first.token
    assert token
    path = data_dir / "operator.token"
    assert path.read_text() == f"{token}\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert (await first.stop(timeout=5.0)).code == 0

    second = gateways(*serve_args(data_dir))
    await ready(second)
    assert second.token == token  # the same token printed again: browsers stay logged in
    assert (await get_json(f"{second.url}/api/devices", token))[0] == 200
    assert (await second.stop(timeout=5.0)).code == 0

    # A configured token wins, and the kept one is left alone (not printed, not changed).
    third = gateways(*serve_args(data_dir, "--token", "configured"))
    await ready(third)
    assert token not in third.stderr()
    assert (await get_json(f"{third.url}/api/devices", token))[0] == 401
    assert (await third.stop(timeout=5.0)).code == 0
    assert path.read_text() == f"{token}\n"


async def test_a_token_file_others_can_read_is_made_private(
    gateways: GatewayFactory, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    path = data_dir / "operator.token"
    path.write_text("kept-token-1234567890\n")
    path.chmod(0o644)
    gw = gateways(*serve_args(data_dir))
    await ready(gw)
    assert gw.token == "kept-token-1234567890"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "readable by others" in gw.stderr()
    assert (await gw.stop(timeout=5.0)).code == 0
