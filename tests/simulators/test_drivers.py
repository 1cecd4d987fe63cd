"""The drivers over real sockets and a real pseudo-terminal, against a tiny frame-speaking peer."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import uuid
from collections.abc import AsyncIterator

import pytest

from frames import (
    Ack,
    Command,
    Data,
    Error,
    ErrorCode,
    Frame,
    FrameDecoder,
    Hello,
    Message,
    Ping,
    Pong,
    Welcome,
    decode_message,
    encode_frame,
    get_protocol,
)
from frames.backoff import Backoff, BackoffPolicy
from simulators import DeviceSpec, Faults, PtyDevice, Simulation, TcpDevice, make_specs, run_devices
from simulators.drivers import PTY_BACKLOG, _PtyLink

FAST = BackoffPolicy(base=0.01, cap=0.05)  # reconnect at once: tests await, never sleep
RELAY = get_protocol("relay-4")
ENV = get_protocol("env-sensor")


class Peer:
    """The gateway end of one device link: send and receive whole messages."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = FrameDecoder()
        self.pending: list[Message] = []
        self.closed = asyncio.Event()

    async def recv(self) -> Message:
        while not self.pending:
            data = await self.reader.read(4096)
            if not data:
                raise EOFError("the device closed the link")
            for event in self.decoder.feed(data):
                if isinstance(event, Frame):
                    self.pending.append(decode_message(event.payload))
        return self.pending.pop(0)

    async def recv_until(self, kind: type[Message]) -> tuple[Message, list[Message]]:
        """The next message of ``kind``, and the others that came before it."""
        before: list[Message] = []
        while not isinstance(msg := await self.recv(), kind):
            before.append(msg)
        return msg, before

    async def send(self, msg: Message) -> None:
        self.writer.write(encode_frame(msg.encode()))
        await self.writer.drain()

    def close(self) -> None:
        self.writer.close()
        self.closed.set()

    async def aclose(self) -> None:
        self.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


class FakeGateway:
    """Accepts device connections on 127.0.0.1 and hands each to the test as a ``Peer``."""

    def __init__(self) -> None:
        self.peers: asyncio.Queue[Peer] = asyncio.Queue()
        self.every_peer: list[Peer] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = Peer(reader, writer)
        self.every_peer.append(peer)
        await self.peers.put(peer)
        await peer.closed.wait()  # keep the handler (and the link) alive until the test is done

    async def accept(self) -> Peer:
        return await self.peers.get()

    async def handshake(self, heartbeat: int = 30) -> tuple[Peer, Hello]:
        peer = await self.accept()
        hello = await peer.recv()
        assert isinstance(hello, Hello)
        # The device may already be gone (a drop fault); the test sees that on recv.
        with contextlib.suppress(ConnectionError):
            await peer.send(Welcome(0, uuid.uuid4(), heartbeat))
        return peer, hello


@pytest.fixture
async def gateway() -> AsyncIterator[FakeGateway]:
    gw = FakeGateway()
    await gw.start()
    yield gw
    assert gw.server is not None
    gw.server.close()
    for peer in gw.every_peer:
        await peer.aclose()
    await gw.server.wait_closed()


@contextlib.asynccontextmanager
async def running(device: TcpDevice | PtyDevice) -> AsyncIterator[asyncio.Event]:
    """Run ``device`` for the block; stop it after and check that it stopped cleanly."""
    stop = asyncio.Event()
    task = asyncio.create_task(device.run(stop))
    try:
        yield stop
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)


# ---- TCP -------------------------------------------------------------------------------------


async def test_tcp_handshake_data_ping_and_command(gateway: FakeGateway) -> None:
    spec = DeviceSpec("env-7", "env-sensor", rate=20.0, token="tok")
    dev = TcpDevice(spec, "127.0.0.1", gateway.port, backoff=FAST)
    async with running(dev):
        peer, hello = await gateway.handshake()
        assert (hello.client_id, hello.protocol, hello.token) == ("env-7", "env-sensor", "tok")
        data, _ = await peer.recv_until(Data)
        assert isinstance(data, Data)
        assert set(ENV.decode_data(data.body)) == {"temperature_c", "humidity_pct", "battery_pct"}
        await peer.send(Ping(99))
        pong, _ = await peer.recv_until(Pong)
        assert pong == Pong(99)
        body = ENV.encode_command({"name": "set_interval", "args": {"seconds": 60}})
        await peer.send(Command(5, body))
        ack, _ = await peer.recv_until(Ack)
        assert ack == Ack(5, 0)
        assert dev.model.online
        assert dev.link_up
        peer.close()
    assert dev.model.interval == 60.0
    assert not dev.link_up


async def test_tcp_relay_command_is_acked_then_reported(gateway: FakeGateway) -> None:
    dev = TcpDevice(DeviceSpec("relay-3", "relay-4", rate=1.0), "127.0.0.1", gateway.port)
    async with running(dev):
        peer, _ = await gateway.handshake()
        await peer.recv_until(Data)
        await peer.send(
            Command(8, RELAY.encode_command({"name": "set", "args": {"channel": 1, "on": True}}))
        )
        ack, _ = await peer.recv_until(Ack)
        assert ack == Ack(8, 0)
        data = await peer.recv()
        assert isinstance(data, Data)
        assert RELAY.decode_data(data.body) == {"channels": [False, True, False, False]}
        peer.close()


async def test_tcp_reconnects_when_the_gateway_closes_the_link(gateway: FakeGateway) -> None:
    dev = TcpDevice(DeviceSpec("env-1", rate=50.0), "127.0.0.1", gateway.port, backoff=FAST)
    async with running(dev):
        first, _ = await gateway.handshake()
        await first.recv_until(Data)
        first.close()
        second, hello = await gateway.handshake()
        assert hello.client_id == "env-1"
        data, _ = await second.recv_until(Data)
        assert isinstance(data, Data)
        assert dev.model.counters.reconnects == 1
        assert dev.model.counters.sessions == 2
        assert dev.links == 2
        second.close()
    # A session came up before the link dropped, so the backoff started over.
    assert dev.backoff.attempt <= 1


class CountingBackoff(Backoff):
    """A fast backoff that tells the test when it has been asked for ``wanted`` delays."""

    def __init__(self, wanted: int) -> None:
        super().__init__(FAST, random.Random(0))
        self.wanted = wanted
        self.asked = asyncio.Event()

    def next_delay(self) -> float:
        if self.attempt + 1 >= self.wanted:
            self.asked.set()
        return super().next_delay()


async def test_tcp_keeps_trying_while_the_gateway_is_down() -> None:
    # A port with nothing listening: take one, then close it.
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    dev = TcpDevice(DeviceSpec("env-1"), "127.0.0.1", port)
    dev.backoff = backoff = CountingBackoff(wanted=3)
    stop = asyncio.Event()
    task = asyncio.create_task(dev.run(stop))
    await asyncio.wait_for(backoff.asked.wait(), 5)
    assert dev.connect_failures >= 3
    assert dev.last_failure is not None
    assert f"cannot connect to 127.0.0.1:{port}" in dev.last_failure
    assert not dev.model.online
    stop.set()
    await asyncio.wait_for(task, 5)


async def test_tcp_fatal_error_stops_the_device(gateway: FakeGateway) -> None:
    dev = TcpDevice(DeviceSpec("env-1"), "127.0.0.1", gateway.port, backoff=FAST)
    stop = asyncio.Event()
    task = asyncio.create_task(dev.run(stop))
    peer, _ = await gateway.handshake()
    await peer.send(Error(0, ErrorCode.REPLACED, "taken over"))
    await asyncio.wait_for(task, 5)  # it returns by itself: no reconnect
    assert dev.model.stopped
    assert dev.model.last_error == Error(0, ErrorCode.REPLACED, "taken over")
    assert gateway.peers.empty()
    peer.close()


async def test_tcp_bad_token_fault_fails_once_then_logs_in(gateway: FakeGateway) -> None:
    spec = DeviceSpec("env-1", token="secret", faults=Faults(badtoken=True))
    dev = TcpDevice(spec, "127.0.0.1", gateway.port, backoff=FAST)
    async with running(dev):
        peer = await gateway.accept()
        hello = await peer.recv()
        assert isinstance(hello, Hello)
        assert hello.token != "secret"
        await peer.send(Error(0, ErrorCode.AUTH_FAILED, "bad token"))
        peer.close()
        _, hello = await gateway.handshake()
        assert hello.token == "secret"
        assert dev.injector.counters.bad_tokens == 1
        assert not dev.model.stopped


async def test_tcp_drop_fault_cuts_the_link_and_the_device_comes_back(gateway: FakeGateway) -> None:
    # Seed 4 cuts each of the first two links after about 0.37 s: time for a handshake.
    spec = DeviceSpec("env-1", rate=50.0, seed=4, faults=Faults(drop=5.0))
    dev = TcpDevice(spec, "127.0.0.1", gateway.port, backoff=FAST)
    async with running(dev):
        first, _ = await gateway.handshake()
        with contextlib.suppress(EOFError, ConnectionError):
            while True:
                await first.recv()
        _, hello = await gateway.handshake()
        assert hello.client_id == "env-1"
        assert dev.injector.counters.drops == 1
        assert dev.model.counters.reconnects == 1


async def test_tcp_split_and_garbage_faults_still_deliver_every_frame(gateway: FakeGateway) -> None:
    spec = DeviceSpec(
        "relay-1",
        "relay-4",
        rate=100.0,
        faults=Faults(split=True, garbage=0.5, merge=3, merge_hold=0.05),
    )
    dev = TcpDevice(spec, "127.0.0.1", gateway.port, backoff=FAST)
    async with running(dev):
        peer, _ = await gateway.handshake()
        seqs = [(await peer.recv_until(Data))[0].seq for _ in range(30)]
        peer.close()
    assert seqs == list(range(1, 31))  # in order, none lost
    assert peer.decoder.crc_errors == 0
    assert peer.decoder.skipped_bytes > 0
    assert dev.injector.counters.splits > 0


async def test_run_devices_brings_a_mix_online(gateway: FakeGateway) -> None:
    specs = make_specs(4, rate=20.0, prefix="mix")
    stop = asyncio.Event()
    task = asyncio.create_task(run_devices(specs, "127.0.0.1", gateway.port, stop, backoff=FAST))
    seen: dict[str, str] = {}
    peers = []
    for _ in specs:
        peer, hello = await gateway.handshake()
        await peer.recv_until(Data)
        seen[hello.client_id] = hello.protocol
        peers.append(peer)
    assert seen == {
        "mix-1": "env-sensor",
        "mix-2": "relay-4",
        "mix-3": "env-sensor",
        "mix-4": "relay-4",
    }
    stop.set()
    stats = await asyncio.wait_for(task, 5)
    assert stats.devices == 4
    assert stats.sessions == 4
    assert stats.data_sent >= 4
    assert stats.frames_sent >= 8
    for peer in peers:
        peer.close()


# ---- pseudo-terminal -------------------------------------------------------------------------


class SlaveEnd:
    """The gateway's side of a pty: the slave path opened the way a serial port is."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        self.loop = asyncio.get_running_loop()
        self.inbox: asyncio.Queue[bytes] = asyncio.Queue()
        self.decoder = FrameDecoder()
        self.pending: list[Message] = []
        self.loop.add_reader(self.fd, self._readable)

    def _readable(self) -> None:
        try:
            self.inbox.put_nowait(os.read(self.fd, 4096))
        except BlockingIOError:
            pass
        except OSError:
            self.loop.remove_reader(self.fd)
            self.inbox.put_nowait(b"")

    async def recv(self) -> Message:
        while not self.pending:
            data = await self.inbox.get()
            if not data:
                raise EOFError("the pty is gone")
            for event in self.decoder.feed(data):
                if isinstance(event, Frame):
                    self.pending.append(decode_message(event.payload))
        return self.pending.pop(0)

    def send(self, msg: Message) -> None:
        os.write(self.fd, encode_frame(msg.encode()))

    def close(self) -> None:
        self.loop.remove_reader(self.fd)
        os.close(self.fd)


async def test_pty_device_says_hello_and_sends_data_after_welcome() -> None:
    dev = PtyDevice(DeviceSpec("pty-1", "env-sensor", rate=20.0), backoff=FAST)
    assert dev.path.startswith("/dev/")
    port = SlaveEnd(dev.path)
    try:
        async with running(dev):
            hello = await port.recv()
            assert hello == Hello(0, "pty-1", "env-sensor", "")
            port.send(Welcome(0, uuid.uuid4(), 30))
            data = await port.recv()
            assert isinstance(data, Data)
            assert data.seq == 1
            assert "temperature_c" in ENV.decode_data(data.body)
            port.send(Ping(4))
            while (msg := await port.recv()) != Pong(4):
                assert isinstance(msg, Data)
    finally:
        port.close()
    assert dev.model.counters.sessions == 1


async def test_pty_fixed_device_sends_data_at_once_and_obeys_commands() -> None:
    spec = DeviceSpec("pty-relay", "relay-4", rate=20.0, hello=False)
    with PtyDevice(spec, backoff=FAST) as dev:
        assert dev.serial_spec == f"{dev.path},client_id=pty-relay,protocol=relay-4"
        port = SlaveEnd(dev.path)
        try:
            async with running(dev):
                first = await port.recv()
                assert isinstance(first, Data)
                assert RELAY.decode_data(first.body) == {"channels": [False] * 4}
                cmd = RELAY.encode_command({"name": "set", "args": {"channel": 3, "on": True}})
                port.send(Command(200, cmd))
                while (msg := await port.recv()) != Ack(200, 0):
                    assert isinstance(msg, Data)
                reported = await port.recv()
                assert isinstance(reported, Data)
                assert RELAY.decode_data(reported.body) == {"channels": [False, False, False, True]}
        finally:
            port.close()


async def test_pty_bytes_pass_unchanged_through_raw_mode() -> None:
    # CR, LF, ^C, XON/XOFF, ^Z and DEL must not be translated or eaten by the line
    # discipline, either way: they go out in COMMAND bodies and come back as ACK seqs.
    tricky = [0x03, 0x0A, 0x0D, 0x11, 0x13, 0x1A, 0x7F, 0xFF]
    dev = PtyDevice(DeviceSpec("pty-raw", "relay-4", hello=False), backoff=FAST)
    port = SlaveEnd(dev.path)
    try:
        async with running(dev):
            await port.recv()
            for seq in tricky:
                port.send(Command(seq, bytes([seq, 0x0D, 0x0A])))  # not a relay command
            acks: list[Ack] = []
            while len(acks) < len(tricky):
                if isinstance(msg := await port.recv(), Ack):
                    acks.append(msg)
            assert acks == [Ack(seq, 1) for seq in tricky]
            assert port.decoder.crc_errors == port.decoder.skipped_bytes == 0
    finally:
        port.close()


async def test_simulation_on_ptys_reports_paths_and_closes_them() -> None:
    sim = Simulation(make_specs(2, hello=False, rate=20.0), serial=True)
    paths = [d.path for d in sim.pty_devices]
    assert len(set(paths)) == 2
    ports = [SlaveEnd(p) for p in paths]
    stop = asyncio.Event()
    task = asyncio.create_task(sim.run(stop))
    try:
        for port in ports:
            assert isinstance(await port.recv(), Data)
        stats = sim.stats()
        assert stats.online == 2
        assert stats.links_up == 2
        stop.set()
        final = await asyncio.wait_for(task, 5)
        assert final.sessions == 2
        assert final.online == 0
        # Closed: the gateway's port sees the device vanish.
        with contextlib.suppress(EOFError):
            while True:
                await port.recv()
    finally:
        for port in ports:
            port.close()


async def test_pty_nobody_reading_loses_bytes_instead_of_growing_without_bound() -> None:
    # A UART with no listener drops what it sends; the simulator keeps only a small backlog.
    with PtyDevice(DeviceSpec("pty-mute", "relay-4", hello=False)) as dev:
        link = _PtyLink(dev, asyncio.get_running_loop())
        try:
            await link.write(b"\x55" * 1_000_000)
            await link.write(b"\x55" * 10)
            assert len(link._out) == PTY_BACKLOG
            assert 0 < dev.overflow_bytes < 1_000_010 - PTY_BACKLOG
        finally:
            link.detach()
