"""The MQTT northbound against a real Mosquitto, a real gateway and real TCP devices (docs/mqtt.md).

One broker and one gateway for the module; each test uses its own device ids.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

import frames
from frames.protocols import ENV_SENSOR, RELAY_4
from gateway.mqtt import object_id
from tests.devices.support import Client
from tests.resilience.support import Telemetry, connect_dashboard
from tests.support.gateway import GatewayProcess
from tests.support.wait import wait_until

from .support import Mosquitto, watch

TOKEN = "mqtt-test-operator-token"
ENV_DATA = ENV_SENSOR.encode_data({"temperature_c": 21.5, "humidity_pct": 40.25, "battery_pct": 88})


def mqtt_config(broker: Mosquitto, **extra: Any) -> dict[str, Any]:
    # Fast reconnects and a short conflation interval keep the module quick.
    return {
        "mqtt": {
            "url": broker.url,
            "min_interval": 0.1,
            "reconnect_base": 0.05,
            "reconnect_cap": 0.3,
            "keepalive": 5,
            **extra,
        }
    }


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, mosquitto: Mosquitto
) -> Iterator[GatewayProcess]:
    gw = GatewayProcess(
        tmp_path_factory.mktemp("gw"), mqtt_config(mosquitto), token=TOKEN, name="mqtt"
    )
    gw.start_sync()
    yield gw
    gw.stop_sync()


async def device(gw: GatewayProcess, client_id: str, protocol: str = "env-sensor") -> Client:
    reader, writer = await asyncio.open_connection(*gw.device_address)
    c = Client(reader, writer)
    await c.hello(client_id, protocol)
    return c


async def test_state_availability_and_bridge_state_are_retained(
    gateway: GatewayProcess, mosquitto: Mosquitto
) -> None:
    dev = await device(gateway, "env.state:1")
    dev.send(frames.Data(dev.next_seq(), ENV_DATA))
    async with watch(mosquitto, "iotgw/env.state:1", "iotgw/env.state:1/availability") as w:
        await w.until("iotgw/env.state:1")
    # A client arriving later gets the retained values at once.
    async with watch(mosquitto, "iotgw/#") as w:
        state = await w.until("iotgw/env.state:1")
        assert state.retain
        assert state.qos == 0
        body = json.loads(state.payload)
        assert set(body) == {"device", "protocol", "offset", "ts", "seq", "data"}
        assert body["device"] == "env.state:1"
        assert body["protocol"] == "env-sensor"
        assert body["data"] == {"temperature_c": 21.5, "humidity_pct": 40.25, "battery_pct": 88}
        avail = await w.until("iotgw/env.state:1/availability", b"online")
        assert avail.retain
        bridge = await w.until("iotgw/bridge/state", b"online")
        assert bridge.retain
        await dev.aclose()
        await w.until("iotgw/env.state:1/availability", b"offline")
    health = await gateway.get_json("/healthz")
    assert health["mqtt"] == "connected"


async def test_home_assistant_discovery_of_both_protocols_and_removal(
    gateway: GatewayProcess, mosquitto: Mosquitto
) -> None:
    env_node, relay_node = object_id("ha.env"), object_id("ha.relay")
    async with watch(mosquitto, "homeassistant/#") as w:
        env = await device(gateway, "ha.env")
        relay = await device(gateway, "ha.relay", "relay-4")
        sensors = {
            key: f"homeassistant/sensor/{env_node}/{key}/config"
            for key in ("temperature", "humidity", "battery")
        }
        switches = [f"homeassistant/switch/{relay_node}/channel_{i}/config" for i in range(4)]
        for topic in [*sensors.values(), *switches]:
            await w.until(topic)
        configs = {t: json.loads(w.payload(t) or b"") for t in [*sensors.values(), *switches]}
        unique = {c["unique_id"] for c in configs.values()}
        assert len(unique) == 7
        for config in configs.values():
            # What Home Assistant requires and uses (state, availability, device block).
            assert config["state_topic"].startswith("iotgw/ha.")
            assert {"topic": "iotgw/bridge/state"} in config["availability"]
            assert config["device"]["identifiers"]
            assert config["device"]["name"].startswith("ha.")
            assert set(config["object_id"]) <= set(
                "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-"
            )
        temp = configs[sensors["temperature"]]
        assert temp["device_class"] == "temperature"
        assert temp["unit_of_measurement"] == "°C"
        assert configs[sensors["humidity"]]["unit_of_measurement"] == "%"
        assert configs[sensors["battery"]]["unit_of_measurement"] == "%"
        assert {"topic": "iotgw/ha.env/availability"} in temp["availability"]
        for i, topic in enumerate(switches):
            sw = configs[topic]
            assert sw["command_topic"] == "iotgw/ha.relay/command"
            assert json.loads(sw["payload_on"]) == {
                "name": "set",
                "args": {"channel": i, "on": True},
            }
        # Home Assistant restarted: it says online, discovery comes again.
        before = len(w.on(sensors["battery"]))
        await w.client.publish("homeassistant/status", "online", qos=1)
        await wait_until(lambda: len(w.on(sensors["battery"])) > before, "discovery again")
        # A deleted device's entities go: an empty retained config each.
        await env.aclose()
        await relay.aclose()
        await wait_until(
            lambda: gateway.get_json_sync("/api/devices/ha.env")["online"] is False,
            "ha.env offline",
        )
        status, _ = await asyncio.to_thread(gateway.request_sync, "DELETE", "/api/devices/ha.env")
        assert status in (200, 204)
        for topic in sensors.values():
            await w.until(topic, b"")
    async with watch(mosquitto, "homeassistant/sensor/#") as later:
        # Nothing retained is left of the deleted device.
        await asyncio.sleep(0.5)
        assert not [m for m in later.messages if env_node in m.topic.value and m.payload]


async def test_commands_in_statuses_out(gateway: GatewayProcess, mosquitto: Mosquitto) -> None:
    relay = await device(gateway, "cmd.relay", "relay-4")
    async with watch(mosquitto, "iotgw/+/command/status", "reply/here") as w:
        on = json.loads(RELAY_4.mqtt_entities[2]["payload_on"])
        await w.client.publish("iotgw/cmd.relay/command", json.dumps({**on, "id": "c1"}), qos=1)
        cmd = await relay.expect(frames.Command)
        assert RELAY_4.decode_command(cmd.body) == {
            "name": "set",
            "args": {"channel": 2, "on": True},
        }
        relay.send(frames.Ack(cmd.seq, 0))

        def statuses(device: str) -> list[dict[str, Any]]:
            return [json.loads(m.payload) for m in w.on(f"iotgw/{device}/command/status")]

        await wait_until(
            lambda: any(s["status"] == "acked" for s in statuses("cmd.relay")), "acked"
        )
        assert all(
            s["id"] == "c1" and not m.retain
            for s, m in zip(
                statuses("cmd.relay"), w.on("iotgw/cmd.relay/command/status"), strict=True
            )
        )
        # A device never seen: rejected.
        await w.client.publish("iotgw/nobody/command", json.dumps(on), qos=1)
        await wait_until(lambda: bool(statuses("nobody")), "a status for nobody")
        assert statuses("nobody")[0]["status"] == "rejected"
        # Not a command: rejected with an error, and the bridge carries on.
        await w.client.publish("iotgw/cmd.relay/command", b"\xff not json", qos=1)
        await wait_until(
            lambda: any("error" in s and s["id"] is None for s in statuses("cmd.relay")),
            "a rejected status with an error",
        )
        # MQTT 5: the status goes to the response topic too, with the correlation data.
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = "reply/here"
        props.CorrelationData = b"corr-1"
        await w.client.publish(
            "iotgw/cmd.relay/command", json.dumps({"name": "nope"}), qos=1, properties=props
        )
        reply = await w.until("reply/here")
        assert json.loads(reply.payload)["status"] == "rejected"
        assert reply.properties.CorrelationData == b"corr-1"
    await relay.aclose()


async def test_last_will_after_kill_9(tmp_path: Path, mosquitto: Mosquitto) -> None:
    gw = GatewayProcess(
        tmp_path, mqtt_config(mosquitto, prefix="will", keepalive=1), token=TOKEN, name="will"
    )
    await gw.start()
    try:
        async with watch(mosquitto, "will/bridge/state") as w:
            await w.until("will/bridge/state", b"online")
            await gw.kill()
            # The connection dropped without DISCONNECT: the broker sends the will.
            await w.until("will/bridge/state", b"offline", timeout=20)
        async with watch(mosquitto, "will/bridge/state") as later:
            msg = await later.until("will/bridge/state", b"offline")
            assert msg.retain  # kept for whoever subscribes later
    finally:
        if gw.running:
            await gw.stop()


async def test_broker_restart_reconnect_republish_and_queue_bound(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    # Its own broker: this test stops it.
    broker = Mosquitto(tmp_path / "b")
    broker.workdir.mkdir()
    broker.start()
    gw = GatewayProcess(
        tmp_path,
        mqtt_config(broker, min_interval=0.0, queue_size=5),
        token=TOKEN,
        name="restart",
    )
    await gw.start()
    try:
        dev = await device(gw, "restart.env")
        dev.send(frames.Data(dev.next_seq(), ENV_DATA))
        async with watch(broker, "iotgw/restart.env") as w:
            await w.until("iotgw/restart.env")
        broker.stop()
        await wait_until(
            lambda: gw.get_json_sync("/healthz")["mqtt"] == "down", "healthz says down"
        )
        assert gw.healthy_sync()  # still 200: devices and dashboards carry on
        async with aiohttp.ClientSession() as session:
            dash = await connect_dashboard(gw, session, token=TOKEN)
            live = Telemetry(dash)
            try:
                for _ in range(40):
                    dev.send(frames.Data(dev.next_seq(), ENV_DATA))
                    await dev.writer.drain()
                # A dashboard gets every message live, and every one is stored.
                await live.wait_for(lambda: live.count("restart.env") == 40)
                await wait_until(
                    lambda: len(gw.stored_offsets_sync("restart.env")) == 41, "41 rows stored"
                )
            finally:
                await live.aclose()
                await dash.ws.close()
        await wait_until(
            lambda: gw.metrics_sync().value("iot_mqtt_dropped_total") >= 30, "drops counted"
        )
        broker.start()
        await wait_until(
            lambda: gw.get_json_sync("/healthz")["mqtt"] == "connected",
            "reconnected",
            timeout=20,
        )
        # The broker kept nothing (no persistence): the bridge published it all again.
        async with watch(broker, "iotgw/#") as w:
            await w.until("iotgw/bridge/state", b"online")
            await w.until("iotgw/restart.env/availability", b"online")
            state = await w.until("iotgw/restart.env")
            assert state.retain
        assert gw.metrics_sync().value("iot_mqtt_connects_total") >= 2
        await dev.aclose()
    finally:
        await gw.stop()
        broker.stop()


async def test_broker_down_from_the_start_changes_nothing_for_devices(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path)  # never started: nobody listens on its port
    gw = GatewayProcess(tmp_path, mqtt_config(broker), token=TOKEN, name="nobroker")
    await gw.start()
    try:
        dev = await device(gw, "nobroker.env")
        dev.send(frames.Data(dev.next_seq(), ENV_DATA))
        await wait_until(lambda: len(gw.stored_offsets_sync("nobroker.env")) == 1, "stored")
        health = gw.get_json_sync("/healthz")
        assert health["mqtt"] == "down"
        assert health["status"] == "ok"
        await wait_until(
            lambda: gw.metrics_sync().value("iot_mqtt_connect_failures_total") >= 2,
            "retries counted",
        )
        await dev.aclose()
    finally:
        await gw.stop()


def test_no_mqtt_field_without_a_broker(tmp_path: Path) -> None:
    gw = GatewayProcess(tmp_path, token=TOKEN)
    gw.start_sync()
    try:
        assert "mqtt" not in gw.get_json_sync("/healthz")
    finally:
        gw.stop_sync()


async def test_flags_prefix_and_no_discovery(tmp_path: Path, mosquitto: Mosquitto) -> None:
    args = ["--mqtt", mosquitto.url, "--mqtt-prefix", "flags", "--mqtt-discovery", "none"]
    gw = GatewayProcess(tmp_path, None, args=args, token=TOKEN, name="flags")
    await gw.start()
    try:
        async with watch(mosquitto, "flags/#", "homeassistant/#") as w:
            dev = await device(gw, "flags.env")
            dev.send(frames.Data(dev.next_seq(), ENV_DATA))
            await w.until("flags/bridge/state", b"online")
            await w.until("flags/flags.env/availability", b"online")
            await w.until("flags/flags.env")
            # Discovery would have come before the availability, on the same connection.
            node = object_id("flags.env")
            assert not [m for m in w.messages if node in m.topic.value]
            await dev.aclose()
    finally:
        await gw.stop()


async def test_credentials_from_the_environment(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path / "auth", users={"gw": "s3cret-pw"})
    broker.workdir.mkdir()
    broker.start()
    try:
        env = {"IOT_GATEWAY_MQTT_USERNAME": "gw", "IOT_GATEWAY_MQTT_PASSWORD": "s3cret-pw"}
        gw = GatewayProcess(tmp_path, mqtt_config(broker), env=env, token=TOKEN, name="cred")
        wrong = GatewayProcess(
            tmp_path,
            mqtt_config(broker, prefix="wrong"),
            env={**env, "IOT_GATEWAY_MQTT_PASSWORD": "nope"},
            token=TOKEN,
            name="wrong",
        )
        await gw.start()
        await wrong.start()
        try:
            await wait_until(
                lambda: gw.get_json_sync("/healthz")["mqtt"] == "connected", "connected"
            )
            await wait_until(
                lambda: wrong.metrics_sync().value("iot_mqtt_connect_failures_total") >= 2,
                "the wrong password refused, again and again",
            )
            assert wrong.get_json_sync("/healthz")["mqtt"] == "down"
        finally:
            await gw.stop()
            await wrong.stop()
        for process in (gw, wrong):
            assert "s3cret-pw" not in process.log()
            assert "nope" not in process.log()
    finally:
        broker.stop()


async def test_mqtts_with_a_ca(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    files = tmp_path / "pki"
    files.mkdir()
    chain, key, ca_file = files / "broker.pem", files / "broker.key", files / "ca.pem"
    cert.private_key_pem.write_to_path(str(key))
    cert.cert_chain_pems[0].write_to_path(str(chain))
    ca.cert_pem.write_to_path(str(ca_file))
    broker = Mosquitto(files, tls=(chain, key))
    broker.start()
    try:
        gw = GatewayProcess(tmp_path, mqtt_config(broker, ca=str(ca_file)), token=TOKEN, name="tls")
        # Without the CA, the broker's certificate is not trusted: never connected.
        untrusted = GatewayProcess(
            tmp_path, mqtt_config(broker, prefix="untrusted"), token=TOKEN, name="untrusted"
        )
        await gw.start()
        await untrusted.start()
        try:
            await wait_until(
                lambda: gw.get_json_sync("/healthz")["mqtt"] == "connected", "connected"
            )
            await wait_until(
                lambda: untrusted.metrics_sync().value("iot_mqtt_connect_failures_total") >= 2,
                "the untrusted broker refused, again and again",
            )
            assert untrusted.get_json_sync("/healthz")["mqtt"] == "down"
        finally:
            await gw.stop()
            await untrusted.stop()
    finally:
        broker.stop()


async def test_a_forgotten_device_leaves_nothing_retained(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    config = {**mqtt_config(mosquitto, prefix="forget"), "dashboards": {"forget_after": 1.0}}
    gw = GatewayProcess(tmp_path, config, token=TOKEN, name="forget")
    await gw.start()
    try:
        node = object_id("forget.env")
        temperature = f"homeassistant/sensor/{node}/temperature/config"
        async with watch(mosquitto, "forget/#", "homeassistant/#") as w:
            dev = await device(gw, "forget.env")
            dev.send(frames.Data(dev.next_seq(), ENV_DATA))
            await w.until("forget/forget.env")
            await w.until(temperature)
            await dev.aclose()
            # Unseen for forget_after: forgotten, and its retained topics emptied.
            await w.until("forget/forget.env", b"", timeout=20)
            await w.until("forget/forget.env/availability", b"")
            await w.until(temperature, b"")
    finally:
        await gw.stop()
