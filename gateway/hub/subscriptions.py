"""The subscription index: which dashboards want a device's telemetry and presence.

Lookups are by device, by protocol, and "all" (docs/api.md §3.2), so routing
one message costs a few dict lookups whatever the number of dashboards.

A parked dashboard (its telemetry queue full, docs/api.md §3.1 ``lagged``)
subscribed to everything and nothing else leaves the "all" set while it is
parked: every message is one it misses, so a count of the messages delivered
since it left says how many, and the fan-out does not touch it at all. Any
other parked dashboard stays, and the fan-out counts it with a flag check.
"""

from __future__ import annotations

from collections.abc import Collection

from .dashboard import Dashboard
from .messages import ALL, Target, TargetKind


class SubscriptionIndex:
    """Dashboards by subscription target; a dashboard's own set mirrors its entries."""

    def __init__(self) -> None:
        self._by_device: dict[str, set[Dashboard]] = {}
        self._by_protocol: dict[str, set[Dashboard]] = {}
        self._all: set[Dashboard] = set()
        #: Telemetry messages delivered so far (the hub counts each, subscribed to or not).
        self.delivered = 0
        #: Parked dashboards out of the "all" set, with ``delivered`` when they left.
        self.parked_all: dict[Dashboard, int] = {}

    def _table(self, kind: TargetKind) -> dict[str, set[Dashboard]]:
        return self._by_device if kind is TargetKind.DEVICE else self._by_protocol

    def leave(self, d: Dashboard) -> None:
        """``d`` has just parked: take it out of the fan-out if a count can stand for it.

        Only a dashboard subscribed to all and nothing else, with no replay
        holding live telemetry for it: each message delivered is then one it
        misses. Call it outside any iteration over ``subscribers()``.
        """
        if d.parked and d.subscriptions == _ONLY_ALL and not d.held.targets and d in self._all:
            self._all.discard(d)
            self.parked_all[d] = self.delivered

    def rejoin(self, d: Dashboard) -> None:
        """Back in the fan-out (it drained, or its subscriptions change): count what it missed."""
        left = self.parked_all.pop(d, None)
        if left is None:
            return
        if d.parked:  # not when it was let go meanwhile (``Dashboard.discard``)
            d.missed += self.delivered - left
        if ALL in d.subscriptions:
            self._all.add(d)

    def missed(self, d: Dashboard) -> int:
        """Telemetry ``d`` has missed since it parked, counted here or by the fan-out."""
        left = self.parked_all.get(d)
        return d.missed + (0 if left is None else self.delivered - left)

    def subscribe(self, d: Dashboard, target: Target) -> None:
        """Add ``target`` to ``d``'s subscriptions."""
        # Out of the "all" set, its count would stop being right with another target.
        self.rejoin(d)
        d.subscriptions.add(target)
        if target.kind is TargetKind.ALL:
            self._all.add(d)
        else:
            self._table(target.kind).setdefault(target.value, set()).add(d)

    def unsubscribe(self, d: Dashboard, target: Target) -> None:
        """Remove ``target`` from ``d``'s subscriptions (no error if absent)."""
        self.rejoin(d)
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
        """Every dashboard subscribed to ``device``, ``protocol`` or all (each once).

        For control messages (presence, labels, removals): never dropped, so
        dashboards parked out of the telemetry fan-out are in too.
        """
        out = self.telemetry_subscribers(device, protocol)
        if not self.parked_all:
            return out
        return {*out, *self.parked_all}

    def telemetry_subscribers(self, device: str, protocol: str) -> Collection[Dashboard]:
        """``subscribers`` less the dashboards parked out of the fan-out (``leave``).

        It may be the index's own set: do not change the index while iterating it.
        """
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
        """Dashboards subscribed to everything (parked or not)."""
        if not self.parked_all:
            return self._all
        return {*self._all, *self.parked_all}

    def is_empty(self) -> bool:
        """True when no dashboard subscribes to anything."""
        return not (self._by_device or self._by_protocol or self._all or self.parked_all)


_ONLY_ALL = frozenset({ALL})
