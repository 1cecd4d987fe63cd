"""Labels and deletions made over the API on one node hold on every node
(docs/cluster.md, "Labels and deletions"), a Redis wipe included.

Real redis-server, real ``serve`` processes, devices over real sockets.
"""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Any

from tests.cluster.conftest import NodeFactory
from tests.cluster.support import RedisServer, listed
from tests.resilience.support import connect_device
from tests.support.gateway import GatewayProcess
from tests.support.wait import wait_until

LABELS = {"name": "Boiler room", "location": "basement", "channels": None}


async def _labels(gw: GatewayProcess, device: str) -> Any:
    status, entry = await asyncio.to_thread(gw.request_sync, "GET", f"/api/devices/{device}")
    return entry.get("labels") if status == 200 else None


async def _has_labels(gw: GatewayProcess, device: str, name: str | None) -> bool:
    labels = await _labels(gw, device)
    return labels is not None and labels.get("name") == name


async def _gone(gw: GatewayProcess, device: str) -> bool:
    listing = await gw.get_json("/api/devices")
    devices = listing["devices"] if isinstance(listing, dict) else listing
    status, _ = await asyncio.to_thread(gw.request_sync, "GET", f"/api/devices/{device}")
    return status == 404 and all(d["device"] != device for d in devices)


async def test_labels_set_on_b_are_seen_on_a_and_c(nodes: NodeFactory) -> None:
    a, b, c = nodes("A"), nodes("B"), nodes("C")
    await asyncio.gather(a.start(), b.start(), c.start())
    dev = await connect_device(a, "lab-1")
    await wait_until(partial(listed, b, "lab-1", node="A"), "lab-1 seen from B")
    status, entry = await asyncio.to_thread(
        b.request_sync, "PUT", "/api/devices/lab-1/labels", LABELS
    )
    assert status == 200, entry
    assert entry["labels"]["name"] == "Boiler room"
    for gw in (a, c):
        await wait_until(partial(_has_labels, gw, "lab-1", "Boiler room"), f"labels on {gw.name}")
    assert (await _labels(c, "lab-1"))["location"] == "basement"
    # A change on C wins over B's everywhere (the log's order).
    status, _ = await asyncio.to_thread(
        c.request_sync, "PUT", "/api/devices/lab-1/labels", {**LABELS, "name": "Attic"}
    )
    assert status == 200
    for gw in (a, b, c):
        await wait_until(partial(_has_labels, gw, "lab-1", "Attic"), f"new labels on {gw.name}")
    # A node started later learns them from Redis.
    d = nodes("D")
    await d.start()
    await wait_until(partial(_has_labels, d, "lab-1", "Attic"), "labels on D")
    await dev.aclose()


async def test_a_device_deleted_on_b_is_gone_from_a_and_c(nodes: NodeFactory) -> None:
    a, b, c = nodes("A"), nodes("B"), nodes("C")
    await asyncio.gather(a.start(), b.start(), c.start())
    dev = await connect_device(a, "del-1")
    await wait_until(partial(listed, c, "del-1", node="A"), "del-1 seen from C")
    # Online: refused, on any node.
    status, _ = await asyncio.to_thread(b.request_sync, "DELETE", "/api/devices/del-1")
    assert status == 409
    await dev.aclose()
    for gw in (a, b, c):
        await wait_until(partial(listed, gw, "del-1", online=False), f"del-1 offline on {gw.name}")
    status, body = await asyncio.to_thread(b.request_sync, "DELETE", "/api/devices/del-1")
    assert status in (200, 204), body
    for gw in (a, b, c):
        await wait_until(partial(_gone, gw, "del-1"), f"del-1 gone from {gw.name}")
    # Gone for good: a node started later does not list it once it has read
    # the log (it replays the device's presence, then its deletion), nor does
    # A after a restart (its own rows of the device were deleted too).
    d = nodes("D")
    await d.start()
    await wait_until(partial(_gone, d, "del-1"), "del-1 gone from D")
    await a.kill()
    await a.start()
    await wait_until(partial(_gone, a, "del-1"), "del-1 gone from A after a restart")
    assert await _gone(b, "del-1")


async def test_labels_survive_a_redis_wipe(nodes: NodeFactory, redis_server: RedisServer) -> None:
    # Last in the module: it restarts the module's Redis.
    a, b = nodes("A"), nodes("B")
    await asyncio.gather(a.start(), b.start())
    dev = await connect_device(a, "wiped-1")
    await wait_until(partial(listed, b, "wiped-1", node="A"), "wiped-1 seen from B")
    status, _ = await asyncio.to_thread(
        b.request_sync, "PUT", "/api/devices/wiped-1/labels", LABELS
    )
    assert status == 200
    await wait_until(partial(_has_labels, a, "wiped-1", "Boiler room"), "labels on A")
    redis_server.restart()
    # The nodes reseed Redis at their next lease renewal; a node started after
    # the wipe learns the labels from there.
    c = nodes("C")
    await c.start()
    await wait_until(partial(listed, c, "wiped-1", node="A"), "wiped-1 seen from C", timeout=30)
    await wait_until(partial(_has_labels, c, "wiped-1", "Boiler room"), "labels on C", timeout=30)
    await dev.aclose()
