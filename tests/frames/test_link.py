"""The link layer: known-answer vectors, resync rules, timeouts and the memory bound."""

from __future__ import annotations

from collections.abc import Iterable

import pytest

from frames import (
    MAX_PAYLOAD,
    Discarded,
    DiscardReason,
    Frame,
    FrameDecoder,
    FrameOptions,
    LocalProtocolError,
    encode_frame,
    max_frame_size,
)
from frames.link import DecoderEvent

# docs/protocol.md §1: payload -> frame.
VECTORS = [
    ("", "aaaa00bf40"),
    ("01", "aaaa0101c1e0"),
    ("1007085911c661", "aaaa071007085911c661208b"),
]


def merge(events: Iterable[DecoderEvent]) -> list[DecoderEvent]:
    """Join adjacent discards of the same reason, so chunkings compare equal."""
    out: list[DecoderEvent] = []
    for ev in events:
        last = out[-1] if out else None
        if (
            isinstance(ev, Discarded)
            and isinstance(last, Discarded)
            and last.reason == ev.reason == DiscardReason.SKIPPED
        ):
            out[-1] = Discarded(last.nbytes + ev.nbytes, ev.reason)
        else:
            out.append(ev)
    return out


def feed_chunks(chunks: Iterable[bytes], decoder: FrameDecoder | None = None) -> list[DecoderEvent]:
    dec = decoder or FrameDecoder()
    events: list[DecoderEvent] = []
    for chunk in chunks:
        events += dec.feed(chunk)
    return merge(events)


def tr(data: bytes, expected: list[DecoderEvent]) -> None:
    """Check a case whole, one byte at a time, and followed by a trailing good frame
    (h11's `tr` habit): every way of delivering the bytes gives the same events."""
    assert feed_chunks([data]) == expected
    assert feed_chunks([data[i : i + 1] for i in range(len(data))]) == expected
    trailer = encode_frame(b"\x03\x07")
    assert feed_chunks([data + trailer]) == [*expected, Frame(b"\x03\x07")]


@pytest.mark.parametrize(("payload", "frame"), VECTORS)
def test_known_answer_vectors(payload: str, frame: str) -> None:
    assert encode_frame(bytes.fromhex(payload)).hex() == frame
    tr(bytes.fromhex(frame), [Frame(bytes.fromhex(payload))])


def test_crc_check_value_is_modbus() -> None:
    assert FrameOptions().checksum(b"123456789") == 0x4B37


def test_payload_over_255_bytes_is_a_clear_error() -> None:
    encode_frame(bytes(MAX_PAYLOAD))
    with pytest.raises(LocalProtocolError, match="at most 255"):
        encode_frame(bytes(MAX_PAYLOAD + 1))


def test_payload_must_be_bytes() -> None:
    with pytest.raises(LocalProtocolError, match="bytes"):
        encode_frame("text")  # type: ignore[arg-type]


def test_leading_garbage_is_skipped_and_counted() -> None:
    frame = encode_frame(b"\x10\x01hi")
    tr(b"\x00\x01\x02" + frame, [Discarded(3, DiscardReason.SKIPPED), Frame(b"\x10\x01hi")])
    dec = FrameDecoder()
    dec.feed(b"\x00\x01\x02" + frame)
    assert (dec.frames, dec.skipped_bytes, dec.crc_errors) == (1, 3, 0)


def test_lone_aa_bytes_are_skipped() -> None:
    frame = encode_frame(b"\x03\x00")
    tr(b"\xaa\x00\xaa\x01" + frame, [Discarded(4, DiscardReason.SKIPPED), Frame(b"\x03\x00")])


def test_bad_crc_drops_one_byte_and_finds_frame_inside() -> None:
    # A frame whose length byte claims more than it has swallows a good frame;
    # the CRC fails and the good frame inside the rejected bytes is still found.
    inner = encode_frame(b"\x10\x05abc")
    outer = b"\xaa\xaa" + bytes([len(inner) + 1]) + b"\x00" + inner + b"\x00\x00"
    events = feed_chunks([outer])
    assert Frame(b"\x10\x05abc") in events
    assert events[0] == Discarded(1, DiscardReason.CRC)


def test_corrupted_frame_is_never_delivered() -> None:
    good = encode_frame(b"\x10\x01\x02\x03")
    bad = bytearray(good)
    bad[5] ^= 0x40
    events = feed_chunks([bytes(bad) + good])
    assert [e for e in events if isinstance(e, Frame)] == [Frame(b"\x10\x01\x02\x03")]
    dec = FrameDecoder()
    dec.feed(bytes(bad) + good)
    assert dec.crc_errors == 1
    assert dec.frames == 1


def test_frame_ending_in_aa_followed_by_frame() -> None:
    # Find a payload whose frame ends in 0xAA: its tail plus the next header
    # looks like a header, which must not stall the next frame.
    payload = next(p for i in range(65536) if encode_frame(p := i.to_bytes(2, "big"))[-1] == 0xAA)
    first = encode_frame(payload)
    second = encode_frame(b"\x10\x09")
    tr(first + second, [Frame(payload), Frame(b"\x10\x09")])


def test_frame_ending_in_aa_after_garbage_resyncs() -> None:
    payload = next(p for i in range(65536) if encode_frame(p := i.to_bytes(2, "big"))[-1] == 0xAA)
    stream = b"\x01" + encode_frame(payload) + encode_frame(b"\x10\x09") * 3
    events = feed_chunks([stream])
    assert [e for e in events if isinstance(e, Frame)] == [Frame(payload)] + [
        Frame(b"\x10\x09")
    ] * 3


def test_corrupted_length_is_released_by_frame_timeout() -> None:
    good = encode_frame(b"\x10\x01\x02")
    broken = bytearray(encode_frame(b"\x10\x00\x01"))
    broken[2] = 200  # the length now claims 200 bytes: the good frames are held back
    dec = FrameDecoder(frame_timeout=0.2)
    events = dec.feed(bytes(broken) + good * 2, now=10.0)
    assert not any(isinstance(e, Frame) for e in events)
    assert dec.deadline == pytest.approx(10.2)
    assert dec.expire(10.1) == []  # not yet
    events = dec.expire(10.3)
    assert events[0] == Discarded(1, DiscardReason.TIMEOUT)
    assert [e for e in events if isinstance(e, Frame)] == [Frame(b"\x10\x01\x02")] * 2
    assert dec.timeouts == 1
    assert dec.buffered == 0


def test_timeout_is_also_checked_when_data_arrives_late() -> None:
    dec = FrameDecoder(frame_timeout=1.0)
    frame = encode_frame(b"\x10\x01\x02\x03")
    assert dec.feed(frame[:4], now=0.0) == []
    events = dec.feed(frame[4:] + frame, now=5.0)
    assert events[0] == Discarded(1, DiscardReason.TIMEOUT)
    assert events[-1] == Frame(b"\x10\x01\x02\x03")


def test_timeout_clock_resets_for_each_new_partial_frame() -> None:
    dec = FrameDecoder(frame_timeout=1.0)
    frame = encode_frame(b"\x10\x01\x02\x03")
    dec.feed(frame, now=0.0)
    dec.feed(frame[:3], now=5.0)
    assert dec.deadline == pytest.approx(6.0)
    assert dec.feed(frame[3:], now=5.5) == [Frame(b"\x10\x01\x02\x03")]
    assert dec.deadline is None


def test_no_clock_means_no_timeouts() -> None:
    dec = FrameDecoder(frame_timeout=0.2)
    dec.feed(encode_frame(b"\x10\x01")[:4])
    assert dec.deadline is None


@pytest.mark.parametrize(
    "options",
    [
        FrameOptions(crc="crc-16"),
        FrameOptions(crc_byteorder="big"),
        FrameOptions(crc_covers_header=True),
        FrameOptions(crc="crc-32", crc_byteorder="big", crc_covers_header=True),
        FrameOptions(crc="crc-8"),
    ],
)
def test_other_crc_options_round_trip(options: FrameOptions) -> None:
    payloads = [b"", b"\x01", bytes(range(255))]
    stream = b"".join(encode_frame(p, options) for p in payloads)
    dec = FrameDecoder(options)
    events = [e for b in stream for e in dec.feed(bytes([b]))]
    assert events == [Frame(p) for p in payloads]
    assert len(encode_frame(b"", options)) == 3 + options.crc_size
    # A default decoder does not accept frames of another CRC (the header is
    # the same, so it sees CRC errors, never frames).
    if options != FrameOptions():
        assert not any(isinstance(e, Frame) for e in FrameDecoder().feed(stream))


def test_byteorder_and_header_coverage_change_the_crc_bytes() -> None:
    default = encode_frame(b"\x01")
    assert (
        encode_frame(b"\x01", FrameOptions(crc_byteorder="big"))
        == default[:-2] + default[-2:][::-1]
    )
    covered = encode_frame(b"\x01", FrameOptions(crc_covers_header=True))
    crc = FrameOptions().checksum(b"\xaa\xaa\x01\x01")
    assert covered[-2:] == crc.to_bytes(2, "little")


def test_bad_options_are_clear_errors() -> None:
    with pytest.raises(LocalProtocolError, match="unknown CRC 'nope'"):
        FrameOptions(crc="nope")
    with pytest.raises(LocalProtocolError, match="crc_byteorder"):
        FrameOptions(crc_byteorder="middle")  # type: ignore[arg-type]


def test_max_frame_size_is_260_by_default() -> None:
    assert max_frame_size() == 260
    assert len(encode_frame(bytes(255))) == 260


def test_memory_bound_under_a_flood_of_headers() -> None:
    # Headers with the largest length and never a good CRC: the worst case for
    # held bytes. After each feed, at most one maximal frame is held.
    dec = FrameDecoder()
    chunk = (b"\xaa\xaa\xff" + bytes(250)) * 16
    for _ in range(50):
        assert dec.feed(chunk) is not None
        assert dec.buffered < max_frame_size()
    assert dec.max_buffered <= max_frame_size() + len(chunk)
