"""Device links: TCP and serial transports and the session state machine behind them.

Thin adapters move bytes between the OS and sans-IO cores: ``frames`` for the
codec, ``devices.core.SessionCore`` for docs/protocol.md §4 (with the
differences between links in ``LinkPolicy``). One ``DeviceSession`` per link
runs a core on the event loop. The hub talks to this package through
``DeviceManager`` (commands, counters) and ``DeviceEventSink`` (events).
"""

from .commands import CommandTracker
from .config import DeviceAuth, SerialPortConfig, SessionConfig
from .core import CloseLink, CommandDone, SessionCore, SessionEvent, SessionState
from .counters import DeviceCounters, LinkCounters
from .events import (
    CloseReason,
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
from .logs import LogLimiter
from .manager import DeviceManager, PortState, SerialPortStatus
from .policy import LinkPolicy
from .ports import LinkPort, ManagedSession, ReadFlow, SessionHost
from .serial_link import SerialLink
from .session import DeviceSession
from .tcp import DeviceServer
from .tls import TlsConfigError, TlsDoor, TlsFiles, load_deny_list, server_context

__all__ = [
    "CloseLink",
    "CloseReason",
    "CommandDone",
    "CommandHandle",
    "CommandResult",
    "CommandStatus",
    "CommandTracker",
    "DeviceAuth",
    "DeviceCounters",
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
    "LinkPolicy",
    "LinkPort",
    "LogLimiter",
    "ManagedSession",
    "PortState",
    "ReadFlow",
    "SerialLink",
    "SerialPortConfig",
    "SerialPortStatus",
    "SessionConfig",
    "SessionCore",
    "SessionEvent",
    "SessionHost",
    "SessionState",
    "TlsConfigError",
    "TlsDoor",
    "TlsFiles",
    "Transport",
    "load_deny_list",
    "server_context",
]
