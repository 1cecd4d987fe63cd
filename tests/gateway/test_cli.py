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
import os
import re
import signal
import socket
import struct
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from frames import Data, Frame, FrameDecoder, Hello, Welcome, decode_message, encode_frame
from gateway.cli import GC_GEN0_THRESHOLD, main, tune_gc

READY = re.compile(r"ready http=127\.0\.0\.1:(\d+) devices=127\.0\.0\.1:(\d+)\n")
DASHBOARD = re.compile(r"dashboard: http://127\.0\.0\.1:(\d+)/\?token=(\S+)")
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


def child_env(**extra: str) -> dict[str, str]:
    """The test's environment without gateway secrets (a developer's shell may set them)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IOT_GATEWAY_")}
    env.update(extra)
    return env


class Served:
    """One ``iot-gateway serve`` child process; stderr is drained as it comes."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.stderr: list[str] = []
        self._stderr_changed = asyncio.Event()
        self._stderr_task = asyncio.create_task(self._drain_stderr())
        self.http = ""
        self.devices: tuple[str, int] = ("", 0)

    async def _drain_stderr(self) -> None:
        assert self.proc.stderr is not None
        async for line in self.proc.stderr:
            self.stderr.append(line.decode())
            self._stderr_changed.set()
        self._stderr_changed.set()

    async def ready(self, timeout: float = 10.0) -> str:
        """Read the ready line (or fail with what stderr said)."""
        assert self.proc.stdout is not None
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        except TimeoutError:
            raise AssertionError(f"no ready line; stderr: {''.join(self.stderr)}") from None
        match = READY.fullmatch(line.decode())
        assert match, f"{line!r}; stderr: {''.join(self.stderr)}"
        self.http = f"127.0.0.1:{match.group(1)}"
        self.devices = ("127.0.0.1", int(match.group(2)))
        return line.decode()

    async def stderr_match(self, pattern: re.Pattern[str], timeout: float = 5.0) -> re.Match[str]:
        async with asyncio.timeout(timeout):
            while True:
                for line in self.stderr:
                    if m := pattern.search(line):
                        return m
                if self._stderr_task.done():
                    raise AssertionError(f"{pattern.pattern} not on stderr: {self.stderr}")
                self._stderr_changed.clear()
                await self._stderr_changed.wait()

    async def finish(self, timeout: float = 5.0) -> tuple[int, str]:
        """Exit status and the rest of stdout, once the process has ended."""
        assert self.proc.stdout is not None
        async with asyncio.timeout(timeout):
            rest = await self.proc.stdout.read()
            code = await self.proc.wait()
            await self._stderr_task
        return code, rest.decode()

    async def stop(self, sig: signal.Signals = signal.SIGTERM) -> tuple[int, str, float]:
        started = time.monotonic()
        self.proc.send_signal(sig)
        code, rest = await self.finish(timeout=5.0)
        return code, rest, time.monotonic() - started

    async def cleanup(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
        # Read the pipes to their end so the transports close before the loop does.
        with contextlib.suppress(Exception):
            await self.finish(timeout=5.0)
        self._stderr_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._stderr_task


Spawn = Callable[..., Awaitable[Served]]


@pytest.fixture
async def spawn(tmp_path: Path) -> AsyncIterator[Spawn]:
    started: list[Served] = []

    async def start(*argv: str, env: dict[str, str] | None = None) -> Served:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway.cli",
            "serve",
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env if env is not None else child_env(),
            cwd=tmp_path,
        )
        served = Served(proc)
        started.append(served)
        return served

    yield start
    for served in started:
        await served.cleanup()


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
    writer.write(encode_frame(Hello(1, client_id, "env-sensor").encode()))
    decoder = FrameDecoder()
    async with asyncio.timeout(5):
        welcome = None
        while welcome is None:
            data = await reader.read(4096)
            assert data, "the gateway closed the device link"
            for event in decoder.feed(data):
                if isinstance(event, Frame):
                    message = decode_message(event.payload)
                    if isinstance(message, Welcome):
                        welcome = message
    writer.write(encode_frame(Data(2, body).encode()))
    await writer.drain()
    return reader, writer


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_serve_prints_ready_serves_and_stops_on_signal(
    spawn: Spawn, tmp_path: Path, sig: signal.Signals
) -> None:
    served = await spawn(*serve_args(tmp_path / "data", "--token", "T"))
    await served.ready()
    status, body = await get_json(f"http://{served.http}/healthz")
    assert status == 200
    assert body["status"] == "ok"
    # The devices address of the ready line is the live device port.
    _, writer = await device_sends(served.devices, "cli-1", struct.pack(">hHB", 2137, 4550, 97))
    await close_device(writer)
    code, rest, elapsed = await served.stop(sig)
    assert code == 0, "".join(served.stderr)
    assert rest == ""  # the ready line was the only line on stdout
    assert elapsed < 5.0
    assert not any("Traceback" in line for line in served.stderr)


async def test_without_a_token_one_is_made_and_printed(spawn: Spawn, tmp_path: Path) -> None:
    served = await spawn(*serve_args(tmp_path / "data"))
    await served.ready()
    match = await served.stderr_match(DASHBOARD)
    assert f"127.0.0.1:{match.group(1)}" == served.http
    token = match.group(2)
    base = f"http://{served.http}"
    assert await get_json(f"{base}/api/devices", token) == (200, {"devices": []})
    status, body = await get_json(f"{base}/api/devices")
    assert (status, body["code"]) == (401, "unauthorized")
    status, _ = await get_json(f"{base}/api/devices", token + "x")
    assert status == 401
    # The printed URL itself works: ?token= is accepted as well as the header.
    assert (await get_json(f"{base}/api/devices?token={token}"))[0] == 200
    code, _, _ = await served.stop()
    assert code == 0


async def test_token_from_the_environment_is_used_and_not_printed(
    spawn: Spawn, tmp_path: Path
) -> None:
    env = child_env(IOT_GATEWAY_TOKEN="env-secret", IOT_GATEWAY_VIEWER_TOKEN="env-viewer")
    served = await spawn(*serve_args(tmp_path / "data"), env=env)
    await served.ready()
    base = f"http://{served.http}/api/devices"
    assert (await get_json(base, "env-secret"))[0] == 200
    assert (await get_json(base, "env-viewer"))[0] == 200
    code, _, _ = await served.stop()
    assert code == 0
    assert not any("token=" in line or "env-secret" in line for line in served.stderr)


async def test_sigterm_keeps_accepted_telemetry_across_a_restart(
    spawn: Spawn, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    first = await spawn(*serve_args(data_dir, "--token", "T"))
    await first.ready()
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(f"http://{first.http}/ws?token=T") as ws,
    ):
        await ws.send_json({"op": "subscribe", "device": "keep-1", "id": 1})
        _, writer = await device_sends(first.devices, "keep-1", struct.pack(">hHB", -512, 0, 5))
        telemetry: dict[str, Any] | None = None
        async with asyncio.timeout(5):
            while telemetry is None:
                for line in (await ws.receive_str()).split("\n"):
                    msg = json.loads(line)
                    if msg["op"] == "telemetry":
                        telemetry = msg
        code, _, _ = await first.stop()
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
    assert code == 0

    second = await spawn(*serve_args(data_dir, "--token", "T"))
    await second.ready()
    status, body = await get_json(f"http://{second.http}/api/devices/keep-1/telemetry", "T")
    assert status == 200
    assert body["telemetry"] == [telemetry]
    assert telemetry["data"] == {"temperature_c": -5.12, "humidity_pct": 0.0, "battery_pct": 5}
    assert (await second.stop())[0] == 0


async def test_a_busy_device_port_is_one_line_and_exit_1(spawn: Spawn, tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        served = await spawn(
            "--http-port", "0", "--device-port", str(port), "--data-dir", str(tmp_path / "d")
        )
        code, out = await served.finish(timeout=10)
    assert code == 1
    assert out == ""  # no ready line
    errors = [line for line in served.stderr if " ERROR " in line]
    assert len(errors) == 1
    assert "cannot start the gateway" in errors[0]
    assert str(port) in errors[0]
    assert not any("Traceback" in line for line in served.stderr)


async def test_an_unusable_data_dir_is_one_line_and_exit_1(spawn: Spawn, tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    served = await spawn(*serve_args(not_a_dir))
    code, out = await served.finish(timeout=10)
    assert code == 1
    assert out == ""
    assert any(
        "cannot start the gateway" in line and str(not_a_dir) in line for line in served.stderr
    )
    assert not any("Traceback" in line for line in served.stderr)


async def test_config_error_in_a_real_process_exits_2(spawn: Spawn, tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text("http_port = 70000\n")
    served = await spawn("--config", str(path))
    code, out = await served.finish(timeout=10)
    assert code == 2
    assert out == ""
    assert served.stderr == [f"iot-gateway: http_port must be 0..65535, not 70000 (in {path})\n"]


def test_tune_gc_freezes_what_exists_and_collects_less_often() -> None:
    before = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_threshold() == (GC_GEN0_THRESHOLD, before[1], before[2])
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
