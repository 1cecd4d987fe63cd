"""The subscription index: which dashboards want a device's telemetry and presence.

Lookups are by device, by protocol, and "all" (docs/api.md §3.2), so routing
one message costs a few dict lookups whatever the number of dashboards.
"""

from __future__ import annotations

from collections.abc import Collection

from .dashboard import Dashboard
from .messages import Target, TargetKind


class SubscriptionIndex:
    """Dashboards by subscription target; a dashboard's own set mirrors its entries."""

    def __init__(self) -> None:
        self._by_device: dict[str, set[Dashboard]] = {}
        self._by_protocol: dict[str, set[Dashboard]] = {}
        self._all: set[Dashboard] = set()

    def _table(self, kind: TargetKind) -> dict[str, set[Dashboard]]:
        return self._by_device if kind is TargetKind.DEVICE else self._by_protocol

    def subscribe(self, d: Dashboard, target: Target) -> None:
        """Add ``target`` to ``d``'s subscriptions."""
        d.subscriptions.add(target)
        if target.kind is TargetKind.ALL:
            self._all.add(d)
        else:
            self._table(target.kind).setdefault(target.value, set()).add(d)

    def unsubscribe(self, d: Dashboard, target: Target) -> None:
        """Remove ``target`` from ``d``'s subscriptions (no error if absent)."""
        d.subscriptions.discard(target)
        if target.kind is TargetKind.ALL:
            self._all.discard(d)
            return
        table = self._table(target.kind)
        index = table.get(target.value)
        if index is not None:
            index.discard(d)
            if not index:
                del table[target.value]

    def remove(self, d: Dashboard) -> None:
        """Forget every subscription of ``d``."""
        for target in list(d.subscriptions):
            self.unsubscribe(d, target)

    def subscribers(self, device: str, protocol: str) -> Collection[Dashboard]:
        """Every dashboard subscribed to ``device``, ``protocol`` or all (each once)."""
        a = self._by_device.get(device)
        b = self._by_protocol.get(protocol)
        if not a and not b:
            return self._all
        out = set(self._all)
        if a:
            out |= a
        if b:
            out |= b
        return out

    def all_subscribers(self) -> Collection[Dashboard]:
        """Dashboards subscribed to everything."""
        return self._all

    def is_empty(self) -> bool:
        """True when no dashboard subscribes to anything."""
        return not (self._by_device or self._by_protocol or self._all)
