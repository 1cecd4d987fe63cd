"""Hostile and faulty devices over real loopback TCP (docs/protocol.md §4).

A burst over the frame rate arrives late but whole (the socket is not read for
a while); a link that floods before its HELLO is closed at its budget; two
links fighting over one client_id, or one link cycling through client_ids,
are refused; a device that stops reading cannot hold a command (or its
sender) for longer than the command timeout, and a reset never raises out of
``send_command``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import struct
import time
from typing import Any

import frames
from devices import (
    CloseReason,
    CommandResult,
    CommandStatus,
    DeviceNotOnline,
    DeviceTelemetry,
)
from devices.tcp import anonymous_allowed, is_loopback
from frames import ErrorCode
from tests.devices.support import ENV_DATA, Client, Gateway, GatewayFactory
from tests.support.wait import wait_until

PING = frames.encode_frame(frames.Ping(1).encode())


async def tight_client(gw: Gateway, rcvbuf: int = 4096) -> Client:
    """A raw device whose socket buffers little: it fills soon when it stops reading."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (gw.host, gw.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    client = Client(reader, writer)
    gw.clients.append(client)
    return client


def server_side(gw: Gateway) -> Any:
    """The gateway's end of the only device connection."""
    [connection] = gw.server.connections
    return connection


async def stop_reading(gw: Gateway, dev: Client) -> None:
    """Make ``dev`` a device that does not read but keeps talking: PINGs until the
    gateway's side of the link stops taking what it writes."""
    conn = server_side(gw)
    sock = conn.transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    dev.reader._transport.pause_reading()  # type: ignore[attr-defined]

    def paused() -> bool:
        dev.send_raw(PING * 500)
        return bool(conn._paused)

    await wait_until(paused, "the gateway's writes to the device to back up", timeout=20)


def reset(dev: Client) -> None:
    """Close the device's socket with a TCP RST (a device that rebooted)."""
    sock = dev.writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    dev.writer.transport.abort()


# ---- rate limits slow a TCP device down, they do not drop its frames ---------------------------


async def test_a_burst_over_the_rate_arrives_late_but_whole(make_gateway: GatewayFactory) -> None:
    gw: Gateway = await make_gateway(max_frames_per_second=50, rate_burst=10)
    dev = await gw.connect()
    await dev.hello("bursty")
    n = 150
    started = time.monotonic()
    dev.send_raw(b"".join(frames.encode_frame(frames.Data(i, ENV_DATA).encode()) for i in range(n)))
    await gw.sink.wait_for(lambda e: len(gw.sink.telemetry("bursty")) == n, timeout=30)
    elapsed = time.monotonic() - started
    assert [t.seq for t in gw.sink.telemetry("bursty")] == list(range(n))
    # Late: about (150 - 10) / 50 s at the device's rate, less one slice read ahead.
    assert elapsed >= 1.5, elapsed
    totals = gw.manager.totals()
    assert totals.rate_limited == 0
    assert totals.throttled >= 1
    # No RATE_LIMITED went to the device: the PONG is the next thing it reads.
    dev.send(frames.Ping(9))
    assert await dev.recv() == frames.Pong(9)
    assert gw.manager.is_online("bursty")


async def test_a_device_over_the_rate_is_not_read_meanwhile(make_gateway: GatewayFactory) -> None:
    gw: Gateway = await make_gateway(max_frames_per_second=20, rate_burst=5)
    dev = await gw.connect()
    await dev.hello("flooder")
    conn = server_side(gw)
    flood = frames.encode_frame(frames.Data(1, ENV_DATA).encode()) * 20_000  # 240 KB
    dev.send_raw(flood)
    await asyncio.sleep(1.0)  # the time under test: what the gateway took in one second
    received = gw.manager.totals().bytes_in
    # One read chunk at most is held; the rest waits in the OS and the device.
    assert received < len(flood) // 2, received
    assert len(gw.sink.telemetry("flooder")) <= 20 * 1 + 5 + 25
    assert not conn.transport.is_reading()


# ---- before HELLO: a small budget ---------------------------------------------------------------


async def test_a_flood_before_hello_is_closed_at_the_budget(gateway: Gateway) -> None:
    dev = await gateway.connect()
    started = time.monotonic()
    dev.send_raw(PING * 20_000)  # 140 KB of valid frames, and never a HELLO
    got = await dev.closed()
    assert time.monotonic() - started < 3.0
    assert [type(m) for m in got] == [frames.Pong] * 16 + [frames.Error]
    assert gateway.manager.counters.links_closed == {CloseReason.HELLO_BUDGET: 1}
    assert gateway.manager.totals().frames_in <= 4096 // len(PING)
    assert not gateway.server.connections


# ---- takeovers and client_id changes ------------------------------------------------------------


async def test_two_links_fighting_over_one_client_id_are_stopped(
    make_gateway: GatewayFactory,
) -> None:
    gw: Gateway = await make_gateway(max_takeovers=3)
    holder = await gw.connect()
    await holder.hello("dup")
    for _ in range(3):
        newer = await gw.connect()
        await newer.hello("dup")
        assert [type(m) for m in await holder.closed()] == [frames.Error]
        holder = newer
    refused = await gw.connect()
    refused.send(frames.Hello(1, "dup", "env-sensor", ""))
    [error] = await refused.closed()
    assert isinstance(error, frames.Error)
    assert error.code == ErrorCode.RATE_LIMITED
    assert gw.manager.counters.refused_takeovers == 1
    # The device that holds it keeps it.
    holder.send(frames.Data(1, ENV_DATA))
    await gw.sink.wait_for(lambda e: isinstance(e, DeviceTelemetry) and e.client_id == "dup")
    assert gw.manager.is_online("dup")


async def test_one_link_cycling_through_client_ids_is_closed(gateway: Gateway) -> None:
    dev = await gateway.connect()
    for i in range(11):  # the first and 10 changes (the default max_client_id_changes)
        await dev.hello(f"id-{i}")
    dev.send(frames.Hello(1, "id-11", "env-sensor", ""))
    [error] = await dev.closed()
    assert isinstance(error, frames.Error)
    assert error.code == ErrorCode.RATE_LIMITED
    assert gateway.manager.counters.refused_client_id_changes == 1
    assert not gateway.manager.online


# ---- a device that stops reading ----------------------------------------------------------------


async def test_a_command_to_a_device_that_does_not_read_fails_in_time(
    make_gateway: GatewayFactory,
) -> None:
    gw: Gateway = await make_gateway(
        ack_timeout=0.5, max_frames_per_second=1e6, rate_burst=1e6, max_inflight_commands=4
    )
    dev = await tight_client(gw)
    await dev.hello("deaf")
    await stop_reading(gw, dev)
    started = time.monotonic()
    handles = await asyncio.wait_for(
        asyncio.gather(*(gw.manager.send_command("deaf", b"\x02") for _ in range(6))), 10
    )
    assert time.monotonic() - started < 5.0  # bounded: about one ack_timeout, not forever
    for handle in handles:
        assert handle.result.done()
        assert handle.result.result() == CommandResult(
            CommandStatus.TIMEOUT, error="device not reading"
        )
    assert gw.manager.counters.commands_not_reading == 6
    assert gw.manager.is_online("deaf")  # the device is not closed for it, only slowed
    # Then it resets while a command waits for room: no ConnectionError, it is offline.
    waiting = asyncio.ensure_future(gw.manager.send_command("deaf", b"\x02"))
    await asyncio.sleep(0.05)
    reset(dev)
    try:
        result = await asyncio.wait_for(waiting, 5)
    except DeviceNotOnline:
        pass
    else:
        assert result.result.done()
        assert result.result.result().status is CommandStatus.TIMEOUT
    assert (await gw.sink.offline("deaf")).reason in (CloseReason.LOST, CloseReason.CLOSED)


async def test_a_device_left_with_unread_bytes_is_aborted_not_kept(
    make_gateway: GatewayFactory,
) -> None:
    gw: Gateway = await make_gateway(
        max_write_buffer=64 * 1024, max_frames_per_second=1e6, rate_burst=1e6
    )
    dev = await tight_client(gw)
    await dev.hello("hoarder")
    conn = server_side(gw)
    conn.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    dev.reader._transport.pause_reading()  # type: ignore[attr-defined]

    def closed_for_it() -> bool:
        if gw.manager.counters.links_closed.get(CloseReason.NOT_READING):
            return True
        dev.send_raw(PING * 1000)
        return False

    await wait_until(closed_for_it, "the link closed for not reading", timeout=20)
    # The connection is gone although the device never read what was left for it:
    # closed gracefully, it would wait for the device to read, that is, forever.
    await wait_until(lambda: not gw.server.connections, "the connection released", timeout=5)
    assert (await gw.sink.offline("hoarder")).reason is CloseReason.NOT_READING


# ---- which device ports take devices without a token ---------------------------------------------


def test_loopback_is_127_8_and_ipv6_one_only() -> None:
    for address in ("127.0.0.1", "127.0.0.2", "127.255.255.254", "::1", "::ffff:127.0.0.1"):
        assert is_loopback(address), address
    for address in ("0.0.0.0", "::", "10.0.0.5", "192.168.1.2", "fe80::1%eth0", "localhost", ""):
        assert not is_loopback(address), address


def test_anonymous_devices_only_on_loopback_unless_allowed() -> None:
    assert anonymous_allowed(["127.0.0.1", "::1"], allow_anonymous=False)
    assert not anonymous_allowed(["0.0.0.0"], allow_anonymous=False)
    assert not anonymous_allowed(["127.0.0.1", "10.0.0.5"], allow_anonymous=False)
    assert anonymous_allowed(["0.0.0.0", "::"], allow_anonymous=True)


async def test_a_loopback_port_says_so_at_start_and_takes_anonymous_devices(
    gateway: Gateway,
) -> None:
    assert gateway.server.policy.allow_anonymous
    dev = await gateway.connect()
    await dev.hello("anon")


# ---- an address whose links keep failing is held at the door (docs/devices.md) -----------------


async def fail_once(gw: Gateway) -> None:
    """One link that floods before HELLO until the gateway closes it."""
    dev = await gw.connect()
    dev.send_raw(PING * 100)
    await dev.closed()


async def test_an_address_that_keeps_failing_is_held_then_let_in_again(
    make_gateway: GatewayFactory,
) -> None:
    # 3 failures per 3 s: past them, one is earned back a second.
    gw: Gateway = await make_gateway(max_failed_links=3, failed_links_window=3.0)
    for _ in range(3):
        await fail_once(gw)
    await wait_until(lambda: len(gw.server.failed_links) == 1, "the failures to be counted")
    held = await gw.connect()
    started = time.monotonic()
    held.send(frames.Hello(1, "late", "env-sensor", ""))
    # Never read: no WELCOME, and closed once the address may connect again.
    assert await held.closed() == []
    assert time.monotonic() - started < 8.0
    assert gw.manager.counters.refused_failed_links == 1
    assert not gw.manager.is_online("late")
    assert not gw.server.held
    # Let in again: a device says HELLO and is welcomed.
    dev = await gw.connect()
    await dev.hello("late")
    assert gw.manager.is_online("late")


def frames_read(gw: Gateway, n: int) -> bool:
    return gw.manager.totals().frames_in >= n


async def test_sessions_that_say_something_never_count(make_gateway: GatewayFactory) -> None:
    gw: Gateway = await make_gateway(max_failed_links=2, failed_links_window=60.0)
    for i in range(5):
        dev = await gw.connect()
        await dev.hello(f"ok-{i}")
        # One frame after HELLO (a reading, or only a PING) and the session was not empty.
        dev.send(frames.Data(1, ENV_DATA) if i % 2 else frames.Ping(1))
        await wait_until(functools.partial(frames_read, gw, 2 * (i + 1)), "the frame to be read")
        dev.writer.close()
        await wait_until(lambda: not gw.server.connections, "the link to close")
    assert len(gw.server.failed_links) == 0
    assert gw.manager.counters.refused_failed_links == 0


async def test_empty_sessions_in_a_loop_are_held_at_the_door(make_gateway: GatewayFactory) -> None:
    # HELLO, WELCOME, close, over and over, each time under another client_id: every
    # session costs the gateway (registry, presence, storage) and brings nothing.
    gw: Gateway = await make_gateway(max_failed_links=3, failed_links_window=60.0)
    online = await gw.connect()
    await online.hello("steady")
    for i in range(3):
        dev = await gw.connect()
        await dev.hello(f"churn-{i}")
        dev.writer.close()
        await wait_until(lambda: len(gw.server.connections) == 1, "the link to close")
    await wait_until(lambda: len(gw.server.failed_links) == 1, "the empty sessions counted")
    held = await gw.connect()
    held.send(frames.Hello(1, "churn-3", "env-sensor", ""))
    await wait_until(lambda: len(gw.server.held) == 1, "the next connection to be held")
    assert gw.manager.counters.refused_failed_links == 1
    assert not gw.manager.is_online("churn-3")
    # A device already online is not touched: its readings still flow.
    before = gw.manager.totals().frames_in
    online.send(frames.Data(1, ENV_DATA))
    await wait_until(lambda: gw.manager.totals().frames_in > before, "the steady device's DATA")
    assert gw.manager.is_online("steady")
    held.writer.close()


async def test_a_held_address_does_not_touch_devices_already_online(
    make_gateway: GatewayFactory,
) -> None:
    gw: Gateway = await make_gateway(max_failed_links=1, failed_links_window=60.0)
    online = await gw.connect()
    await online.hello("steady")
    await fail_once(gw)
    held = await gw.connect()
    await wait_until(lambda: bool(gw.server.held), "the next connection to be held")
    online.send(frames.Data(1, ENV_DATA))
    await gw.sink.wait_for(lambda e: isinstance(e, DeviceTelemetry) and e.client_id == "steady")
    assert gw.manager.is_online("steady")
    assert held in gw.clients


async def test_held_connections_are_bounded_and_go_at_shutdown(
    make_gateway: GatewayFactory,
) -> None:
    gw: Gateway = await make_gateway(max_failed_links=1, failed_links_window=600.0)
    gw.server.max_held = 2
    await fail_once(gw)
    waiting = [await gw.connect() for _ in range(2)]
    await wait_until(lambda: len(gw.server.held) == 2, "two connections to be held")
    extra = await gw.connect()
    assert await extra.closed() == []  # the waiting room is full: closed at once
    assert gw.manager.counters.refused_failed_links == 3
    await gw.server.close()
    for client in waiting:
        assert await client.closed() == []
    assert not gw.server.held


async def test_a_device_reconnecting_in_a_loop_is_refused_for_the_window(
    make_gateway: GatewayFactory,
) -> None:
    gw: Gateway = await make_gateway(max_sessions_per_client=3, max_failed_links=0)
    for _ in range(3):
        dev = await gw.connect()
        await dev.hello("looper")
        dev.writer.close()
        await wait_until(lambda: not gw.manager.is_online("looper"), "the session to end")
    refused = await gw.connect()
    refused.send(frames.Hello(1, "looper", "env-sensor", ""))
    [error] = await refused.closed()
    assert isinstance(error, frames.Error)
    assert error.code == ErrorCode.RATE_LIMITED
    assert "max_sessions_per_client" in error.reason
    assert gw.manager.counters.refused_sessions == 1
    # Other client_ids are not touched.
    other = await gw.connect()
    await other.hello("steady")
    assert gw.manager.is_online("steady")


def test_a_held_connection_is_not_read_on_uvloop() -> None:
    # uvloop starts reading after connection_made whatever was asked in it: a
    # held connection must still not be read (a flooder's bytes cost nothing).
    import uvloop

    from devices import DeviceManager, DeviceServer, SessionConfig
    from tests.devices.support import Recorder

    async def scenario() -> None:
        manager = DeviceManager(
            Recorder(), SessionConfig(max_failed_links=1, failed_links_window=600.0)
        )
        server = DeviceServer(manager, "127.0.0.1", 0)
        await server.start()
        host, port = server.address
        try:
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(PING * 100)  # over the budget: closed, one failed link
            await asyncio.wait_for(reader.read(), 10)
            writer.close()
            await wait_until(lambda: len(server.failed_links) == 1, "the failure counted")
            before = manager.totals().bytes_in
            reader, writer = await asyncio.open_connection(host, port)
            await wait_until(lambda: bool(server.held), "the next connection held")
            chunk = b"\x00" * (1 << 20)
            written = 0
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(3):
                    while written < 64 << 20:
                        writer.write(chunk)
                        await writer.drain()
                        written += len(chunk)
            # Only the sockets' buffers took anything; nothing read it.
            assert written < 32 << 20, written
            assert manager.totals().bytes_in == before
            writer.close()
        finally:
            await server.close()

    uvloop.run(scenario())
