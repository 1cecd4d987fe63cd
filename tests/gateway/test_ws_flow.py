"""Flow under pressure: slow dashboards, replay seams under live traffic, restarts, write bursts."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from pathlib import Path
from typing import Any

import pytest

import frames
from gateway.web.context import WEB
from gateway.web.ws import NOTSENT_LOWAT
from tests.gateway.conftest import OPERATOR, AppFactory
from tests.gateway.support import ENV_DATA, dash, device, runtime_of
from tests.support.wait import wait_until


def _stalled_dashboard(host: str, port: int) -> socket.socket:
    """A WebSocket client that completes the upgrade and then never reads."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect((host, port))
    s.sendall(
        (
            f"GET /ws?token={OPERATOR} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    body = b'{"op":"subscribe","all":true}'
    # One masked text frame (an all-zero mask leaves the payload as it is).
    s.sendall(bytes([0x81, 0x80 | len(body)]) + b"\x00\x00\x00\x00" + body)
    return s


async def test_stalled_dashboard_does_not_slow_the_others(make_app: AppFactory) -> None:
    client = await make_app(
        dashboards={"queue_size": 256}, devices={"max_frames_per_second": 1e6, "rate_burst": 1e6}
    )
    rt = runtime_of(client)
    reader = await dash(client)
    await reader.request({"op": "subscribe", "all": True}, "subscribed")
    stalled = _stalled_dashboard(client.host, client.port)
    try:
        await wait_until(
            lambda: len(rt.hub.subscriptions.all_subscribers()) == 2,
            "len(rt.hub.subscriptions.all_subscribers()) == 2",
            timeout=10,
        )
        slow = next(
            d
            for d in rt.hub.subscriptions.all_subscribers()
            if d.id != min(x.id for x in rt.hub.subscriptions.all_subscribers())
        )
        dev = await device(rt, "flood")
        # Paced by the reading dashboard: 100 rounds of 200 messages, each read in
        # full before the next, while the stalled one's buffers fill and overflow.
        got = 0
        for _ in range(100):
            for i in range(200):
                dev.send(frames.Data(i, ENV_DATA))
            await dev.writer.drain()
            target = got + 200
            while got < target:
                msg = await reader.recv()
                if msg["op"] == "telemetry":
                    got += 1
        # The stalled one's queue stayed bounded and it lost telemetry, not the reader.
        assert slow.telemetry_queued <= 256
        assert slow.dropped_total > 0
        assert rt.metrics.telemetry_dropped._value.get() > 0
        assert not [m for m in reader.seen if m.get("op") == "lagged"]
    finally:
        stalled.close()


async def test_replay_seam_has_no_gap_and_no_duplicate_under_live_traffic(
    make_app: AppFactory,
) -> None:
    client = await make_app(devices={"max_frames_per_second": 1e6, "rate_burst": 1e6})
    rt = runtime_of(client)
    dev = await device(rt, "live")
    total = 3000
    joined = asyncio.Event()

    async def produce() -> None:
        for i in range(total):
            dev.send(frames.Data(i % 256, ENV_DATA))
            if i % 50 == 0:
                await dev.writer.drain()
                await asyncio.sleep(0)
            if i == total // 2:
                joined.set()

    producer = asyncio.create_task(produce())
    await joined.wait()
    d = await dash(client)
    await d.send({"op": "subscribe", "device": "live", "since": 0})
    received: list[int] = []

    async def consume() -> None:  # read as a live dashboard does, while traffic flows
        while len(received) < total:
            msg = await d.recv()
            assert msg["op"] != "lagged", "a reading dashboard must not lag here"
            if msg["op"] == "telemetry":
                received.append(msg["offset"])

    consumer = asyncio.create_task(consume())
    await producer
    await wait_until(
        lambda: rt.hub.devices["live"].last is not None and rt.storage.stats.pending == 0,
        "the live value stored",
        timeout=10,
    )
    await rt.storage.flush()
    stored = []
    after = 0
    while batch := await rt.storage.telemetry_since(after, device="live", limit=1000):
        stored += [r.offset for r in batch]
        after = batch[-1].offset
    assert len(stored) == total
    await asyncio.wait_for(consumer, 30)
    assert received == stored


async def test_restart_keeps_offsets_history_and_queued_commands(
    make_app: AppFactory, tmp_path: Path
) -> None:
    data = tmp_path / "kept"
    first = await make_app(data_dir=data)
    rt = runtime_of(first)
    dev = await device(rt, "r")
    for i in range(5):
        dev.send(frames.Data(i, ENV_DATA))
    d = await dash(first)
    await d.request({"op": "subscribe", "device": "r", "since": 0}, "subscribed")
    before = [(await d.expect("telemetry"))["offset"] for _ in range(5)]
    await dev.aclose()
    await wait_until(
        lambda: not rt.hub.devices["r"].online, "not rt.hub.devices['r'].online", timeout=10
    )
    await d.send({"op": "command", "id": "later", "device": "r", "command": {"name": "reboot"}})
    await d.expect("command_status", status="queued")
    await first.close()

    second = await make_app(data_dir=data)
    rt2 = runtime_of(second)
    listing = await (
        await second.get("/api/devices/r", headers={"Authorization": f"Bearer {OPERATOR}"})
    ).json()
    assert listing["online"] is False
    assert listing["last"]["offset"] == before[-1]
    d2 = await dash(second)
    await d2.request({"op": "subscribe", "device": "r", "since": 0}, "subscribed")
    replayed = [(await d2.expect("telemetry"))["offset"] for _ in range(5)]
    assert replayed == before
    back = await device(rt2, "r")
    cmd = await back.expect(frames.Command)
    assert cmd.body == b"\x02"
    back.send(frames.Data(9, ENV_DATA))
    new = await d2.expect("telemetry")
    assert new["offset"] > before[-1]


async def test_loop_is_not_blocked_by_storage_during_a_write_burst(make_app: AppFactory) -> None:
    client = await make_app(devices={"max_frames_per_second": 1e6, "rate_burst": 1e6})
    rt = runtime_of(client)
    dev = await device(rt, "burst")
    loop = asyncio.get_running_loop()
    worst = 0.0
    done = asyncio.Event()

    async def ticker() -> None:
        nonlocal worst
        while not done.is_set():
            t0 = loop.time()
            await asyncio.sleep(0.001)
            worst = max(worst, loop.time() - t0)

    tick = asyncio.create_task(ticker())
    for i in range(20_000):
        dev.send(frames.Data(i % 256, ENV_DATA))
        if i % 500 == 0:
            await dev.writer.drain()
    await dev.writer.drain()
    await wait_until(
        lambda: rt.storage.stats.rows_written >= 20_000,
        "rt.storage.stats.rows_written >= 20_000",
        timeout=30,
    )
    done.set()
    await tick
    # A lag check, not a speed test: generous for a noisy 2-core machine.
    assert worst < 2.0, worst


async def test_socket_that_does_not_drain_is_closed_and_counted(make_app: AppFactory) -> None:
    client = await make_app(
        dashboards={"drain_timeout": 0.5},
        devices={"max_frames_per_second": 1e6, "rate_burst": 1e6},
    )
    rt = runtime_of(client)
    stalled = _stalled_dashboard(client.host, client.port)
    try:
        await wait_until(
            lambda: len(rt.hub.subscriptions.all_subscribers()) == 1,
            "len(rt.hub.subscriptions.all_subscribers()) == 1",
            timeout=10,
        )
        dev = await device(rt, "firehose")
        closed = rt.metrics.slow_dashboards_closed
        for _ in range(200):  # until the stalled socket's buffers are full
            for i in range(500):
                dev.send(frames.Data(i % 256, ENV_DATA))
            await dev.writer.drain()
            if closed._value.get() >= 1:
                break
            await asyncio.sleep(0.05)  # let the writer's drain timeout run
        await wait_until(lambda: closed._value.get() >= 1, "closed._value.get() >= 1", timeout=10)
        await wait_until(
            lambda: not rt.hub.subscriptions.all_subscribers(),
            "not rt.hub.subscriptions.all_subscribers()",
            timeout=10,
        )
    finally:
        stalled.close()


def _ws_text(body: bytes) -> bytes:
    """One masked client text frame (all-zero mask), any length."""
    if len(body) < 126:
        head = bytes([0x81, 0x80 | len(body)])
    else:
        head = bytes([0x81, 0x80 | 126]) + len(body).to_bytes(2, "big")
    return head + b"\x00\x00\x00\x00" + body


async def test_a_dashboard_that_does_not_read_its_replies_is_disconnected(
    make_app: AppFactory,
) -> None:
    """docs/api.md §3: replies are never dropped, so one that piles them up is let go."""
    client = await make_app(
        dashboards={"control_queue_bytes": 4096, "drain_timeout": 60.0, "devices_page_size": 20}
    )
    rt = runtime_of(client)
    for n in range(20):
        await device(rt, f"known-{n:02d}")
    reader = await dash(client)
    stalled = _stalled_dashboard(client.host, client.port)
    try:
        await wait_until(
            lambda: len(rt.hub.dashboards) == 2, "len(rt.hub.dashboards) == 2", timeout=10
        )
        # Each reply is some 5 KB: the socket's buffers fill, then its control queue.
        ask = _ws_text(b'{"op":"devices"}') * 50
        for _ in range(100):
            await asyncio.get_running_loop().sock_sendall(stalled, ask)
            if rt.hub.counters.dashboards_closed["control_queue"]:
                break
            await asyncio.sleep(0.01)
        await wait_until(
            lambda: rt.hub.counters.dashboards_closed["control_queue"] == 1,
            "the stalled dashboard closed for its control queue",
            timeout=10,
        )
        assert len(rt.hub.dashboards) == 1
        assert len(rt.hub.subscriptions.all_subscribers()) == 0
        scrape = await (await client.get("/metrics")).text()
        assert 'iot_dashboards_closed_total{reason="control_queue"} 1.0' in scrape
        answer = await reader.request({"op": "devices", "id": "still"}, "devices")
        assert len(answer["devices"]) == 20
        # It reads again, slowly or not: after what was already on its way, the
        # gateway's close frame, and then the end of the connection. dc04a44 kept
        # the socket open with nothing more to send, so this timed out.
        code, reason = await _read_until_close(stalled, timeout=20)
        assert (code, reason) == (1013, "control_queue")
    finally:
        stalled.close()


async def _read_until_close(s: socket.socket, timeout: float) -> tuple[int, str]:
    """Read a server's frames off ``s`` until its close frame: (code, reason).

    Then the connection must end (EOF or a reset), nothing more after it.
    """
    loop = asyncio.get_running_loop()
    s.setblocking(False)
    buf = bytearray()
    async with asyncio.timeout(timeout):
        # The 101 answer first, up to its blank line.
        while b"\r\n\r\n" not in buf:
            chunk = await loop.sock_recv(s, 65536)
            assert chunk, "closed before the upgrade answer"
            buf += chunk
        del buf[: buf.index(b"\r\n\r\n") + 4]
        while True:
            frame = _server_frame(buf)
            if frame is None:
                chunk = await loop.sock_recv(s, 65536)
                assert chunk, "the connection ended without a close frame"
                buf += chunk
                continue
            opcode, payload = frame
            if opcode == 0x8:
                break
        assert not buf, "bytes after the close frame"
        with contextlib.suppress(ConnectionResetError):  # an abort is an end too
            assert await loop.sock_recv(s, 65536) == b""
    return int.from_bytes(payload[:2], "big"), payload[2:].decode()


def _server_frame(buf: bytearray) -> tuple[int, bytes] | None:
    """Take one unmasked server frame off the front of ``buf`` (None: not all here yet)."""
    if len(buf) < 2:
        return None
    opcode, length, at = buf[0] & 0x0F, buf[1] & 0x7F, 2
    if length == 126:
        if len(buf) < 4:
            return None
        length, at = int.from_bytes(buf[2:4], "big"), 4
    elif length == 127:
        if len(buf) < 10:
            return None
        length, at = int.from_bytes(buf[2:10], "big"), 10
    if len(buf) < at + length:
        return None
    payload = bytes(buf[at : at + length])
    del buf[: at + length]
    return opcode, payload


async def test_a_command_to_a_device_that_never_acks_leaves_its_dashboard_answering(
    make_app: AppFactory,
) -> None:
    """Finding 2 of issue 12: the hub awaited each command inline, so the dashboard's
    requests waited for a device's free command slot (up to ``ack_timeout``)."""
    client = await make_app(devices={"max_inflight_commands": 1, "ack_timeout": 30.0})
    rt = runtime_of(client)
    mute = await device(rt, "mute")
    d = await dash(client)
    await d.send({"op": "command", "id": "c1", "device": "mute", "command": {"name": "reboot"}})
    await d.expect("command_status", id="c1", status="sent")
    await mute.expect(frames.Command)  # read, never ACKed: its one slot stays taken
    await d.send({"op": "command", "id": "c2", "device": "mute", "command": {"name": "reboot"}})
    answer = await d.request({"op": "devices", "id": "now"}, "devices")
    assert [e["device"] for e in answer["devices"]] == ["mute"]
    assert not [m for m in d.seen if m.get("id") == "c2"]  # still waiting for the slot


class _RawDashboard:
    """A WebSocket client on a plain socket with a small receive buffer, reading only
    when told to: so that the gateway's writer feels it stop reading at once."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = _stalled_dashboard(host, port)  # upgraded, subscribed to all
        self.sock.settimeout(10.0)
        self.buf = b""
        self.head_done = False

    def _read(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError("the gateway closed the socket")
        self.buf += chunk

    def next_messages(self) -> list[dict[str, Any]]:
        """The JSON objects of the next text frame (the gateway batches them by newline)."""
        while not self.head_done:
            if b"\r\n\r\n" in self.buf:
                head, self.buf = self.buf.split(b"\r\n\r\n", 1)
                assert b" 101 " in head.split(b"\r\n", 1)[0], head[:80]
                self.head_done = True
            else:
                self._read()
        while True:
            frame = self._frame()
            if frame is None:
                self._read()
            elif frame[0] == 0x1:  # text; pings (0x9) go unanswered: the test is short
                return [json.loads(line) for line in frame[1].decode().split("\n")]

    def _frame(self) -> tuple[int, bytes] | None:
        """The next whole frame (opcode, payload) taken from the buffer, or None."""
        buf = self.buf
        if len(buf) < 2:
            return None
        n, at = buf[1] & 0x7F, 2
        if n >= 126:
            at = 4 if n == 126 else 10
            if len(buf) < at:
                return None
            n = int.from_bytes(buf[2:at], "big")
        if len(buf) < at + n:
            return None
        self.buf = buf[at + n :]
        return buf[0] & 0x0F, buf[at : at + n]

    def close(self) -> None:
        self.sock.close()


async def test_a_dashboard_that_stops_reading_keeps_the_oldest_and_resumes_exactly(
    make_app: AppFactory,
) -> None:
    """docs/api.md §3.1 lagged, through the socket: what was queued when it
    stopped comes first and in order, then one notice per gap whose
    resume_from starts the run it counts, then live telemetry; a subscribe
    with since = resume_from - 1 replays exactly the missed ones first."""
    client = await make_app(
        dashboards={"queue_size": 64},
        devices={"max_frames_per_second": 1e6, "rate_burst": 1e6},
        storage={"retention_per_device": 1_000_000},  # every message stays to compare
    )
    rt = runtime_of(client)
    raw = _RawDashboard(client.host, client.port)
    got: list[dict[str, Any]] = []
    try:
        while not any(m["op"] == "subscribed" for m in got):
            got += await asyncio.to_thread(raw.next_messages)
        got.clear()
        (slow,) = rt.hub.dashboards.values()
        dev = await device(rt, "lag")
        state = rt.hub.devices["lag"]
        sent = 0

        async def send(n: int) -> None:
            nonlocal sent
            for i in range(n):
                dev.send(frames.Data(i % 256, ENV_DATA))
            await dev.writer.drain()
            sent += n
            total = sent
            await wait_until(
                lambda: state.telemetry_count >= total, "the gateway took every frame", timeout=10
            )

        # Until the socket's buffers and then the queue are full: parked.
        while not slow.parked:
            await send(100)
            # TCP_NOTSENT_LOWAT: hundreds of kilobytes wait in the kernel, not megabytes
            # (52,000 messages of this test before it was set).
            assert sent < 10_000, "the dashboard did not fill up"
        await send(200)  # missed, all of them
        # Read until the gateway has nothing left for it, then one live message.
        while slow.parked or slow.queued_items():
            got += await asyncio.to_thread(raw.next_messages)
        await send(1)
        assert state.last is not None
        live = state.last.offset
        while not any(m.get("offset") == live for m in got):
            got += await asyncio.to_thread(raw.next_messages)
    finally:
        raw.close()
    await rt.storage.flush()
    stored = [r.offset for r in await rt.storage.telemetry_since(0, device="lag", limit=100_000)]
    assert len(stored) == sent
    # Each message sent, or counted by the one notice whose run it is in, in order.
    position, notices = 0, []
    for m in got:
        if m["op"] == "telemetry":
            assert m["offset"] == stored[position]
            position += 1
        elif m["op"] == "lagged":
            assert m["resume_from"] == stored[position]
            notices.append((position, m))
            position += m["dropped"]
    assert position == len(stored)
    assert {m["op"] for m in got} == {"presence", "telemetry", "lagged"}  # presence: "lag" online
    assert got[-1]["offset"] == live  # live again after the last notice
    first, last = notices[-1]
    assert first + last["dropped"] == len(stored) - 1  # its run ends at the live message
    # since = resume_from - 1: exactly the missed ones first, then the live one it has.
    d = await dash(client)
    await d.request(
        {"op": "subscribe", "device": "lag", "since": last["resume_from"] - 1}, "subscribed"
    )
    replayed = [(await d.expect("telemetry"))["offset"] for _ in range(last["dropped"] + 1)]
    assert replayed == [*stored[first : first + last["dropped"]], live]
    assert not set(replayed[:-1]) & {m["offset"] for m in got if m["op"] == "telemetry"}


@pytest.mark.skipif(not hasattr(socket, "TCP_NOTSENT_LOWAT"), reason="Linux and macOS")
async def test_a_dashboards_socket_holds_little_unsent(make_app: AppFactory) -> None:
    """What the kernel holds for a dashboard is bounded, so a stalled one parks soon."""
    client = await make_app()
    await dash(client)
    (ws,) = client.server.app[WEB].sockets
    sock = ws.get_extra_info("socket")
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT) == NOTSENT_LOWAT
