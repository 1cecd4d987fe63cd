"""MQTT in a cluster (docs/mqtt.md, "In a cluster"): two nodes on a private Redis and Mosquitto.

Each node publishes its own devices and its own bridge state; a command is
taken by one node through the shared subscription and reaches its device once.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

import frames
from frames.protocols import ENV_SENSOR, RELAY_4
from tests.cluster.support import RedisServer
from tests.devices.support import Client
from tests.support.gateway import OPERATOR, GatewayProcess
from tests.support.wait import wait_until

from .support import Mosquitto, watch

ENV_DATA = ENV_SENSOR.encode_data({"temperature_c": 20.0, "humidity_pct": 50.0, "battery_pct": 90})


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def cluster(
    tmp_path: Path, redis_server: RedisServer, mosquitto: Mosquitto
) -> AsyncIterator[list[GatewayProcess]]:
    made = []
    for name in ("n1", "n2"):
        table: dict[str, Any] = {
            "cluster": {"node_lost_after": 2.0},
            "mqtt": {
                "url": mosquitto.url,
                "prefix": "cl",
                "min_interval": 0.1,
                "reconnect_base": 0.05,
                "reconnect_cap": 0.3,
            },
        }
        args = ["--cluster", redis_server.url, "--node-id", name, "--cluster-prefix", "mq"]
        made.append(GatewayProcess(tmp_path, table, args=args, name=name, token=OPERATOR))
    for gw in made:
        await gw.start()
    yield made
    for gw in made:
        await gw.stop()


async def device(gw: GatewayProcess, client_id: str, protocol: str = "env-sensor") -> Client:
    reader, writer = await asyncio.open_connection(*gw.device_address)
    c = Client(reader, writer)
    await c.hello(client_id, protocol)
    return c


async def test_each_node_publishes_its_own_devices(
    cluster: list[GatewayProcess], mosquitto: Mosquitto
) -> None:
    n1, n2 = cluster
    async with watch(mosquitto, "cl/#") as w:
        await w.until("cl/bridge/n1/state", b"online")
        await w.until("cl/bridge/n2/state", b"online")
        d1 = await device(n1, "cl.d1")
        d2 = await device(n2, "cl.d2")
        d1.send(frames.Data(d1.next_seq(), ENV_DATA))
        await w.until("cl/cl.d1")
        await w.until("cl/cl.d1/availability", b"online")
        # n2 has d1's message too (the cluster's log) ...
        await wait_until(lambda: len(n2.stored_offsets_sync("cl.d1")) == 1, "d1's row on n2")
        # ... and anything n2 would publish for it would come before d2's state, on
        # the same connection: only n1 published d1.
        d2.send(frames.Data(d2.next_seq(), ENV_DATA))
        await w.until("cl/cl.d2")
        assert len(w.on("cl/cl.d1")) == 1
        assert len(w.on("cl/cl.d1/availability")) == 1
        await d1.aclose()
        await d2.aclose()


async def test_a_command_is_taken_once_and_reaches_a_device_on_either_node(
    cluster: list[GatewayProcess], mosquitto: Mosquitto
) -> None:
    n1, n2 = cluster
    relays = {"cl.r1": await device(n1, "cl.r1", "relay-4")}
    relays["cl.r2"] = await device(n2, "cl.r2", "relay-4")
    async with watch(mosquitto, "cl/+/command/status") as w:
        for client_id, relay in relays.items():
            for i in range(3):
                on = json.loads(RELAY_4.mqtt_entities[i]["payload_on"])
                await w.client.publish(
                    f"cl/{client_id}/command", json.dumps({**on, "id": f"{client_id}-{i}"}), qos=1
                )
                cmd = await relay.expect(frames.Command)
                # Exactly this command, never a second copy of the one before.
                assert RELAY_4.decode_command(cmd.body)["args"]["channel"] == i
                relay.send(frames.Ack(cmd.seq, 0))
            statuses = f"cl/{client_id}/command/status"

            def acked(topic: str = statuses) -> bool:
                done = [m for m in w.on(topic) if json.loads(m.payload)["status"] == "acked"]
                return len(done) == 3

            await wait_until(acked, f"three acked statuses on {statuses}")
    for relay in relays.values():
        await relay.aclose()


async def test_a_lost_node_s_devices_and_bridge_go_offline(
    cluster: list[GatewayProcess], mosquitto: Mosquitto
) -> None:
    n2 = cluster[1]
    async with watch(mosquitto, "cl/#") as w:
        d2 = await device(n2, "cl.lost")
        await w.until("cl/cl.lost/availability", b"online")
        await n2.kill()
        # n2's will, then n1 declares n2's devices offline (node_lost) and says so.
        await w.until("cl/bridge/n2/state", b"offline", timeout=20)
        await w.until("cl/cl.lost/availability", b"offline", timeout=20)
        await d2.aclose()
    await n2.start()  # the fixture stops both
