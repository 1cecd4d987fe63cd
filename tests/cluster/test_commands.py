"""Commands from any node to any device (docs/cluster.md, "Commands").

Every status reaches the dashboard or HTTP caller that gave the command,
with its ``id`` and the gateway's ``command_id``, whichever node holds the
device.
"""

from __future__ import annotations

import asyncio
from functools import partial

import aiohttp
import pytest

import frames
from tests.cluster.conftest import NodeFactory
from tests.cluster.support import listed
from tests.resilience.support import connect_dashboard, connect_device
from tests.support.wait import wait_until

FAST_ACK = {"devices": {"ack_timeout": 1.0}}


async def test_commands_from_b_to_a_device_on_a(nodes: NodeFactory) -> None:
    a, b, c = nodes("A", FAST_ACK), nodes("B"), nodes("C")
    await asyncio.gather(a.start(), b.start(), c.start())
    async with aiohttp.ClientSession() as session:
        dash = await connect_dashboard(b, session, {"device": "cmd-1"})
        dev = await connect_device(a, "cmd-1")
        await wait_until(lambda: listed(b, "cmd-1", node="A"), "cmd-1 online on A, seen from B")
        # acked
        await dash.send(
            {"op": "command", "id": "x1", "device": "cmd-1", "command": {"name": "reboot"}}
        )
        sent = await dash.expect("command_status", id="x1")
        assert sent["status"] == "sent", sent
        command = await dev.expect(frames.Command)
        dev.send(frames.Ack(command.seq, 0))
        acked = await dash.expect("command_status", id="x1")
        assert acked["status"] == "acked", acked
        assert acked["command_id"] == sent["command_id"]
        # nacked
        await dash.send(
            {"op": "command", "id": 2, "device": "cmd-1", "command": {"name": "reboot"}}
        )
        assert (await dash.expect("command_status", id=2))["status"] == "sent"
        command = await dev.expect(frames.Command)
        dev.send(frames.Ack(command.seq, 9))
        nacked = await dash.expect("command_status", id=2)
        assert (nacked["status"], nacked["code"]) == ("nacked", 9), nacked
        # timeout: the device never answers (ack_timeout 1 s on A)
        await dash.send(
            {"op": "command", "id": 3, "device": "cmd-1", "command": {"name": "reboot"}}
        )
        assert (await dash.expect("command_status", id=3))["status"] == "sent"
        await dev.expect(frames.Command)
        timed_out = await dash.expect("command_status", id=3, timeout=15)
        assert timed_out["status"] == "timeout", timed_out
        # Over HTTP from C: the first status answers the POST, the rest is in
        # C's command log.
        status, body = await c.post_json(
            "/api/devices/cmd-1/commands", {"command": {"name": "reboot"}}
        )
        assert status == 202, body
        assert body["status"] == "sent"
        command = await dev.expect(frames.Command)
        dev.send(frames.Ack(command.seq, 0))

        async def acked_in_log() -> bool:
            entry = await c.get_json(f"/api/commands/{body['command_id']}")
            return bool(entry["status"] == "acked")

        await wait_until(acked_in_log, "the acked status in C's command log")
        await dev.aclose()


async def test_group_command_across_nodes_one_status_per_device(nodes: NodeFactory) -> None:
    a, b, c = nodes("A"), nodes("B"), nodes("C")
    await asyncio.gather(a.start(), b.start(), c.start())
    async with aiohttp.ClientSession() as session:
        dash = await connect_dashboard(b, session)
        devices = {
            "g-a": await connect_device(a, "g-a"),
            "g-b": await connect_device(b, "g-b"),
            "g-c": await connect_device(c, "g-c"),
        }
        for name in devices:
            await wait_until(partial(listed, b, name), f"{name} online, seen from B")
        await dash.send(
            {"op": "command", "id": "grp", "protocol": "env-sensor", "command": {"name": "reboot"}}
        )
        for dev in devices.values():
            command = await dev.expect(frames.Command)
            dev.send(frames.Ack(command.seq, 0))
        statuses: dict[str, list[str]] = {}

        def done() -> bool:
            return all(statuses.get(d, [])[-1:] == ["acked"] for d in devices)

        while not done():
            msg = await dash.expect("command_status", id="grp")
            statuses.setdefault(msg["device"], []).append(msg["status"])
        assert statuses == {d: ["sent", "acked"] for d in devices}, statuses
        for dev in devices.values():
            await dev.aclose()


async def test_queued_through_b_delivered_on_c_once(nodes: NodeFactory) -> None:
    a, b, c = nodes("A"), nodes("B"), nodes("C")
    await asyncio.gather(a.start(), b.start(), c.start())
    async with aiohttp.ClientSession() as session:
        dash = await connect_dashboard(b, session, {"device": "sleepy"})
        dev = await connect_device(a, "sleepy")
        await wait_until(partial(listed, b, "sleepy", node="A"), "sleepy online, seen from B")
        await dev.aclose()
        await wait_until(partial(listed, b, "sleepy", online=False), "sleepy offline, seen from B")
        for i in range(3):
            await dash.send(
                {
                    "op": "command",
                    "id": i,
                    "device": "sleepy",
                    "command": {"name": "set_interval", "args": {"seconds": 10 + i}},
                }
            )
            assert (await dash.expect("command_status", id=i))["status"] == "queued"
        back = await connect_device(c, "sleepy")
        got = []
        for _ in range(3):
            command = await back.expect(frames.Command, timeout=15)
            got.append(command.body)
            back.send(frames.Ack(command.seq, 0))
        assert len(set(got)) == 3
        last = None
        for i in range(3):
            assert (await dash.expect("command_status", id=i))["status"] == "sent"
            last = await dash.expect("command_status", id=i)
            assert last["status"] == "acked", last
        assert last is not None
        # Once: nothing more reaches the device.
        with pytest.raises(TimeoutError):
            await back.expect(frames.Command, timeout=1.5)
        # Any node answers for the command.
        entry = await a.get_json(f"/api/commands/{last['command_id']}")
        assert entry["status"] == "acked", entry
        await back.aclose()
