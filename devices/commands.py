"""Command sequencing of one session, sans-IO: seqs, the in-flight bound, ACKs, timeouts.

docs/protocol.md §3: the gateway picks a COMMAND's seq and the device's ACK
echoes it. A seq still awaiting its ACK is never reused, so an ACK always
names one command. No futures and no timers here: the session core asks for a
seq, reports ACKs, and calls ``expire(now)`` at ``deadline``; the asyncio
adapter maps the results onto futures.
"""

from __future__ import annotations

from frames import LocalProtocolError

from .events import CommandResult, CommandStatus

ACKED = CommandResult(CommandStatus.ACKED)
TIMED_OUT = CommandResult(CommandStatus.TIMEOUT)


class CommandTracker:
    """The commands of one session that wait for their ACK.

    ``now`` is any monotonic clock in seconds and must not go backwards:
    deadlines are kept in send order, which is then also their time order.
    """

    __slots__ = ("_deadlines", "_next_seq", "ack_timeout", "deadline", "max_inflight")

    def __init__(self, max_inflight: int, ack_timeout: float) -> None:
        if not 1 <= max_inflight <= 255:
            # One seq byte: with at most 255 in flight a free seq always exists.
            raise ValueError(f"max_inflight must be 1..255, not {max_inflight}")
        self.max_inflight = max_inflight
        self.ack_timeout = ack_timeout
        self._deadlines: dict[int, float] = {}  # seq -> ACK deadline, in send order
        self._next_seq = 0
        # When the oldest command in flight times out, or None. An attribute, not a
        # property: the session reads it after every chunk of bytes.
        self.deadline: float | None = None

    @property
    def inflight(self) -> int:
        """Commands written and not yet ACKed, NACKed or timed out."""
        return len(self._deadlines)

    @property
    def has_room(self) -> bool:
        """True when another command may be sent (the in-flight bound)."""
        return len(self._deadlines) < self.max_inflight

    def pending(self) -> list[int]:
        """The seqs in flight, oldest first."""
        return list(self._deadlines)

    def start(self, now: float) -> int:
        """Take a seq for a new command and start its ACK timeout.

        Raises ``LocalProtocolError`` when the in-flight bound is reached:
        the caller waits for room first.
        """
        if len(self._deadlines) >= self.max_inflight:
            raise LocalProtocolError(f"{self.max_inflight} commands already await their ACK")
        deadlines = self._deadlines
        seq = self._next_seq
        while seq in deadlines:  # skip seqs still awaiting their ACK
            seq = (seq + 1) & 0xFF
        self._next_seq = (seq + 1) & 0xFF
        deadlines[seq] = at = now + self.ack_timeout
        if self.deadline is None:
            self.deadline = at
        return seq

    def cancel(self, seq: int) -> None:
        """Forget a command that was never written (its seq is free again)."""
        if self._deadlines.pop(seq, None) is not None:
            self._oldest_changed()

    def ack(self, seq: int, status: int) -> CommandResult | None:
        """The device's ACK: the command's result, or None for no command in flight."""
        if self._deadlines.pop(seq, None) is None:
            return None
        self._oldest_changed()
        if status == 0:
            return ACKED
        return CommandResult(CommandStatus.NACKED, code=status)

    def expire(self, now: float) -> list[int]:
        """Drop and return the seqs whose ACK timeout has passed by ``now``."""
        if self.deadline is None or now < self.deadline:
            return []
        late = [seq for seq, at in self._deadlines.items() if at <= now]
        for seq in late:
            del self._deadlines[seq]
        self._oldest_changed()
        return late

    def drain(self) -> list[int]:
        """Drop and return every seq in flight (no ACK can come any more)."""
        seqs = list(self._deadlines)
        self._deadlines.clear()
        self.deadline = None
        return seqs

    def _oldest_changed(self) -> None:
        # Send order is deadline order (``now`` never goes back): the first is the oldest.
        self.deadline = next(iter(self._deadlines.values()), None)
