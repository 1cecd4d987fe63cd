"""A device's frame rate as a token bucket that may run into debt (docs/protocol.md §4).

Over TCP the rate limit slows a device down instead of dropping its frames:
the session core takes one token per frame and may go below zero, and reading
from the socket stops until the debt is paid (``ready_at``). Over serial, where
nothing can be slowed, a frame with no token left is dropped (``take``). Sans-IO:
``now`` is any monotonic clock in seconds, passed in.

``frames.ratelimit.TokenBucket`` answers only "one more now?"; this one also
says how many tokens there are and when there will be enough, which the
backpressure needs.
"""

from __future__ import annotations


class FrameRate:
    """``rate`` tokens a second, at most ``burst`` saved; starts full.

    ``tokens`` is public so that the per-frame path spends with one subtraction;
    call ``refill(now)`` once per chunk of bytes before spending.
    """

    __slots__ = ("_at", "burst", "rate", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if not rate > 0:
            raise ValueError(f"rate must be > 0, not {rate}")
        if burst < 1:
            raise ValueError(f"burst must be >= 1, not {burst}")
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self._at = now

    def refill(self, now: float) -> float:
        """Add what ``now - last refill`` earned (up to ``burst``); return the tokens."""
        tokens = self.tokens + (now - self._at) * self.rate
        if tokens > self.burst:
            tokens = self.burst
        self.tokens = tokens
        self._at = now
        return tokens

    def take(self, now: float) -> bool:
        """Spend one token if there is one (no debt); False means over the rate."""
        if self.refill(now) >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def ready_at(self, tokens: float = 1.0) -> float:
        """The clock value at which ``tokens`` will be there (the last refill's, if already)."""
        missing = tokens - self.tokens
        if missing <= 0:
            return self._at
        return self._at + missing / self.rate
