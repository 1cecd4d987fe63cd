"""Typed counters of the device side, for logs and ``/metrics``.

Each figure is counted once, in one place: ``LinkCounters`` for what one link
carried (a serial port keeps one set across reopenings), ``DeviceCounters`` for
gateway-wide events (links closed by reason, ERRORs sent by code, refusals).
Dicts keyed by an enum hold only the keys that happened, so a metric shows a
label only once it has been counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from frames import ErrorCode

from .events import CloseReason


@dataclass(slots=True)
class LinkCounters:
    """Traffic of one link (or of one serial port across its reopenings)."""

    frames_in: int = 0
    frames_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    crc_errors: int = 0
    skipped_bytes: int = 0
    frame_timeouts: int = 0
    rate_limited: int = 0  # device frames dropped by the rate limit (serial)
    throttled: int = 0  # times reading stopped for the rate limit (TCP backpressure)
    errors_sent: int = 0
    reconnects: int = 0

    def add(self, other: LinkCounters) -> None:
        """Add ``other``'s counts to these."""
        for f in _LINK_FIELDS:
            setattr(self, f, getattr(self, f) + getattr(other, f))


_LINK_FIELDS = tuple(f.name for f in fields(LinkCounters))


@dataclass(slots=True)
class DeviceCounters:
    """Gateway-wide counters of the device side (one set per ``DeviceManager``)."""

    links_closed: dict[CloseReason, int] = field(default_factory=dict)
    errors_sent: dict[ErrorCode, int] = field(default_factory=dict)
    replaced: int = 0  # sessions taken over by a newer HELLO of the same client_id
    stray_acks: int = 0  # ACKs for no command in flight
    auth_failed: int = 0  # HELLOs with a wrong token, or not the certificate's CN
    garbage_closed: int = 0  # TCP links closed by the garbage rule
    refused_connections: int = 0  # TCP connections refused at max_connections
    refused_failed_links: int = 0  # TCP connections held: their address failed too often
    refused_max_devices: int = 0  # HELLOs refused at max_devices
    refused_takeovers: int = 0  # HELLOs refused at max_takeovers
    refused_sessions: int = 0  # HELLOs refused at max_sessions_per_client
    refused_client_id_changes: int = 0  # HELLOs refused at max_client_id_changes
    refused_anonymous: int = 0  # HELLOs with no token on a port that needs one
    commands_not_reading: int = 0  # commands not written: no room on the link in time
    commands_no_slot: int = 0  # commands not written: no in-flight slot in time

    def link_closed(self, reason: CloseReason) -> None:
        """Count one link closed for ``reason``."""
        self.links_closed[reason] = self.links_closed.get(reason, 0) + 1

    def error_sent(self, code: ErrorCode) -> None:
        """Count one ERROR ``code`` sent to a device."""
        self.errors_sent[code] = self.errors_sent.get(code, 0) + 1
