"""Device sessions over real loopback TCP: the rules of docs/protocol.md §4 end to end.

The same rules are checked exactly, on a fake clock, against the sans-IO core
(``test_core*.py``); here they run through real sockets, the adapter and the
registry together.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest

import frames
from devices import (
    CloseReason,
    CommandResult,
    CommandStatus,
    DeviceManager,
    DeviceNotOnline,
    DeviceOnline,
    DeviceServer,
    DeviceTelemetry,
    Transport,
)
from frames import ErrorCode
from tests.devices.support import ENV_DATA, Client, Gateway, GatewayFactory, Recorder
from tests.support.wait import wait_until


async def test_handshake_welcome_and_telemetry(gateway: Gateway) -> None:
    dev = await gateway.connect()
    welcome = await dev.hello("sensor-1")
    assert welcome.session_id.version == 4
    assert welcome.heartbeat == 30
    online = await gateway.sink.online("sensor-1")
    assert online.info.session == str(welcome.session_id)
    assert online.info.transport is Transport.TCP
    assert online.info.protocol == "env-sensor"
    assert online.info.peer.startswith("127.0.0.1:")
    dev.send(frames.Data(5, ENV_DATA))
    t = await gateway.sink.wait_for(lambda e: isinstance(e, DeviceTelemetry))
    assert isinstance(t, DeviceTelemetry)
    assert (t.seq, t.protocol) == (5, "env-sensor")
    assert t.data == {"temperature_c": 21.37, "humidity_pct": 45.5, "battery_pct": 97}
    assert gateway.manager.is_online("sensor-1")


async def test_each_session_gets_a_fresh_uuid(gateway: Gateway) -> None:
    a = await gateway.connect()
    b = await gateway.connect()
    wa = await a.hello("a")
    wb = await b.hello("b")
    assert wa.session_id != wb.session_id
    assert uuid.UUID(str(wa.session_id)).version == 4


async def test_ping_is_answered_with_pong_same_seq(gateway: Gateway) -> None:
    dev = await gateway.connect()
    dev.send(frames.Ping(77))  # allowed before HELLO
    assert (await dev.expect(frames.Pong)).seq == 77
    await dev.hello("p")
    dev.send(frames.Ping(200))
    assert (await dev.expect(frames.Pong)).seq == 200


async def test_data_before_hello_is_not_registered(gateway: Gateway) -> None:
    dev = await gateway.connect()
    dev.send(frames.Data(1, ENV_DATA))
    err = await dev.expect(frames.Error)
    assert err.code == ErrorCode.NOT_REGISTERED
    await dev.hello("late")  # the link stays usable
    assert not gateway.sink.telemetry()


async def test_hello_timeout_sends_error_and_closes(make_gateway: GatewayFactory) -> None:
    gw: Gateway = await make_gateway(hello_timeout=0.2)
    dev = await gw.connect()
    got = await dev.closed()
    assert [m.code for m in got if isinstance(m, frames.Error)] == [ErrorCode.NOT_REGISTERED]


async def test_bad_hello_is_answered_and_link_kept(gateway: Gateway) -> None:
    dev = await gateway.connect()
    bad = bytes([0x01, 1, 5]) + b"a b c" + bytes([3]) + b"env" + b"\x00"
    dev.send_raw(frames.encode_frame(bad))
    err = await dev.expect(frames.Error)
    assert err.code == ErrorCode.BAD_HELLO
    assert "client_id" in err.reason
    await dev.hello("fixed-id")


async def test_global_token_auth_failed_is_fatal(make_gateway: GatewayFactory) -> None:
    gw: Gateway = await make_gateway(token="s3cret")
    dev = await gw.connect()
    dev.send(frames.Hello(1, "intruder", "env-sensor", "wrong"))
    got = await dev.closed()
    assert [m.code for m in got if isinstance(m, frames.Error)] == [ErrorCode.AUTH_FAILED]
    ok = await gw.connect()
    await ok.hello("friend", token="s3cret")
    assert not gw.manager.is_online("intruder")
    assert gw.manager.counters.auth_failed == 1
    assert gw.manager.counters.links_closed[CloseReason.AUTH_FAILED] == 1


async def test_per_client_token_wins(make_gateway: GatewayFactory) -> None:
    gw: Gateway = await make_gateway(token="all", tokens={"special": "mine"})
    a = await gw.connect()
    a.send(frames.Hello(1, "special", "env-sensor", "all"))
    assert (await a.expect(frames.Error)).code == ErrorCode.AUTH_FAILED
    b = await gw.connect()
    await b.hello("special", token="mine")
    c = await gw.connect()
    await c.hello("other", token="all")


async def test_unknown_type_and_malformed(gateway: Gateway) -> None:
    dev = await gateway.connect()
    await dev.hello("u")
    dev.send_raw(frames.encode_frame(b"\x55\x01"))
    assert (await dev.expect(frames.Error)).code == ErrorCode.UNKNOWN_TYPE
    dev.send(frames.Data(2, b"\x00"))  # env-sensor DATA is 5 bytes
    err = await dev.expect(frames.Error)
    assert err.code == ErrorCode.MALFORMED
    dev.send_raw(frames.encode_frame(b"\x21\x00"))  # ACK without status
    assert (await dev.expect(frames.Error)).code == ErrorCode.MALFORMED
    dev.send(frames.Command(1, b"\x01"))  # devices do not send COMMAND
    assert (await dev.expect(frames.Error)).code == ErrorCode.UNKNOWN_TYPE
    dev.send(frames.Data(3, ENV_DATA))
    await gateway.sink.wait_for(lambda e: bool(gateway.sink.telemetry("u")))


async def test_takeover_replaces_older_session(gateway: Gateway) -> None:
    old = await gateway.connect()
    w1 = await old.hello("dup")
    new = await gateway.connect()
    w2 = await new.hello("dup")
    assert w1.session_id != w2.session_id
    got = await old.closed()
    assert [m.code for m in got if isinstance(m, frames.Error)] == [ErrorCode.REPLACED]
    off = await gateway.sink.offline("dup")
    assert off.reason is CloseReason.REPLACED
    assert off.info.session == str(w1.session_id)
    ons = [e for e in gateway.sink.events if isinstance(e, DeviceOnline)]
    assert [e.info.session for e in ons] == [str(w1.session_id), str(w2.session_id)]
    assert gateway.manager.online["dup"].info is not None
    assert gateway.manager.online["dup"].info.session == str(w2.session_id)


async def test_heartbeat_silence_ends_session(make_gateway: GatewayFactory) -> None:
    gw: Gateway = await make_gateway(heartbeat=1, misses=1)
    dev = await gw.connect()
    welcome = await dev.hello("quiet")
    assert welcome.heartbeat == 1
    off = await gw.sink.offline("quiet")
    assert off.reason is CloseReason.SILENT
    await dev.closed()
    assert not gw.manager.is_online("quiet")


async def test_command_acked(gateway: Gateway) -> None:
    dev = await gateway.connect()
    await dev.hello("act")
    handle = await gateway.manager.send_command("act", b"\x02")
    cmd = await dev.expect(frames.Command)
    assert (cmd.seq, cmd.body) == (handle.seq, b"\x02")
    dev.send(frames.Ack(cmd.seq, 0))
    result = await asyncio.wait_for(handle.result, 10)
    assert result.status is CommandStatus.ACKED


async def test_command_nacked_with_device_code(gateway: Gateway) -> None:
    dev = await gateway.connect()
    await dev.hello("act")
    handle = await gateway.manager.send_command("act", b"\x01\x00\x05")
    cmd = await dev.expect(frames.Command)
    dev.send(frames.Ack(cmd.seq, 3))
    result = await asyncio.wait_for(handle.result, 10)
    assert (result.status, result.code) == (CommandStatus.NACKED, 3)


async def test_command_timeout_and_seq_skipping(make_gateway: GatewayFactory) -> None:
    gw: Gateway = await make_gateway(ack_timeout=0.5)
    dev = await gw.connect()
    await dev.hello("slow")
    first = await gw.manager.send_command("slow", b"\x02")
    second = await gw.manager.send_command("slow", b"\x02")
    assert first.seq != second.seq
    c1 = await dev.expect(frames.Command)
    c2 = await dev.expect(frames.Command)
    dev.send(frames.Ack(c2.seq, 0))  # out of order: matched by seq
    assert (await asyncio.wait_for(second.result, 10)).status is CommandStatus.ACKED
    assert (await asyncio.wait_for(first.result, 10)).status is CommandStatus.TIMEOUT
    assert c1.seq == first.seq
    dev.send(frames.Ack(c1.seq, 0))  # a late ACK is counted, not matched
    await wait_until(lambda: gw.manager.counters.stray_acks == 1, "the late ACK counted")


async def test_command_times_out_saying_link_lost_when_link_is_lost(gateway: Gateway) -> None:
    dev = await gateway.connect()
    await dev.hello("gone")
    handle = await gateway.manager.send_command("gone", b"\x02")
    await dev.expect(frames.Command)
    await dev.aclose()
    result = await asyncio.wait_for(handle.result, 10)
    assert result == CommandResult(CommandStatus.TIMEOUT, error="link lost")
    with pytest.raises(DeviceNotOnline):
        await gateway.manager.send_command("gone", b"\x02")


async def test_seq_never_reuses_one_awaiting_ack(make_gateway: GatewayFactory) -> None:
    gw: Gateway = await make_gateway(max_inflight_commands=255)
    dev = await gw.connect()
    await dev.hello("many")
    handles = [await gw.manager.send_command("many", b"\x02") for _ in range(255)]
    assert len({h.seq for h in handles}) == 255
    for h in handles:
        h.result.cancel()


async def test_garbage_link_is_closed_and_counted(make_gateway: GatewayFactory) -> None:
    gw: Gateway = await make_gateway(garbage_bytes=4096)
    dev = await gw.connect()
    await dev.hello("noisy")
    dev.send_raw(bytes(range(0x00, 0xA0)) * 40)  # no header anywhere: all skipped
    await dev.closed()
    off = await gw.sink.offline("noisy")
    assert off.reason is CloseReason.GARBAGE
    assert gw.manager.counters.garbage_closed == 1


async def test_crc_errors_close_a_tcp_link(make_gateway: GatewayFactory) -> None:
    gw: Gateway = await make_gateway(garbage_crc_errors=10)
    dev = await gw.connect()
    await dev.hello("bitrot")
    bad = bytearray(frames.encode_frame(frames.Data(1, ENV_DATA).encode()))
    bad[-1] ^= 0xFF
    dev.send_raw(bytes(bad) * 12)
    await dev.closed()
    assert (await gw.sink.offline("bitrot")).reason is CloseReason.GARBAGE


async def test_max_devices_refusal(make_gateway: GatewayFactory) -> None:
    gw: Gateway = await make_gateway(max_devices=2)
    a, b, c = [await gw.connect() for _ in range(3)]
    await a.hello("a")
    await b.hello("b")
    c.send(frames.Hello(1, "c", "env-sensor", ""))
    got = await c.closed()
    errors = [m for m in got if isinstance(m, frames.Error)]
    assert errors[0].code == ErrorCode.RATE_LIMITED
    assert "max_devices" in errors[0].reason
    assert gw.manager.counters.refused_max_devices == 1


async def test_frames_split_and_merged_over_tcp(gateway: Gateway) -> None:
    dev = await gateway.connect()
    await dev.hello("split")
    wire = b"".join(frames.encode_frame(frames.Data(i, ENV_DATA).encode()) for i in range(20))
    for i in range(0, len(wire), 7):
        dev.send_raw(wire[i : i + 7])
        await dev.writer.drain()
    await gateway.sink.wait_for(lambda e: len(gateway.sink.telemetry("split")) == 20)
    assert [t.seq for t in gateway.sink.telemetry("split")] == list(range(20))


async def test_five_hundred_concurrent_devices(gateway: Gateway) -> None:
    n = 500
    devs = await asyncio.gather(*(gateway.connect() for _ in range(n)))
    await asyncio.gather(*(d.hello(f"dev-{i}") for i, d in enumerate(devs)))
    assert len(gateway.manager.online) == n
    for d in devs:
        for seq in range(3):
            d.send(frames.Data(seq, ENV_DATA))
    await gateway.sink.wait_for(lambda e: len(gateway.sink.telemetry()) == 3 * n, timeout=30)
    per_device = {t.client_id for t in gateway.sink.telemetry()}
    assert len(per_device) == n


async def test_max_connections_refuses_at_once_and_counts() -> None:
    manager = DeviceManager(Recorder())
    server = DeviceServer(manager, "127.0.0.1", 0, max_connections=1)
    await server.start()
    clients: list[Client] = []
    try:
        for _ in range(2):
            reader, writer = await asyncio.open_connection(*server.address)
            clients.append(Client(reader, writer))
        await clients[0].hello("first")
        assert await clients[1].closed() == []
        assert manager.counters.refused_connections == 1
        assert len(server.connections) == 1
    finally:
        for c in clients:
            await c.aclose()
        await server.close()


async def test_server_close_shuts_every_connection_down(gateway: Gateway) -> None:
    devs = [await gateway.connect() for _ in range(3)]
    for i, dev in enumerate(devs):
        await dev.hello(f"d-{i}")
    await gateway.server.close()
    for dev in devs:
        assert await dev.closed() == []
    offs = [await gateway.sink.offline(f"d-{i}") for i in range(3)]
    assert {off.reason for off in offs} == {CloseReason.SHUTDOWN}
    assert gateway.manager.counters.links_closed == {CloseReason.SHUTDOWN: 3}
    assert not gateway.manager.links
