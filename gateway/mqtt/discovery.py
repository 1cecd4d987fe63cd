"""Home Assistant MQTT discovery payloads (docs/mqtt.md, "Home Assistant").

Pure functions: what to publish for one device, given its protocol's declared
entities (``Protocol.mqtt_entities``, frames/protocols.py). Home Assistant
allows only ``[a-zA-Z0-9_-]`` in object and node ids, so client_ids are
sanitised, and a short hash of the original keeps two ids that sanitise alike
(``a.b`` and ``a:b``) apart, the same on every start.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

_UNSAFE = re.compile(r"[^a-zA-Z0-9_-]")

#: Keys an entity declaration gives; the rest of the config the bridge fills in.
COMPONENTS = ("sensor", "binary_sensor", "switch")


def object_id(client_id: str) -> str:
    """``client_id`` as a Home Assistant node id: safe characters plus 8 hex of its SHA-256."""
    digest = hashlib.sha256(client_id.encode()).hexdigest()[:8]
    return f"{_UNSAFE.sub('_', client_id)[:64]}_{digest}"


def config_topic(discovery: str, component: str, client_id: str, key: str) -> str:
    """Where the retained config of one entity lives."""
    return f"{discovery}/{component}/{object_id(client_id)}/{_UNSAFE.sub('_', key)}/config"


def discovery_messages(
    *,
    discovery: str,
    prefix: str,
    client_id: str,
    protocol: str,
    entities: Sequence[Mapping[str, Any]],
    bridge_topic: str,
) -> list[tuple[str, str]]:
    """(topic, JSON payload) of every entity of one device, ready to publish retained.

    Each entity is a mapping with ``component`` (sensor, binary_sensor or
    switch), ``key`` (unique within the protocol) and any Home Assistant keys
    (``name``, ``value_template``, ``device_class``, ``unit_of_measurement``,
    ``payload_on``/``payload_off`` for a switch). The bridge adds the state,
    availability and command topics, ``unique_id``, ``object_id`` and the device block.
    """
    node = object_id(client_id)
    state = f"{prefix}/{client_id}"
    out = []
    for entity in entities:
        component = str(entity["component"])
        key = str(entity["key"])
        body: dict[str, Any] = {k: v for k, v in entity.items() if k not in ("component", "key")}
        body.update(
            {
                "unique_id": f"iotgw_{node}_{_UNSAFE.sub('_', key)}",
                "object_id": f"{node}_{_UNSAFE.sub('_', key)}",
                "state_topic": state,
                # Both must say online: the device, and the bridge that reports it.
                "availability": [
                    {"topic": f"{state}/availability"},
                    {"topic": bridge_topic},
                ],
                "availability_mode": "all",
                "device": {
                    "identifiers": [f"iotgw_{node}"],
                    "name": client_id,
                    "model": protocol,
                    "manufacturer": "iot-frame-gateway",
                },
            }
        )
        if component == "switch":
            body["command_topic"] = f"{state}/command"
            body.setdefault("qos", 1)
        out.append((config_topic(discovery, component, client_id, key), json.dumps(body)))
    return out


def removal_topics(
    discovery: str, client_id: str, entities: Sequence[Mapping[str, Any]]
) -> list[str]:
    """The config topics of a device's entities: an empty retained payload removes each."""
    return [
        config_topic(discovery, str(e["component"]), client_id, str(e["key"])) for e in entities
    ]
