"""Serial links over real pseudo-terminals: split reads, fixed identity, unplug and replug."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import tty
from collections.abc import Iterator
from pathlib import Path

import pytest
import serial_asyncio

import frames
from devices import (
    CloseReason,
    CommandResult,
    CommandStatus,
    DeviceManager,
    DeviceTelemetry,
    PortState,
    SerialLink,
    SerialPortConfig,
    SessionConfig,
    Transport,
)
from frames.backoff import BackoffPolicy
from simulators.handshake import MessageReader, encode
from tests.devices.support import ENV_DATA, Recorder
from tests.support.wait import wait_until

FAST = BackoffPolicy(base=0.05, cap=0.2)


class Pty:
    """A pseudo-terminal pair; the test plays the device on the master side."""

    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.master)
        self.path = os.ttyname(self.slave)
        self.reader = MessageReader(strict=True)
        os.set_blocking(self.master, False)

    def write(self, data: bytes) -> None:
        os.write(self.master, data)

    def send(self, message: frames.Message) -> None:
        self.write(encode(message))

    async def recv(self) -> frames.Message:
        loop = asyncio.get_running_loop()
        got: asyncio.Queue[frames.Message] = asyncio.Queue()

        def readable() -> None:
            try:
                data = os.read(self.master, 4096)
            except (BlockingIOError, OSError):
                return
            for message in self.reader.feed(data):
                got.put_nowait(message)

        loop.add_reader(self.master, readable)
        try:
            async with asyncio.timeout(10):
                return await got.get()
        finally:
            loop.remove_reader(self.master)

    def unplug(self) -> None:
        for fd in (self.master, self.slave):
            with contextlib.suppress(OSError):
                os.close(fd)


@pytest.fixture
def ptys() -> Iterator[list[Pty]]:
    made: list[Pty] = []
    yield made
    for p in made:
        p.unplug()


def new_pty(ptys: list[Pty]) -> Pty:
    p = Pty()
    ptys.append(p)
    return p


async def start_link(config: SerialPortConfig, **session: object) -> tuple[SerialLink, Recorder]:
    sink = Recorder()
    manager = DeviceManager(sink, SessionConfig(**session))  # type: ignore[arg-type]
    link = SerialLink(manager, config, rng=random.Random(1))
    link.start()
    return link, sink


async def test_fixed_identity_needs_no_hello(ptys: list[Pty]) -> None:
    pty = new_pty(ptys)
    cfg = SerialPortConfig(pty.path, client_id="bench-1", protocol="env-sensor", backoff=FAST)
    link, sink = await start_link(cfg)
    try:
        await asyncio.wait_for(link.opened.wait(), 10)
        pty.send(frames.Data(1, ENV_DATA))
        online = await sink.online("bench-1")
        assert online.info.transport is Transport.SERIAL
        assert online.info.peer == pty.path
        t = await sink.wait_for(lambda e: isinstance(e, DeviceTelemetry))
        assert isinstance(t, DeviceTelemetry)
        assert t.data["temperature_c"] == 21.37
    finally:
        await link.stop()


async def test_hello_over_serial_and_frames_split_across_reads(ptys: list[Pty]) -> None:
    pty = new_pty(ptys)
    link, sink = await start_link(SerialPortConfig(pty.path, backoff=FAST))
    try:
        await asyncio.wait_for(link.opened.wait(), 10)
        pty.send(frames.Hello(1, "serial-hello", "relay-4", ""))
        welcome = await pty.recv()
        assert isinstance(welcome, frames.Welcome)
        await sink.online("serial-hello")
        wire = b"".join(
            frames.encode_frame(frames.Data(i, bytes([i % 16])).encode()) for i in range(10)
        )
        for i in range(0, len(wire), 3):  # three bytes per write: frames split across reads
            pty.write(wire[i : i + 3])
        await sink.wait_for(lambda e: len(sink.telemetry()) == 10)
        assert [t.seq for t in sink.telemetry()] == list(range(10))
        assert sink.telemetry()[3].data == {"channels": [True, True, False, False]}
    finally:
        await link.stop()


async def test_command_over_serial(ptys: list[Pty]) -> None:
    pty = new_pty(ptys)
    cfg = SerialPortConfig(pty.path, client_id="relay", protocol="relay-4", backoff=FAST)
    link, sink = await start_link(cfg)
    try:
        await asyncio.wait_for(link.opened.wait(), 10)
        pty.send(frames.Data(1, b"\x00"))
        await sink.online("relay")
        handle = await link.manager.send_command("relay", bytes.fromhex("010201"))
        cmd = await pty.recv()
        assert isinstance(cmd, frames.Command)
        assert cmd.body == bytes.fromhex("010201")
        pty.send(frames.Ack(cmd.seq, 0))
        assert (await asyncio.wait_for(handle.result, 10)).status is CommandStatus.ACKED
    finally:
        await link.stop()


async def test_serial_over_the_rate_drops_and_counts_but_never_an_ack(ptys: list[Pty]) -> None:
    # docs/protocol.md §4: a serial line cannot be slowed down, so frames over the rate
    # are dropped, counted, and answered with RATE_LIMITED at most once a second.
    pty = new_pty(ptys)
    cfg = SerialPortConfig(pty.path, client_id="chatty", protocol="env-sensor", backoff=FAST)
    link, sink = await start_link(cfg, max_frames_per_second=5, rate_burst=5)
    try:
        await asyncio.wait_for(link.opened.wait(), 10)
        started = asyncio.get_running_loop().time()
        pty.write(b"".join(encode(frames.Data(i, ENV_DATA)) for i in range(40)))
        await wait_until(lambda: link.counters.rate_limited >= 25, "frames dropped and counted")
        error = await pty.recv()
        assert isinstance(error, frames.Error)
        assert error.code == frames.ErrorCode.RATE_LIMITED
        assert len(sink.telemetry("chatty")) < 15  # the burst of 5, and what 5/s refilled
        # An ACK over the rate is still matched.
        handle = await link.manager.send_command("chatty", b"\x02")
        messages = [await pty.recv()]
        while not isinstance(messages[-1], frames.Command):
            messages.append(await pty.recv())
        command = messages[-1]
        pty.write(b"".join(encode(frames.Data(i, ENV_DATA)) for i in range(20)))
        pty.send(frames.Ack(command.seq, 0))
        assert (await asyncio.wait_for(handle.result, 10)).status is CommandStatus.ACKED
        elapsed = asyncio.get_running_loop().time() - started
        errors = 1 + sum(isinstance(m, frames.Error) for m in messages)
        assert errors <= elapsed + 1  # at most one RATE_LIMITED a second
        assert link.manager.is_online("chatty")  # dropped, never closed
    finally:
        await link.stop()


async def test_silent_serial_device_goes_offline_and_the_port_stays_open(ptys: list[Pty]) -> None:
    pty = new_pty(ptys)
    cfg = SerialPortConfig(pty.path, client_id="quiet", protocol="env-sensor", backoff=FAST)
    link, sink = await start_link(cfg, heartbeat=1, misses=1, ack_timeout=30.0)
    try:
        await asyncio.wait_for(link.opened.wait(), 10)
        pty.send(frames.Data(1, ENV_DATA))
        first = await sink.online("quiet")
        handle = await link.manager.send_command("quiet", b"\x02")
        assert isinstance(await pty.recv(), frames.Command)
        off = await sink.offline("quiet")  # no ACK, no frame: silent after 1 s
        assert off.reason is CloseReason.SILENT
        result = await asyncio.wait_for(handle.result, 10)
        assert result == CommandResult(CommandStatus.TIMEOUT, error="device went silent")
        assert link.state == "open"
        pty.send(frames.Data(2, ENV_DATA))  # it speaks again: a new session
        await sink.wait_for(lambda e: len(sink.telemetry()) == 2)
        assert link.manager.online["quiet"].info is not None
        assert link.manager.online["quiet"].info.session != first.info.session
    finally:
        await link.stop()


async def test_unplug_offline_then_replug_online(ptys: list[Pty], tmp_path: Path) -> None:
    first = new_pty(ptys)
    port = tmp_path / "ttyDEVICE"  # a stable name, like /dev/serial/by-id/...
    port.symlink_to(first.path)
    cfg = SerialPortConfig(str(port), client_id="plug", protocol="env-sensor", backoff=FAST)
    link, sink = await start_link(cfg)
    try:
        await asyncio.wait_for(link.opened.wait(), 10)
        first.send(frames.Data(1, ENV_DATA))
        await sink.online("plug")
        # Unplug: the device side vanishes and the stable name goes away.
        port.unlink()
        first.unplug()
        off = await sink.offline("plug")
        assert off.reason is CloseReason.LOST
        assert not link.manager.is_online("plug")
        # Replug: a new pty behind the same name. Online again within the backoff bound.
        second = new_pty(ptys)
        port.symlink_to(second.path)
        loop = asyncio.get_running_loop()
        replugged = loop.time()
        await asyncio.wait_for(link.opened.wait(), 10)
        second.send(frames.Data(2, ENV_DATA))
        ons = await sink.wait_for(
            lambda e: len([x for x in sink.events if type(x).__name__ == "DeviceOnline"]) == 2
        )
        assert ons is not None
        # Cap 0.2 s plus the health check interval and scheduling slack.
        assert loop.time() - replugged < 5.0
        assert link.counters.reconnects >= 1
        assert link.manager.is_online("plug")
    finally:
        await link.stop()


async def test_connection_lost_never_called_is_caught_by_health_check(
    ptys: list[Pty], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Simulate the pyserial-asyncio trap: a read error that never reaches
    # connection_lost. The real part (a pty that disappears) is real; only the
    # transport's error path is silenced.
    def swallow(self: serial_asyncio.SerialTransport) -> None:
        try:
            data = self._serial.read(self._max_read_size)
        except Exception:
            self._remove_reader()
            return
        if data:
            self._protocol.data_received(data)

    monkeypatch.setattr(serial_asyncio.SerialTransport, "_read_ready", swallow)
    first = new_pty(ptys)
    port = tmp_path / "ttySILENT"
    port.symlink_to(first.path)
    cfg = SerialPortConfig(
        str(port), client_id="ghost", protocol="env-sensor", backoff=FAST, health_interval=0.1
    )
    link, sink = await start_link(cfg)
    try:
        await asyncio.wait_for(link.opened.wait(), 10)
        first.send(frames.Data(1, ENV_DATA))
        await sink.online("ghost")
        port.unlink()
        first.unplug()
        off = await sink.offline("ghost")
        assert off.reason is CloseReason.LOST
        second = new_pty(ptys)
        port.symlink_to(second.path)
        await asyncio.wait_for(link.opened.wait(), 10)
        second.send(frames.Data(2, ENV_DATA))
        await sink.wait_for(lambda e: len(sink.telemetry()) == 2)
    finally:
        await link.stop()


async def test_port_closed_before_reopen(ptys: list[Pty], tmp_path: Path) -> None:
    # The other trap: connection_lost may run before the port is closed. The
    # link must never hold two open file descriptors for one port.
    first = new_pty(ptys)
    port = tmp_path / "ttyX"
    port.symlink_to(first.path)
    cfg = SerialPortConfig(str(port), client_id="x", protocol="env-sensor", backoff=FAST)
    link, _sink = await start_link(cfg)
    try:
        await asyncio.wait_for(link.opened.wait(), 10)
        old_serial = link.transport.serial
        port.unlink()
        first.unplug()
        await wait_until(lambda: link.state != "open", "the link to notice the unplug")
        assert not old_serial.is_open
        second = new_pty(ptys)
        port.symlink_to(second.path)
        await asyncio.wait_for(link.opened.wait(), 10)
        assert not old_serial.is_open
        assert link.transport.serial is not old_serial
    finally:
        await link.stop()


async def test_frame_timeout_releases_stalled_partial_frame(ptys: list[Pty]) -> None:
    pty = new_pty(ptys)
    cfg = SerialPortConfig(
        pty.path, client_id="stall", protocol="env-sensor", backoff=FAST, frame_timeout=0.2
    )
    link, sink = await start_link(cfg)
    try:
        await asyncio.wait_for(link.opened.wait(), 10)
        good = frames.encode_frame(frames.Data(7, ENV_DATA).encode())
        # A header whose length byte was corrupted to 250: it swallows the good
        # frame that follows, until the frame timeout abandons it.
        pty.write(b"\xaa\xaa\xfa" + good)
        t = await sink.wait_for(lambda e: isinstance(e, DeviceTelemetry))
        assert isinstance(t, DeviceTelemetry)
        assert t.seq == 7
        assert link.counters.frame_timeouts >= 1
    finally:
        await link.stop()


async def test_noise_on_serial_is_counted_never_closed(ptys: list[Pty]) -> None:
    pty = new_pty(ptys)
    cfg = SerialPortConfig(pty.path, client_id="noisy", protocol="env-sensor", backoff=FAST)
    link, sink = await start_link(cfg, garbage_bytes=100)
    try:
        await asyncio.wait_for(link.opened.wait(), 10)
        pty.write(bytes(range(0x00, 0xA0)) * 10)
        pty.send(frames.Data(1, ENV_DATA))
        await sink.wait_for(lambda e: isinstance(e, DeviceTelemetry))
        assert link.counters.skipped_bytes >= 1600
        assert link.state == "open"
    finally:
        await link.stop()


async def test_missing_port_keeps_retrying_and_says_why_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="devices.serial_link")
    missing = tmp_path / "ttyUSB-nothing"
    cfg = SerialPortConfig(str(missing), client_id="m", protocol="env-sensor", backoff=FAST)
    link, _ = await start_link(cfg)
    try:
        await wait_until(lambda: link._backoff.attempt >= 5, "five failed opens")
        assert link.state == "missing"
        # The manager lists it too (GET /api/serial), since its first failed open.
        status = link.manager.serial_ports[str(missing)]
        assert status.state is PortState.MISSING
        assert status.error is not None
        assert "No such file" in status.error
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        assert str(missing) in warnings[0].getMessage()
    finally:
        await link.stop()
    assert link.state == "closed"


def test_serial_spec_parsing() -> None:
    cfg = SerialPortConfig.parse("/dev/ttyUSB0,client_id=pump-1,protocol=relay-4,baud=9600")
    assert (cfg.url, cfg.client_id, cfg.protocol, cfg.baud) == (
        "/dev/ttyUSB0",
        "pump-1",
        "relay-4",
        9600,
    )
    assert SerialPortConfig.parse("socket://127.0.0.1:4000").fixed is False
    for bad, words in [
        ("/dev/x,client_id=a", "both client_id and protocol"),
        ("/dev/x,speed=9600", "unknown key 'speed'"),
        ("/dev/x,baud=fast", "baud must be an integer"),
        ("/dev/x,heartbeat=0", "heartbeat must be 1..65535"),
        ("/dev/x,baud", "expected key=value"),
        ("/dev/x,client_id=a b,protocol=p", "client_id"),
        (",client_id=a,protocol=p", "URL"),
    ]:
        with pytest.raises(ValueError, match=words):
            SerialPortConfig.parse(bad)


async def test_socket_url_serial_device_server() -> None:
    # A serial device server (ser2net-style) reached through pyserial's socket:// URL.
    connected: asyncio.Queue[asyncio.StreamWriter] = asyncio.Queue()

    async def on_client(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await connected.put(w)

    server = await asyncio.start_server(on_client, "127.0.0.1", 0)
    host, port = server.sockets[0].getsockname()[:2]
    cfg = SerialPortConfig(
        f"socket://{host}:{port}", client_id="remote", protocol="env-sensor", backoff=FAST
    )
    link, sink = await start_link(cfg)
    try:
        writer = await asyncio.wait_for(connected.get(), 10)
        writer.write(frames.encode_frame(frames.Data(4, ENV_DATA).encode()))
        online = await sink.online("remote")
        assert online.info.peer == cfg.url
        await sink.wait_for(lambda e: isinstance(e, DeviceTelemetry))
        # The device server goes away: offline, then back when it returns.
        writer.close()
        assert (await sink.offline("remote")).reason is CloseReason.LOST
        writer = await asyncio.wait_for(connected.get(), 10)
        writer.write(frames.encode_frame(frames.Data(5, ENV_DATA).encode()))
        await sink.wait_for(lambda e: len(sink.telemetry()) == 2)
        writer.close()
    finally:
        await link.stop()
        server.close()
        await server.wait_closed()
