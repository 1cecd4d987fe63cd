"""Value ranges: which telemetry values are outside what their device can measure.

A reading outside its field's range is kept and shown as sent, and flagged:
the telemetry message gains ``"out_of_range": [field, ...]`` (docs/api.md
§3.1). Each protocol declares its ranges (``frames.Protocol.ranges``); the
config file's ``[protocols.NAME.ranges]`` overrides them field by field
(docs/configuration.md). The check runs for every telemetry message, so the
table is built once: a protocol with no ranges costs one dict lookup.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from frames import get_protocol, known_protocols

# (field, low, high) for each checked field of one protocol.
Checks = tuple[tuple[str, float, float], ...]


class RangeTable:
    """The checked fields of each protocol, built-in ranges merged with the config's."""

    def __init__(
        self,
        overrides: Mapping[str, Mapping[str, tuple[float, float]]] | None = None,
        protocols: Iterable[str] | None = None,
    ) -> None:
        """``overrides``: protocol -> field -> (low, high), over the protocols' own.

        ``protocols``: the names to build for (default: every registered protocol);
        the overrides' names are added.
        """
        overrides = overrides or {}
        names = set(known_protocols() if protocols is None else protocols) | set(overrides)
        self._checks: dict[str, Checks] = {}
        for name in sorted(names):
            merged = {**get_protocol(name).ranges, **overrides.get(name, {})}
            checks = tuple(
                (field, float(low), float(high)) for field, (low, high) in sorted(merged.items())
            )
            if checks:
                self._checks[name] = checks

    def ranges(self, protocol: str) -> dict[str, tuple[float, float]]:
        """The ranges checked for ``protocol``, by field."""
        return {field: (low, high) for field, low, high in self._checks.get(protocol, ())}

    def check(self, protocol: str, data: Mapping[str, Any]) -> tuple[str, ...] | None:
        """The fields of ``data`` outside their range, by name; None when every one is in.

        Only numbers are checked (a bool is not one); a field that is missing or
        of another kind is not flagged here: its protocol's decoder is what
        says whether the DATA was well formed.
        """
        checks = self._checks.get(protocol)
        if checks is None:
            return None
        return flag(checks, data)

    @property
    def by_protocol(self) -> Mapping[str, Checks]:
        """The checks of each protocol that has ranges, for ``flag`` (the hot path looks
        the protocol up here and calls ``flag`` only when it has some)."""
        return self._checks


def flag(checks: Checks, data: Mapping[str, Any]) -> tuple[str, ...] | None:
    """The fields of ``data`` outside their range under ``checks`` (see ``RangeTable.check``)."""
    bad: tuple[str, ...] | None = None
    get = data.get
    for field, low, high in checks:
        value: Any = get(field)
        # The common case first: a number in its range. A missing field, a
        # string or a list cannot be compared (TypeError: not checked); a bool
        # can, and is left alone below. A NaN is in no range: it is flagged.
        try:
            if low <= value <= high:
                continue
        except TypeError:
            continue
        kind = type(value)
        if kind is int or kind is float:
            bad = (field,) if bad is None else (*bad, field)
    return bad
