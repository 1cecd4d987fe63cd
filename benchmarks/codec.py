"""Measured claim: how fast the frame codec decodes and encodes, against two baselines.

Run it with ``.venv/bin/python benchmarks/codec.py`` (``--quick`` for a short
run). It times, in one process and on the same streams:

* ``ours``: ``frames.FrameDecoder`` / ``frames.encode_frame``;
* ``naive``: an interpreted (not compiled) ``construct`` Struct that checks the
  CRC itself with ``Checksum`` + ``RawCopy``, tried with ``.parse`` at every
  ``0xAA 0xAA`` found by a byte-by-byte loop;
* ``hand``: a hand-written ``bytes.find`` + ``struct`` + crcmod-on-memoryview
  decoder, the pure-Python ceiling.

All three follow docs/protocol.md §2: skip to a header, wait for the whole
frame, on a CRC error drop one byte and scan again. Streams are cut in
4096-byte chunks; the corrupted streams have one random bit flipped in 1% of
their bytes (seeded). Every payload starts with its frame's index, so each
delivered frame is traced back to the one sent, or counted as a false accept.
Figures go to the terminal and to ``benchmarks/results/codec.json``.
"""

from __future__ import annotations

import argparse
import bisect
import gc
import json
import os
import platform
import random
import statistics
import struct
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Protocol

import construct
import crcmod.predefined
from construct import (
    Bytes,
    Checksum,
    ChecksumError,
    Const,
    ConstructError,
    Int8ub,
    Int16ul,
    RawCopy,
    Rebuild,
    StreamError,
    Struct,
    len_,
    this,
)

import frames

HEADER: Final = b"\xaa\xaa"
MAX_FRAME: Final = 260  # header 2 + length 1 + payload 255 + CRC 2
CHUNK: Final = 4096
SIZES: Final = (8, 64, 255)
CORRUPTION: Final = 0.01
INDEX_BYTES: Final = 4  # every payload starts with its frame's index, big-endian
RESULTS: Final = Path(__file__).resolve().parent / "results" / "codec.json"

# The same CRC-16/MODBUS the project uses, made here independently of frames/.
MODBUS: Final = crcmod.predefined.mkPredefinedCrcFun("modbus")
CRC_LE: Final = struct.Struct("<H")


# ---- baseline (a): interpreted construct, CRC checked by construct itself -------------------

NAIVE_FRAME: Final[Any] = Struct(
    "header" / Const(HEADER),
    "body"
    / RawCopy(
        Struct(
            "length" / Rebuild(Int8ub, len_(this.payload)),
            "payload" / Bytes(this.length),
        )
    ),
    "crc" / Checksum(Int16ul, MODBUS, this.body.data),
)


class NaiveConstructDecoder:
    """Tries ``NAIVE_FRAME.parse`` at each header a byte-by-byte loop finds."""

    def __init__(self) -> None:
        self._buf = b""
        self.frames = 0
        self.crc_errors = 0
        self.skipped_bytes = 0

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf + data
        n = len(buf)
        out: list[bytes] = []
        i = 0
        while i + 1 < n:
            if buf[i] == 0xAA and buf[i + 1] == 0xAA:
                try:
                    parsed = NAIVE_FRAME.parse(buf[i : i + MAX_FRAME])
                except StreamError:
                    break  # not all there yet: wait for more bytes
                except (ChecksumError, ConstructError):
                    self.crc_errors += 1
                    i += 1
                    continue
                payload: bytes = parsed.body.value.payload
                out.append(payload)
                self.frames += 1
                i += 5 + len(payload)
            else:
                self.skipped_bytes += 1
                i += 1
        if i == n - 1 and buf[i] != 0xAA:
            self.skipped_bytes += 1
            i += 1
        self._buf = buf[i:]
        return out


def naive_encode(payload: bytes) -> bytes:
    built: bytes = NAIVE_FRAME.build({"body": {"value": {"payload": payload}}, "crc": None})
    return built


# ---- baseline (b): hand-written, the pure-Python ceiling ------------------------------------


class HandWrittenDecoder:
    """``bytes.find`` for the header, ``struct`` for the CRC, crcmod on a memoryview."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self.frames = 0
        self.crc_errors = 0
        self.skipped_bytes = 0

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf
        buf += data
        n = len(buf)
        out: list[bytes] = []
        pos = 0
        crc = MODBUS
        unpack = CRC_LE.unpack_from
        view = memoryview(buf)
        try:
            while True:
                start = buf.find(HEADER, pos)
                if start < 0:
                    keep = 1 if n > pos and buf[n - 1] == 0xAA else 0
                    self.skipped_bytes += n - keep - pos
                    pos = n - keep
                    break
                self.skipped_bytes += start - pos
                pos = start
                if pos + 3 > n:
                    break
                body_end = pos + 3 + buf[pos + 2]
                if body_end + 2 > n:
                    break
                if crc(view[pos + 2 : body_end]) == unpack(buf, body_end)[0]:
                    out.append(bytes(view[pos + 3 : body_end]))
                    self.frames += 1
                    pos = body_end + 2
                else:
                    self.crc_errors += 1
                    pos += 1
        finally:
            view.release()
        del buf[:pos]
        return out


def hand_encode(payload: bytes) -> bytes:
    body = bytes((len(payload),)) + payload
    return HEADER + body + CRC_LE.pack(MODBUS(body))


# ---- the decoders and encoders under test ---------------------------------------------------


class StreamDecoder(Protocol):
    frames: int
    crc_errors: int
    skipped_bytes: int

    def feed(self, data: bytes) -> Sequence[object]: ...


def _our_payloads(events: list[Any]) -> list[bytes]:
    return [e.payload for e in events if isinstance(e, frames.Frame)]


def _plain_payloads(events: list[Any]) -> list[bytes]:
    return list(events)


@dataclass(frozen=True, slots=True)
class DecoderKind:
    name: str
    make: Callable[[], StreamDecoder]
    payloads: Callable[[list[Any]], list[bytes]]


DECODERS: Final = (
    DecoderKind("ours", frames.FrameDecoder, _our_payloads),
    DecoderKind("naive", NaiveConstructDecoder, _plain_payloads),
    DecoderKind("hand", HandWrittenDecoder, _plain_payloads),
)

ENCODERS: Final[tuple[tuple[str, Callable[[bytes], bytes]], ...]] = (
    ("ours", frames.encode_frame),
    ("naive", naive_encode),
    ("hand", hand_encode),
)


# ---- streams --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Stream:
    sent: list[bytes]  # payloads, in order
    intact: list[bool]  # frame i reached the decoder untouched
    chunks: list[bytes]
    nbytes: int
    flipped: int  # bytes with a flipped bit


def make_payloads(rng: random.Random, count: int, size: int | None) -> list[bytes]:
    """``count`` payloads of ``size`` bytes (random 4..255 when None), index first."""
    out = []
    for i in range(count):
        n = size if size is not None else rng.randint(INDEX_BYTES, 255)
        out.append(i.to_bytes(INDEX_BYTES, "big") + rng.randbytes(n - INDEX_BYTES))
    return out


def make_stream(rng: random.Random, sent: list[bytes], corruption: float) -> Stream:
    encoded = [frames.encode_frame(p) for p in sent]
    starts = []
    offset = 0
    for f in encoded:
        starts.append(offset)
        offset += len(f)
    data = bytearray(b"".join(encoded))
    flipped = sorted(rng.sample(range(len(data)), round(len(data) * corruption)))
    for at in flipped:
        data[at] ^= 1 << rng.randrange(8)
    intact = []
    for start, f in zip(starts, encoded, strict=True):
        first_hit = bisect.bisect_left(flipped, start)
        intact.append(first_hit == len(flipped) or flipped[first_hit] >= start + len(f))
    raw = bytes(data)
    chunks = [raw[i : i + CHUNK] for i in range(0, len(raw), CHUNK)]
    return Stream(sent, intact, chunks, len(raw), len(flipped))


@dataclass(frozen=True, slots=True)
class Score:
    delivered: int
    recovered: int  # sent frames delivered exactly once
    intact_recovered: int
    intact_sent: int
    false_accepts: int  # delivered frames that were not sent (or sent once, delivered twice)


def score(delivered: list[bytes], stream: Stream) -> Score:
    seen = bytearray(len(stream.sent))
    recovered = intact_recovered = false_accepts = 0
    for payload in delivered:
        index = int.from_bytes(payload[:INDEX_BYTES]) if len(payload) >= INDEX_BYTES else -1
        if 0 <= index < len(stream.sent) and stream.sent[index] == payload and not seen[index]:
            seen[index] = 1
            recovered += 1
            intact_recovered += stream.intact[index]
        else:
            false_accepts += 1
    return Score(len(delivered), recovered, intact_recovered, sum(stream.intact), false_accepts)


# ---- timing ---------------------------------------------------------------------------------


def _time_decode(kind: DecoderKind, chunks: list[bytes]) -> tuple[float, list[Any]]:
    decoder = kind.make()
    feed = decoder.feed
    out: list[Any] = []
    extend = out.extend
    gc.collect()
    gc.disable()  # as timeit does: time the decoder, not a collection it did not cause
    try:
        t0 = time.perf_counter()
        for chunk in chunks:
            extend(feed(chunk))
        elapsed = time.perf_counter() - t0
    finally:
        gc.enable()
    return elapsed, out


def _time_encode(
    encode: Callable[[bytes], bytes], payloads: list[bytes]
) -> tuple[float, list[bytes]]:
    out: list[bytes] = []
    append = out.append
    gc.collect()
    gc.disable()
    try:
        t0 = time.perf_counter()
        for p in payloads:
            append(encode(p))
        elapsed = time.perf_counter() - t0
    finally:
        gc.enable()
    return elapsed, out


@dataclass(frozen=True, slots=True)
class Row:
    op: str  # "decode" or "encode"
    size: int
    condition: str  # "clean", "1% corrupted" or "-"
    frames: int
    rates: dict[str, float]  # frames sent per second, median of the repeats
    times: dict[str, list[float]]
    scores: dict[str, dict[str, int]]

    def ratio(self, base: str) -> float:
        return self.rates["ours"] / self.rates[base]


class CheckFailed(Exception):
    pass


def bench_decode(stream: Stream, size: int, condition: str, repeats: int) -> Row:
    rates: dict[str, float] = {}
    times: dict[str, list[float]] = {}
    scores: dict[str, dict[str, int]] = {}
    outputs: dict[str, list[bytes]] = {}
    first: dict[str, list[Any]] = {}
    for _ in range(repeats):  # interleaved, so that a slow spell hits every decoder alike
        for kind in DECODERS:
            elapsed, events = _time_decode(kind, stream.chunks)
            times.setdefault(kind.name, []).append(elapsed)
            first.setdefault(kind.name, events)
    for kind in DECODERS:
        rates[kind.name] = len(stream.sent) / statistics.median(times[kind.name])
        delivered = kind.payloads(first[kind.name])
        outputs[kind.name] = delivered
        result = score(delivered, stream)
        scores[kind.name] = asdict(result)
        if condition == "clean" and (delivered != stream.sent or result.false_accepts):
            raise CheckFailed(
                f"{kind.name} decoded {result.recovered}/{len(stream.sent)} clean "
                f"{size}-byte frames, {result.false_accepts} false accepts"
            )
    if not outputs["ours"] == outputs["naive"] == outputs["hand"]:
        print(f"  note: decoders disagree on {size}-byte {condition} frames", file=sys.stderr)
    return Row("decode", size, condition, len(stream.sent), rates, times, scores)


def bench_encode(payloads: list[bytes], size: int, repeats: int) -> Row:
    rates: dict[str, float] = {}
    times: dict[str, list[float]] = {}
    first: dict[str, list[bytes]] = {}
    for _ in range(repeats):
        for name, encode in ENCODERS:
            elapsed, out = _time_encode(encode, payloads)
            times.setdefault(name, []).append(elapsed)
            first.setdefault(name, out)
    for name, _ in ENCODERS:
        rates[name] = len(payloads) / statistics.median(times[name])
        if first[name] != first["ours"]:
            raise CheckFailed(f"{name} encodes {size}-byte payloads differently from ours")
    return Row("encode", size, "-", len(payloads), rates, times, {})


# ---- report ---------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "construct": construct.__version__,
        "crcmod_c_extension": frames.CRC_EXTENSION_IN_USE,
    }


def _k(rate: float) -> str:
    return f"{rate / 1000:,.1f}k"


def print_table(rows: list[Row]) -> None:
    head = (
        f"{'op':<7}{'payload':>8}  {'stream':<13}{'ours f/s':>11}{'naive f/s':>11}"
        f"{'hand f/s':>11}{'ours/naive':>12}{'ours/hand':>11}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r.op:<7}{r.size:>8}  {r.condition:<13}{_k(r.rates['ours']):>11}"
            f"{_k(r.rates['naive']):>11}{_k(r.rates['hand']):>11}"
            f"{r.ratio('naive'):>11.2f}x{r.ratio('hand'):>10.2f}x"
        )


def print_recovery(title: str, rows: list[tuple[str, dict[str, dict[str, int]]]]) -> None:
    print(title)
    head = f"{'stream':<22}" + "".join(f"{kind.name:>26}" for kind in DECODERS)
    print(head)
    print("-" * len(head))
    for label, scores in rows:
        cells = []
        for kind in DECODERS:
            s = scores[kind.name]
            cells.append(
                f"{s['intact_recovered']}/{s['intact_sent']}, {s['false_accepts']} false".rjust(26)
            )
        print(f"{label:<22}" + "".join(cells))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a short run (a few seconds)")
    parser.add_argument("--frames", type=int, help="frames per decode stream (default 20000)")
    parser.add_argument("--repeats", type=int, help="timed repeats; the median is kept (5)")
    parser.add_argument(
        "--check-frames", type=int, help="frames in the corruption check (default 100000)"
    )
    parser.add_argument("--seed", type=int, default=20261127)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    count = args.frames or (2_000 if args.quick else 20_000)
    repeats = args.repeats or (3 if args.quick else 5)
    check_count = args.check_frames or (10_000 if args.quick else 100_000)

    info = machine()
    print(
        f"Python {info['python']} on {info['cpu_model']} ({info['cpus']} CPUs); construct "
        f"{info['construct']}; crcmod C extension: {info['crcmod_c_extension']}"
    )
    print(f"{count} frames per stream, {CHUNK}-byte chunks, median of {repeats}, seed {args.seed}")
    started = time.perf_counter()
    rng = random.Random(args.seed)
    rows: list[Row] = []
    try:
        for size in SIZES:
            sent = make_payloads(rng, count, size)
            for condition, rate in (("clean", 0.0), ("1% corrupted", CORRUPTION)):
                rows.append(bench_decode(make_stream(rng, sent, rate), size, condition, repeats))
        for size in SIZES:
            rows.append(bench_encode(make_payloads(rng, count, size), size, repeats))

        sent = make_payloads(rng, check_count, None)
        check = make_stream(rng, sent, CORRUPTION)
        check_scores: dict[str, dict[str, int]] = {}
        for kind in DECODERS:
            decoder = kind.make()
            events = [e for chunk in check.chunks for e in decoder.feed(chunk)]
            check_scores[kind.name] = {
                **asdict(score(kind.payloads(events), check)),
                "crc_errors": decoder.crc_errors,
                "skipped_bytes": decoder.skipped_bytes,
            }
    except CheckFailed as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - started

    print()
    print_table(rows)
    print()
    print_recovery(
        "Recovery under 1% corruption: intact frames recovered / intact frames sent, false accepts",
        [(f"{r.size}-byte payloads", r.scores) for r in rows if r.condition == "1% corrupted"],
    )
    label = f"{check_count // 1000}k frames, 4..255 B"
    print_recovery("", [(label, check_scores)])

    target = next(r for r in rows if r.op == "decode" and r.size == 64 and r.condition == "clean")
    vs_naive, vs_hand = target.ratio("naive"), target.ratio("hand")
    print()
    print(
        f"Target, 64-byte clean decode: ours/naive {vs_naive:.2f}x (>= 2x: "
        f"{'met' if vs_naive >= 2 else 'MISSED'}), ours/hand {vs_hand:.2f}x (>= 0.2x: "
        f"{'met' if vs_hand >= 0.2 else 'MISSED'}; 0.3x goal: "
        f"{'met' if vs_hand >= 0.3 else 'not yet'})"
    )
    print(f"Whole run: {elapsed:.1f} s")

    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": info,
        "settings": {
            "frames_per_stream": count,
            "repeats": repeats,
            "chunk_bytes": CHUNK,
            "corruption": CORRUPTION,
            "seed": args.seed,
            "check_frames": check_count,
            "gc_disabled_while_timing": True,
        },
        "rows": [
            {**asdict(r), "ours_over_naive": r.ratio("naive"), "ours_over_hand": r.ratio("hand")}
            for r in rows
        ],
        "corruption_check": {
            "frames": check_count,
            "payload_bytes": "4..255, random",
            "bytes": check.nbytes,
            "flipped_bytes": check.flipped,
            "scores": check_scores,
        },
        "target_64_clean": {"ours_over_naive": vs_naive, "ours_over_hand": vs_hand},
        "seconds": elapsed,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"Results written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
