"""Redis restarted empty (it keeps nothing on disk): the cluster goes on (docs/cluster.md).

Offsets still increase, commands reported ``queued`` are still delivered,
``GET /api/commands/{id}`` still answers, and the registry is reseeded by
the nodes. Its own module: it restarts the module's redis-server.
"""

from __future__ import annotations

import asyncio
from functools import partial

import aiohttp

import frames
from tests.cluster.conftest import NodeFactory
from tests.cluster.support import RedisServer, listed
from tests.resilience.support import Telemetry, connect_dashboard, connect_device, data_frame
from tests.support.gateway import GatewayProcess
from tests.support.wait import wait_until


async def _cluster_ok(gw: GatewayProcess, nodes: list[str]) -> bool:
    status, body = await asyncio.to_thread(gw.request_sync, "GET", "/healthz")
    return bool(status == 200 and body["cluster"]["nodes"] == nodes)


async def test_redis_restarted_empty(nodes: NodeFactory, redis_server: RedisServer) -> None:
    a, b = nodes("A"), nodes("B")
    await asyncio.gather(a.start(), b.start())
    async with aiohttp.ClientSession() as session:
        watch = Telemetry(await connect_dashboard(b, session))
        dev = await connect_device(a, "w-1")
        sleepy = await connect_device(a, "w-sleepy")
        for seq in range(1, 6):
            dev.send_raw(data_frame(seq))
        await watch.wait_for(lambda: watch.count("w-1") >= 5)
        before = watch.offsets("w-1")
        await sleepy.aclose()
        await wait_until(partial(listed, b, "w-sleepy", online=False), "w-sleepy offline on B")
        status, queued = await b.post_json(
            "/api/devices/w-sleepy/commands", {"command": {"name": "reboot"}}
        )
        assert (status, queued["status"]) == (202, "queued"), queued

        redis_server.restart()
        for gw in (a, b):
            await wait_until(
                partial(_cluster_ok, gw, ["A", "B"]), f"{gw.name} ok again", timeout=20
            )
        # A reseeded its online device: B still lists it on A.
        await wait_until(partial(listed, b, "w-1", node="A"), "w-1 still on A, seen from B")
        for seq in range(6, 11):
            dev.send_raw(data_frame(seq))
        await watch.wait_for(lambda: watch.count("w-1") >= 10, 20)
        after = watch.offsets("w-1")[5:]
        assert min(after) > max(before), (before, after)
        assert after == sorted(set(after))
        # The queued command (kept in B's own SQLite) reaches the device, once.
        back = await connect_device(a, "w-sleepy")
        command = await back.expect(frames.Command, timeout=15)
        back.send(frames.Ack(command.seq, 0))

        async def acked() -> bool:
            entry = await b.get_json(f"/api/commands/{queued['command_id']}")
            return bool(entry["status"] == "acked")

        await wait_until(acked, "the queued command acked, in B's command log")
        await back.aclose()
        await dev.aclose()
