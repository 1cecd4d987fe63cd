"""The link layer: frames on a byte stream (docs/protocol.md §1-2), sans-IO.

The frame layout lives here once, as a ``construct`` definition::

    offset  size  field
    0       2     header   0xAA 0xAA
    2       1     length   N = payload length, 0..255
    3       N     payload  a message (docs/protocol.md §3)
    3+N     C     crc      CRC of [2, 3+N) (or [0, 3+N) when the header is
                           covered), C = CRC width (2 for CRC-16), low byte first

``FrameDecoder`` turns any byte stream, in any chunks, into ``Frame`` and
``Discarded`` events. It never raises on input and never holds more than one
maximal frame plus the chunk being fed. Nothing here touches a socket or a
clock: the caller passes the time in when it wants frame timeouts.
"""

from __future__ import annotations

import enum
import functools
import struct
from dataclasses import dataclass
from typing import Any, Final, Literal

from construct import BytesInteger, Const, GreedyBytes, Int8ub, Prefixed, Struct

from .errors import LocalProtocolError
from .options import DEFAULT_OPTIONS, FrameOptions, crc_function

HEADER: Final = b"\xaa\xaa"
HEADER_SIZE: Final = len(HEADER)
LENGTH_SIZE: Final = 1
PREFIX_SIZE: Final = HEADER_SIZE + LENGTH_SIZE  # header + length, before the payload
MAX_PAYLOAD: Final = 255


# The length byte and the payload it counts: the part of the frame every CRC
# option covers. It is a field of the frame struct below, and the decoder
# parses just this span once the CRC over it has matched.
PAYLOAD_FIELD: Final = Prefixed(Int8ub, GreedyBytes)
_PAYLOAD_PARSER: Final = PAYLOAD_FIELD.compile()


@functools.cache
def frame_struct(options: FrameOptions = DEFAULT_OPTIONS) -> Any:
    """The compiled ``construct`` definition of a frame for these options.

    Parsing it yields ``header``, ``payload`` and ``crc``; it does not check
    the CRC (the decoder does that on its buffer, at C speed, before it parses).
    """
    return Struct(
        "header" / Const(HEADER),
        "payload" / PAYLOAD_FIELD,
        "crc" / BytesInteger(options.crc_size, swapped=options.crc_byteorder == "little"),
    ).compile()


def max_frame_size(options: FrameOptions = DEFAULT_OPTIONS) -> int:
    """Largest frame these options allow (260 bytes with a 16-bit CRC)."""
    return PREFIX_SIZE + MAX_PAYLOAD + options.crc_size


def encode_frame(payload: bytes, options: FrameOptions | None = None) -> bytes:
    """Wrap ``payload`` (0..255 bytes) in a frame: header, length, payload, CRC."""
    opts = options or DEFAULT_OPTIONS
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise LocalProtocolError(f"payload must be bytes, not {type(payload).__name__}")
    payload = bytes(payload)
    if len(payload) > MAX_PAYLOAD:
        raise LocalProtocolError(
            f"payload is {len(payload)} bytes; a frame carries at most {MAX_PAYLOAD}"
        )
    covered = (HEADER if opts.crc_covers_header else b"") + bytes((len(payload),)) + payload
    crc = crc_function(opts.crc)[0](covered)
    result: bytes = frame_struct(opts).build({"payload": payload, "crc": crc})
    return result


class DiscardReason(enum.StrEnum):
    """Why the decoder dropped bytes."""

    SKIPPED = "skipped"  # bytes before a header
    CRC = "crc"  # a frame whose CRC did not match: its first header byte is dropped
    TIMEOUT = "timeout"  # a partial frame waited longer than the frame timeout


@dataclass(frozen=True, slots=True)
class Frame:
    """A frame whose CRC matched."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class Discarded:
    """``nbytes`` bytes of the stream were dropped, for ``reason``."""

    nbytes: int
    reason: DiscardReason


DecoderEvent = Frame | Discarded


class FrameDecoder:
    """Reads frames from a byte stream fed in arbitrary chunks (docs/protocol.md §2).

    ``feed(data, now)`` returns, in stream order, the events the data completes.
    Bad input becomes ``Discarded`` events and counters, never an exception.

    Frame timeout: when ``frame_timeout`` is set and the caller passes ``now``
    (any monotonic clock, in seconds), a partial frame that has waited longer
    than the timeout is abandoned as a CRC error would be: its first byte is
    dropped and the rest rescanned. ``deadline`` tells the caller when to call
    ``expire(now)`` if no more data comes.
    """

    def __init__(
        self, options: FrameOptions | None = None, *, frame_timeout: float | None = None
    ) -> None:
        self.options = options or DEFAULT_OPTIONS
        self.frame_timeout = frame_timeout
        self._checksum, self._crc_size = crc_function(self.options.crc)
        self._crc_start = 0 if self.options.crc_covers_header else HEADER_SIZE
        order = "<" if self.options.crc_byteorder == "little" else ">"
        fmt = {1: "B", 2: "H", 4: "I", 8: "Q"}.get(self._crc_size)
        self._crc_unpack = struct.Struct(order + fmt).unpack_from if fmt else None
        self._crc_little = self.options.crc_byteorder == "little"
        self._buf = bytearray()
        # When the partial frame at the start of the buffer was first seen.
        self._partial_since: float | None = None
        self.frames = 0
        self.crc_errors = 0
        self.timeouts = 0
        self.skipped_bytes = 0
        self.max_buffered = 0

    @property
    def buffered(self) -> int:
        """Bytes held back, waiting for the rest of a frame."""
        return len(self._buf)

    @property
    def deadline(self) -> float | None:
        """Clock value at which the held partial frame times out, or None."""
        if self.frame_timeout is None or self._partial_since is None:
            return None
        return self._partial_since + self.frame_timeout

    def feed(
        self, data: bytes | bytearray | memoryview, now: float | None = None
    ) -> list[DecoderEvent]:
        """Add ``data`` to the stream; return the frames and discards it completes."""
        events: list[DecoderEvent] = []
        # Tested here, not only in _expire_into: most reads hold no partial frame,
        # and this runs once per read.
        if now is not None and self._partial_since is not None:
            self._expire_into(events, now)
        if data:
            self._buf += data
            if len(self._buf) > self.max_buffered:
                self.max_buffered = len(self._buf)
            self._scan(events, now)
        return events

    def expire(self, now: float) -> list[DecoderEvent]:
        """Abandon a partial frame older than the frame timeout; return what that frees."""
        events: list[DecoderEvent] = []
        self._expire_into(events, now)
        return events

    def _expire_into(self, events: list[DecoderEvent], now: float) -> None:
        deadline = self.deadline
        if deadline is None or now <= deadline:
            return
        self.timeouts += 1
        events.append(Discarded(1, DiscardReason.TIMEOUT))
        del self._buf[:1]
        self._partial_since = None
        # Whatever follows the dropped byte arrived before `now`; a partial frame
        # found in it starts its own wait now.
        self._scan(events, now)

    def _scan(self, events: list[DecoderEvent], now: float | None) -> None:
        buf = self._buf
        n = len(buf)
        pos = 0
        crc_size = self._crc_size
        crc_start = self._crc_start
        parse_payload = _PAYLOAD_PARSER.parse
        checksum = self._checksum
        unpack = self._crc_unpack
        order: Literal["little", "big"] = "little" if self._crc_little else "big"
        view = memoryview(buf)
        try:
            while True:
                start = buf.find(HEADER, pos)
                if start < 0:
                    # Keep a trailing 0xAA: it may be the first half of a header.
                    keep = 1 if n > pos and buf[n - 1] == 0xAA else 0
                    if n - keep > pos:
                        self._skip(events, n - keep - pos)
                    pos = n - keep
                    self._partial_since = None
                    break
                if start > pos:
                    self._skip(events, start - pos)
                    pos = start
                if n - pos < PREFIX_SIZE:
                    self._hold(now, pos)
                    break
                body_end = pos + PREFIX_SIZE + buf[pos + HEADER_SIZE]
                end = body_end + crc_size
                if end > n:
                    self._hold(now, pos)
                    break
                received = (
                    unpack(buf, body_end)[0]
                    if unpack is not None
                    else int.from_bytes(view[body_end:end], order)
                )
                if checksum(view[pos + crc_start : body_end]) == received:
                    # The CRC has matched; construct reads the payload it covers.
                    events.append(Frame(parse_payload(view[pos + HEADER_SIZE : body_end])))
                    self.frames += 1
                    self._partial_since = None
                    pos = end
                else:
                    # Drop only the first header byte: a good frame may start
                    # inside the bytes of the one just rejected.
                    self.crc_errors += 1
                    events.append(Discarded(1, DiscardReason.CRC))
                    self._partial_since = None
                    pos += 1
        finally:
            view.release()
        if pos:
            del buf[:pos]

    def _hold(self, now: float | None, pos: int) -> None:
        # A partial frame sits at `pos`; it becomes the buffer's start. Its wait
        # starts when it is first seen there.
        if pos or self._partial_since is None:
            self._partial_since = now

    def _skip(self, events: list[DecoderEvent], nbytes: int) -> None:
        self.skipped_bytes += nbytes
        events.append(Discarded(nbytes, DiscardReason.SKIPPED))
