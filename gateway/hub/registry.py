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
from .ranges import RangeTable
from .records import DeviceRecord, TelemetryRecord

#: The label fields of a device (docs/api.md §3.2), each a string or null
#: (``channels``: a list of strings, one per relay channel).
LABEL_FIELDS = ("name", "location", "channels")
#: The ``offline_reason`` of a device loaded at start whose reason was not kept
#: (the gateway stopped without saying why it went: a crash, or an older data dir).
RESTART = "restart"

Labels = dict[str, Any]


#: Bounds of a label (characters of a name or location, channels, characters of one).
MAX_LABEL = 100
MAX_CHANNELS = 32
MAX_CHANNEL_NAME = 40


def no_labels() -> Labels:
    """Every label field null."""
    return dict.fromkeys(LABEL_FIELDS)


def check_labels(value: Any) -> Labels:
    """Labels as given (``PUT .../labels`` body, a ``[labels."ID"]`` table), checked.

    Returns every field (a missing one null). Raises ``ValueError`` saying what
    is wrong: an unknown key, a field of the wrong kind or too long.
    """
    if not isinstance(value, dict):
        raise ValueError('labels must be an object {"name", "location", "channels"}')
    unknown = sorted(set(value) - set(LABEL_FIELDS))
    if unknown:
        raise ValueError(f"unknown label {unknown[0]!r}: labels are name, location, channels")
    out = no_labels()
    for key in ("name", "location"):
        text = value.get(key)
        if text is None:
            continue
        if not isinstance(text, str) or not 0 < len(text) <= MAX_LABEL:
            raise ValueError(f"{key} must be a string of 1 to {MAX_LABEL} characters, or null")
        out[key] = text
    channels = value.get("channels")
    if channels is not None:
        if (
            not isinstance(channels, list)
            or len(channels) > MAX_CHANNELS
            or not all(isinstance(c, str) and len(c) <= MAX_CHANNEL_NAME for c in channels)
        ):
            raise ValueError(
                f"channels must be a list of at most {MAX_CHANNELS} strings of at most "
                f"{MAX_CHANNEL_NAME} characters, or null"
            )
        out["channels"] = list(channels)
    return out


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
    offline_since: int | None = None  # unix ms; None while online
    offline_reason: str | None = None  # the presence reason; None while online
    # The cluster node holding its link (docs/cluster.md); None in a single node.
    node: str | None = None
    # Counted since the gateway started (docs/api.md §3.2 ``counters``).
    telemetry_count: int = 0
    out_of_range_count: int = 0
    commands_count: int = 0
    nacks_count: int = 0

    def listing(
        self, labels: Labels | None = None, ranges: RangeTable | None = None
    ) -> dict[str, Any]:
        """The device's entry of ``{"op":"devices"}`` and ``GET /api/devices``.

        ``labels``: its labels (every field null when None); ``ranges`` flags the
        values of ``last`` outside their range.
        """
        last = self.last
        out = {
            "device": self.device,
            "protocol": self.protocol,
            "online": self.online,
            "transport": self.transport,
            "peer": self.peer,
            "session": self.session,
            "connected_at": self.connected_at,
            "last_seen": self.last_seen,
            "last": None
            if last is None
            else telemetry_message(
                last, None if ranges is None else ranges.check(last.protocol, last.data)
            ),
            "labels": no_labels() if labels is None else labels,
            "offline_since": None if self.online else self.offline_since,
            "offline_reason": None if self.online else (self.offline_reason or RESTART),
            "counters": {
                "telemetry": self.telemetry_count,
                "out_of_range": self.out_of_range_count,
                "commands": self.commands_count,
                "nacks": self.nacks_count,
            },
        }
        if self.node is not None:
            out["node"] = self.node
        return out

    def record(self, now_ms: int) -> DeviceRecord:
        """What is kept of the device across restarts."""
        return DeviceRecord(
            self.device,
            self.protocol,
            self.transport or "tcp",
            self.first_seen or now_ms,
            self.last_seen or now_ms,
            None if self.online else self.offline_reason,
        )


class Registry:
    """Devices by client_id, with their labels (from the config and the API)."""

    def __init__(
        self,
        config_labels: dict[str, Labels] | None = None,
        ranges: RangeTable | None = None,
    ) -> None:
        self.devices: dict[str, DeviceState] = {}
        # The ids, sorted: a page of the listing is a bisect and a slice, not a sort.
        self._ids: list[str] = []
        self._online = 0
        # Labels by device: the config file's, and those set over the API (which
        # win field by field). Kept apart from the states: a device forgotten
        # for being unseen keeps its labels when it comes back.
        self.config_labels: dict[str, Labels] = dict(config_labels or {})
        self.api_labels: dict[str, Labels] = {}
        self.ranges = ranges
        self._latest_elsewhere: dict[str, TelemetryRecord] = {}

    def labels(self, device: str) -> Labels:
        """The device's labels: each field the API's value if set, else the config's."""
        api = self.api_labels.get(device)
        config = self.config_labels.get(device)
        if api is None and config is None:
            return no_labels()
        out = no_labels()
        for source in (config, api):
            if source:
                for key in LABEL_FIELDS:
                    if source.get(key) is not None:
                        out[key] = source[key]
        return out

    def entry(self, device: str) -> dict[str, Any] | None:
        """The device's listing entry, or None when unknown."""
        state = self.devices.get(device)
        return None if state is None else state.listing(self.labels(device), self.ranges)

    def load(self, records: list[DeviceRecord], latest: dict[str, TelemetryRecord]) -> None:
        """Fill the registry from what the engine kept (at start)."""
        for r in records:
            self.devices[r.device] = DeviceState(
                device=r.device,
                protocol=r.protocol,
                transport=r.transport,
                first_seen=r.first_seen_ms,
                last_seen=r.last_seen_ms,
                offline_since=r.last_seen_ms,
                offline_reason=r.offline_reason,
            )
        self._ids = sorted(self.devices)
        for device, rec in latest.items():
            state = self.devices.get(device)
            if state is not None:
                state.last = rec
            else:
                # Another cluster node's device (its history is replicated
                # here): its ``last`` once ``remote`` learns of it.
                self._latest_elsewhere[device] = rec

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
        state.offline_since = state.offline_reason = None
        return state

    def offline(
        self, info: DeviceInfo, now_ms: int, reason: str | None = None
    ) -> DeviceState | None:
        """A session ended (for ``reason``); None when it was an older session (the
        device moved on)."""
        state = self.devices.get(info.client_id)
        if state is None or state.session != info.session or not state.online:
            return None
        state.online = False
        state.last_seen = now_ms
        state.offline_since = now_ms
        state.offline_reason = reason
        self._online -= 1
        return state

    def remote(
        self,
        device: str,
        protocol: str,
        node: str,
        online: bool,
        ts: int,
        reason: str,
        transport: str | None,
    ) -> DeviceState | None:
        """Another cluster node says a device it holds came or went (docs/cluster.md).

        Returns the state, or None for an offline from a node that no longer
        holds the device (it moved on: fencing already dropped most of those).
        """
        state = self.devices.get(device)
        if state is None:
            state = DeviceState(device, protocol, first_seen=ts)
            state.last = self._latest_elsewhere.pop(device, None)
            self.devices[device] = state
            bisect.insort(self._ids, device)
        elif not online and state.online and state.node != node:
            return None
        if online and not state.online:
            self._online += 1
        elif not online and state.online:
            self._online -= 1
        if protocol:
            state.protocol = protocol
        state.node = node
        state.online = online
        # A session of this node's for the device is not this one: its later
        # offline (the takeover closing it) changes nothing.
        state.session = None
        if transport:
            state.transport = transport
        state.last_seen = ts
        if online:
            state.connected_at = ts
            state.offline_since = state.offline_reason = None
        else:
            state.offline_since = ts
            state.offline_reason = reason
        return state

    def telemetry(self, rec: TelemetryRecord, out_of_range: bool = False) -> None:
        """The device's latest value and when it was last heard; counted."""
        state = self.devices.get(rec.device)
        if state is not None:
            state.last = rec
            state.last_seen = rec.ts
            state.telemetry_count += 1
            if out_of_range:
                state.out_of_range_count += 1

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
        return [self.devices[k].listing(self.labels(k), self.ranges) for k in self._ids]

    def page(self, after: str | None, limit: int) -> tuple[list[dict[str, Any]], str | None]:
        """Up to ``limit`` devices with ids above ``after`` (all when None), by id.

        Returns the entries and the id to ask ``after`` next, None when no
        device is left (docs/api.md §3.2 ``devices``).
        """
        ids = self._ids
        start = 0 if after is None else bisect.bisect_right(ids, after)
        chosen = ids[start : start + limit]
        more = start + limit < len(ids)
        entries = [self.devices[k].listing(self.labels(k), self.ranges) for k in chosen]
        return entries, chosen[-1] if more and chosen else None

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

    def restore(self, state: DeviceState) -> None:
        """Know ``state`` again (a deletion the storage could not carry out), unless
        its device came back meanwhile."""
        if state.device in self.devices:
            return
        self.devices[state.device] = state
        bisect.insort(self._ids, state.device)
        if state.online:
            self._online += 1
