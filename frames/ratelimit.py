"""A token bucket, written once for every rate the gateway enforces.

Device frames (docs/protocol.md §4) and dashboard commands (docs/api.md §3)
are both limited by a rate with a burst. It is sans-IO: the caller passes
``now`` (any monotonic clock in seconds), so rules are tested on a fake clock.
"""

from __future__ import annotations


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved; starts full."""

    __slots__ = ("_at", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if not rate > 0:
            raise ValueError(f"rate must be > 0, not {rate}")
        if burst < 1:
            raise ValueError(f"burst must be >= 1, not {burst}")
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._at = now

    def take(self, now: float) -> bool:
        """Spend one token if there is one; False means over the rate."""
        tokens = self._tokens + (now - self._at) * self.rate
        self._tokens = tokens if tokens < self.burst else self.burst
        self._at = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False
