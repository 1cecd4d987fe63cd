"""The struct fast path for fixed-size DATA schemas gives exactly what construct gives.

``ConstructProtocol.decode_data`` unpacks a right-sized body of a fixed-size schema
with a precompiled ``struct.Struct``; ``_decode_with_construct`` is the construct
decoding it replaces. Every test here compares the two, value by value and type by
type (NaN-aware, to the bit), and the errors message by message.
"""

from __future__ import annotations

import math
import struct
import sys
from collections.abc import Callable
from typing import Any, Literal

import pytest
from construct import (
    Array,
    Bytes,
    BytesInteger,
    Computed,
    Const,
    Construct,
    Enum,
    ExprAdapter,
    Flag,
    FormatField,
    Int8sb,
    Int8sl,
    Int8ub,
    Int8ul,
    Int16sb,
    Int16sl,
    Int16sn,
    Int16ub,
    Int16ul,
    Int16un,
    Int24ub,
    Int32sb,
    Int32sl,
    Int32ub,
    Int32ul,
    Int64sb,
    Int64sl,
    Int64ub,
    Int64ul,
    PaddedString,
    Padding,
    Renamed,
    Struct,
    this,
)
from hypothesis import example, given
from hypothesis import strategies as st

from frames import (
    Boolean,
    ChannelMask,
    ConstructProtocol,
    ErrorCode,
    Integer,
    RemoteProtocolError,
    Scaled,
    get_protocol,
    known_protocols,
)
from frames.protocols import _to_json

FLOATS = "efd"  # struct codes of construct's Float16*, Float32*, Float64*


def _outcome(decode: Callable[[bytes], Any], body: bytes) -> tuple[str, Any]:
    """What ``decode`` does with ``body``: its value, or its error as plain data."""
    try:
        return "value", decode(body)
    except RemoteProtocolError as e:
        return "error", (str(e), e.code, e.field)


def _interpreted(proto: ConstructProtocol) -> Callable[[bytes], Any]:
    """The interpreted construct struct through ``_to_json``, its errors as DATA errors."""

    def decode(body: bytes) -> Any:
        return _to_json(proto._parse_for_error(body)["values"])

    return decode


def assert_same(fast: Any, slow: Any) -> None:
    """Equal, of the same types throughout, floats equal to the bit (so NaN == NaN)."""
    assert type(fast) is type(slow), (fast, slow)
    if isinstance(fast, float):
        assert struct.pack("<d", fast) == struct.pack("<d", slow), (fast, slow)
    elif isinstance(fast, dict):
        assert list(fast) == list(slow)  # same keys, in the same order
        for key in fast:
            assert_same(fast[key], slow[key])
    elif isinstance(fast, list | tuple):
        assert len(fast) == len(slow)
        for a, b in zip(fast, slow, strict=True):
            assert_same(a, b)
    else:
        assert fast == slow


def assert_same_outcome(fast: tuple[str, Any], slow: tuple[str, Any], body: bytes) -> None:
    assert fast[0] == slow[0], (body.hex(), fast, slow)
    if fast[0] == "error":
        assert fast == slow  # the same message, code and field
    else:
        assert_same(fast[1], slow[1])


def assert_fast_equals_construct(proto: ConstructProtocol, body: bytes) -> None:
    """decode_data == the interpreted struct; for a right-sized body, == the compiled one."""
    fast = _outcome(proto.decode_data, body)
    assert_same_outcome(fast, _outcome(_interpreted(proto), body), body)
    if proto._fixed is not None and len(body) == proto._fixed.size:
        assert_same_outcome(fast, _outcome(proto._decode_with_construct, body), body)


def _schema(proto: ConstructProtocol) -> Construct:
    """The ``data`` schema given to the protocol (``proto.data`` adds ``Terminated``)."""
    return proto.data.subcons[0].subcon


def _leaf(sc: Construct) -> Construct:
    while hasattr(sc, "subcon"):
        sc = sc.subcon
    return sc


def _special_floats(fmtstr: str) -> list[bytes]:
    """NaNs (quiet, signalling, negative, with a payload), infinities, zeros, a subnormal."""
    width = struct.calcsize(fmtstr)
    orders: dict[str, Literal["little", "big"]] = {"<": "little", ">": "big", "=": sys.byteorder}
    order = orders[fmtstr[0]]
    exponent_bits = {2: 5, 4: 8, 8: 11}[width]
    mantissa_bits = width * 8 - 1 - exponent_bits
    exp_all_ones = ((1 << exponent_bits) - 1) << mantissa_bits
    sign = 1 << (width * 8 - 1)
    patterns = [
        exp_all_ones | 1 << (mantissa_bits - 1),  # quiet NaN
        exp_all_ones | 1,  # signalling NaN
        sign | exp_all_ones | 1 << (mantissa_bits - 1) | 0b1011,  # negative NaN with a payload
        exp_all_ones,  # +inf
        sign | exp_all_ones,  # -inf
        sign,  # -0.0
        1,  # the smallest subnormal
    ]
    return [p.to_bytes(width, order) for p in patterns]


@st.composite
def bodies(draw: st.DrawFn, proto: ConstructProtocol) -> bytes:
    """A body of the schema's size: random bytes, with special floats in float fields."""
    parts = []
    for sc in _schema(proto).subcons:
        leaf = _leaf(sc)
        size = sc.sizeof()
        fmtstr = getattr(leaf, "fmtstr", "")
        if fmtstr[1:] in tuple(FLOATS):
            parts.append(
                draw(
                    st.binary(min_size=size, max_size=size)
                    | st.sampled_from(_special_floats(fmtstr))
                )
            )
        else:
            parts.append(draw(st.binary(min_size=size, max_size=size)))
    return b"".join(parts)


# ---- schemas ----------------------------------------------------------------------------------

BIG = ConstructProtocol(
    "test-fixed-big",
    Struct(
        "u8" / Int8ub,
        "s8" / Int8sb,
        "u16" / Int16ub,
        "s16" / Int16sb,
        "u32" / Int32ub,
        "s32" / Int32sb,
        "u64" / Int64ub,
        "s64" / Int64sb,
        "f16" / FormatField(">", "e"),
        "f32" / FormatField(">", "f"),
        "f64" / FormatField(">", "d"),
        "flag" / Flag,
        "bool" / FormatField(">", "?"),
    ),
)

LITTLE = ConstructProtocol(
    "test-fixed-little",
    Struct(
        "u8" / Int8ul,
        "s8" / Int8sl,
        "u16" / Int16ul,
        "s16" / Int16sl,
        "u32" / Int32ul,
        "s32" / Int32sl,
        "u64" / Int64ul,
        "s64" / Int64sl,
        "f16" / FormatField("<", "e"),
        "f32" / FormatField("<", "f"),
        "f64" / FormatField("<", "d"),
        "flag" / Flag,
    ),
)

# Byte orders change field to field, one-byte fields between them (they have none).
MIXED_ORDERS = ConstructProtocol(
    "test-fixed-mixed",
    Struct(
        "a" / Int8ub,
        "b" / Int16ul,
        "c" / Int16ub,
        "d" / Flag,
        "e" / Int32sl,
        "f" / Int16un,
        "g" / Int16sn,
        "h" / FormatField(">", "f"),
        "i" / Int8sl,
        "j" / FormatField("<", "d"),
    ),
)

ADAPTED = ConstructProtocol(
    "test-fixed-adapted",
    Struct(
        "t" / Scaled(Int16sl, 100),
        "big" / Scaled(Int32ub, 1000),
        "float_scaled" / Scaled(FormatField(">", "f"), 4),
        "level" / Integer(Int16ul, 10, 1000),  # most raw values are out of range
        "count" / Integer(Int8ub, 0, 255),
        "on" / Boolean(),
        "mask12" / ChannelMask(Int16ub, 12),
        "mask8" / ChannelMask(Int8ub, 8),
        "nested" / Scaled(Integer(Int16ub, 0, 5000), 10),
        "doubly_named" / ("inner" / Int8ub),
        "documented" / Int16sb * "a field with docs",
    ),
)

# A right-sized body every field accepts.
ADAPTED_BODY = ADAPTED.encode_data(
    {
        "t": -1.5,
        "big": 70000.0,
        "float_scaled": 0.25,
        "level": 10,
        "count": 3,
        "on": True,
        "mask12": [False] * 12,
        "mask8": [True] * 8,
        "nested": 499.9,
        "doubly_named": 7,
        "documented": -2,
    }
)


# Every raw value refused: the error path on a right-sized body.
REFUSING = ConstructProtocol(
    "test-fixed-refusing", Struct("x" / Integer(FormatField(">", "f"), 0, 1))
)

EMPTY = ConstructProtocol("test-fixed-empty", Struct())

HAND_BUILT = [BIG, LITTLE, MIXED_ORDERS, ADAPTED, REFUSING, EMPTY]


def _builtin_protocols() -> list[ConstructProtocol]:
    found = [get_protocol(name) for name in known_protocols()]
    protos = [p for p in found if isinstance(p, ConstructProtocol)]
    assert {p.name for p in protos} >= {"env-sensor", "relay-4"}
    return protos


ALL = _builtin_protocols() + HAND_BUILT


# ---- equivalence ----------------------------------------------------------------------------


@pytest.mark.parametrize("proto", ALL, ids=lambda p: p.name)
def test_fixed_schemas_get_a_layout_of_their_size(proto: ConstructProtocol) -> None:
    assert proto._fixed is not None
    assert proto._fixed.size == _schema(proto).sizeof()


@pytest.mark.parametrize("proto", ALL, ids=lambda p: p.name)
@given(data=st.data())
def test_fast_path_equals_construct(proto: ConstructProtocol, data: st.DataObject) -> None:
    assert_fast_equals_construct(proto, data.draw(bodies(proto)))


@pytest.mark.parametrize("proto", ALL, ids=lambda p: p.name)
@given(body=st.binary(max_size=64))
@example(body=b"")
def test_any_length_equals_construct(proto: ConstructProtocol, body: bytes) -> None:
    assert_fast_equals_construct(proto, body)


@pytest.mark.parametrize("proto", ALL, ids=lambda p: p.name)
@given(data=st.data(), cut=st.integers(1, 3), extra=st.binary(min_size=1, max_size=3))
def test_a_byte_short_or_long_equals_construct(
    proto: ConstructProtocol, data: st.DataObject, cut: int, extra: bytes
) -> None:
    body = data.draw(bodies(proto))
    assert_fast_equals_construct(proto, body[:-cut])
    assert_fast_equals_construct(proto, body + extra)


def test_relay_every_byte() -> None:
    relay = get_protocol("relay-4")
    assert isinstance(relay, ConstructProtocol)
    for byte in range(256):
        assert_fast_equals_construct(relay, bytes((byte,)))


@pytest.mark.parametrize("proto", [BIG, LITTLE, MIXED_ORDERS], ids=lambda p: p.name)
def test_float_specials_keep_their_bits(proto: ConstructProtocol) -> None:
    assert proto._fixed is not None
    size = proto._fixed.size
    seen_nan = False
    for fill in (b"\x00", b"\xff", b"\x7f", b"\x80", b"\x01"):
        body = (fill * size)[:size]
        assert_fast_equals_construct(proto, body)
        values = proto.decode_data(body)
        seen_nan |= any(isinstance(v, float) and math.isnan(v) for v in values.values())
    assert seen_nan


def test_types_are_exact() -> None:
    body = ADAPTED_BODY
    values = ADAPTED.decode_data(body)
    assert_fast_equals_construct(ADAPTED, body)
    assert type(values["t"]) is float
    assert type(values["big"]) is float
    assert type(values["count"]) is int
    assert type(values["on"]) is bool
    assert values["mask8"] == [True] * 8
    assert values["nested"] == 499.9
    assert type(values["documented"]) is int
    big = BIG.decode_data(bytes(_schema(BIG).sizeof()))
    assert [type(v) for v in big.values()] == [int] * 8 + [float] * 3 + [bool] * 2


@pytest.mark.parametrize(
    ("proto", "body"),
    [(get_protocol("env-sensor"), bytes.fromhex("085911c661")), (ADAPTED, ADAPTED_BODY)],
    ids=["env-sensor", "adapted"],
)
def test_fast_path_does_not_call_construct(
    proto: ConstructProtocol, body: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = _interpreted(proto)(body)

    def refuse(body: bytes) -> Any:
        raise AssertionError("construct was called for a right-sized, valid body")

    monkeypatch.setattr(proto, "_decode_with_construct", refuse)
    monkeypatch.setattr(proto, "_parse_for_error", refuse)
    assert_same(proto.decode_data(body), expected)


# ---- errors: the construct path, as before -----------------------------------------------------


@pytest.mark.parametrize(
    ("name", "body", "message", "field"),
    [
        (
            "env-sensor",
            "",
            "env-sensor DATA does not fit its schema (0 bytes): "
            "stream read less than specified amount, expected 2, found 0",
            "data.temperature_c",
        ),
        (
            "env-sensor",
            "085911c6",
            "env-sensor DATA does not fit its schema (4 bytes): "
            "stream read less than specified amount, expected 1, found 0",
            "data.battery_pct",
        ),
        (
            "env-sensor",
            "085911c66100",
            "env-sensor DATA does not fit its schema (6 bytes): expected end of stream",
            "data",
        ),
        (
            "relay-4",
            "0100",
            "relay-4 DATA does not fit its schema (2 bytes): expected end of stream",
            "data",
        ),
        (
            "relay-4",
            "10",
            "relay-4 DATA does not fit its schema (1 bytes): bits above channel 3 are set",
            "data.channels",
        ),
    ],
)
def test_errors_are_unchanged(name: str, body: str, message: str, field: str) -> None:
    proto = get_protocol(name)
    with pytest.raises(RemoteProtocolError) as info:
        proto.decode_data(bytes.fromhex(body))
    assert str(info.value) == message
    assert info.value.code is ErrorCode.MALFORMED
    assert info.value.field == field


def test_a_refused_value_names_its_field() -> None:
    body = bytes(_schema(ADAPTED).sizeof())  # level 0 is below its 10..1000
    with pytest.raises(RemoteProtocolError) as info:
        ADAPTED.decode_data(body)
    assert info.value.field == "data.level"
    assert "object failed validation: 0" in str(info.value)


# ---- schemas the fast path leaves to construct ------------------------------------------------


class Percent(Integer):
    """A subclass: it could override ``_decode``, so it is not trusted."""


def _hook(obj: Any, context: Any) -> None:
    pass


UNSUPPORTED: list[tuple[str, Construct, bytes]] = [
    ("array", Struct("a" / Array(2, Int8ub)), b"\x01\x02"),
    ("bytes", Struct("raw" / Bytes(2)), b"\x01\x02"),
    ("string", Struct("s" / PaddedString(3, "ascii")), b"ab\x00"),
    ("nested", Struct("n" / Struct("x" / Int8ub)), b"\x05"),
    ("enum", Struct("e" / Enum(Int8ub, on=1, off=0)), b"\x01"),
    ("padding", Struct("x" / Int8ub, Padding(1)), b"\x05\x00"),
    ("const", Struct("magic" / Const(b"\xab"), "x" / Int8ub), b"\xab\x05"),
    ("computed", Struct("x" / Int8ub, "y" / Computed(lambda ctx: ctx.x * 2)), b"\x05"),
    ("int24", Struct("x" / Int24ub), b"\x00\x01\x02"),
    ("bytesinteger", Struct("x" / BytesInteger(3, swapped=True)), b"\x00\x01\x02"),
    (
        "expradapter",
        Struct("x" / ExprAdapter(Int16ub, lambda raw, ctx: raw / 10, lambda v, ctx: v)),
        b"\x01\xf4",
    ),
    ("subclass", Struct("x" / Percent(Int8ub, 0, 100)), b"\x05"),
    ("parsed hook", Struct("x" / Int8ub * _hook), b"\x05"),
    ("unnamed", Struct(Int8ub, "x" / Int8ub), b"\x01\x02"),
    ("private name", Struct("_x" / Int8ub, "y" / Int8ub), b"\x01\x02"),
    ("duplicate name", Struct("x" / Int8ub, "x" / Int16ub), b"\x01\x00\x02"),
    ("not a struct", Int8ub, b"\x05"),
    ("renamed with a hook", Renamed(Struct("x" / Int8ub), newparsed=_hook), b"\x05"),
]


@pytest.mark.parametrize(("label", "schema", "body"), UNSUPPORTED, ids=[u[0] for u in UNSUPPORTED])
def test_unsupported_schemas_get_no_layout_and_still_decode(
    label: str, schema: Construct, body: bytes
) -> None:
    proto = ConstructProtocol("test-unsupported", schema)
    assert proto._fixed is None
    assert_same(proto.decode_data(body), _to_json(proto.data.parse(body)["values"]))
    with pytest.raises(RemoteProtocolError) as info:
        proto.decode_data(body + b"\x00")
    assert info.value.field == "data"


# ---- short bodies that compiled construct got wrong --------------------------------------------


@pytest.mark.parametrize(
    ("schema", "body", "field"),
    [
        # Compiled construct read the missing Flag byte as True and accepted the body.
        (Struct("a" / Int8ub, "on" / Flag), b"\x01", "data.on"),
        # Compiled FormatField and Array raised struct.error, not a DATA error.
        (Struct("m" / Int16ub, "p" / Int8ub), b"", "data.m"),
        (Struct("m" / Int16ub, "p" / Int8ub), b"\x01\x02", "data.p"),
        (Struct("a" / Array(2, Int8ub)), b"\x01", "data.a"),
    ],
)
def test_short_bodies_are_malformed(schema: Construct, body: bytes, field: str) -> None:
    proto = ConstructProtocol("test-short", schema)
    with pytest.raises(RemoteProtocolError) as info:
        proto.decode_data(body)
    assert info.value.code is ErrorCode.MALFORMED
    assert info.value.field == field
    assert "stream read less than specified amount" in str(info.value)


@pytest.mark.parametrize(
    ("schema", "body"),
    [
        (Struct("raw" / Bytes(4)), b"\x01\x02"),  # compiled construct took 2 bytes for 4
        (Struct("x" / Int24ub), b"\x01"),
        (Struct("n" / Int8ub, "raw" / Bytes(this.n), "on" / Flag), b"\x01\xff"),  # no Flag byte
    ],
)
def test_a_short_body_is_malformed_whatever_the_schema(schema: Construct, body: bytes) -> None:
    proto = ConstructProtocol("short-test", schema)
    with pytest.raises(RemoteProtocolError) as info:
        proto.decode_data(body)
    assert info.value.code is ErrorCode.MALFORMED
