"""Per-link frame options and the one place where the CRC function is made.

docs/protocol.md §1 lets each link choose another CRC (any
``crcmod.predefined`` name), the CRC's byte order, and whether the header is
covered by it. The default is CRC-16/MODBUS, little-endian, header not covered.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import crcmod
import crcmod.predefined

from .errors import LocalProtocolError

log = logging.getLogger(__name__)

CrcFunction = Callable[[bytes | bytearray | memoryview], int]

DEFAULT_CRC = "modbus"


def _report_missing_extension() -> bool:
    """Say once in the log when crcmod runs in pure Python (5-20x slower)."""
    module = sys.modules.get("crcmod.crcmod")
    using_c = bool(getattr(module, "_usingExtension", False))
    if not using_c:
        log.warning(
            "crcmod's C extension is not in use: CRCs are computed in pure Python, "
            "5-20x slower. Install crcmod-plus, which ships prebuilt wheels."
        )
    return using_c


CRC_EXTENSION_IN_USE = _report_missing_extension()


@functools.cache
def crc_function(name: str) -> tuple[CrcFunction, int]:
    """Return ``(crc(data) -> int, width in bytes)`` for a ``crcmod.predefined`` name."""
    try:
        fn = crcmod.predefined.mkPredefinedCrcFun(name)
        definition = crcmod.predefined.PredefinedCrc(name)
    except KeyError:
        raise LocalProtocolError(
            f"unknown CRC {name!r}: use a crcmod.predefined name such as 'modbus' or 'crc-16'"
        ) from None
    width_bits: int = definition.digest_size * 8
    return fn, width_bits // 8


@dataclass(frozen=True, slots=True)
class FrameOptions:
    """How one link frames its bytes (docs/protocol.md §1).

    ``crc`` is a ``crcmod.predefined`` name; ``crc_byteorder`` is how the CRC is
    written on the wire; ``crc_covers_header`` adds the two ``0xAA`` bytes to
    the CRC's input.
    """

    crc: str = DEFAULT_CRC
    crc_byteorder: Literal["little", "big"] = "little"
    crc_covers_header: bool = False

    def __post_init__(self) -> None:
        if self.crc_byteorder not in ("little", "big"):
            raise LocalProtocolError(
                f"crc_byteorder must be 'little' or 'big', not {self.crc_byteorder!r}"
            )
        crc_function(self.crc)  # fail at configuration time, not at the first frame

    @property
    def crc_size(self) -> int:
        """Width of the CRC on the wire, in bytes."""
        return crc_function(self.crc)[1]

    def checksum(self, data: bytes | bytearray | memoryview) -> int:
        """The configured CRC of ``data``."""
        return crc_function(self.crc)[0](data)


DEFAULT_OPTIONS = FrameOptions()
