"""The NTP-style offset estimate: within its error bound, whatever the delays."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chimera._clock import MAX_DRIFT, ClockEstimator


class Monotonic:
    """A monotonic clock that a test moves (ns)."""

    def __init__(self) -> None:
        self.now = 0

    def __call__(self) -> int:
        return self.now


def exchange(offset, out_delay, back_delay, service=1_000, t0=10**18):
    """The four timestamps of an exchange with the given true offset and delays (ns)."""
    t1 = t0 + out_delay + offset
    t2 = t1 + service
    t3 = t2 - offset + back_delay
    return t0, t1, t2, t3


def test_symmetric_delays_give_the_exact_offset():
    estimator = ClockEstimator(monotonic=Monotonic())
    estimator.add(*exchange(offset=5_000_000, out_delay=40_000, back_delay=40_000))
    estimate = estimator.estimate()
    assert estimate.offset_ns == 5_000_000
    assert estimate.error_ns == 40_000
    assert estimate.samples == 1


def test_the_lowest_delay_sample_wins():
    estimator = ClockEstimator(monotonic=Monotonic())
    estimator.add(*exchange(offset=-7_000, out_delay=900_000, back_delay=10_000))  # queued
    estimator.add(*exchange(offset=-7_000, out_delay=20_000, back_delay=22_000))
    estimator.add(*exchange(offset=-7_000, out_delay=10_000, back_delay=700_000))  # queued
    estimate = estimator.estimate()
    assert abs(estimate.offset_ns - -7_000) <= 1_000
    assert estimate.error_ns == 21_000


def test_old_samples_leave_the_window():
    estimator = ClockEstimator(window=2, monotonic=Monotonic())
    estimator.add(*exchange(offset=0, out_delay=1_000, back_delay=1_000))
    for _ in range(2):
        estimator.add(*exchange(offset=50_000, out_delay=30_000, back_delay=30_000))
    assert estimator.estimate().offset_ns == 50_000  # the clock moved: the old best is gone


def test_now_is_the_local_clock_plus_the_offset():
    estimator = ClockEstimator(clock=lambda: 1_000_000, monotonic=Monotonic())
    assert estimator.estimate() is None and estimator.now() == 1_000_000
    estimator.add(*exchange(offset=250, out_delay=100, back_delay=100))
    assert estimator.now() == 1_000_250


@pytest.mark.parametrize(
    "bad",
    [
        (10, 5, 6, 9),  # back before it left
        (10, 20, 19, 30),  # answered before it arrived
        (10, 20, 40, 25),  # took less time than its answer (the delay is negative)
    ],
)
def test_impossible_exchanges_are_dropped(bad):
    # As when a clock steps during an exchange: the estimate keeps what it had.
    estimator = ClockEstimator(monotonic=Monotonic())
    assert estimator.add(*exchange(offset=0, out_delay=1_000, back_delay=1_000))
    before = estimator.estimate()
    assert not estimator.add(*bad)
    assert estimator.estimate() == before


def test_a_clock_that_steps_is_followed_at_the_next_sample():
    monotonic = Monotonic()
    estimator = ClockEstimator(monotonic=monotonic)
    for _ in range(10):  # good samples at offset 0...
        estimator.add(*exchange(offset=0, out_delay=10_000, back_delay=10_000))
        monotonic.now += 10**9
    # ...then the Worker's clock steps back 1 s: one sample of a larger delay.
    assert estimator.add(*exchange(offset=10**9, out_delay=400_000, back_delay=400_000))
    estimate = estimator.estimate()
    assert (estimate.offset_ns, estimate.samples) == (10**9, 1)


def test_the_error_bound_widens_with_the_age_of_the_sample():
    monotonic = Monotonic()
    estimator = ClockEstimator(monotonic=monotonic)
    estimator.add(*exchange(offset=0, out_delay=10_000, back_delay=10_000))
    monotonic.now += 100 * 10**9  # 100 s later
    assert estimator.estimate().error_ns == 10_000 + round(100 * 10**9 * MAX_DRIFT)
    # A fresh sample, of a larger delay, is now the tighter bound.
    estimator.add(*exchange(offset=3_000_000, out_delay=500_000, back_delay=500_000))
    estimate = estimator.estimate()
    assert (estimate.offset_ns, estimate.error_ns) == (3_000_000, 500_000)


def test_reset_forgets_every_sample():
    estimator = ClockEstimator(clock=lambda: 1_000_000, monotonic=Monotonic())
    estimator.add(*exchange(offset=250, out_delay=100, back_delay=100))
    estimator.reset()
    assert estimator.estimate() is None and estimator.now() == 1_000_000
    # The next reference's sample is the estimate, though the old one was
    # tighter and would agree with it.
    estimator.add(*exchange(offset=10_000, out_delay=50_000, back_delay=50_000))
    estimate = estimator.estimate()
    assert (estimate.offset_ns, estimate.error_ns, estimate.samples) == (10_000, 50_000, 1)


def test_a_window_must_be_positive():
    with pytest.raises(ValueError):
        ClockEstimator(window=0)


@given(
    offset=st.integers(-(10**12), 10**12),
    delays=st.lists(
        st.tuples(st.integers(0, 10**7), st.integers(0, 10**7), st.integers(0, 10**6)),
        min_size=1,
        max_size=30,
    ),
)
def test_the_true_offset_is_always_within_the_error_bound(offset, delays):
    estimator = ClockEstimator(monotonic=Monotonic())
    for out_delay, back_delay, service in delays:
        estimator.add(*exchange(offset, out_delay, back_delay, service))
    estimate = estimator.estimate()
    assert abs(estimate.offset_ns - offset) <= estimate.error_ns + 1
    assert estimate.error_ns <= (min(o + b for o, b, _ in delays) + 1) // 2


@given(
    offset=st.integers(-(10**12), 10**12),
    drift=st.floats(-MAX_DRIFT * 0.99, MAX_DRIFT * 0.99),
    steps=st.lists(
        st.tuples(
            st.integers(0, 10 * 10**9),  # ns since the last exchange
            st.integers(0, 10**7),
            st.integers(0, 10**7),
        ),
        min_size=1,
        max_size=30,
    ),
)
def test_a_drifting_offset_is_always_within_the_error_bound(offset, drift, steps):
    monotonic = Monotonic()
    estimator = ClockEstimator(monotonic=monotonic)
    for gap, out_delay, back_delay in steps:
        monotonic.now += gap
        true_offset = offset + int(drift * monotonic.now)
        estimator.add(*exchange(true_offset, out_delay, back_delay))
    estimate = estimator.estimate()
    true_offset = offset + int(drift * monotonic.now)
    assert abs(estimate.offset_ns - true_offset) <= estimate.error_ns + 2
