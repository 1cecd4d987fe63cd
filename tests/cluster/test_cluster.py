"""Nodes of one cluster act as one gateway (docs/cluster.md).

Real redis-server, real ``serve`` processes, devices and dashboards over
real sockets.
"""

from __future__ import annotations

import asyncio
import re
from functools import partial
from pathlib import Path

import aiohttp
import pytest

import frames
from tests.cluster.conftest import NodeFactory
from tests.cluster.support import listed
from tests.resilience.support import Telemetry, connect_dashboard, connect_device, data_frame
from tests.support.wait import wait_until

CLUSTER_DOC = Path(__file__).parents[2] / "docs" / "cluster.md"


async def test_device_on_a_dashboards_on_b_and_c_see_the_same(nodes: NodeFactory) -> None:
    a, b, c = nodes("A"), nodes("B"), nodes("C")
    await asyncio.gather(a.start(), b.start(), c.start())
    async with aiohttp.ClientSession() as session:
        on_b = Telemetry(await connect_dashboard(b, session))
        on_c = Telemetry(await connect_dashboard(c, session))
        dev = await connect_device(a, "cl-1")
        for seq in range(1, 31):
            dev.send_raw(data_frame(seq, 20.0 + seq))
        await on_b.wait_for(lambda: on_b.count("cl-1") >= 30)
        await on_c.wait_for(lambda: on_c.count("cl-1") >= 30)
        offsets = on_b.offsets("cl-1")
        assert offsets == on_c.offsets("cl-1")
        assert len(offsets) == 30
        assert offsets == sorted(set(offsets)), "strictly increasing"
        # The presence of a device of A reached B's dashboard too.
        assert any(
            m.get("op") == "presence" and m["device"] == "cl-1" and m["online"] for m in on_b.other
        )
        # Every node lists the device, with the node that holds it.
        for gw in (a, b, c):
            entry = await gw.get_json("/api/devices/cl-1")
            assert entry["online"] is True, (gw.name, entry)
            assert entry["node"] == "A", (gw.name, entry)
            assert entry["last"]["offset"] == offsets[-1], (gw.name, entry)
        health = await c.get_json("/healthz")
        assert health["cluster"]["node"] == "C"
        assert health["cluster"]["state"] == "ok"

        async def three_nodes() -> bool:
            return bool((await c.get_json("/healthz"))["cluster"]["nodes"] == ["A", "B", "C"])

        await wait_until(three_nodes, "C seeing nodes A, B and C")
        metrics_a, metrics_c = await a.metrics(), await c.metrics()
        assert metrics_a.value("iot_cluster_sequenced_total") >= 30
        assert metrics_c.value("iot_cluster_sequenced_total") == 0
        assert metrics_c.value("iot_cluster_log_read_total") >= 31  # presence too
        assert metrics_c.value("iot_cluster_nodes") == 3
        assert metrics_c.value("iot_cluster_degraded") == 0
        documented = re.findall(r"^\| `(iot_cluster_[a-z_]+)` \|", CLUSTER_DOC.read_text(), re.M)
        assert len(documented) >= 7
        exported = {name for name, _ in metrics_c}
        for name in documented:
            assert name in exported, name
        await dev.aclose()


async def test_dashboard_moves_from_b_to_c_with_since(nodes: NodeFactory) -> None:
    a, b, c = nodes("A"), nodes("B"), nodes("C")
    await asyncio.gather(a.start(), b.start(), c.start())
    async with aiohttp.ClientSession() as session:
        whole = Telemetry(await connect_dashboard(a, session))
        first = Telemetry(await connect_dashboard(b, session))
        dev = await connect_device(a, "mover")
        for seq in range(1, 21):
            dev.send_raw(data_frame(seq))
        await first.wait_for(lambda: first.count("mover") >= 20)
        seen = first.offsets("mover")
        await first.aclose()
        for seq in range(21, 41):
            dev.send_raw(data_frame(seq))
        await whole.wait_for(lambda: whole.count("mover") >= 40)
        second = Telemetry(
            await connect_dashboard(c, session, {"device": "mover", "since": seen[-1]})
        )
        for seq in range(41, 51):
            dev.send_raw(data_frame(seq))
        await whole.wait_for(lambda: whole.count("mover") >= 50)
        await second.wait_for(lambda: second.count("mover") >= 30)
        assert seen + second.offsets("mover") == whole.offsets("mover")
        await dev.aclose()


async def test_takeover_from_a_to_b(nodes: NodeFactory) -> None:
    a, b, c = nodes("A"), nodes("B"), nodes("C")
    await asyncio.gather(a.start(), b.start(), c.start())
    async with aiohttp.ClientSession() as session:
        watch = Telemetry(await connect_dashboard(c, session))
        old = await connect_device(a, "mover-2")
        await watch.wait_for(
            lambda: any(m.get("op") == "presence" for m in watch.other), what="online from A"
        )
        new = await connect_device(b, "mover-2")
        error = await old.expect(frames.Error)
        assert error.code == frames.ErrorCode.REPLACED
        new.send_raw(data_frame(1))
        await watch.wait_for(lambda: watch.count("mover-2") >= 1)

        async def on_b() -> bool:
            entry = await c.get_json("/api/devices/mover-2")
            return bool(entry["online"] and entry["node"] == "B")

        await wait_until(on_b, "C listing mover-2 online on B")
        for gw in (a, b):
            entry = await gw.get_json("/api/devices/mover-2")
            assert entry["online"] is True, (gw.name, entry)
            assert entry["node"] == "B", (gw.name, entry)
        presence = [m for m in watch.other if m.get("op") == "presence"]
        assert [p["online"] for p in presence] == [True, True], presence
        await new.aclose()


async def test_kill9_node_lost_and_clean_stop_shutdown(nodes: NodeFactory) -> None:
    a, b, c = nodes("A"), nodes("B"), nodes("C")
    await asyncio.gather(a.start(), b.start(), c.start())
    async with aiohttp.ClientSession() as session:
        watch = Telemetry(await connect_dashboard(b, session))
        await connect_device(a, "on-a")
        await connect_device(c, "on-c")

        def offline(device: str) -> list[str]:
            return [
                m["reason"]
                for m in watch.other
                if m.get("op") == "presence" and m["device"] == device and not m["online"]
            ]

        await watch.wait_for(
            lambda: sum(m.get("op") == "presence" for m in watch.other) >= 2, what="both online"
        )
        await a.kill()
        await watch.wait_for(lambda: bool(offline("on-a")), 15, "node_lost of on-a")
        assert offline("on-a") == ["node_lost"]
        entry = await b.get_json("/api/devices/on-a")
        assert entry["online"] is False
        assert entry["offline_reason"] == "node_lost"
        # Queued through C meanwhile; the device comes back on B: delivered once.
        status, queued = await c.post_json(
            "/api/devices/on-a/commands", {"command": {"name": "reboot"}}
        )
        assert (status, queued["status"]) == (202, "queued"), queued
        back = await connect_device(b, "on-a")
        command = await back.expect(frames.Command, timeout=15)
        back.send(frames.Ack(command.seq, 0))

        async def acked() -> bool:
            entry = await c.get_json(f"/api/commands/{queued['command_id']}")
            return bool(entry["status"] == "acked")

        await wait_until(acked, "the queued command acked, in C's command log")
        with pytest.raises(TimeoutError):
            await back.expect(frames.Command, timeout=1.0)
        await back.aclose()
        await c.stop()
        await watch.wait_for(lambda: bool(offline("on-c")), 15, "offline of on-c")
        assert offline("on-c") == ["shutdown"]

        async def alone() -> bool:
            return bool((await b.get_json("/healthz"))["cluster"]["nodes"] == ["B"])

        await wait_until(alone, "B seeing only itself", timeout=15)


async def test_node_killed_and_restarted_at_once_says_its_devices_went(
    nodes: NodeFactory,
) -> None:
    a, b = nodes("A", {"cluster": {"node_lost_after": 30.0}}), nodes("B")
    await asyncio.gather(a.start(), b.start())
    async with aiohttp.ClientSession() as session:
        watch = Telemetry(await connect_dashboard(b, session))
        dev = await connect_device(a, "quick")
        await wait_until(partial(listed, b, "quick", node="A"), "quick online on A, seen from B")
        await a.kill()
        await a.start()  # long before its 30 s lease expires
        await wait_until(
            partial(listed, b, "quick", online=False), "quick offline, seen from B", timeout=10
        )
        entry = await b.get_json("/api/devices/quick")
        assert entry["offline_reason"] == "restart", entry
        reasons = [
            m["reason"] for m in watch.other if m.get("op") == "presence" and not m["online"]
        ]
        assert reasons == ["restart"], reasons
        await dev.aclose()


async def test_a_node_that_joins_or_restarts_lists_every_device_with_its_last(
    nodes: NodeFactory,
) -> None:
    a, c = nodes("A"), nodes("C")
    await a.start()
    async with aiohttp.ClientSession() as session:
        watch = Telemetry(await connect_dashboard(a, session))
        dev = await connect_device(a, "early")
        for seq in range(1, 4):
            dev.send_raw(data_frame(seq))
        await watch.wait_for(lambda: watch.count("early") >= 3)
        newest = watch.offsets("early")[-1]
        for start in range(2):  # joins late, then restarts on its data dir
            await c.start()
            await wait_until(
                partial(listed, c, "early", node="A"), f"C listing early (start {start})"
            )
            # Listed from the registry at once; its last value once C has read
            # the log that far (a node catches up after it joins).

            async def caught_up() -> bool:
                entry = await c.get_json("/api/devices/early")
                return bool(entry["last"] is not None and entry["last"]["offset"] == newest)

            await wait_until(caught_up, f"C's last value of early (start {start})")
            history = await c.get_json("/api/devices/early/telemetry?since=0")
            assert [m["offset"] for m in history["telemetry"]] == watch.offsets("early")
            await c.stop()
        await dev.aclose()


async def test_many_devices_at_once_are_announced_and_retired_in_pipelines(
    nodes: NodeFactory,
) -> None:
    # Their presence changes queue up together and go to Redis in pipelines;
    # each offline needs the fence its online got back from the pipeline.
    a, b = nodes("A"), nodes("B")
    await asyncio.gather(a.start(), b.start())
    names = [f"many-{i:03d}" for i in range(60)]
    devs = await asyncio.gather(*(connect_device(a, name) for name in names))

    async def all_listed(online: bool) -> bool:
        listing = await b.get_json("/api/devices")
        entries = listing["devices"] if isinstance(listing, dict) else listing
        by_id = {e["device"]: e for e in entries}
        return all(
            n in by_id and by_id[n]["online"] is online and by_id[n].get("node") == "A"
            for n in names
        )

    await wait_until(partial(all_listed, True), "60 devices of A online on B")
    await asyncio.gather(*(d.aclose() for d in devs))
    await wait_until(partial(all_listed, False), "60 devices of A offline on B")
