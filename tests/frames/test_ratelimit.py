"""The shared token bucket on a fake clock."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from frames.ratelimit import TokenBucket


def test_starts_full_then_refills_at_the_rate() -> None:
    bucket = TokenBucket(rate=2.0, burst=3.0, now=0.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert not bucket.take(0.25)  # half a token
    assert bucket.take(0.5)  # one whole token again
    assert not bucket.take(0.5)


def test_never_saves_more_than_the_burst() -> None:
    bucket = TokenBucket(rate=10.0, burst=2.0, now=0.0)
    assert [bucket.take(1000.0) for _ in range(3)] == [True, True, False]


@pytest.mark.parametrize(("rate", "burst"), [(0.0, 1.0), (-1.0, 1.0), (1.0, 0.5)])
def test_rejects_settings_that_cannot_work(rate: float, burst: float) -> None:
    with pytest.raises(ValueError, match="must be"):
        TokenBucket(rate, burst, 0.0)


@given(
    rate=st.floats(0.1, 1000.0),
    burst=st.floats(1.0, 1000.0),
    steps=st.lists(st.floats(0.0, 5.0), max_size=200),
)
def test_never_grants_more_than_burst_plus_rate_times_time(
    rate: float, burst: float, steps: list[float]
) -> None:
    bucket = TokenBucket(rate, burst, 0.0)
    now = 0.0
    granted = 0
    for step in steps:
        now += step
        granted += bucket.take(now)
    assert granted <= burst + rate * now + 1e-6
