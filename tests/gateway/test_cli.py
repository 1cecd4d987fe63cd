"""``iot-gateway serve`` as a user runs it (docs/configuration.md, Command-line flags).

Flag parsing is tested in-process through ``main(argv)``. Everything about
running (the ready line, signals, exit statuses, the generated token) is
tested on a real child process, because signal handling and stdout buffering
only show their real behaviour there.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import re
import signal
import socket
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from frames import Data
from gateway.cli import (
    EXIT_CONFIG,
    EXIT_ERROR,
    EXIT_LISTEN,
    EXIT_OK,
    EXIT_STORAGE,
    GC_GEN0_THRESHOLD,
    main,
    tune_gc,
)
from simulators.handshake import DeviceHandshake, MessageReader, encode
from tests.support.gateway import ROOT, Exit, GatewayProcess

READY = re.compile(r"ready http=127\.0\.0\.1:(\d+) devices=127\.0\.0\.1:(\d+)\n")
DASHBOARD = re.compile(r"dashboard: http://127\.0\.0\.1:(\d+)/#token=(\S+)")
# docs/configuration.md, Command-line flags.
SECTION_6_FLAGS = [
    "--config",
    "--host",
    "--http-port",
    "--device-port",
    "--data-dir",
    "--token",
    "--viewer-token",
    "--serial",
    "--demo",
]


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``main(argv)``'s exit status, whether returned or raised by argparse."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


# ---- flags -------------------------------------------------------------------------------------


def test_serve_help_documents_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(["serve", "--help"], capsys)
    assert code == 0
    for flag in [*SECTION_6_FLAGS, "--device-token", "--log-level"]:
        # Each flag is listed in the options, with a help text after it.
        assert re.search(rf"^  {re.escape(flag)}\b.*\S", out, re.MULTILINE), flag
    for variable in ("IOT_GATEWAY_TOKEN", "IOT_GATEWAY_VIEWER_TOKEN", "IOT_GATEWAY_DEVICE_TOKEN"):
        assert variable in out
    assert "client_id=ID,protocol=NAME,baud=N" in out


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--http-port", "abc"], ["--http-port", "'abc' is not a port number"]),
        (["--device-port", "70000"], ["--device-port", "0..65535"]),
        (["--serial", "/dev/x,speed=1"], ["--serial", "unknown key 'speed'"]),
        (["--serial", "/dev/x,baud=fast"], ["--serial", "baud must be an integer"]),
        (["--serial", "/dev/x,client_id=meter-1"], ["--serial", "client_id and protocol"]),
        (["--demo", "-1"], ["--demo", ">= 0"]),
        (["--log-level", "loud"], ["--log-level", "invalid choice"]),
        (["--no-such-flag"], ["unrecognized arguments: --no-such-flag"]),
    ],
)
def test_bad_flag_exits_2_with_a_message(
    capsys: pytest.CaptureFixture[str], argv: list[str], words: list[str]
) -> None:
    code, out, err = run_main(["serve", *argv], capsys)
    assert code == 2
    assert out == ""
    assert "usage: iot-gateway" in err
    for word in words:
        assert word in err


def test_config_error_exits_2_naming_key_and_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text("[devices]\nheartbeat_s = 30\n")
    code, out, err = run_main(["serve", "--config", str(path)], capsys)
    assert code == 2
    assert out == ""
    assert err == f"iot-gateway: unknown key 'devices.heartbeat_s' in {path}\n"


def test_missing_config_file_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "missing.toml"
    code, _, err = run_main(["serve", "--config", str(path)], capsys)
    assert code == 2
    assert f"config file {path} does not exist" in err


# ---- a real gateway process --------------------------------------------------------------------


GatewayFactory = Callable[..., GatewayProcess]


@pytest.fixture
def gateways(tmp_path: Path) -> Iterator[GatewayFactory]:
    """``iot-gateway serve ARGS`` with exactly the flags a test gives (``bare``), not started.

    Their environment has no ``IOT_GATEWAY_*`` variable but those in ``env``
    (a developer's shell may set them). Each one still running at the end is killed.
    """
    made: list[GatewayProcess] = []

    def make(
        *args: str, config: dict[str, Any] | None = None, env: dict[str, str] | None = None
    ) -> GatewayProcess:
        gw = GatewayProcess(tmp_path / f"gw{len(made)}", config, args=args, bare=True, env=env)
        made.append(gw)
        return gw

    yield make
    for gw in made:
        gw.kill_sync()


async def ready(gw: GatewayProcess) -> None:
    """Start it; its first stdout line is the ready line, on loopback."""
    await gw.start(timeout=10.0)
    assert READY.fullmatch(gw.ready_line), f"{gw.ready_line!r}; stderr: {gw.stderr()}"


def serve_args(data_dir: Path, *extra: str) -> list[str]:
    return ["--http-port", "0", "--device-port", "0", "--data-dir", str(data_dir), *extra]


async def get_json(url: str, token: str | None = None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as http, http.get(url, headers=headers) as resp:
        return resp.status, await resp.json()


async def close_device(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


async def device_sends(
    address: tuple[str, int], client_id: str, body: bytes
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw TCP device: HELLO, wait for WELCOME, send one DATA."""
    reader, writer = await asyncio.open_connection(*address)
    handshake = DeviceHandshake(client_id, "env-sensor")
    messages = MessageReader(strict=True)
    writer.write(encode(handshake.hello()))
    async with asyncio.timeout(5):
        while not handshake.welcomed:
            data = await reader.read(4096)
            assert data, "the gateway closed the device link"
            for message in messages.feed(data):
                handshake.receive(message)
                assert not handshake.refused, handshake.error
    writer.write(encode(Data(2, body)))
    await writer.drain()
    return reader, writer


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_serve_prints_ready_serves_and_stops_on_signal(
    gateways: GatewayFactory, tmp_path: Path, sig: signal.Signals
) -> None:
    gw = gateways(*serve_args(tmp_path / "data", "--token", "T"))
    await ready(gw)
    status, body = await get_json(f"{gw.url}/healthz")
    assert status == 200
    assert body["status"] == "ok"
    # The devices address of the ready line is the live device port.
    _, writer = await device_sends(gw.device_address, "cli-1", struct.pack(">hHB", 2137, 4550, 97))
    await close_device(writer)
    exit = await gw.stop(sig, timeout=5.0)
    assert exit.code == 0, exit
    assert exit.stdout == ""  # the ready line was the only line on stdout
    assert exit.elapsed < 5.0
    assert "Traceback" not in exit.stderr


async def test_without_a_token_one_is_made_and_printed(
    gateways: GatewayFactory, tmp_path: Path
) -> None:
    gw = gateways(*serve_args(tmp_path / "data"))
    await ready(gw)
    # Printed before the ready line (docs/configuration.md, Command-line flags): there by now.
    match = DASHBOARD.search(gw.stderr())
    assert match, gw.stderr()
    assert f"127.0.0.1:{match.group(1)}" == f"{gw.http_host}:{gw.http_port}"
    token = match.group(2)
    assert gw.token == token
    # In the fragment (which browsers never send), never in the query (docs/api.md §1).
    assert "?token=" not in gw.stderr()
    base = gw.url
    assert await get_json(f"{base}/api/devices", token) == (200, {"devices": [], "next": None})
    status, body = await get_json(f"{base}/api/devices")
    assert (status, body["code"]) == (401, "unauthorized")
    status, _ = await get_json(f"{base}/api/devices", token + "x")
    assert status == 401
    # ?token= stays for scripts.
    assert (await get_json(f"{base}/api/devices?token={token}"))[0] == 200
    exit = await gw.stop(timeout=5.0)
    assert exit.code == 0, exit


@pytest.mark.parametrize("how", ["flag", "environment"])
async def test_a_configured_token_is_never_printed_even_with_demo(
    gateways: GatewayFactory, tmp_path: Path, how: str
) -> None:
    # dc04a44 printed "dashboard: ...?token=<the configured token>" for --demo.
    secret = "configured-secret-7f3a"
    args = serve_args(tmp_path / "data", "--demo", "1")
    if how == "flag":
        gw = gateways(*args, "--token", secret)
    else:
        gw = gateways(*args, env={"IOT_GATEWAY_TOKEN": secret})
    await ready(gw)
    # The page's address is still printed, without any token: its owner has it.
    assert f"dashboard: {gw.url}/\n" in gw.stderr(), gw.stderr()
    assert (await get_json(f"{gw.url}/api/devices", secret))[0] == 200
    exit = await gw.stop(timeout=5.0)
    assert exit.code == EXIT_OK, exit
    assert secret not in exit.stderr
    assert secret not in exit.stdout
    assert "token=" not in exit.stderr


async def test_token_from_the_environment_is_used_and_not_printed(
    gateways: GatewayFactory, tmp_path: Path
) -> None:
    env = {"IOT_GATEWAY_TOKEN": "env-secret", "IOT_GATEWAY_VIEWER_TOKEN": "env-viewer"}
    gw = gateways(*serve_args(tmp_path / "data"), env=env)
    await ready(gw)
    base = f"{gw.url}/api/devices"
    assert (await get_json(base, "env-secret"))[0] == 200
    assert (await get_json(base, "env-viewer"))[0] == 200
    exit = await gw.stop(timeout=5.0)
    assert exit.code == 0, exit
    assert not any("token=" in line or "env-secret" in line for line in exit.stderr.splitlines())


async def test_sigterm_keeps_accepted_telemetry_across_a_restart(
    gateways: GatewayFactory, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    first = gateways(*serve_args(data_dir, "--token", "T"))
    await ready(first)
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(f"{first.url}/ws?token=T") as ws,
    ):
        await ws.send_json({"op": "subscribe", "device": "keep-1", "id": 1})
        _, writer = await device_sends(
            first.device_address, "keep-1", struct.pack(">hHB", -512, 0, 5)
        )
        telemetry: dict[str, Any] | None = None
        async with asyncio.timeout(5):
            while telemetry is None:
                for line in (await ws.receive_str()).split("\n"):
                    msg = json.loads(line)
                    if msg["op"] == "telemetry":
                        telemetry = msg
        exit = await first.stop(timeout=5.0)
        # Shutdown closes the device first (the dashboard sees it go), then the socket.
        after: list[dict[str, Any]] = []
        async with asyncio.timeout(5):
            while (closing := await ws.receive()).type is aiohttp.WSMsgType.TEXT:
                after += [json.loads(line) for line in closing.data.split("\n")]
        assert closing.type is aiohttp.WSMsgType.CLOSE
        assert closing.data == aiohttp.WSCloseCode.GOING_AWAY
        assert [(m["op"], m["online"], m["reason"]) for m in after] == [
            ("presence", False, "shutdown")
        ]
        await close_device(writer)
    assert exit.code == 0, exit

    second = gateways(*serve_args(data_dir, "--token", "T"))
    await ready(second)
    status, body = await get_json(f"{second.url}/api/devices/keep-1/telemetry", "T")
    assert status == 200
    assert body["telemetry"] == [telemetry]
    assert telemetry["data"] == {"temperature_c": -5.12, "humidity_pct": 0.0, "battery_pct": 5}
    assert (await second.stop(timeout=5.0)).code == 0


def _one_error(exit: Exit) -> str:
    """The one ERROR line of a start that failed cleanly: no ready line, no traceback."""
    assert exit.stdout == ""  # no ready line
    assert "Traceback" not in exit.stderr
    errors = [line for line in exit.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, exit.stderr
    return errors[0]


@pytest.mark.parametrize("role", ["devices", "http"])
async def test_a_busy_port_is_one_line_naming_it_and_exit_4(
    gateways: GatewayFactory, tmp_path: Path, role: str
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        ports = ["--device-port", str(port), "--http-port", "0"]
        if role == "http":
            ports = ["--device-port", "0", "--http-port", str(port)]
        gw = gateways(*ports, "--data-dir", str(tmp_path / "d"))
        gw.launch()
        exit = await gw.wait_exit(timeout=10)
    assert exit.code == EXIT_LISTEN, exit
    line = _one_error(exit)
    if role == "devices":
        expected = f"device port 127.0.0.1:{port} is in use (devices: --device-port / device_port)"
    else:
        expected = (
            f"HTTP port 127.0.0.1:{port} is in use (dashboards and API: --http-port / http_port)"
        )
    assert line.endswith(f"cannot start the gateway: {expected}"), line


@pytest.mark.parametrize("flag", ["--host", "--device-host"])
async def test_an_address_not_on_this_machine_is_exit_4_naming_the_host(
    gateways: GatewayFactory, tmp_path: Path, flag: str
) -> None:
    # TEST-NET-1 (RFC 5737): never an address of this machine.
    gw = gateways(flag, "192.0.2.1", *serve_args(tmp_path / "d"))
    gw.launch()
    exit = await gw.wait_exit(timeout=10)
    assert exit.code == EXIT_LISTEN, exit
    line = _one_error(exit)
    assert "cannot listen on the device port 192.0.2.1:0" in line, line
    key = flag.removeprefix("--").replace("-", "_")
    assert line.endswith(f"(devices: {flag} / {key}, --device-port / device_port)"), line


async def test_an_unusable_data_dir_is_one_line_and_exit_3(
    gateways: GatewayFactory, tmp_path: Path
) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    gw = gateways(*serve_args(not_a_dir))
    gw.launch()
    exit = await gw.wait_exit(timeout=10)
    assert exit.code == EXIT_STORAGE, exit
    line = _one_error(exit)
    assert "cannot start the gateway" in line
    assert str(not_a_dir) in line


@pytest.mark.parametrize(
    "content", [b"", b"not a database " * 100], ids=["empty file", "not a database"]
)
async def test_a_database_file_that_is_not_a_database_is_exit_3(
    gateways: GatewayFactory, tmp_path: Path, content: bytes
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    # An empty file is what a full disk or a bad copy leaves: starting fresh from
    # it would reuse offsets that dashboards remember.
    (data_dir / "gateway.sqlite3").write_bytes(content)
    gw = gateways(*serve_args(data_dir))
    gw.launch()
    exit = await gw.wait_exit(timeout=10)
    assert exit.code == EXIT_STORAGE, exit
    assert "gateway.sqlite3" in _one_error(exit)
    assert (data_dir / "gateway.sqlite3").read_bytes() == content  # left for a person to see


async def test_config_error_in_a_real_process_exits_2(gateways: GatewayFactory) -> None:
    gw = gateways(config={"http_port": 70000})  # serve --config FILE, nothing else
    assert gw.argv()[-2:] == ["--config", str(gw.config_path)]
    gw.launch()
    assert gw.config_path.read_text() == "http_port = 70000\n"
    exit = await gw.wait_exit(timeout=10)
    assert exit.code == EXIT_CONFIG
    assert exit.stdout == ""
    path = gw.config_path
    assert exit.stderr == f"iot-gateway: http_port must be 0..65535, not 70000 (in {path})\n"


async def test_a_protocols_module_that_cannot_be_imported_is_exit_2(
    gateways: GatewayFactory, tmp_path: Path
) -> None:
    gw = gateways(*serve_args(tmp_path / "d"), config={"protocols": ["no_such_module_here"]})
    gw.launch()
    exit = await gw.wait_exit(timeout=10)
    assert exit.code == EXIT_CONFIG, exit
    assert "protocols: cannot import 'no_such_module_here'" in exit.stderr


def test_exit_statuses_are_distinct_and_documented() -> None:
    statuses = {
        "EXIT_OK": EXIT_OK,
        "EXIT_ERROR": EXIT_ERROR,
        "EXIT_CONFIG": EXIT_CONFIG,
        "EXIT_STORAGE": EXIT_STORAGE,
        "EXIT_LISTEN": EXIT_LISTEN,
    }
    assert len(set(statuses.values())) == len(statuses)
    doc = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    section = doc.split("### Exit statuses", 1)[1].split("\n#", 1)[0]
    documented = {int(n) for n in re.findall(r"^\| `(\d+)` \|", section, re.MULTILINE)}
    assert documented == set(statuses.values())


def test_the_documented_unit_does_not_restart_what_a_restart_cannot_fix() -> None:
    doc = (ROOT / "docs" / "deployment.md").read_text(encoding="utf-8")
    unit = doc.split("```ini", 1)[1].split("```", 1)[0]
    settings = dict(
        line.split("=", 1) for line in unit.splitlines() if "=" in line and not line.startswith("#")
    )
    assert settings["Restart"] == "on-failure"
    assert set(settings["RestartPreventExitStatus"].split()) == {
        str(EXIT_CONFIG),
        str(EXIT_STORAGE),
    }


def test_tune_gc_freezes_what_exists_and_collects_less_often() -> None:
    before = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_threshold() == (GC_GEN0_THRESHOLD, before[1], before[2])
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
