"""``iot-gateway simulate``: flags, progress output, summary, exit codes and signals."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import re
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from frames import (
    Data,
    Error,
    ErrorCode,
    Frame,
    FrameDecoder,
    Hello,
    Ping,
    Pong,
    Welcome,
    decode_message,
    encode_frame,
)
from simulators import Faults, cli

ROOT = Path(__file__).resolve().parents[2]


class AutoGateway:
    """A stand-in gateway: WELCOMEs every HELLO (or refuses a wrong token), notes who sends DATA."""

    def __init__(self, expect: int, token: str | None = None) -> None:
        self.expect = expect
        self.token = token
        self.data_from: set[str] = set()
        self.all_sent_data = asyncio.Event()
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None
        self.address = ""

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.address = f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in self.writers:
            w.close()
            with contextlib.suppress(OSError):
                await w.wait_closed()
        await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        decoder = FrameDecoder()
        client: str | None = None
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(4096):
                for event in decoder.feed(data):
                    if not isinstance(event, Frame):
                        continue
                    msg = decode_message(event.payload)
                    if isinstance(msg, Hello):
                        if self.token is not None and msg.token != self.token:
                            writer.write(encode_frame(Error(0, 3, "wrong token").encode()))
                            writer.close()
                            return
                        client = msg.client_id
                        writer.write(encode_frame(Welcome(0, uuid.uuid4(), 30).encode()))
                    elif isinstance(msg, Ping):
                        writer.write(encode_frame(Pong(msg.seq).encode()))
                    elif isinstance(msg, Data) and client is not None:
                        self.data_from.add(client)
                        if len(self.data_from) >= self.expect:
                            self.all_sent_data.set()
        writer.close()


@contextlib.asynccontextmanager
async def auto_gateway(expect: int, token: str | None = None) -> AsyncIterator[AutoGateway]:
    gw = AutoGateway(expect, token)
    await gw.start()
    try:
        yield gw
    finally:
        await gw.close()


class Screen(io.StringIO):
    """Captured output that can pretend to be a terminal and signal a line appearing."""

    def __init__(self, tty: bool, wait_for: str) -> None:
        super().__init__()
        self.tty = tty
        self.pattern = re.compile(wait_for)
        self.seen = asyncio.Event()

    def isatty(self) -> bool:
        return self.tty

    def write(self, s: str) -> int:
        n = super().write(s)
        if self.pattern.search(self.getvalue()):
            self.seen.set()
        return n


# ---- flags -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "--gateway HOST:PORT is required"),
        (["--gateway", "localhost"], "expected HOST:PORT"),
        (["--gateway", "h:port"], "port must be a number"),
        (["--gateway", "h:70000"], "port must be 1..65535"),
        (["--gateway", "h:1", "--devices", "0"], "--devices: must be 1..10000"),
        (["--gateway", "h:1", "--rate", "0"], "--rate: must be a number > 0"),
        (["--gateway", "h:1", "--rate", "fast"], "expected a number, not 'fast'"),
        (["--gateway", "h:1", "--protocol", "modbus"], "invalid choice: 'modbus'"),
        (["--gateway", "h:1", "--faults", "flip=2"], r"flip must be in \(0, 1\]"),
        (["--gateway", "h:1", "--faults", "shake"], "unknown fault 'shake'"),
        (["--gateway", "h:1", "--no-hello"], "--no-hello only applies to --serial"),
        (["--gateway", "h:1", "--prefix", "a b"], "client ids allow only"),
        (["--gateway", "h:1", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_flags_exit_2_with_a_clear_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "usage: iot-gateway simulate" in err
    assert re.search(message, err), err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    assert "--faults SPEC" in capsys.readouterr().out


def test_parse_gateway_accepts_ipv6_and_names() -> None:
    assert cli.parse_gateway("[::1]:7000") == ("::1", 7000)
    assert cli.parse_gateway("gw.local:1") == ("gw.local", 1)


def test_flags_are_parsed_into_the_run() -> None:
    args = cli.parse_args(
        ["--gateway", "10.0.0.2:7000", "--devices", "4", "--protocol", "relay-4", "--rate", "2.5",
         "--faults", "split,drop=0.5", "--duration", "9", "--token", "t", "--seed", "7"]
    )  # fmt: skip
    assert args.gateway == ("10.0.0.2", 7000)
    assert (args.devices, args.protocol, args.rate, args.duration) == (4, "relay-4", 2.5, 9.0)
    assert args.faults == Faults(split=True, drop=0.5)
    assert (args.token, args.seed, args.serial) == ("t", 7, False)


# ---- running ---------------------------------------------------------------------------------


async def test_piped_output_prints_plain_progress_lines_and_a_summary(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(cli, "PIPE_REFRESH", 0.02)
    async with auto_gateway(expect=3) as gw:
        args = cli.parse_args(["--gateway", gw.address, "--devices", "3", "--rate", "20"])
        out = Screen(tty=False, wait_for=r"online 3/3 .*\n")
        stop = asyncio.Event()
        run = asyncio.create_task(cli.simulate(args, out=out, stop=stop, handle_signals=False))
        await asyncio.wait_for(out.seen.wait(), 10)
        stop.set()
        assert await asyncio.wait_for(run, 5) == 0
    text = out.getvalue()
    assert text.startswith("simulating 3 device(s), protocol mix, 20 Hz, faults none -> 127.0.0.1:")
    assert "\r" not in text
    assert re.search(r"^online 3/3  frames \d+  acks 0  reconnects 0$", text, re.M)
    assert "devices 3, sessions 3, stopped 0" in text
    assert gw.data_from == {"sim-1", "sim-2", "sim-3"}


async def test_terminal_output_refreshes_one_line_in_place(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "TTY_REFRESH", 0.02)
    async with auto_gateway(expect=2) as gw:
        args = cli.parse_args(["--gateway", gw.address, "--devices", "2", "--rate", "20"])
        out = Screen(tty=True, wait_for=r"\ronline 2/2 [^\r]*\x1b\[K")
        stop = asyncio.Event()
        run = asyncio.create_task(cli.simulate(args, out=out, stop=stop, handle_signals=False))
        await asyncio.wait_for(out.seen.wait(), 10)
        stop.set()
        assert await asyncio.wait_for(run, 5) == 0
    text = out.getvalue()
    progress = text.split("\n")[1]  # after the banner: one line, rewritten with \r
    assert progress.startswith("\r")
    assert progress.count("\r") >= 1
    assert "\x1b[K\ndevices 2, sessions 2" in text  # the summary starts on a fresh line


async def test_duration_ends_the_run_by_itself() -> None:
    async with auto_gateway(expect=1) as gw:
        args = cli.parse_args(["--gateway", gw.address, "--duration", "0.3", "--rate", "20"])
        out = Screen(tty=False, wait_for="^$")
        assert await asyncio.wait_for(cli.simulate(args, out=out, handle_signals=False), 5) == 0
    assert "sessions 1" in out.getvalue()


async def test_every_device_refused_exits_1_and_says_why() -> None:
    async with auto_gateway(expect=2, token="right") as gw:
        args = cli.parse_args(["--gateway", gw.address, "--devices", "2", "--token", "wrong"])
        out = Screen(tty=False, wait_for="^$")
        assert await asyncio.wait_for(cli.simulate(args, out=out, handle_signals=False), 10) == 1
    text = out.getvalue()
    assert "stopped 2" in text
    assert f"{ErrorCode.AUTH_FAILED.name} 'wrong token'" in text


async def test_serial_mode_prints_each_pty_and_its_gateway_flag() -> None:
    args = cli.parse_args(["--serial", "--no-hello", "--devices", "2", "--protocol", "relay-4"])
    out = Screen(tty=False, wait_for=r"serial sim-2 .*\n")
    stop = asyncio.Event()
    run = asyncio.create_task(cli.simulate(args, out=out, stop=stop, handle_signals=False))
    await asyncio.wait_for(out.seen.wait(), 5)
    lines = out.getvalue().splitlines()
    paths = []
    for line, name in zip(lines[1:3], ("sim-1", "sim-2"), strict=True):
        m = re.fullmatch(rf"serial {name} relay-4 (\S+)  \(gateway: --serial (\S+)\)", line)
        assert m, line
        paths.append(m[1])
        assert m[2] == f"{m[1]},client_id={name},protocol=relay-4"
    # The path is a real serial port a gateway can open.
    fd = os.open(paths[0], os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        assert os.isatty(fd)
    finally:
        os.close(fd)
    stop.set()
    assert await asyncio.wait_for(run, 5) == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_a_signal_stops_the_simulator_cleanly(sig: signal.Signals) -> None:
    async with auto_gateway(expect=2) as gw:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            "import sys; from simulators.cli import main; sys.exit(main(sys.argv[1:]))",
            *("--gateway", gw.address, "--devices", "2", "--rate", "20"),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=ROOT,
        )
        try:
            await asyncio.wait_for(gw.all_sent_data.wait(), 20)
            proc.send_signal(sig)
            out, err = await asyncio.wait_for(proc.communicate(), 10)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert proc.returncode == 0, err.decode()
    text = out.decode()
    assert "devices 2, sessions 2, stopped 0" in text
    assert "Traceback" not in err.decode()
