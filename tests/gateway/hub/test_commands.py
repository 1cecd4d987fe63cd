"""gateway.hub.commands.CommandRouter: every command gets its statuses (docs/api.md §3.1).

Pins the routing rules with a LocalEngine over MemoryStorage and a fake
device side (``Links``) whose result futures the tests resolve: a device never
seen or a command its protocol cannot encode is ``rejected`` and goes
nowhere; an online device gets it (``sent``) and its ACK, NACK (``code``) or
timeout (``error``) becomes the final status; an offline device's commands
are ``queued`` and delivered oldest first at its next session, their
statuses going to whoever gave them, with their ids; a queued command past
its TTL is ``expired``, but not one whose delivery is under way; a command
to a protocol goes to each online device of it, or is a ``not_found``
ClientError; every status is counted in ``iot_command_results_total`` by
status.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devices import (
    CommandHandle,
    CommandResult,
    CommandStatus,
    DeviceInfo,
    DeviceNotOnline,
    SessionConfig,
    Transport,
)
from frames import CommandError, get_protocol
from gateway.hub import (
    ClientError,
    CommandRequest,
    CommandRouter,
    CommandSettings,
    ErrorCode,
    LocalEngine,
    Registry,
)
from gateway.hub import commands as commands_module
from gateway.metrics import Metrics
from gateway.storage import MemoryStorage, QueuedCommand

TIMEOUT = 5.0  # a deadline for what the loop should do at once, never a pause


class Links:
    """A fake device side: ``online`` devices take commands; the tests resolve the results."""

    def __init__(self, max_inflight: int = 64) -> None:
        self.config = SessionConfig(max_inflight_commands=max_inflight)
        self.online: set[str] = set()
        self.refuse: set[str] = set()  # say online, then raise DeviceNotOnline (a race)
        self.sent: list[tuple[str, bytes, CommandHandle]] = []
        self.attempts = 0  # send_command calls, refused ones included
        # When set, send_command waits for it first (a link awaiting a slot or a drain).
        self.gate: asyncio.Event | None = None
        self.gates: dict[str, asyncio.Event] = {}  # the same, for one device
        # The next send_command to this device raises this (the link failed writing it).
        self.fail: dict[str, BaseException] = {}
        # Called with (device, body) as a command is written (checks at that moment).
        self.on_write: Callable[[str, bytes], None] | None = None
        self.cancelled = 0  # send_command calls cancelled while waiting at the gate
        self._changed = asyncio.Event()

    def is_online(self, client_id: str) -> bool:
        return client_id in self.online

    async def send_command(self, client_id: str, body: bytes) -> CommandHandle:
        self.attempts += 1
        self._changed.set()
        gate = self.gates.get(client_id, self.gate)
        if gate is not None:
            try:
                await gate.wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                self._changed.set()
                raise
        if client_id not in self.online or client_id in self.refuse:
            raise DeviceNotOnline(client_id)
        if client_id in self.fail:
            raise self.fail.pop(client_id)
        if self.on_write is not None:
            self.on_write(client_id, body)
        future: asyncio.Future[CommandResult] = asyncio.get_running_loop().create_future()
        handle = CommandHandle(client_id, len(self.sent), future)
        self.sent.append((client_id, body, handle))
        self._changed.set()
        return handle

    async def until(self, check: Callable[[], bool]) -> None:
        async with asyncio.timeout(TIMEOUT):
            while not check():
                self._changed.clear()
                await self._changed.wait()

    async def wait_sent(self, n: int) -> None:
        await self.until(lambda: len(self.sent) >= n)

    async def wait_attempts(self, n: int) -> None:
        await self.until(lambda: self.attempts >= n)

    def resolve(self, i: int, result: CommandResult) -> None:
        self.sent[i][2].result.set_result(result)


class Replies:
    """A StatusCallback that keeps every status and can be awaited."""

    def __init__(self) -> None:
        self.got: list[dict[str, Any]] = []
        # The gateway's command_id of each status, kept apart: the statuses are
        # compared whole, and a command_id is random (tests/gateway/test_commands_api.py).
        self.command_ids: list[str | None] = []
        self._changed = asyncio.Event()

    def __call__(self, message: dict[str, Any]) -> None:
        message = dict(message)
        self.command_ids.append(message.pop("command_id", None))
        self.got.append(message)
        self._changed.set()

    async def until(self, n: int) -> list[dict[str, Any]]:
        return await self.until_true(lambda: len(self.got) >= n)

    async def until_true(self, check: Callable[[], bool]) -> list[dict[str, Any]]:
        async with asyncio.timeout(TIMEOUT):
            while not check():
                self._changed.clear()
                await self._changed.wait()
        return self.got

    @property
    def statuses(self) -> list[str]:
        return [m["status"] for m in self.got]


class WatchedEngine(LocalEngine):
    """A LocalEngine that tells when an expiry pass has run, and up to which time,
    and keeps the ``limit`` of each read of the offline queue."""

    def __init__(self, storage: MemoryStorage) -> None:
        super().__init__(storage)
        self.expired_up_to = 0
        self.expiry_ran = asyncio.Event()
        self.page_limits: list[int | None] = []
        self.expiry_attempts = 0  # failed passes included

    async def pending_commands(
        self, device: str, now_ms: int, *, after: int = 0, limit: int | None = None
    ) -> list[QueuedCommand]:
        self.page_limits.append(limit)
        return await super().pending_commands(device, now_ms, after=after, limit=limit)

    async def expire_commands(self, now_ms: int, limit: int = 1000) -> list[QueuedCommand]:
        self.expiry_attempts += 1
        self.expiry_ran.set()
        expired = await super().expire_commands(now_ms, limit)
        self.expired_up_to = max(self.expired_up_to, now_ms)
        self.expiry_ran.set()
        return expired

    async def expiry_attempts_reach(self, n: int) -> None:
        async with asyncio.timeout(TIMEOUT):
            while self.expiry_attempts < n:
                self.expiry_ran.clear()
                await self.expiry_ran.wait()

    async def expiry_pass_after(self, ms: int) -> None:
        async with asyncio.timeout(TIMEOUT):
            while self.expired_up_to < ms:
                self.expiry_ran.clear()
                await self.expiry_ran.wait()


class World:
    def __init__(
        self,
        settings: CommandSettings,
        storage: MemoryStorage | None = None,
        links: Links | None = None,
    ) -> None:
        self.storage = storage or MemoryStorage()
        self.engine = WatchedEngine(self.storage)
        self.registry = Registry()
        self.metrics = Metrics()
        self.settings = settings
        self.router = CommandRouter(self.registry, self.engine, self.metrics, lambda: self.settings)
        self.links = links or Links()
        self.router.links = self.links

    async def start(self) -> None:
        await self.storage.open()
        self.router.start()

    async def stop(self) -> None:
        await self.router.stop()
        await self.storage.close()

    def online(self, device: str, session: str = "s1", protocol: str = "env-sensor") -> None:
        """What the hub does on WELCOME, minus the delivery of queued commands."""
        self.registry.online(info(device, session, protocol), now_ms())
        self.links.online.add(device)

    def offline(self, device: str, session: str = "s1", protocol: str = "env-sensor") -> None:
        self.registry.offline(info(device, session, protocol), now_ms())
        self.links.online.discard(device)

    async def queued(self, device: str) -> list[bytes]:
        return [c.body for c in await self.engine.pending_commands(device, now_ms())]

    def counted(self, status: CommandStatus) -> float:
        value = self.metrics.registry.get_sample_value(
            "iot_command_results_total", {"status": str(status)}
        )
        return 0.0 if value is None else value


def info(device: str, session: str = "s1", protocol: str = "env-sensor") -> DeviceInfo:
    return DeviceInfo(device, protocol, Transport.TCP, "127.0.0.1:1", session, now_ms())


def now_ms() -> int:
    return int(time.time() * 1000)


def status(rid: Any, device: str, st_: CommandStatus, **extra: Any) -> dict[str, Any]:
    return {"op": "command_status", "id": rid, "device": device, "status": str(st_), **extra}


@pytest.fixture
async def world() -> AsyncIterator[World]:
    w = World(CommandSettings())
    await w.start()
    yield w
    await w.stop()


# ---- rejected ----------------------------------------------------------------------------------


async def test_a_device_never_seen_is_rejected(world: World) -> None:
    replies = Replies()
    got = await world.router.submit(CommandRequest("c1", {"hex": "02"}, device="ghost"), replies)
    assert got == [CommandStatus.REJECTED]
    assert replies.got == [
        status("c1", "ghost", CommandStatus.REJECTED, error="device 'ghost' has never been seen")
    ]
    assert world.links.sent == []
    assert await world.queued("ghost") == []
    assert world.counted(CommandStatus.REJECTED) == 1


@pytest.mark.parametrize(
    "command",
    [
        {"name": "bogus"},
        {"name": "set_interval"},  # a missing argument
        {"name": "set_interval", "args": {"seconds": 0}},  # out of range
        {"name": "reboot", "extra": 1},
        {"hex": "zz"},
        {"hex": "02", "name": "reboot"},
        {},
    ],
)
@pytest.mark.parametrize("online", [True, False])
async def test_a_command_the_protocol_cannot_encode_is_rejected(
    world: World, command: dict[str, Any], online: bool
) -> None:
    world.online("a")
    if not online:
        world.offline("a")
    with pytest.raises(CommandError) as expected:
        get_protocol("env-sensor").encode_command(command)
    replies = Replies()
    got = await world.router.submit(CommandRequest(9, command, device="a"), replies)
    assert got == [CommandStatus.REJECTED]
    assert replies.got == [status(9, "a", CommandStatus.REJECTED, error=str(expected.value))]
    assert world.links.sent == []
    assert await world.queued("a") == []  # rejected before any queueing


# ---- sent, then the device's answer ------------------------------------------------------------


@pytest.mark.parametrize(
    ("result", "extra"),
    [
        (CommandResult(CommandStatus.ACKED), {}),
        # A code env-sensor does not name, in words all the same (docs/api.md §3.1).
        (
            CommandResult(CommandStatus.NACKED, code=3),
            {"code": 3, "message": "device error code 3"},
        ),
        (CommandResult(CommandStatus.TIMEOUT, error="no ACK in 10 s"), {"error": "no ACK in 10 s"}),
        (CommandResult(CommandStatus.TIMEOUT), {}),
    ],
)
async def test_sent_then_the_final_status_from_the_result(
    world: World, result: CommandResult, extra: dict[str, Any]
) -> None:
    world.online("a")
    replies = Replies()
    command = {"name": "set_interval", "args": {"seconds": 10}}
    got = await world.router.submit(CommandRequest("c1", command, device="a"), replies)
    assert got == [CommandStatus.SENT]
    assert replies.got == [status("c1", "a", CommandStatus.SENT)]
    assert [(d, body) for d, body, _ in world.links.sent] == [("a", b"\x01\x00\x0a")]
    world.links.resolve(0, result)
    await replies.until(2)
    assert replies.got[1] == status("c1", "a", result.status, **extra)
    assert world.counted(CommandStatus.SENT) == 1
    assert world.counted(result.status) == 1
    assert await world.queued("a") == []


async def test_statuses_go_to_each_callers_own_callback(world: World) -> None:
    world.online("a")
    first, second = Replies(), Replies()
    await world.router.submit(CommandRequest("x", {"hex": "01"}, device="a"), first)
    await world.router.submit(CommandRequest("y", {"hex": "02"}, device="a"), second)
    world.links.resolve(1, CommandResult(CommandStatus.NACKED, code=7))
    world.links.resolve(0, CommandResult(CommandStatus.ACKED))
    await first.until(2)
    await second.until(2)
    assert first.got == [
        status("x", "a", CommandStatus.SENT),
        status("x", "a", CommandStatus.ACKED),
    ]
    assert second.got == [
        status("y", "a", CommandStatus.SENT),
        status("y", "a", CommandStatus.NACKED, code=7, message="device error code 7"),
    ]


# ---- queued, delivered, expired ----------------------------------------------------------------


async def test_queued_when_offline_then_delivered_oldest_first_on_device_online(
    world: World,
) -> None:
    world.online("a")
    world.offline("a")
    first, second = Replies(), Replies()
    assert await world.router.submit(CommandRequest("c1", {"hex": "01"}, device="a"), first) == [
        CommandStatus.QUEUED
    ]
    assert await world.router.submit(CommandRequest(7, {"hex": "02"}, device="a"), second) == [
        CommandStatus.QUEUED
    ]
    assert first.got == [status("c1", "a", CommandStatus.QUEUED)]
    assert second.got == [status(7, "a", CommandStatus.QUEUED)]
    assert world.links.sent == []
    assert await world.queued("a") == [b"\x01", b"\x02"]

    world.online("a", session="s2")
    world.router.device_online("a", "s2")
    await world.links.wait_sent(2)
    assert [body for _, body, _ in world.links.sent] == [b"\x01", b"\x02"]  # oldest first
    # ``sent`` reaches whoever gave the command, with the id it gave (7 stays an int).
    assert await first.until(2) == [
        status("c1", "a", CommandStatus.QUEUED),
        status("c1", "a", CommandStatus.SENT),
    ]
    assert await second.until(2) == [
        status(7, "a", CommandStatus.QUEUED),
        status(7, "a", CommandStatus.SENT),
    ]
    assert await world.queued("a") == []
    world.links.resolve(0, CommandResult(CommandStatus.ACKED))
    world.links.resolve(1, CommandResult(CommandStatus.NACKED, code=2))
    assert (await first.until(3))[2] == status("c1", "a", CommandStatus.ACKED)
    assert (await second.until(3))[2] == status(
        7, "a", CommandStatus.NACKED, code=2, message="bad argument"
    )
    assert world.counted(CommandStatus.QUEUED) == 2
    assert world.counted(CommandStatus.SENT) == 2


async def test_a_queued_command_without_id_is_reported_with_a_null_id(world: World) -> None:
    world.online("a")
    world.offline("a")
    replies = Replies()
    await world.router.submit(CommandRequest(None, {"hex": "05"}, device="a"), replies)
    world.online("a", session="s2")
    world.router.device_online("a", "s2")
    assert await replies.until(2) == [
        status(None, "a", CommandStatus.QUEUED),
        status(None, "a", CommandStatus.SENT),
    ]


async def test_online_in_the_registry_but_unreachable_is_queued(world: World) -> None:
    """The registry says online, the links do not: no other node holds it, so it waits."""
    world.online("a")
    world.links.online.discard("a")
    replies = Replies()
    got = await world.router.submit(CommandRequest("c", {"hex": "01"}, device="a"), replies)
    assert got == [CommandStatus.QUEUED]
    assert replies.statuses == ["queued"]
    assert await world.queued("a") == [b"\x01"]


async def test_a_device_gone_while_sending_is_queued(world: World) -> None:
    world.online("a")
    world.links.refuse.add("a")  # is_online says yes, send_command raises DeviceNotOnline
    replies = Replies()
    got = await world.router.submit(CommandRequest("c", {"hex": "01"}, device="a"), replies)
    assert got == [CommandStatus.QUEUED]
    assert replies.got == [status("c", "a", CommandStatus.QUEUED)]
    assert world.links.sent == []
    assert await world.queued("a") == [b"\x01"]


async def test_delivery_that_finds_the_device_gone_keeps_the_commands(world: World) -> None:
    world.online("a")
    world.offline("a")
    replies = Replies()
    await world.router.submit(CommandRequest("c", {"hex": "01"}, device="a"), replies)
    world.online("a", session="s2")
    world.links.refuse.add("a")  # gone again between WELCOME and the delivery
    world.router.device_online("a", "s2")
    await world.links.wait_attempts(1)
    for _ in range(5):
        await asyncio.sleep(0)  # let the delivery task see DeviceNotOnline and end
    assert await world.queued("a") == [b"\x01"]  # still queued for the next session
    assert replies.statuses == ["queued"]
    world.links.refuse.clear()
    world.router.device_online("a", "s2")
    assert (await replies.until(2))[1] == status("c", "a", CommandStatus.SENT)
    assert await world.queued("a") == []


async def test_a_queued_command_expires_after_its_ttl() -> None:
    w = World(CommandSettings(command_ttl=0.05, expiry_interval=0.01))
    await w.start()
    try:
        w.online("a")
        w.offline("a")
        replies = Replies()
        await w.router.submit(CommandRequest("c1", {"hex": "01"}, device="a"), replies)
        assert await replies.until(2) == [
            status("c1", "a", CommandStatus.QUEUED),
            status("c1", "a", CommandStatus.EXPIRED),
        ]
        assert await w.engine.expire_commands(now_ms() + 10**9) == []  # gone from the queue
        assert w.counted(CommandStatus.EXPIRED) == 1
        assert w.counted(CommandStatus.QUEUED) == 1
    finally:
        await w.stop()


FINAL = {"acked", "nacked", "timeout", "expired", "rejected"}


async def test_a_command_being_delivered_is_not_also_expired(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [1_000_000]
    monkeypatch.setattr(commands_module, "now_ms", lambda: clock[0])
    w = World(CommandSettings(command_ttl=60.0, expiry_interval=0.005))
    await w.start()
    try:
        w.online("a")
        w.offline("a")
        replies = Replies()
        await w.router.submit(CommandRequest("c1", {"hex": "01"}, device="a"), replies)
        w.links.gate = asyncio.Event()
        w.online("a", session="s2")
        w.router.device_online("a", "s2")
        await w.links.wait_attempts(1)  # the delivery is under way, waiting on the link
        clock[0] += 60_000  # the TTL passes meanwhile
        await w.engine.expiry_pass_after(clock[0])
        w.links.gate.set()  # the link takes the command (unless the router cancelled the send)
        await w.links.until(lambda: bool(w.links.sent or w.links.cancelled))
        if w.links.sent:
            w.links.resolve(0, CommandResult(CommandStatus.ACKED))
        await replies.until_true(
            lambda: (
                "acked" in replies.statuses
                or (w.links.cancelled > 0 and "expired" in replies.statuses)
            )
        )
        statuses = replies.statuses
        finals = [i for i, s in enumerate(statuses) if s in FINAL]
        assert finals == [len(statuses) - 1], f"a status after a final one: {statuses}"
        if w.links.sent:  # the device got it: it did not expire
            assert statuses == ["queued", "sent", "acked"]
    finally:
        await w.stop()


# ---- commands to a protocol --------------------------------------------------------------------


async def test_a_protocol_command_goes_to_each_online_device_of_it(world: World) -> None:
    for device in ("b", "a", "c"):
        world.online(device)
    world.offline("c")
    world.online("r", protocol="relay-4")
    replies = Replies()
    got = await world.router.submit(
        CommandRequest("g", {"name": "reboot"}, protocol="env-sensor"), replies
    )
    assert got == [CommandStatus.SENT, CommandStatus.SENT]
    assert replies.got == [
        status("g", "a", CommandStatus.SENT),
        status("g", "b", CommandStatus.SENT),
    ]
    assert [(d, body) for d, body, _ in world.links.sent] == [("a", b"\x02"), ("b", b"\x02")]
    assert await world.queued("c") == []  # only devices online now
    world.links.resolve(1, CommandResult(CommandStatus.ACKED))
    assert (await replies.until(3))[2] == status("g", "b", CommandStatus.ACKED)


async def test_a_protocol_command_each_device_rejects(world: World) -> None:
    world.online("a")
    world.online("b")
    replies = Replies()
    got = await world.router.submit(
        CommandRequest("g", {"name": "bogus"}, protocol="env-sensor"), replies
    )
    assert got == [CommandStatus.REJECTED, CommandStatus.REJECTED]
    assert [(m["device"], m["status"]) for m in replies.got] == [
        ("a", "rejected"),
        ("b", "rejected"),
    ]


@pytest.mark.parametrize("protocol", ["relay-4", "nobody-speaks-this"])
async def test_a_protocol_command_with_no_device_online_is_not_found(
    world: World, protocol: str
) -> None:
    world.online("r", protocol="relay-4")
    world.offline("r", protocol="relay-4")
    world.online("a")  # online, but another protocol
    replies = Replies()
    with pytest.raises(ClientError) as excinfo:
        await world.router.submit(CommandRequest("g", {"hex": "01"}, protocol=protocol), replies)
    assert excinfo.value.code is ErrorCode.NOT_FOUND
    assert protocol in excinfo.value.message
    assert replies.got == []
    assert world.links.sent == []
    assert await world.queued("r") == []


# ---- metrics -----------------------------------------------------------------------------------


async def test_every_status_is_counted_by_status(world: World) -> None:
    world.online("a")
    world.online("b")
    world.offline("b")
    replies = Replies()
    await world.router.submit(CommandRequest(1, {"hex": "01"}, device="a"), replies)
    await world.router.submit(CommandRequest(2, {"hex": "01"}, device="a"), replies)
    await world.router.submit(CommandRequest(3, {"hex": "01"}, device="b"), replies)
    await world.router.submit(CommandRequest(4, {"hex": "01"}, device="ghost"), replies)
    world.links.resolve(0, CommandResult(CommandStatus.ACKED))
    world.links.resolve(1, CommandResult(CommandStatus.NACKED, code=1))
    await replies.until(6)
    assert sorted(replies.statuses) == sorted(
        ["sent", "sent", "queued", "rejected", "acked", "nacked"]
    )
    text = world.metrics.render().decode()
    for name, n in [("sent", 2), ("queued", 1), ("rejected", 1), ("acked", 1), ("nacked", 1)]:
        assert f'iot_command_results_total{{status="{name}"}} {n:.1f}' in text
    assert world.counted(CommandStatus.TIMEOUT) == 0
    assert world.counted(CommandStatus.EXPIRED) == 0


# ---- any command object ------------------------------------------------------------------------

json_values: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=6),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=8,
)
commands = st.dictionaries(
    st.sampled_from(["name", "args", "hex"]) | st.text(max_size=6), json_values, max_size=3
) | st.fixed_dictionaries(
    {
        "name": st.sampled_from(["set_interval", "reboot", "set"]),
        "args": st.dictionaries(st.sampled_from(["seconds", "channel", "on"]), json_values),
    }
)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(command=commands, protocol=st.sampled_from(["env-sensor", "relay-4", "made-up"]))
async def test_any_command_object_gets_one_status_and_never_raises(
    command: dict[str, Any], protocol: str
) -> None:
    w = World(CommandSettings())
    await w.start()
    try:
        w.online("a", protocol=protocol)
        replies = Replies()
        got = await w.router.submit(CommandRequest("c", command, device="a"), replies)
        assert len(got) == 1
        assert replies.statuses == [str(got[0])]
        try:
            body = get_protocol(protocol).encode_command(command)
        except CommandError as e:
            assert got == [CommandStatus.REJECTED]
            assert replies.got[0]["error"] == str(e)
            assert w.links.sent == []
        else:
            assert got == [CommandStatus.SENT]
            assert [b for _, b, _ in w.links.sent] == [body]
    finally:
        await w.stop()


# ---- bounds: ids and the offline queue ---------------------------------------------------------


def refused(w: World, reason: str) -> int:
    return w.router.refused[reason]


@pytest.mark.parametrize("online", [True, False])
async def test_an_id_over_max_command_id_is_a_bad_request(world: World, online: bool) -> None:
    world.online("a")
    if not online:
        world.offline("a")
    replies = Replies()
    limit = CommandSettings().max_command_id
    with pytest.raises(ClientError) as refusal:
        await world.router.submit(CommandRequest("x" * (limit + 1), {"hex": "01"}, "a"), replies)
    assert refusal.value.code is ErrorCode.BAD_REQUEST
    assert str(limit) in refusal.value.message
    assert replies.got == []
    assert world.links.sent == []
    assert await world.queued("a") == []  # nothing of it kept
    assert refused(world, "max_command_id") == 1
    # At the bound it is fine, as is a number.
    await world.router.submit(CommandRequest("x" * limit, {"hex": "01"}, "a"), replies)
    await world.router.submit(CommandRequest(10**40, {"hex": "01"}, "a"), replies)
    assert len(replies.got) == 2


async def test_past_a_queue_bound_a_command_is_rejected_and_counted() -> None:
    w = World(CommandSettings(), MemoryStorage(max_queued_commands_per_device=2))
    await w.start()
    try:
        w.online("a")
        w.offline("a")
        replies = Replies()
        for i in range(3):
            await w.router.submit(CommandRequest(i, {"hex": "01"}, device="a"), replies)
        assert replies.statuses == ["queued", "queued", "rejected"]
        assert "max_queued_commands_per_device" in replies.got[2]["error"]
        assert refused(w, "max_queued_commands_per_device") == 1
        assert w.counted(CommandStatus.REJECTED) == 1
        assert len(await w.queued("a")) == 2
    finally:
        await w.stop()


async def test_a_failing_storage_rejects_a_queued_command_with_an_answer(world: World) -> None:
    world.online("a")
    world.offline("a")
    world.storage.fault = "database or disk is full"
    replies = Replies()
    got = await world.router.submit(CommandRequest("c", {"hex": "01"}, device="a"), replies)
    assert got == [CommandStatus.REJECTED]
    [answer] = replies.got
    assert answer["error"] == "storage unavailable: database or disk is full"
    assert commands_module.is_storage_unavailable(answer)
    assert refused(world, "storage_unavailable") == 1
    world.storage.fault = None
    await world.router.submit(CommandRequest("d", {"hex": "01"}, device="a"), replies)
    assert replies.statuses[-1] == "queued"
    assert not commands_module.is_storage_unavailable(replies.got[-1])


# ---- a link that fails or cannot take the command ----------------------------------------------


async def test_a_link_failing_while_writing_ends_the_command_as_timeout(world: World) -> None:
    world.online("a")
    world.links.fail["a"] = ConnectionResetError("reset by peer")
    replies = Replies()
    got = await world.router.submit(CommandRequest("c", {"hex": "01"}, device="a"), replies)
    assert got == [CommandStatus.TIMEOUT]
    assert replies.got == [status("c", "a", CommandStatus.TIMEOUT, error="link lost")]
    assert await world.queued("a") == []  # it may have reached the device: not again


async def test_a_command_never_written_gets_only_its_final_status(world: World) -> None:
    """The device side gives up writing to a device that does not read (seq -1)."""
    world.online("a")

    async def not_reading(client_id: str, body: bytes) -> CommandHandle:
        future: asyncio.Future[CommandResult] = asyncio.get_running_loop().create_future()
        future.set_result(CommandResult(CommandStatus.TIMEOUT, error="device not reading"))
        return CommandHandle(client_id, -1, future)

    world.links.send_command = not_reading  # type: ignore[method-assign]
    replies = Replies()
    got = await world.router.submit(CommandRequest("c", {"hex": "01"}, device="a"), replies)
    assert got == [CommandStatus.TIMEOUT]
    assert replies.got == [status("c", "a", CommandStatus.TIMEOUT, error="device not reading")]
    assert world.counted(CommandStatus.SENT) == 0


async def test_a_protocol_command_does_not_wait_for_a_device_that_cannot_take_it(
    world: World,
) -> None:
    for device in ("a", "b", "c"):
        world.online(device)
    world.links.gates["a"] = asyncio.Event()  # a's link cannot take it now
    replies = Replies()
    submitted = asyncio.create_task(
        world.router.submit(CommandRequest("g", {"name": "reboot"}, protocol="env-sensor"), replies)
    )
    # The others have theirs while a's is still waiting.
    await replies.until_true(lambda: {m["device"] for m in replies.got} == {"b", "c"})
    assert not submitted.done()
    world.links.gates["a"].set()
    assert sorted(map(str, await submitted)) == ["sent", "sent", "sent"]
    assert sorted(m["device"] for m in replies.got) == ["a", "b", "c"]  # one status each


# ---- delivering the offline queue: paced, paged, at most once ----------------------------------


async def queue_for(w: World, device: str, n: int) -> Replies:
    w.online(device)
    w.offline(device)
    replies = Replies()
    for i in range(n):
        await w.router.submit(CommandRequest(f"c{i}", {"hex": f"{i:02x}"}, device), replies)
    assert replies.statuses == ["queued"] * n
    return replies


async def test_delivery_keeps_at_most_the_in_flight_allowance_outstanding() -> None:
    w = World(CommandSettings(), links=Links(max_inflight=2))
    await w.start()
    try:
        replies = await queue_for(w, "a", 5)
        w.online("a", session="s2")
        w.router.device_online("a", "s2")
        await w.links.wait_sent(2)
        for _ in range(10):
            await asyncio.sleep(0)  # room for a third, if delivery did not wait
        assert len(w.links.sent) == 2  # no third before an answer
        w.links.resolve(0, CommandResult(CommandStatus.ACKED))
        await w.links.wait_sent(3)
        w.links.resolve(1, CommandResult(CommandStatus.ACKED))
        w.links.resolve(2, CommandResult(CommandStatus.NACKED, code=1))
        await w.links.wait_sent(5)
        assert [body for _, body, _ in w.links.sent] == [bytes([i]) for i in range(5)]
        for i in (3, 4):
            w.links.resolve(i, CommandResult(CommandStatus.ACKED))
        await replies.until(15)  # queued, sent and a final status for each
        assert replies.statuses.count("acked") == 4
        assert await w.queued("a") == []
    finally:
        await w.stop()


async def test_delivery_reads_the_queue_a_page_at_a_time() -> None:
    w = World(CommandSettings(delivery_page=3))
    await w.start()
    try:
        await queue_for(w, "a", 7)
        w.online("a", session="s2")
        w.router.device_online("a", "s2")
        await w.links.wait_sent(7)
        assert [body for _, body, _ in w.links.sent] == [bytes([i]) for i in range(7)]
        assert w.engine.page_limits
        assert set(w.engine.page_limits) == {3}
    finally:
        await w.stop()


async def test_a_command_is_marked_as_being_sent_before_it_is_written(world: World) -> None:
    await queue_for(world, "a", 3)
    marked_at_write: list[bool] = []

    def check(device: str, body: bytes) -> None:
        [cmd] = [c for c in world.storage._commands.values() if c.body == body]
        marked_at_write.append(cmd.key in world.storage._sending)

    world.links.on_write = check
    world.online("a", session="s2")
    world.router.device_online("a", "s2")
    await world.links.wait_sent(3)
    assert marked_at_write == [True, True, True]


async def test_a_command_being_written_at_a_crash_is_never_written_again() -> None:
    """Finding 1 of issue 12, on a fake clock: the crash comes mid-write."""
    before = World(CommandSettings())
    await before.start()
    replies = await queue_for(before, "a", 3)
    before.links.gates["a"] = gate = asyncio.Event()
    before.online("a", session="s2")
    before.router.device_online("a", "s2")
    await before.links.wait_attempts(1)  # c0 is being written: the process dies now
    storage = before.storage.restart()
    await before.router.stop()
    assert replies.statuses == ["queued"] * 3
    gate.set()

    after = World(CommandSettings(), storage)
    await after.start()
    try:
        # The three were marked together (one page, room for all): each ends as a
        # timeout, counted, and none reaches the device again.
        await until_counted(after, CommandStatus.TIMEOUT, 3)
        after.online("a", session="s3")
        after.router.device_online("a", "s3")
        for _ in range(10):
            await asyncio.sleep(0)
        assert after.links.sent == []
        assert await after.queued("a") == []
    finally:
        await after.stop()


async def test_an_interrupted_command_is_logged_and_counted_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("INFO", "gateway.hub.commands")
    before = World(CommandSettings())
    await before.start()
    await queue_for(before, "a", 2)
    [first, _] = await before.engine.pending_commands("a", now_ms())
    await before.engine.mark_sending([first.key])
    await before.router.stop()
    after = World(CommandSettings(), before.storage.restart())
    await after.start()
    try:
        await until_counted(after, CommandStatus.TIMEOUT, 1)
        assert "1 queued commands were being sent when the gateway stopped" in caplog.text
        assert "command id=c0" in caplog.text
        assert "gateway restarted" in caplog.text
        assert [c.command_id for c in await after.engine.pending_commands("a", 0)] == ["c1"]
        # A queued command's final result: counted apart, and in its command log.
        queued_timeouts = after.metrics.registry.get_sample_value(
            "iot_queued_command_results_total", {"status": "timeout"}
        )
        assert queued_timeouts == 1
        assert first.gateway_id is not None
        logged = await after.engine.command_log(first.gateway_id)
        assert logged is not None
        assert [h["status"] for h in logged.history] == ["queued", "timeout"]
        assert logged.history[-1]["error"] == "gateway restarted"
    finally:
        await after.stop()


async def until_counted(w: World, st_: CommandStatus, n: int) -> None:
    async with asyncio.timeout(TIMEOUT):
        while w.counted(st_) < n:
            await asyncio.sleep(0.001)
    assert w.counted(st_) == n


async def test_a_delivery_the_storage_cut_short_resumes_once_it_works(
    caplog: pytest.LogCaptureFixture,
) -> None:
    w = World(CommandSettings(expiry_interval=0.005))
    await w.start()
    try:
        await queue_for(w, "a", 2)
        w.storage.fault = "disk I/O error"
        w.online("a", session="s2")
        w.router.device_online("a", "s2")
        await w.engine.expiry_attempts_reach(5)  # several failed passes
        assert w.links.sent == []
        w.storage.fault = None
        await w.links.wait_sent(2)
        # Logged when it began and when it ended, not once per expiry pass.
        assert caplog.text.count("command expiry failed") == 1
        assert caplog.text.count("delivery of queued commands failed") == 1
        assert caplog.text.count("command expiry works again") == 1
    finally:
        await w.stop()


async def test_a_stop_during_delivery_keeps_what_was_not_handed_to_the_link() -> None:
    """A clean stop loses nothing accepted: only the command in doubt ends as interrupted."""
    w = World(CommandSettings())
    await w.start()
    await queue_for(w, "a", 3)
    w.links.gates["a"] = asyncio.Event()
    w.online("a", session="s2")
    w.router.device_online("a", "s2")
    await w.links.wait_attempts(1)  # c0 handed to the link, which waits; c1 and c2 marked
    await w.router.stop()
    after = World(CommandSettings(), w.storage.restart())
    await after.start()
    try:
        await until_counted(after, CommandStatus.TIMEOUT, 1)
        assert [c.command_id for c in await after.engine.pending_commands("a", 0)] == ["c1", "c2"]
    finally:
        await after.stop()


@pytest.mark.parametrize("window", [1, 64])  # the rest in later batches, or in the same
async def test_a_device_that_does_not_read_keeps_the_rest_of_its_queue(window: int) -> None:
    world = World(CommandSettings(), links=Links(max_inflight=window))
    await world.start()
    try:
        await not_reading_keeps_the_rest(world)
    finally:
        await world.stop()


async def not_reading_keeps_the_rest(world: World) -> None:
    replies = await queue_for(world, "a", 3)
    written: list[bytes] = []

    async def not_reading(client_id: str, body: bytes) -> CommandHandle:
        written.append(body)
        future: asyncio.Future[CommandResult] = asyncio.get_running_loop().create_future()
        future.set_result(CommandResult(CommandStatus.TIMEOUT, error="device not reading"))
        return CommandHandle(client_id, -1, future)

    world.links.send_command = not_reading  # type: ignore[method-assign]
    world.online("a", session="s2")
    world.router.device_online("a", "s2")
    got = await replies.until(4)
    assert got[3] == status("c0", "a", CommandStatus.TIMEOUT, error="device not reading")
    async with asyncio.timeout(TIMEOUT):  # the delivery unmarks the rest as it ends
        while world.storage._sending or "deliver a" in {t.get_name() for t in asyncio.all_tasks()}:
            await asyncio.sleep(0.001)
    assert written == [b"\x00"]  # one try; the others wait for the next session
    assert [c.command_id for c in await world.engine.pending_commands("a", 0)] == ["c1", "c2"]
