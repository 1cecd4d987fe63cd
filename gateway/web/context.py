"""What the web handlers may reach of a running gateway, under one typed app key.

The handlers see the hub, tokens, metrics, config and the connection cap,
never the device side or the storage engine: those are wired by the
composition root (``gateway.app``), whose ``Runtime`` extends this.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web

from ..auth import CommandRates, TokenTable
from ..config import GatewayConfig
from ..hub import Hub
from ..metrics import Metrics
from .connections import HttpConnectionCap


@dataclass(slots=True)
class WebContext:
    """The routing core and the settings the HTTP and WebSocket handlers use."""

    config: GatewayConfig
    tokens: TokenTable
    metrics: Metrics
    hub: Hub
    http: HttpConnectionCap
    sockets: set[web.WebSocketResponse] = field(default_factory=set)
    accepting: bool = True
    # Commands over HTTP, per token (docs/api.md §4); made from the config when None.
    http_commands: CommandRates | None = None
    # "connected" or "down" while an MQTT broker is configured (docs/mqtt.md); None: no broker.
    mqtt_state: Callable[[], str] | None = None

    def command_rates(self) -> CommandRates:
        """The per-token buckets of ``POST .../commands`` (dashboards.commands_per_second)."""
        if self.http_commands is None:
            self.http_commands = CommandRates(self.config.dashboards.commands_per_second)
        return self.http_commands


WEB: web.AppKey[WebContext] = web.AppKey("web", WebContext)
