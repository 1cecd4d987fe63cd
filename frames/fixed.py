"""The struct fast path: fixed-size DATA schemas decoded with precompiled ``struct.Struct``s.

construct parses every DATA body correctly but slowly; a schema of
fixed-size numbers (the common case) is decoded here instead, calling the same
adapters construct would, so values and types are identical (property tests
in tests/frames/test_protocols_fixed.py hold them to that). Anything else keeps
the construct path.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from construct import Construct, ConstructError, Flag, FormatField, Renamed, Struct

from .schema import Boolean, ChannelMask, Integer, Scaled

JsonObject = dict[str, Any]

# An adapter's ``_decode(obj, context, path)``, called with no context and no path.
_Decoder = Callable[[Any, Any, str], Any]

# Adapters the fast path may call outside construct: their ``_decode`` reads neither the
# context nor the path. Matched by exact type, since a subclass may override ``_decode``.
_CONTEXT_FREE_ADAPTERS: tuple[type, ...] = (Integer, Boolean, Scaled, ChannelMask)
_NATIVE_ORDER = "<" if sys.byteorder == "little" else ">"


@dataclass(frozen=True, slots=True)
class FixedLayout:
    """A DATA schema of fixed-size numbers, decoded with precompiled ``struct.Struct``s.

    ``unpack`` gives each field's raw value as construct's ``FormatField`` (or ``Flag``)
    would; ``fields`` names each one with its adapters' ``_decode`` (None if it has
    none): the functions construct calls, so the values and their types are the same.
    """

    size: int
    unpack: Callable[[bytes], tuple[Any, ...]]
    fields: tuple[tuple[str, _Decoder | None], ...]

    def decode(self, body: bytes) -> JsonObject:
        """``body`` (exactly ``size`` bytes) -> values; an adapter may raise ConstructError."""
        values: JsonObject = {}
        for (name, decode), value in zip(self.fields, self.unpack(body), strict=True):
            values[name] = value if decode is None else decode(value, None, "")
        return values


def static_size(schema: Construct) -> int | None:
    """The schema's size in bytes if it has one size, else None."""
    try:
        size: int = schema.sizeof()
    except ConstructError:  # SizeofError: variable size (or depends on the data)
        return None
    return size


def fixed_layout(data: Construct) -> FixedLayout | None:
    """The fixed layout of a DATA schema, or None when construct must decode it.

    Every field must be named (uniquely, and not ``_...``, which ``_to_json`` would
    drop) and be a ``FormatField`` or ``Flag`` under any number of ``Renamed`` and
    context-free adapters, with no ``parsed`` hook anywhere (a hook is user code
    that construct calls while parsing). Anything else keeps the construct path.
    """
    while type(data) is Renamed and data.parsed is None:
        data = data.subcon
    if type(data) is not Struct or data.parsed is not None:
        return None
    names: list[str] = []
    fields: list[tuple[str, _Decoder | None]] = []
    # Consecutive fields of one byte order share one struct; a field of one byte has none.
    runs: list[tuple[str | None, str]] = []
    for sc in data.subcons:
        name = sc.name
        if not isinstance(name, str) or not name or name.startswith("_") or name in names:
            return None
        found = _fixed_field(sc)
        if found is None:
            return None
        order, code, decode = found
        if struct.calcsize(">" + code) == 1:
            order = None
        elif order == "=":
            order = _NATIVE_ORDER  # "=" is native order with standard sizes, like "<" / ">"
        if runs and (order is None or runs[-1][0] in (None, order)):
            run_order, codes = runs[-1]
            runs[-1] = (run_order or order, codes + code)
        else:
            runs.append((order, code))
        names.append(name)
        fields.append((name, decode))
    # Standard sizes and no alignment padding: "<", ">" and "=" never insert any.
    structs = [struct.Struct((order or ">") + codes) for order, codes in runs]
    unpack: Callable[[bytes], tuple[Any, ...]]
    if len(structs) <= 1:
        unpack = (structs[0] if structs else struct.Struct(">")).unpack
    else:
        unpack = _unpack_runs(structs)
    return FixedLayout(sum(s.size for s in structs), unpack, tuple(fields))


def _fixed_field(sc: Construct) -> tuple[str | None, str, _Decoder | None] | None:
    """(byte order, struct code, its adapters' decoding) of one field, or None."""
    decode: _Decoder | None = None
    while True:
        if sc.parsed is not None:
            return None
        kind = type(sc)
        if kind is Renamed:
            sc = sc.subcon
        elif kind in _CONTEXT_FREE_ADAPTERS:
            # Walking inwards: this adapter decodes after the ones inside it.
            decode = sc._decode if decode is None else _then(sc._decode, decode)
            sc = sc.subcon
        else:
            break
    if kind is FormatField:
        return sc.fmtstr[0], sc.fmtstr[1:], decode
    if kind is type(Flag):
        # construct reads one byte and compares it with 0, as struct's "?" does.
        return None, "?", decode
    return None


def _then(first: _Decoder, outer: _Decoder) -> _Decoder:
    """``outer`` applied to what ``first`` decodes (a field under nested adapters)."""

    def decode(obj: Any, context: Any, path: str) -> Any:
        return outer(first(obj, context, path), context, path)

    return decode


def _unpack_runs(structs: list[struct.Struct]) -> Callable[[bytes], tuple[Any, ...]]:
    """One unpack over fields of mixed byte order: each run of one order at its offset."""
    parts: list[tuple[int, struct.Struct]] = []
    offset = 0
    for s in structs:
        parts.append((offset, s))
        offset += s.size

    def unpack(body: bytes) -> tuple[Any, ...]:
        values: tuple[Any, ...] = ()
        for at, part in parts:
            values += part.unpack_from(body, at)
        return values

    return unpack
