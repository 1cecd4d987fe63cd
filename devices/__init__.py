"""Device links: TCP and serial transports and the session state machine behind them.

Thin adapters move bytes between the OS and the sans-IO ``frames`` core; one
``DeviceSession`` per link owns docs/protocol.md §4. The hub talks to this
package through ``DeviceManager`` (commands) and ``DeviceEventSink`` (events).
"""

from .config import DeviceAuth, SerialPortConfig, SessionConfig
from .events import (
    CommandHandle,
    CommandResult,
    CommandStatus,
    DeviceEvent,
    DeviceEventSink,
    DeviceInfo,
    DeviceNotOnline,
    DeviceOffline,
    DeviceOnline,
    DeviceTelemetry,
    Transport,
)
from .manager import DeviceManager
from .serial_link import SerialLink
from .session import DeviceSession, LinkCounters, SessionState
from .tcp import DeviceServer

__all__ = [
    "CommandHandle",
    "CommandResult",
    "CommandStatus",
    "DeviceAuth",
    "DeviceEvent",
    "DeviceEventSink",
    "DeviceInfo",
    "DeviceManager",
    "DeviceNotOnline",
    "DeviceOffline",
    "DeviceOnline",
    "DeviceServer",
    "DeviceSession",
    "DeviceTelemetry",
    "LinkCounters",
    "SerialLink",
    "SerialPortConfig",
    "SessionConfig",
    "SessionState",
    "Transport",
]
