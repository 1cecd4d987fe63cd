"""The routing core (docs/architecture.md): devices in, dashboards out, no aiohttp, no SQLite.

``Hub`` composes the parts; the web layer (``gateway.web``) is a thin skin over it.
"""

from __future__ import annotations

from .commands import CommandRouter, CommandSettings, DeviceLinks
from .core import DeviceIsOnline, Hub, HubConfig
from .dashboard import Dashboard, Kind, Refused, Role
from .engine import Engine, EngineSink, LocalEngine, Presence, StatusCallback
from .messages import (
    ClientError,
    CommandRequest,
    ErrorCode,
    Target,
    TargetKind,
    dumps,
    error_message,
    now_ms,
    parse_command,
    parse_target,
    telemetry_message,
    telemetry_text,
)
from .ranges import RangeTable
from .records import CommandLog, StorageUnavailable, StoreError
from .registry import DeviceState, Registry
from .replay import REPLAY_ROUNDS, HeldLive
from .subscriptions import SubscriptionIndex

__all__ = [
    "REPLAY_ROUNDS",
    "ClientError",
    "CommandLog",
    "CommandRequest",
    "CommandRouter",
    "CommandSettings",
    "Dashboard",
    "DeviceIsOnline",
    "DeviceLinks",
    "DeviceState",
    "Engine",
    "EngineSink",
    "ErrorCode",
    "HeldLive",
    "Hub",
    "HubConfig",
    "Kind",
    "LocalEngine",
    "Presence",
    "RangeTable",
    "Refused",
    "Registry",
    "Role",
    "StatusCallback",
    "StorageUnavailable",
    "StoreError",
    "SubscriptionIndex",
    "Target",
    "TargetKind",
    "dumps",
    "error_message",
    "now_ms",
    "parse_command",
    "parse_target",
    "telemetry_message",
    "telemetry_text",
]
