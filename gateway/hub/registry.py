"""The device registry: every device the gateway knows, online or not, and its latest value.

It answers ``devices`` (docs/api.md §3.2) a page at a time and ``GET
/api/devices``, and knows which devices of a protocol are online for group
commands. What it keeps across restarts it hands to the engine as
``DeviceRecord``s. Its size is the hub's to bound (``max_known_devices``);
``forget`` lets a device go that has been offline too long.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any

from devices import DeviceInfo

from .messages import telemetry_message
from .records import DeviceRecord, TelemetryRecord


@dataclass(slots=True)
class DeviceState:
    """What the hub knows of one device, online or not."""

    device: str
    protocol: str
    online: bool = False
    transport: str | None = None
    peer: str | None = None
    session: str | None = None
    connected_at: int | None = None
    first_seen: int = 0
    last_seen: int | None = None
    last: TelemetryRecord | None = None  # latest telemetry (its message is built when asked)

    def listing(self) -> dict[str, Any]:
        """The device's entry of ``{"op":"devices"}`` and ``GET /api/devices``."""
        return {
            "device": self.device,
            "protocol": self.protocol,
            "online": self.online,
            "transport": self.transport,
            "peer": self.peer,
            "session": self.session,
            "connected_at": self.connected_at,
            "last_seen": self.last_seen,
            "last": None if self.last is None else telemetry_message(self.last),
        }

    def record(self, now_ms: int) -> DeviceRecord:
        """What is kept of the device across restarts."""
        return DeviceRecord(
            self.device,
            self.protocol,
            self.transport or "tcp",
            self.first_seen or now_ms,
            self.last_seen or now_ms,
        )


class Registry:
    """Devices by client_id."""

    def __init__(self) -> None:
        self.devices: dict[str, DeviceState] = {}
        # The ids, sorted: a page of the listing is a bisect and a slice, not a sort.
        self._ids: list[str] = []
        self._online = 0

    def load(self, records: list[DeviceRecord], latest: dict[str, TelemetryRecord]) -> None:
        """Fill the registry from what the engine kept (at start)."""
        for r in records:
            self.devices[r.device] = DeviceState(
                device=r.device,
                protocol=r.protocol,
                transport=r.transport,
                first_seen=r.first_seen_ms,
                last_seen=r.last_seen_ms,
            )
        self._ids = sorted(self.devices)
        for device, rec in latest.items():
            state = self.devices.get(device)
            if state is not None:
                state.last = rec

    def get(self, device: str) -> DeviceState | None:
        """The device's state, or None when it was never seen."""
        return self.devices.get(device)

    def __contains__(self, device: object) -> bool:
        return device in self.devices

    def __len__(self) -> int:
        return len(self.devices)

    def online(self, info: DeviceInfo, now_ms: int) -> DeviceState:
        """A session started: the device is online with this session."""
        state = self.devices.get(info.client_id)
        if state is None:
            state = DeviceState(info.client_id, info.protocol, first_seen=now_ms)
            self.devices[info.client_id] = state
            bisect.insort(self._ids, info.client_id)
        if not state.online:
            self._online += 1
        state.protocol = info.protocol
        state.online = True
        state.transport = str(info.transport)
        state.peer = info.peer
        state.session = info.session
        state.connected_at = info.connected_at
        state.last_seen = now_ms
        return state

    def offline(self, info: DeviceInfo, now_ms: int) -> DeviceState | None:
        """A session ended; None when it was an older session (the device moved on)."""
        state = self.devices.get(info.client_id)
        if state is None or state.session != info.session or not state.online:
            return None
        state.online = False
        state.last_seen = now_ms
        self._online -= 1
        return state

    def telemetry(self, rec: TelemetryRecord) -> None:
        """The device's latest value and when it was last heard."""
        state = self.devices.get(rec.device)
        if state is not None:
            state.last = rec
            state.last_seen = rec.ts

    def online_count(self) -> int:
        """Devices online now."""
        return self._online

    def online_of(self, protocol: str) -> list[str]:
        """Online devices speaking ``protocol``, by id."""
        return sorted(
            s.device for s in self.devices.values() if s.online and s.protocol == protocol
        )

    def listing(self) -> list[dict[str, Any]]:
        """Every known device, by id."""
        return [self.devices[k].listing() for k in self._ids]

    def page(self, after: str | None, limit: int) -> tuple[list[dict[str, Any]], str | None]:
        """Up to ``limit`` devices with ids above ``after`` (all when None), by id.

        Returns the entries and the id to ask ``after`` next, None when no
        device is left (docs/api.md §3.2 ``devices``).
        """
        ids = self._ids
        start = 0 if after is None else bisect.bisect_right(ids, after)
        chosen = ids[start : start + limit]
        more = start + limit < len(ids)
        return [self.devices[k].listing() for k in chosen], chosen[-1] if more and chosen else None

    def stale(self, before_ms: int) -> list[str]:
        """Offline devices last seen before ``before_ms`` (unix ms), by id."""
        return [
            s.device
            for s in self.devices.values()
            if not s.online and (s.last_seen or s.first_seen) < before_ms
        ]

    def forget(self, device: str) -> bool:
        """Let an offline device go, its latest value too; False when online or unknown."""
        state = self.devices.get(device)
        if state is None or state.online:
            return False
        del self.devices[device]
        i = bisect.bisect_left(self._ids, device)
        del self._ids[i]
        return True
