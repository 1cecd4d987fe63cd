"""Capped exponential backoff with full jitter, written once for every reconnecting link.

It lives in the sans-IO package because both the gateway's serial links and
the simulators' device clients reconnect, and neither may import the other. It
computes delays only; the caller sleeps.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class BackoffPolicy:
    """Delay before retry n is uniform in [0, min(cap, base * 2**n)] ("full jitter")."""

    base: float = 0.5
    cap: float = 30.0

    def __post_init__(self) -> None:
        if not 0 < self.base <= self.cap:
            raise ValueError(f"backoff needs 0 < base <= cap, got base={self.base} cap={self.cap}")

    def ceiling(self, attempt: int) -> float:
        """Largest delay for the given retry number (0 for the first retry)."""
        # Cap the exponent too, so a link down for days cannot overflow a float.
        return min(self.cap, self.base * float(2 ** min(attempt, 62)))


@dataclass(slots=True)
class Backoff:
    """The retry state of one link: call ``next_delay()`` after each failure, ``reset()``
    after a success."""

    policy: BackoffPolicy = field(default_factory=BackoffPolicy)
    rng: random.Random = field(default_factory=random.Random)
    attempt: int = 0

    def next_delay(self) -> float:
        """Seconds to wait before the next try; each call counts one more failure."""
        delay = self.rng.uniform(0, self.policy.ceiling(self.attempt))
        self.attempt += 1
        return delay

    def reset(self) -> None:
        """The link is up again: the next failure starts from the base delay."""
        self.attempt = 0
