"""Fault injection between a simulated device and the wire: seeded, switchable, counted.

Field faults are hard to reproduce on purpose; this layer makes them on
demand. It sits between a model's messages and the bytes a driver writes,
never touches I/O or a clock (time is passed in), and draws every random
choice from its own seeded generator, so a test knows exactly what it does.
Each fault has a counter, so a test against a real gateway can check that
the gateway's own counters (CRC errors, skipped bytes, reconnects) agree.

Faults, in the order they apply to outgoing messages:

- ``badtoken``: the device's first HELLO carries a wrong token;
- ``silent=S``: now and then the device goes mute for S seconds, long
  enough (if S > misses x heartbeat) for the gateway to expire its session;
- ``garbage=P``: with probability P a run of junk bytes precedes a frame;
- ``merge[=K]``: frames are held back and written K at a time (at most
  ``merge_hold`` seconds late);
- ``flip=P``: each bit written is inverted with probability P;
- ``split``: each write is cut into random chunks;
- ``drop=R``: the link is cut at random, R times per second on average.

``parse_faults`` reads the CLI form:
``split,merge,flip=0.001,garbage=0.05,drop=0.01,silent=30,badtoken``.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from frames import FrameOptions, Hello, Message, encode_frame

# Defaults for a fault named without a value in a CLI spec.
DEFAULT_MERGE: Final = 3
DEFAULT_FLIP: Final = 0.001
DEFAULT_GARBAGE: Final = 0.05
DEFAULT_DROP: Final = 0.01
# Longer than the gateway's default expiry (3 misses x 30 s), so it triggers one.
DEFAULT_SILENT: Final = 120.0

MAX_GARBAGE_RUN: Final = 16
# Garbage never contains 0xAA: junk that looks like a frame header is what bit
# flips produce, and it would hold the good frames behind it until the
# gateway's frame timeout. This fault tests the skipping path alone.
GARBAGE_ALPHABET: Final = bytes(b for b in range(256) if b != 0xAA)


class FaultSpecError(ValueError):
    """A ``--faults`` spec names an unknown fault or gives a bad value; the message says which."""


@dataclass(frozen=True, slots=True)
class Faults:
    """Which faults to inject and how hard. The default injects nothing."""

    split: bool = False
    merge: int = 0  # frames per write; 0 or 1 = off
    merge_hold: float = 2.0  # seconds a frame may wait for the others of its write
    flip: float = 0.0  # probability per bit
    garbage: float = 0.0  # probability per frame
    drop: float = 0.0  # link drops per second
    silent: float = 0.0  # seconds of each silence; 0 = off
    badtoken: bool = False

    def __post_init__(self) -> None:
        if self.merge < 0:
            raise ValueError(f"merge must be >= 0 frames per write, not {self.merge}")
        if not (math.isfinite(self.merge_hold) and self.merge_hold > 0):
            raise ValueError(f"merge_hold must be > 0 seconds, not {self.merge_hold}")
        for name in ("flip", "garbage"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                raise ValueError(f"{name} is a probability in 0..1, not {value}")
        for name in ("drop", "silent"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0.0):
                raise ValueError(f"{name} must be a number >= 0, not {value}")

    @property
    def enabled(self) -> bool:
        """True when at least one fault is switched on."""
        return self != Faults(merge_hold=self.merge_hold)

    def describe(self) -> str:
        """The spec ``parse_faults`` would read back into these faults ("none" if none)."""
        parts: list[str] = []
        if self.split:
            parts.append("split")
        if self.merge > 1:
            parts.append(f"merge={self.merge}")
        for name in ("flip", "garbage", "drop", "silent"):
            value = getattr(self, name)
            if value:
                parts.append(f"{name}={value:g}")
        if self.badtoken:
            parts.append("badtoken")
        return ",".join(parts) or "none"


_FLAGS: Final = ("split", "badtoken")
_PROBABILITIES: Final = {"flip": DEFAULT_FLIP, "garbage": DEFAULT_GARBAGE}
_KNOWN: Final = sorted(("split", "merge", "flip", "garbage", "drop", "silent", "badtoken"))


def parse_faults(spec: str) -> Faults:
    """Read a comma-separated fault spec, e.g. ``split,flip=0.001,drop=0.01,silent=30``.

    A name without a value takes its default (merge 3 frames, flip 0.001,
    garbage 0.05, drop 0.01/s, silent 120 s). ``""`` and ``"none"`` mean no
    faults. Raises ``FaultSpecError`` naming the bad part.
    """
    values: dict[str, bool | int | float] = {}
    text = spec.strip()
    if text in ("", "none"):
        return Faults()
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            raise FaultSpecError(f"empty fault name in {spec!r} (a stray comma?)")
        name, sep, value = (part.strip() for part in item.partition("="))
        if name not in _KNOWN:
            raise FaultSpecError(f"unknown fault {name!r}; known faults: {', '.join(_KNOWN)}")
        if name in values:
            raise FaultSpecError(f"fault {name!r} is given twice")
        if sep and not value:
            raise FaultSpecError(f"fault {name!r} has '=' but no value")
        if name in _FLAGS:
            if sep:
                raise FaultSpecError(f"fault {name!r} takes no value (got {value!r})")
            values[name] = True
        elif name == "merge":
            values[name] = _parse_merge(value) if sep else DEFAULT_MERGE
        elif name in _PROBABILITIES:
            values[name] = _parse_number(name, value, 0.0, 1.0) if sep else _PROBABILITIES[name]
        elif name == "drop":
            values[name] = _parse_number(name, value, 0.0, None) if sep else DEFAULT_DROP
        else:  # silent
            values[name] = _parse_number(name, value, 0.0, None) if sep else DEFAULT_SILENT
    return Faults(**values)  # type: ignore[arg-type]  # keys and types are checked above


def _parse_merge(value: str) -> int:
    try:
        count = int(value)
    except ValueError:
        raise FaultSpecError(f"merge takes a whole number of frames, not {value!r}") from None
    if count < 2:
        raise FaultSpecError(f"merge needs at least 2 frames per write, not {count}")
    return count


def _parse_number(name: str, value: str, low: float, high: float | None) -> float:
    try:
        number = float(value)
    except ValueError:
        raise FaultSpecError(f"{name} takes a number, not {value!r}") from None
    if not math.isfinite(number) or number <= low or (high is not None and number > high):
        bound = f"in ({low:g}, {high:g}]" if high is not None else f"> {low:g}"
        raise FaultSpecError(f"{name} must be {bound}, not {value}")
    return number


@dataclass(slots=True)
class FaultCounters:
    """How often each fault struck."""

    bad_tokens: int = 0  # HELLOs sent with a wrong token
    silences: int = 0  # silent periods begun
    frames_silenced: int = 0  # frames swallowed by silences
    garbage_runs: int = 0
    garbage_bytes: int = 0
    merged_writes: int = 0  # writes carrying two or more frames
    merged_frames: int = 0  # frames that went out in such writes
    bits_flipped: int = 0
    writes_corrupted: int = 0  # writes with at least one flipped bit
    splits: int = 0  # writes cut into two or more chunks
    chunks: int = 0  # chunks those writes became
    drops: int = 0  # links cut

    def add(self, other: FaultCounters) -> None:
        """Add ``other``'s counts to these (for totals over many devices)."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


class FaultInjector:
    """Applies ``Faults`` to one device's outgoing traffic.

    Drivers call ``link_up(now)`` when a link comes up, pass each batch of
    messages through ``outgoing(messages, now)`` and write the chunks it
    returns in order, call ``poll(now)`` at ``deadline`` for merged frames
    held back, and cut the link when ``drop_due(now)`` says so.
    """

    def __init__(
        self,
        faults: Faults | None = None,
        *,
        seed: int | str = 0,
        options: FrameOptions | None = None,
    ) -> None:
        self.faults = faults or Faults()
        self.options = options
        self.rng = random.Random(seed)
        self.counters = FaultCounters()
        self.tampered_hello = False  # the last HELLO sent carried a bad token
        self._held: list[bytes] = []
        self._held_since: float | None = None
        self._next_drop: float | None = None
        self._silence_start: float | None = None
        self._silence_end: float | None = None
        self._flip_gap = self._draw_flip_gap()

    # ---- link events ----------------------------------------------------------------------

    def link_up(self, now: float) -> None:
        """A new link: forget held frames and schedule its drop and silences."""
        self._held.clear()
        self._held_since = None
        f = self.faults
        self._next_drop = now + self.rng.expovariate(f.drop) if f.drop > 0 else None
        self._silence_start = self._silence_end = None
        if f.silent > 0:
            # A seeded, uneven gap of talk before each silence, so many devices
            # sharing a seed base do not all go quiet together.
            self._silence_start = now + self.rng.uniform(f.silent, 2 * f.silent)

    def drop_due(self, now: float) -> bool:
        """True (once, counted) when the link should be cut now."""
        if self._next_drop is None or now < self._next_drop:
            return False
        self._next_drop = None  # the next link_up schedules the next drop
        self.counters.drops += 1
        return True

    @property
    def deadline(self) -> float | None:
        """Clock value at which ``poll`` or ``drop_due`` next has work, or None."""
        times = [self._next_drop]
        if self._held and self._held_since is not None:
            times.append(self._held_since + self.faults.merge_hold)
        return min((t for t in times if t is not None), default=None)

    def silent(self, now: float) -> bool:
        """True while a silence is under way (counted when it begins)."""
        while self._silence_start is not None and now >= self._silence_start:
            if self._silence_end is None:
                self._silence_end = self._silence_start + self.faults.silent
                self.counters.silences += 1
            if now < self._silence_end:
                return True
            # Over: the next silence comes after another stretch of talk.
            self._silence_start = self._silence_end + self.rng.uniform(
                self.faults.silent, 2 * self.faults.silent
            )
            self._silence_end = None
        return False

    # ---- traffic --------------------------------------------------------------------------

    def outgoing(self, messages: Sequence[Message], now: float) -> list[bytes]:
        """Encode ``messages`` as frames and return the (possibly mangled) chunks to write."""
        f = self.faults
        frames: list[bytes] = []
        for msg in messages:
            if isinstance(msg, Hello):
                msg = self._maybe_bad_token(msg)
            if self.silent(now):
                self.counters.frames_silenced += 1
                continue
            frame = encode_frame(msg.encode(), self.options)
            if f.garbage and self.rng.random() < f.garbage:
                junk = bytes(
                    self.rng.choices(GARBAGE_ALPHABET, k=self.rng.randint(1, MAX_GARBAGE_RUN))
                )
                self.counters.garbage_runs += 1
                self.counters.garbage_bytes += len(junk)
                frame = junk + frame
            frames.append(frame)
        return self._finish(self._merge(frames, now) if f.merge > 1 else frames)

    def poll(self, now: float) -> list[bytes]:
        """Release merged frames that have waited ``merge_hold``; return the chunks to write."""
        if not self._held or self._held_since is None:
            return []
        if now < self._held_since + self.faults.merge_hold:
            return []
        if self.silent(now):
            self.counters.frames_silenced += len(self._held)
            self._held.clear()
            self._held_since = None
            return []
        return self._finish([self._release()])

    def _maybe_bad_token(self, hello: Hello) -> Hello:
        # Only the device's first HELLO: a device that can never log in shows
        # one failure, not a loop, and its next HELLO shows recovery.
        if not self.faults.badtoken or self.counters.bad_tokens:
            self.tampered_hello = False
            return hello
        self.counters.bad_tokens += 1
        self.tampered_hello = True
        bad = ("wrong-" + hello.token).encode()[:64].decode("utf-8", "ignore")
        return dataclasses.replace(hello, token=bad)

    def _merge(self, frames: list[bytes], now: float) -> list[bytes]:
        writes: list[bytes] = []
        for frame in frames:
            if not self._held:
                self._held_since = now
            self._held.append(frame)
            if len(self._held) >= self.faults.merge:
                writes.append(self._release())
        return writes

    def _release(self) -> bytes:
        if len(self._held) > 1:
            self.counters.merged_writes += 1
            self.counters.merged_frames += len(self._held)
        write = b"".join(self._held)
        self._held.clear()
        self._held_since = None
        return write

    def _finish(self, writes: list[bytes]) -> list[bytes]:
        out: list[bytes] = []
        for write in writes:
            if self.faults.flip:
                write = self._flip(write)
            if self.faults.split and len(write) > 1:
                out.extend(self._split(write))
            else:
                out.append(write)
        return out

    def _draw_flip_gap(self) -> int:
        """Bits left intact before the next flip: a geometric draw, so a rate of
        0.001 costs one random number per flip instead of one per bit."""
        p = self.faults.flip
        if p <= 0:
            return -1
        if p >= 1:
            return 0
        return int(math.log(1.0 - self.rng.random()) / math.log(1.0 - p))

    def _flip(self, write: bytes) -> bytes:
        nbits = len(write) * 8
        if self._flip_gap >= nbits:
            self._flip_gap -= nbits
            return write
        data = bytearray(write)
        pos = self._flip_gap
        while pos < nbits:
            data[pos // 8] ^= 0x80 >> (pos % 8)
            self.counters.bits_flipped += 1
            pos += 1 + self._draw_flip_gap()
        self._flip_gap = pos - nbits
        self.counters.writes_corrupted += 1
        return bytes(data)

    def _split(self, write: bytes) -> list[bytes]:
        chunks: list[bytes] = []
        pos = 0
        while pos < len(write):
            size = self.rng.randint(1, len(write) - pos)
            chunks.append(write[pos : pos + size])
            pos += size
        if len(chunks) > 1:
            self.counters.splits += 1
        self.counters.chunks += len(chunks)
        return chunks
