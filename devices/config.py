"""Settings of the device side: sessions, limits, device tokens, serial ports.

Every default is the one docs/protocol.md §4 gives; the gateway's config file
and CLI flags fill these in.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from frames import FrameOptions, max_frame_size, valid_client_id, valid_protocol_name
from frames.backoff import BackoffPolicy


@dataclass(frozen=True, slots=True)
class DeviceAuth:
    """Device tokens: one for every device, and/or one per client_id (which wins)."""

    token: str | None = None
    per_client: Mapping[str, str] = field(default_factory=dict)

    def expected(self, client_id: str) -> str | None:
        """The token this client_id must present, or None: it is anonymous (needs none)."""
        return self.per_client.get(client_id, self.token)

    def allows(self, client_id: str, token: str) -> bool:
        """True when ``token`` is what this client_id must present (constant time)."""
        expected = self.expected(client_id)
        if expected is None:
            return True
        return hmac.compare_digest(expected.encode(), token.encode())


def _check_heartbeat(name: str, value: int) -> None:
    """A heartbeat goes in WELCOME as a u16 (docs/protocol.md §3): 1..65535 seconds."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 0xFFFF:
        raise ValueError(f"{name} must be 1..65535 seconds, not {value!r}")


@dataclass(frozen=True, slots=True)
class HeartbeatOverrides:
    """Heartbeat intervals that differ from ``SessionConfig.heartbeat``.

    ``devices`` by client_id, ``protocols`` by protocol name. With the
    serial port's own ``heartbeat`` the order is: device > serial port >
    protocol > the global ``heartbeat`` (``SessionConfig.heartbeat_for``).
    """

    protocols: dict[str, int] = field(default_factory=dict)
    devices: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # A key that no HELLO could ever carry is a typo that would silently never match.
        for name in self.protocols:
            if not valid_protocol_name(name):
                raise ValueError(
                    f"protocols: {name!r} is not a protocol name (1..32 characters of a-z0-9._-)"
                )
        for client_id in self.devices:
            if not valid_client_id(client_id):
                raise ValueError(
                    f"devices: {client_id!r} is not a client_id (1..64 characters of A-Za-z0-9._:-)"
                )
        for kind, table in (("protocols", self.protocols), ("devices", self.devices)):
            for key, value in table.items():
                _check_heartbeat(f"{kind}.{key}", value)


# Defaults that more than one part takes: written once here.
BAUD: Final = 115200
MAX_CONNECTIONS: Final = 20_000  # TCP device connections at once
MAX_FRAME: Final = max_frame_size()  # the largest frame of the default framing


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """Timers and limits of every device session (docs/protocol.md §4)."""

    hello_timeout: float = 5.0
    heartbeat: int = 30  # seconds, sent in WELCOME
    misses: int = 3  # silence for misses x heartbeat ends the session
    ack_timeout: float = 10.0
    # Per device: over TCP a device above it is not read from for a while (a burst
    # arrives late but whole); over serial its extra frames are dropped (RATE_LIMITED).
    max_frames_per_second: float = 100.0
    rate_burst: float = 200.0
    max_inflight_commands: int = 64  # commands awaiting write or ACK per device
    garbage_bytes: int = 64 * 1024  # a TCP link discarding this much ...
    garbage_crc_errors: int = 100  # ... or this many CRC errors ...
    garbage_window: float = 60.0  # ... within this window is closed
    max_write_buffer: int = 1 << 20  # a device that never reads is closed past this
    frame_timeout: float = 1.0  # a partial frame's wait on TCP (docs/protocol.md §2)
    serial_frame_timeout: float = 0.2
    max_devices: int = 100_000
    # Before its HELLO is accepted a TCP link may send this much; past it, it is closed.
    hello_budget_bytes: int = 4096
    hello_budget_frames: int = 16
    # Within churn_window: HELLOs taking over one client_id from another link, and
    # HELLOs changing the client_id of one link; beyond either, RATE_LIMITED and closed.
    max_takeovers: int = 10
    max_client_id_changes: int = 10
    churn_window: float = 60.0
    # Devices with no token configured for them, on a device port that is not loopback.
    allow_anonymous: bool = False
    # Log lines a peer can cause (wrong tokens, takeovers, sessions...): per kind and window.
    max_log_lines: int = 50
    log_window: float = 60.0
    token: str | None = None  # one device token for every device
    tokens: dict[str, str] = field(default_factory=dict)  # per client_id; wins over token
    # Heartbeats per device and per protocol (a serial port may have its own too).
    heartbeat_overrides: HeartbeatOverrides = field(default_factory=HeartbeatOverrides)

    def __post_init__(self) -> None:
        positive = {
            "hello_timeout": self.hello_timeout,
            "ack_timeout": self.ack_timeout,
            "max_frames_per_second": self.max_frames_per_second,
            "garbage_window": self.garbage_window,
            "frame_timeout": self.frame_timeout,
            "serial_frame_timeout": self.serial_frame_timeout,
            "churn_window": self.churn_window,
            "log_window": self.log_window,
        }
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"{name} must be > 0, not {value}")
        _check_heartbeat("heartbeat", self.heartbeat)
        for name, count in {
            "misses": self.misses,
            "max_inflight_commands": self.max_inflight_commands,
            "max_devices": self.max_devices,
            "garbage_bytes": self.garbage_bytes,
            "garbage_crc_errors": self.garbage_crc_errors,
            "max_write_buffer": self.max_write_buffer,
            "hello_budget_frames": self.hello_budget_frames,
            "max_takeovers": self.max_takeovers,
            "max_client_id_changes": self.max_client_id_changes,
            "max_log_lines": self.max_log_lines,
        }.items():
            if count < 1:
                raise ValueError(f"{name} must be >= 1, not {count}")
        if self.max_inflight_commands > 255:
            raise ValueError("max_inflight_commands must be <= 255 (one seq byte)")
        if self.rate_burst < 1:
            raise ValueError(f"rate_burst must be >= 1, not {self.rate_burst}")
        if self.hello_budget_bytes < MAX_FRAME:
            # Less could refuse a valid HELLO, which takes up to one whole frame.
            raise ValueError(
                f"hello_budget_bytes must be >= {MAX_FRAME} (one frame), "
                f"not {self.hello_budget_bytes}"
            )

    @property
    def auth(self) -> DeviceAuth:
        """The device tokens, as the HELLO check takes them."""
        return DeviceAuth(self.token, self.tokens)

    @property
    def silence_limit(self) -> float:
        """Seconds of silence after which a session ends (at the global heartbeat)."""
        return float(self.misses * self.heartbeat)

    def heartbeat_for(self, client_id: str, protocol: str, port: int | None = None) -> int:
        """The heartbeat of one device: its own override, else its serial ``port``'s,
        else its protocol's, else the global ``heartbeat`` (docs/configuration.md)."""
        overrides = self.heartbeat_overrides
        own = overrides.devices.get(client_id)
        if own is not None:
            return own
        if port is not None:
            return port
        return overrides.protocols.get(protocol, self.heartbeat)


@dataclass(frozen=True, slots=True)
class SerialPortConfig:
    """One serial link: a pyserial URL, its speed, framing, and an optional fixed identity."""

    url: str
    baud: int = BAUD
    client_id: str | None = None
    protocol: str | None = None
    frame: FrameOptions = field(default_factory=FrameOptions)
    frame_timeout: float | None = None  # None: SessionConfig.serial_frame_timeout
    backoff: BackoffPolicy = field(default_factory=BackoffPolicy)
    health_interval: float = 1.0  # how often to check that the port is still the one opened
    heartbeat: int | None = None  # this port's devices' heartbeat (see heartbeat_for)

    def __post_init__(self) -> None:
        if not self.url:
            raise ValueError("a serial port needs a URL or device path")
        if self.baud <= 0:
            raise ValueError(f"baud must be a positive integer, not {self.baud}")
        if (self.client_id is None) != (self.protocol is None):
            raise ValueError(
                f"serial {self.url}: give both client_id and protocol for a fixed identity, "
                "or neither (then the device sends HELLO)"
            )
        if self.heartbeat is not None:
            _check_heartbeat(f"serial {self.url}: heartbeat", self.heartbeat)
        if self.client_id is not None and not valid_client_id(self.client_id):
            raise ValueError(
                f"serial {self.url}: client_id {self.client_id!r} must be 1..64 characters "
                "of A-Za-z0-9._:-"
            )
        if self.protocol is not None and not valid_protocol_name(self.protocol):
            raise ValueError(
                f"serial {self.url}: protocol {self.protocol!r} must be 1..32 characters "
                "of a-z0-9._-"
            )

    @property
    def fixed(self) -> bool:
        """True when the link has a configured identity and needs no HELLO."""
        return self.client_id is not None

    @classmethod
    def parse(cls, spec: str) -> SerialPortConfig:
        """Parse the CLI form ``URL,client_id=ID,protocol=NAME,baud=N,heartbeat=S``."""
        url, *pairs = spec.split(",")
        values: dict[str, str] = {}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            key = key.strip()
            if not sep or not value:
                raise ValueError(f"--serial {spec!r}: expected key=value, got {pair!r}")
            if key not in SERIAL_KEYS:
                raise ValueError(
                    f"--serial {spec!r}: unknown key {key!r} ({', '.join(SERIAL_KEYS)})"
                )
            values[key] = value.strip()
        numbers: dict[str, int] = {}
        for key in ("baud", "heartbeat"):
            if key in values:
                try:
                    numbers[key] = int(values[key])
                except ValueError:
                    raise ValueError(f"--serial {spec!r}: {key} must be an integer") from None
        return cls(
            url=url.strip(),
            baud=numbers.get("baud", BAUD),
            client_id=values.get("client_id"),
            protocol=values.get("protocol"),
            heartbeat=numbers.get("heartbeat"),
        )


# The keys of ``--serial URL,key=value,...``.
SERIAL_KEYS: Final = ("client_id", "protocol", "baud", "heartbeat")
