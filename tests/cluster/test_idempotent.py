"""A sequencer call that Redis ran but whose reply was lost is not sequenced twice.

The node's link to Redis goes through a proxy that passes the requests on and
drops the replies (``LinkProxy.deafen``): the TELEMETRY script runs in Redis,
the node's call times out, and the node retries the same batch under the same
id once the link is back (docs/cluster.md, "One log, one sequencer").
"""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Any

import aiohttp
import redis as sync_redis

from tests.cluster.conftest import NodeFactory
from tests.cluster.support import LinkProxy, RedisServer, listed
from tests.resilience.support import Telemetry, connect_dashboard, connect_device, data_frame
from tests.support.gateway import GatewayProcess
from tests.support.wait import wait_until


def _prefix(gw: GatewayProcess) -> str:
    return gw.args[gw.args.index("--cluster-prefix") + 1]


def _logged_telemetry(port: int, prefix: str, node: str) -> int:
    """Messages of ``node`` in the log, counted from Redis itself."""
    r = sync_redis.Redis(port=port, decode_responses=True)
    try:
        entries: Any = r.xrange(f"{prefix}:log")
    finally:
        r.close()
    return sum(
        len(f["m"].split("\n")) for _, f in entries if f.get("k") == "t" and f.get("n") == node
    )


async def test_a_batch_whose_reply_was_lost_is_sequenced_once(
    nodes: NodeFactory, proxy: LinkProxy, redis_server: RedisServer
) -> None:
    a, b = nodes("A", url=proxy.url), nodes("B")
    await asyncio.gather(a.start(), b.start())
    async with aiohttp.ClientSession() as session:
        on_b = Telemetry(await connect_dashboard(b, session))
        dev = await connect_device(a, "once")
        await wait_until(partial(listed, b, "once", node="A"), "once on A, seen from B")
        for seq in range(1, 4):
            dev.send_raw(data_frame(seq))
        await on_b.wait_for(lambda: on_b.count("once") >= 3)

        proxy.deafen()
        for seq in range(4, 24):
            dev.send_raw(data_frame(seq))

        # The script ran in Redis (its entry is in the log) but A never heard back.
        def logged() -> int:
            return _logged_telemetry(redis_server.port, _prefix(a), "A")

        async def in_redis() -> bool:
            # At least one message sent while deaf: a batch Redis ran (the
            # messages may have gone in more than one batch; the first is retried).
            return await asyncio.to_thread(logged) > 3

        await wait_until(in_redis, "A's batch in Redis's log")

        async def degraded() -> bool:
            status, _ = await asyncio.to_thread(a.request_sync, "GET", "/healthz")
            return status == 503

        # A's call times out (3 s), then Redis counts as unreachable for a while.
        await wait_until(degraded, "A degraded", timeout=20)
        assert proxy.dropped > 0
        await proxy.heal()

        async def ok() -> bool:
            status, _ = await asyncio.to_thread(a.request_sync, "GET", "/healthz")
            return status == 200

        await wait_until(ok, "A ok again", timeout=30)
        for seq in range(24, 27):
            dev.send_raw(data_frame(seq))
        await on_b.wait_for(lambda: on_b.count("once") >= 26, 30)
        # Every message once: none sequenced twice by the retry.
        assert await asyncio.to_thread(logged) == 26
        offsets = on_b.offsets("once")
        assert len(offsets) == 26, offsets
        assert offsets == sorted(set(offsets))
        await dev.aclose()
