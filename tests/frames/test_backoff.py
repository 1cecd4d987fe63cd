"""The reconnect policy: capped exponential growth with full jitter."""

from __future__ import annotations

import random

import pytest

from frames.backoff import Backoff, BackoffPolicy


def test_delays_grow_to_the_cap_and_stay_within_it() -> None:
    b = Backoff(BackoffPolicy(base=0.5, cap=30.0), random.Random(1))
    ceilings = [b.policy.ceiling(i) for i in range(10)]
    assert ceilings[:7] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0]
    delays = [b.next_delay() for _ in range(200)]
    assert all(0 <= d <= 30.0 for d in delays)
    assert max(delays[:2]) <= 1.0
    assert b.policy.ceiling(10**6) == 30.0


def test_jitter_spreads_delays_and_reset_starts_over() -> None:
    b = Backoff(BackoffPolicy(base=1.0, cap=60.0), random.Random(7))
    for _ in range(5):
        b.next_delay()
    spread = {round(b.next_delay(), 3) for _ in range(20)}
    assert len(spread) > 10
    b.reset()
    assert b.attempt == 0
    assert b.next_delay() <= 1.0


def test_bad_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="base"):
        BackoffPolicy(base=0, cap=1)
    with pytest.raises(ValueError, match="base"):
        BackoffPolicy(base=5, cap=1)
