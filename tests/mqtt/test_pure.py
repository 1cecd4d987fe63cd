"""The bridge's pure parts (docs/mqtt.md): Home Assistant ids, the broker URL, the docs."""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from frames import get_protocol
from gateway.config import ConfigError, build_config
from gateway.hub import Hub, LocalEngine
from gateway.hub.messages import telemetry_text
from gateway.hub.records import TelemetryRecord
from gateway.mqtt import MqttBridge, MqttConfig, discovery_messages, object_id, parse_url
from gateway.mqtt.bridge import MqttUrlError, _command_device, _payload, state_payload
from gateway.storage import MemoryStorage

DOC = Path(__file__).resolve().parents[2] / "docs" / "mqtt.md"
CLIENT_IDS = st.text(
    alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-",
    min_size=1,
    max_size=64,
)


@given(CLIENT_IDS)
def test_object_ids_are_safe_and_stable(client_id: str) -> None:
    oid = object_id(client_id)
    assert re.fullmatch(r"[a-zA-Z0-9_-]+", oid)
    assert object_id(client_id) == oid


@given(CLIENT_IDS, CLIENT_IDS)
def test_object_ids_of_different_client_ids_differ(a: str, b: str) -> None:
    if a != b:
        assert object_id(a) != object_id(b)


def test_ids_that_sanitise_alike_stay_apart() -> None:
    assert object_id("relay.A") != object_id("relay:A")
    assert object_id("relay.A").startswith("relay_A_")


@given(CLIENT_IDS)
def test_a_command_topic_names_its_device(client_id: str) -> None:
    assert _command_device("iotgw", f"iotgw/{client_id}/command") == client_id


def test_urls() -> None:
    b = parse_url("mqtt://u:p%40ss@broker.example:1884")
    assert (b.host, b.port, b.tls, b.username, b.password) == (
        "broker.example",
        1884,
        False,
        "u",
        "p@ss",
    )
    assert parse_url("mqtts://h").port == 8883
    assert parse_url("mqtt://h").port == 1883
    for bad in ("http://h:1", "mqtt://:1883", "mqtt://h:99999", "mqtt://h/x", "h:1883"):
        with pytest.raises(MqttUrlError):
            parse_url(bad)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"url": "tcp://h"}, "mqtt.url"),
        ({"url": "mqtt://h", "prefix": "a/#"}, "prefix"),
        ({"url": "mqtt://h", "min_interval": -1}, "min_interval"),
        ({"url": "mqtts://h", "ca": "/nonexistent/ca.pem"}, "mqtt.ca"),
        ({"url": "mqtt://h", "version": 4}, "version"),
        ({"url": "mqtt://h", "bogus": 1}, "mqtt.bogus"),
    ],
)
def test_bad_settings_are_one_line_config_errors(table: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)) as e:
        build_config({"mqtt": table})
    assert "\n" not in str(e.value)


def test_credentials_from_the_environment() -> None:
    config = build_config(
        {"mqtt": {"url": "mqtt://h"}},
        environ={"IOT_GATEWAY_MQTT_USERNAME": "u", "IOT_GATEWAY_MQTT_PASSWORD": "s3cret"},
    )
    assert (config.mqtt.username, config.mqtt.password) == ("u", "s3cret")
    assert "s3cret" not in config.mqtt.url_without_password


def test_cluster_topics() -> None:
    single = MqttConfig(url="mqtt://h")
    assert single.bridge_topic == "iotgw/bridge/state"
    assert single.command_filter == "iotgw/+/command"
    node = MqttConfig(url="mqtt://h", node="n1")
    assert node.bridge_topic == "iotgw/bridge/n1/state"
    assert node.command_filter == "$share/iotgw/iotgw/+/command"


def test_the_docs_discovery_examples_are_the_real_output() -> None:
    blocks = re.findall(r"```json discovery:(\S+):(\S+):(\d+)\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) == 2
    for client_id, protocol, index, text in blocks:
        entity = get_protocol(protocol).mqtt_entities[int(index)]
        ((_, payload),) = discovery_messages(
            discovery="homeassistant",
            prefix="iotgw",
            client_id=client_id,
            protocol=protocol,
            entities=[entity],
            bridge_topic="iotgw/bridge/state",
        )
        assert json.loads(text) == json.loads(payload)


PROTOCOLS = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789._-", min_size=1, max_size=32)
DATA = st.dictionaries(
    st.text(max_size=8), st.one_of(st.integers(), st.floats(allow_nan=False), st.text()), max_size=4
)


@given(CLIENT_IDS | st.text(min_size=1, max_size=20), PROTOCOLS, DATA, st.booleans())
def test_the_state_payload_is_the_telemetry_message_without_its_op(
    device: str, protocol: str, data: dict[str, Any], flagged: bool
) -> None:
    """What the bridge keeps of a delivery becomes the telemetry message minus its op."""
    record = TelemetryRecord(7, device, protocol, 1_700_000_000_000, 3, data)
    text = telemetry_text(record, json.dumps(data), ("x",) if flagged else None)
    bridge = MqttBridge(Hub(LocalEngine(MemoryStorage())), MqttConfig(url="mqtt://h"))
    bridge.telemetry(record, json.dumps(data), ("x",) if flagged else None)
    dev = bridge.devices[device]
    assert dev.protocol == protocol
    assert dev.state is not None
    expected = {k: v for k, v in json.loads(text).items() if k != "op"}
    assert json.loads(_payload(dev.state)) == expected
    assert json.loads(state_payload(text)) == expected


def test_every_mqtt_key_is_documented_with_its_default() -> None:
    text = (DOC.parent / "configuration.md").read_text(encoding="utf-8")
    section = text.split("## `[mqtt]`", 1)[1].split("\n## ", 1)[0]
    rows = dict(re.findall(r"^\|\s*`([a-z_]+)`\s*\|[^|]*\|\s*([^|]*?)\s*\|", section, re.M))
    fields = {f.name: f.default for f in dataclasses.fields(MqttConfig)}
    assert set(rows) == set(fields)
    for key, default in fields.items():
        literal = re.fullmatch(r"`(.+)`", rows[key])
        if literal is None:
            assert default is None, f"mqtt.{key}: give the default {default!r}"
        else:
            assert tomllib.loads(f"v = {literal.group(1)}")["v"] == default, key


def test_the_docs_node_red_flow_and_telegraf_topics_fit_the_real_topics() -> None:
    """docs/mqtt.md's Node-RED import and Telegraf topics against what the bridge uses."""
    from paho.mqtt.client import topic_matches_sub

    text = DOC.read_text()
    node_red = text[text.index("## Node-RED") :]
    (flow_text,) = re.findall(r"```json\n(.*?)```", node_red[: node_red.index("## Trust")], re.S)
    flow = {node["id"]: node for node in json.loads(flow_text)}
    # The bridge publishes state on PREFIX/DEVICE and statuses on PREFIX/DEVICE/command/status.
    assert topic_matches_sub(flow["in1"]["topic"], "iotgw/relay.A")
    assert not topic_matches_sub(flow["in1"]["topic"], "iotgw/relay.A/availability")
    assert topic_matches_sub(flow["st1"]["topic"], "iotgw/relay.A/command/status")
    # The command goes where the bridge takes commands, and its payload is a relay-4 command.
    out_topic = flow["out1"]["topic"]
    assert topic_matches_sub(MqttConfig(url="mqtt://h").command_filter, out_topic)
    assert _command_device("iotgw", out_topic) == "relay.A"
    payload = re.search(r"with payload\n`(\{.*?\})`", node_red, re.S)
    assert payload is not None
    command = json.loads(payload.group(1))
    command.pop("id")
    assert get_protocol("relay-4").encode_command(command) == bytes.fromhex("010001")
    # Telegraf: the state topics only.
    (telegraf,) = re.findall(r'topics =\s*\["([^"]+)"\]', node_red)
    assert topic_matches_sub(telegraf, "iotgw/sensor-1")
