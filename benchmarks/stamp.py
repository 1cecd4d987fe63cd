"""A send time carried inside an env-sensor DATA body, so latency is measured on real telemetry.

The env-sensor body is 40 bits (i16 temperature, u16 humidity, u8 battery,
docs/protocols.md) and every bit pattern is valid. The load generator puts
the wall clock there, in units of 10 us modulo 2**40 (127 days); a dashboard on
the same machine reads it back from the telemetry JSON and takes the nearest
past time with those low bits. The gateway decodes the body with its real
env-sensor schema, so nothing in the pipeline is special-cased for the benchmark.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any, Final

UNIT_NS: Final = 10_000  # 10 us
WRAP: Final = 1 << 40
_BODY: Final = struct.Struct(">HHB")


def body(now_ns: int) -> bytes:
    """The 5-byte env-sensor DATA body that carries ``now_ns`` (``time.time_ns()``)."""
    t = (now_ns // UNIT_NS) % WRAP
    return _BODY.pack((t >> 24) & 0xFFFF, (t >> 8) & 0xFFFF, t & 0xFF)


def sent_ns(data: Mapping[str, Any], received_ns: int) -> int:
    """The send time inside telemetry ``data``, given when it was received (same clock)."""
    temp: int = round(data["temperature_c"] * 100) & 0xFFFF
    hum: int = round(data["humidity_pct"] * 100) & 0xFFFF
    battery: int = data["battery_pct"] & 0xFF
    t = (temp << 24) | (hum << 8) | battery
    now = received_ns // UNIT_NS
    return (now - ((now - t) % WRAP)) * UNIT_NS


def latency_us(data: Mapping[str, Any], received_ns: int) -> int:
    """Microseconds from the send time inside ``data`` to ``received_ns``."""
    return (received_ns - sent_ns(data, received_ns)) // 1000
