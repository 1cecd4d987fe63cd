"""Property tests of the decoder: any chunking, any garbage, any corruption."""

from __future__ import annotations

import itertools
import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from frames import Discarded, Frame, FrameDecoder, encode_frame, max_frame_size

payloads = st.lists(st.binary(max_size=255), max_size=20)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


@given(payloads, st.lists(st.integers(min_value=0), max_size=40))
def test_any_chunking_decodes_to_the_payloads(items: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(encode_frame(p) for p in items)
    dec = FrameDecoder()
    events = [e for chunk in chunked(stream, cuts) for e in dec.feed(chunk)]
    assert events == [Frame(p) for p in items]
    assert dec.buffered == 0


@given(st.lists(st.binary(max_size=700), max_size=30), st.floats(0, 100), st.floats(0, 5))
def test_random_bytes_never_raise_and_stay_bounded(
    chunks: list[bytes], start: float, step: float
) -> None:
    dec = FrameDecoder(frame_timeout=0.2)
    now = start
    consumed = 0
    for chunk in chunks:
        events = dec.feed(chunk, now=now)
        assert dec.buffered < max_frame_size()
        assert dec.max_buffered <= max_frame_size() + len(chunk)
        consumed += sum(e.nbytes for e in events if isinstance(e, Discarded))
        now += step
    # Every byte is accounted for: in a frame, discarded, or still held.
    framed = dec.frames
    assert framed >= 0
    assert consumed + dec.buffered <= sum(map(len, chunks))


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    st.lists(st.binary(min_size=0, max_size=60), min_size=1, max_size=40),
    st.integers(0, 2**32 - 1),
)
def test_corruption_and_garbage_lose_only_touched_frames(items: list[bytes], seed: int) -> None:
    rng = random.Random(seed)
    stream = bytearray()
    intact: list[bytes] = []
    for p in items:
        if rng.random() < 0.3:  # garbage between frames
            stream += bytes(rng.randrange(256) for _ in range(rng.randrange(1, 20)))
        frame = bytearray(encode_frame(p))
        if rng.random() < 0.2:  # corrupt this frame
            i = rng.randrange(len(frame))
            frame[i] ^= 1 << rng.randrange(8)
        else:
            intact.append(p)
        stream += frame
    dec = FrameDecoder(frame_timeout=1.0)
    data = bytes(stream)
    events = []
    pos = 0
    while pos < len(data):
        step = rng.randrange(1, 300)
        events += dec.feed(data[pos : pos + step], now=0.0)
        pos += step
    # The stream ends: a corrupted length byte may still hold good frames back
    # until the frame timeout releases them.
    while (deadline := dec.deadline) is not None:
        events += dec.expire(deadline + 1.0)
    got = [e.payload for e in events if isinstance(e, Frame)]
    # Every untouched frame is delivered, in order. A corrupted frame is never
    # delivered (a CRC-16 collision is possible in theory: allow a got item
    # that is not in `items` only if it is not from `intact`, i.e. check
    # `intact` is an ordered subsequence of `got`).
    it = iter(got)
    assert all(any(g == p for g in it) for p in intact), (intact, got)
    extra = len(got) - len(intact)
    assert extra <= 1  # CRC-16 collisions aside, nothing corrupted gets through
