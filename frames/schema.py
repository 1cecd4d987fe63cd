"""Construct building blocks for protocol schemas: checked integers, flags, fixed point, masks.

They are what a protocol module (built-in or the user's own, docs/protocols.md)
writes its DATA and COMMAND schemas with; each refuses a JSON value of the
wrong kind when building, so a bad command is an error and never a wrong byte.
"""

from __future__ import annotations

from typing import Any

from construct import Adapter, Construct, ConstructError, Flag, Validator


class Integer(Validator):  # type: ignore[misc]
    """An integer field that refuses bools and floats and stays within [low, high]."""

    def __init__(self, subcon: Construct, low: int, high: int) -> None:
        super().__init__(subcon)
        self.low = low
        self.high = high

    def _validate(self, obj: Any, context: Any, path: str) -> bool:
        return isinstance(obj, int) and not isinstance(obj, bool) and self.low <= obj <= self.high


class Boolean(Validator):  # type: ignore[misc]
    """A one-byte flag that only accepts JSON true/false when building."""

    def __init__(self) -> None:
        super().__init__(Flag)

    def _validate(self, obj: Any, context: Any, path: str) -> bool:
        return isinstance(obj, bool)


class Scaled(Adapter):  # type: ignore[misc]
    """A fixed-point number: the wire carries ``round(value * factor)``."""

    def __init__(self, subcon: Construct, factor: int) -> None:
        super().__init__(subcon)
        self.factor = factor

    def _decode(self, obj: int, context: Any, path: str) -> float:
        return obj / self.factor

    def _encode(self, obj: Any, context: Any, path: str) -> int:
        if isinstance(obj, bool) or not isinstance(obj, int | float):
            raise ConstructError(f"expected a number, not {obj!r}", path=path)
        return round(obj * self.factor)


class ChannelMask(Adapter):  # type: ignore[misc]
    """A bitmask, bit i = channel i, shown as a list of ``count`` booleans."""

    def __init__(self, subcon: Construct, count: int) -> None:
        super().__init__(subcon)
        self.count = count

    def _decode(self, obj: int, context: Any, path: str) -> list[bool]:
        if obj >> self.count:
            raise ConstructError(f"bits above channel {self.count - 1} are set", path=path)
        return [bool(obj >> i & 1) for i in range(self.count)]

    def _encode(self, obj: Any, context: Any, path: str) -> int:
        if not isinstance(obj, list) or len(obj) != self.count:
            raise ConstructError(f"expected a list of {self.count} booleans", path=path)
        if not all(isinstance(v, bool) for v in obj):
            raise ConstructError("every channel must be true or false", path=path)
        return sum(1 << i for i, on in enumerate(obj) if on)
