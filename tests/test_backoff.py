"""amid.ami.backoff: every delay in [min_delay, max_delay], jittered, growing, Retry-After a floor."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from amid.ami.backoff import Backoff, backoff_delay


@given(failures=st.integers(1, 200), min_delay=st.floats(0.001, 100), spread=st.floats(1, 1000),
       rand=st.floats(0, 1, exclude_max=True))
def test_every_delay_is_within_min_and_max(failures, min_delay, spread, rand):
    max_delay = min_delay * spread
    delay = backoff_delay(failures, min_delay, max_delay, rand)
    assert min_delay <= delay <= max_delay


def test_min_delay_is_a_floor_and_every_delay_is_jittered():
    """The sink retry gaps of issue 13 fell below min_delay (full jitter from 0): never again.
    And a fixed delay (the 1.00 s reconnect of issue 13) cannot come out: the lowest and the
    highest draw of every step differ."""
    for failures in range(1, 30):
        low = backoff_delay(failures, 0.5, 30.0, 0.0)
        high = backoff_delay(failures, 0.5, 30.0, 0.999999)
        assert 0.5 <= low < high <= 30.0
    assert backoff_delay(1, 0.5, 30.0, 0.0) == 0.5
    assert backoff_delay(1, 0.5, 30.0, 0.5) == 0.75   # first band: [min, 2*min]
    assert backoff_delay(3, 0.5, 30.0, 0.0) == 2.0    # ceiling 4, band [2, 4]
    assert backoff_delay(50, 0.5, 30.0, 0.0) == 15.0  # capped: band [max/2, max]


def test_the_band_grows_until_the_cap():
    bands = [(backoff_delay(n, 1.0, 60.0, 0.0), backoff_delay(n, 1.0, 60.0, 0.999999)) for n in range(1, 9)]
    lows = [low for low, _ in bands]
    assert lows == sorted(lows) and lows[0] == 1.0 and lows[-1] == 30.0
    assert bands[-1][1] == pytest.approx(60.0, rel=1e-5)


def test_retry_after_is_a_floor_with_jitter_and_capped():
    assert backoff_delay(1, 0.5, 30.0, 0.0, retry_after=120.0) == 120.0
    assert backoff_delay(1, 0.5, 30.0, 0.5, retry_after=120.0) == 120.25
    assert backoff_delay(1, 0.5, 30.0, 0.0, retry_after=10_000.0, retry_after_cap=600.0) == 600.0
    # a Retry-After shorter than the backoff changes nothing
    assert backoff_delay(6, 0.5, 30.0, 0.0, retry_after=1.0) == backoff_delay(6, 0.5, 30.0, 0.0)


def test_backoff_counts_failures_and_resets():
    rng = random.Random(7)
    backoff = Backoff(0.1, 5.0, rng=rng.random)
    delays = [backoff.failure() for _ in range(12)]
    assert backoff.failures == 12
    assert all(0.1 <= d <= 5.0 for d in delays)
    assert delays[-1] >= 2.5  # capped band [max/2, max]
    assert len(set(delays)) == len(delays)  # jittered: no two alike
    backoff.reset()
    assert 0.1 <= backoff.failure() <= 0.2


def test_bad_bounds_are_refused_at_once():
    with pytest.raises(ValueError):
        Backoff(2.0, 1.0)
    with pytest.raises(ValueError):
        Backoff(-1.0, 1.0)
