"""gateway/mqtt is no web skin (docs/architecture.md): it reaches neither aiohttp nor sqlite3."""

from __future__ import annotations

from tests.test_layering import MODULES, libraries, reach

MQTT = [m for m in MODULES if m == "gateway.mqtt" or m.startswith("gateway.mqtt.")]


def test_the_bridge_reaches_neither_aiohttp_nor_sqlite() -> None:
    assert MQTT
    for module in MQTT:
        reached = reach(module)
        assert not {"aiohttp", "sqlite3"} & libraries(reached), module
        # It reads the hub; the web skin, the storage and the composition root stay apart.
        assert not [
            m
            for m in reached
            if m.startswith(("gateway.web", "gateway.storage", "gateway.app", "gateway.cli"))
        ], module
