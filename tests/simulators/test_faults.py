"""Each fault's transformation and counter, seeded, checked with the real frame decoder."""

from __future__ import annotations

import pytest

from frames import (
    Data,
    DecoderEvent,
    Discarded,
    DiscardReason,
    Frame,
    FrameDecoder,
    Hello,
    Message,
    Ping,
    decode_message,
    encode_frame,
)
from simulators import FaultInjector, Faults, FaultSpecError, parse_faults


def messages(n: int) -> list[Message]:
    """``n`` DATA messages of varied sizes (0..40 bytes of body)."""
    return [Data(i % 256, bytes((i + k) % 256 for k in range(i % 41))) for i in range(n)]


def payloads(msgs: list[Message]) -> list[bytes]:
    return [m.encode() for m in msgs]


def decode_all(chunks: list[bytes]) -> tuple[list[bytes], FrameDecoder]:
    """Feed ``chunks`` in order; then let any partial frame time out, so nothing stays held."""
    decoder = FrameDecoder(frame_timeout=1.0)
    events: list[DecoderEvent] = []
    for chunk in chunks:
        events += decoder.feed(chunk, now=0.0)
    now = 0.0
    while decoder.buffered and decoder.deadline is not None:
        now += 2.0
        events += decoder.expire(now)
    return [e.payload for e in events if isinstance(e, Frame)], decoder


def test_no_faults_means_one_clean_frame_per_write() -> None:
    inj = FaultInjector(Faults(), seed=1)
    msgs = messages(5)
    assert inj.outgoing(msgs, 0.0) == [encode_frame(p) for p in payloads(msgs)]
    assert inj.poll(100.0) == []
    assert inj.deadline is None
    assert not Faults().enabled
    assert Faults(split=True).enabled


def test_split_cuts_writes_into_chunks_that_decode_to_the_same_frames() -> None:
    inj = FaultInjector(Faults(split=True), seed=5)
    msgs = messages(200)
    chunks = inj.outgoing(msgs, 0.0)
    assert len(chunks) > 2 * len(msgs)
    assert inj.counters.chunks == len(chunks)
    assert 150 < inj.counters.splits <= 200  # a write may come out whole, by chance
    decoded, decoder = decode_all(chunks)
    assert decoded == payloads(msgs)
    assert decoder.crc_errors == decoder.skipped_bytes == 0


def test_split_is_deterministic_for_a_seed() -> None:
    msgs = messages(30)
    a = FaultInjector(Faults(split=True), seed=9).outgoing(msgs, 0.0)
    b = FaultInjector(Faults(split=True), seed=9).outgoing(msgs, 0.0)
    c = FaultInjector(Faults(split=True), seed=10).outgoing(msgs, 0.0)
    assert a == b
    assert a != c


def test_merge_writes_several_frames_at_once_and_flushes_late_ones() -> None:
    inj = FaultInjector(Faults(merge=3, merge_hold=2.0), seed=1)
    msgs = messages(7)
    frames = [encode_frame(p) for p in payloads(msgs)]
    writes = inj.outgoing(msgs[:5], 0.0)
    assert writes == [b"".join(frames[0:3])]  # two frames stay held
    assert inj.deadline == 2.0
    assert inj.poll(1.9) == []
    assert inj.outgoing(msgs[5:6], 1.0) == [b"".join(frames[3:6])]
    assert inj.deadline is None
    assert inj.outgoing(msgs[6:], 3.0) == []
    assert inj.deadline == 5.0
    assert inj.poll(5.0) == [frames[6]]  # alone: not a merged write
    assert inj.counters.merged_writes == 2
    assert inj.counters.merged_frames == 6


def test_merge_and_split_together_still_decode_to_every_frame() -> None:
    inj = FaultInjector(Faults(split=True, merge=4), seed=3)
    msgs = messages(101)
    chunks = inj.outgoing(msgs, 0.0) + inj.poll(10.0)
    decoded, _ = decode_all(chunks)
    assert decoded == payloads(msgs)
    assert inj.counters.merged_writes == 25  # 100 frames in fours; the last one alone
    assert inj.counters.merged_frames == 100


def test_flipped_bits_cause_crc_errors_and_only_the_hit_frames_are_lost() -> None:
    msgs = messages(400)
    clean = [encode_frame(p) for p in payloads(msgs)]
    inj = FaultInjector(Faults(flip=0.002), seed=11)
    writes = inj.outgoing(msgs, 0.0)
    hit = [w != c for w, c in zip(writes, clean, strict=True)]
    assert inj.counters.writes_corrupted == sum(hit)
    assert 20 < sum(hit) < 200
    assert inj.counters.bits_flipped >= sum(hit)
    assert (
        sum(
            bin(a ^ b).count("1")
            for w, c in zip(writes, clean, strict=True)
            for a, b in zip(w, c, strict=True)
        )
        == inj.counters.bits_flipped
    )
    decoded, decoder = decode_all(writes)
    # Every intact frame is still found, whatever the corrupt ones did to the stream.
    assert decoded == [p for p, bad in zip(payloads(msgs), hit, strict=True) if not bad]
    assert decoder.crc_errors + decoder.timeouts > 0


def test_flip_at_rate_one_inverts_every_bit() -> None:
    inj = FaultInjector(Faults(flip=1.0), seed=1)
    [write] = inj.outgoing([Ping(1)], 0.0)
    assert write == bytes(b ^ 0xFF for b in encode_frame(Ping(1).encode()))
    assert inj.counters.bits_flipped == 8 * len(write)


def test_garbage_between_frames_is_skipped_by_the_decoder() -> None:
    inj = FaultInjector(Faults(garbage=1.0), seed=2)
    msgs = messages(50)
    writes = inj.outgoing(msgs, 0.0)
    assert inj.counters.garbage_runs == 50
    assert sum(map(len, writes)) == inj.counters.garbage_bytes + sum(
        len(encode_frame(p)) for p in payloads(msgs)
    )
    decoded, decoder = decode_all(writes)
    assert decoded == payloads(msgs)
    assert decoder.skipped_bytes == inj.counters.garbage_bytes
    assert decoder.crc_errors == 0


def test_garbage_rate_is_a_probability_per_frame() -> None:
    inj = FaultInjector(Faults(garbage=0.1), seed=4)
    inj.outgoing(messages(1000), 0.0)
    assert 60 < inj.counters.garbage_runs < 140


def test_bad_token_spoils_only_the_first_hello() -> None:
    inj = FaultInjector(Faults(badtoken=True), seed=1)
    hello = Hello(0, "env-1", "env-sensor", "secret")
    [first] = inj.outgoing([hello], 0.0)
    sent = decode_message(first[3:-2])
    assert isinstance(sent, Hello)
    assert sent.client_id == "env-1"
    assert sent.token != "secret"
    assert inj.tampered_hello
    assert inj.counters.bad_tokens == 1
    [second] = inj.outgoing([hello], 5.0)
    assert second == encode_frame(hello.encode())
    assert not inj.tampered_hello
    assert inj.counters.bad_tokens == 1


def test_drop_cuts_the_link_at_seeded_random_times() -> None:
    def first_drop(seed: int) -> float:
        inj = FaultInjector(Faults(drop=0.5), seed=seed)
        inj.link_up(100.0)
        deadline = inj.deadline
        assert deadline is not None
        assert not inj.drop_due(deadline - 0.001)
        assert inj.drop_due(deadline)
        assert not inj.drop_due(deadline + 1)  # once per link
        assert inj.counters.drops == 1
        inj.link_up(deadline + 5)
        assert inj.deadline is not None
        return deadline - 100.0

    times = [first_drop(seed) for seed in range(200)]
    assert times[:3] == [first_drop(0), first_drop(1), first_drop(2)]
    assert 1.5 < sum(times) / len(times) < 2.5  # mean 1 / rate
    off = FaultInjector(Faults(), seed=0)
    off.link_up(0.0)
    assert not off.drop_due(1e9)


def test_silence_swallows_frames_for_its_duration_then_talk_resumes() -> None:
    inj = FaultInjector(Faults(silent=10.0), seed=6)
    inj.link_up(0.0)
    sent_at = [t for t in range(0, 60) if inj.outgoing([Ping(t)], float(t))]
    silent_at = sorted(set(range(60)) - set(sent_at))
    # Talk for 10..20 s, then exactly 10 s of silence, then talk again.
    assert 10 <= silent_at[0] <= 21
    assert silent_at[:10] == list(range(silent_at[0], silent_at[0] + 10))
    assert silent_at[0] + 10 in sent_at
    assert inj.counters.frames_silenced == len(silent_at)
    assert inj.counters.silences == len(silent_at) // 10 + (len(silent_at) % 10 > 0)


def test_counters_add_up() -> None:
    a = FaultInjector(Faults(garbage=1.0), seed=1)
    a.outgoing(messages(3), 0.0)
    total = FaultInjector(Faults(), seed=1).counters
    total.add(a.counters)
    total.add(a.counters)
    assert total.garbage_runs == 6


# ---- the --faults spec -----------------------------------------------------------------------


def test_parse_the_documented_example() -> None:
    spec = "split,merge,flip=0.001,garbage=0.05,drop=0.01,silent=30,badtoken"
    faults = parse_faults(spec)
    assert faults == Faults(
        split=True, merge=3, flip=0.001, garbage=0.05, drop=0.01, silent=30.0, badtoken=True
    )
    assert parse_faults(faults.describe()) == faults


def test_parse_defaults_and_none() -> None:
    assert parse_faults("") == Faults()
    assert parse_faults("none") == Faults()
    assert Faults().describe() == "none"
    assert parse_faults(" flip , merge=5 ") == Faults(flip=0.001, merge=5)
    assert parse_faults("silent").silent == 120.0
    assert parse_faults("garbage").garbage == 0.05
    assert parse_faults("drop").drop == 0.01


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("splat", "unknown fault 'splat'; known faults: badtoken, drop, flip"),
        ("flip=abc", "flip takes a number, not 'abc'"),
        ("flip=1.5", r"flip must be in \(0, 1\], not 1.5"),
        ("garbage=0", r"garbage must be in \(0, 1\]"),
        ("drop=-1", "drop must be > 0"),
        ("silent=inf", "silent must be > 0"),
        ("merge=1", "merge needs at least 2 frames"),
        ("merge=two", "merge takes a whole number"),
        ("split=3", "'split' takes no value"),
        ("badtoken=yes", "'badtoken' takes no value"),
        ("flip=", "has '=' but no value"),
        ("split,,flip", "empty fault name"),
        ("split,split", "given twice"),
    ],
)
def test_parse_errors_say_what_is_wrong(spec: str, message: str) -> None:
    with pytest.raises(FaultSpecError, match=message):
        parse_faults(spec)


def test_faults_refuse_impossible_settings() -> None:
    with pytest.raises(ValueError, match="probability"):
        Faults(flip=2.0)
    with pytest.raises(ValueError, match="drop"):
        Faults(drop=-1.0)
    with pytest.raises(ValueError, match="merge"):
        Faults(merge=-1)


def test_discard_events_name_the_garbage() -> None:
    # The gateway's decoder reports garbage as "skipped", not as CRC errors.
    inj = FaultInjector(Faults(garbage=1.0), seed=8)
    [write] = inj.outgoing([Ping(1)], 0.0)
    events = FrameDecoder().feed(write)
    assert isinstance(events[0], Discarded)
    assert events[0].reason is DiscardReason.SKIPPED
    assert events[1] == Frame(Ping(1).encode())
