"""MQTT northbound (docs/mqtt.md): every device's state, availability and commands on a broker.

No aiohttp here: the bridge reads the hub the way a dashboard does and talks
to the broker with aiomqtt.
"""

from .bridge import MqttBridge, MqttConfig, MqttCounters, parse_url
from .discovery import discovery_messages, object_id

__all__ = [
    "MqttBridge",
    "MqttConfig",
    "MqttCounters",
    "discovery_messages",
    "object_id",
    "parse_url",
]
