"""Cluster time: a Worker's estimate of the offset from its clock to the Manager's.

Every timestamp chimera writes is the Manager's wall clock, in ns. A Worker
measures the offset of its own clock NTP-style over its control connection:
it stamps a request when it leaves (``t0``, its clock), the Manager stamps its
arrival and its answer (``t1``, ``t2``, the Manager's clock), the Worker
stamps the answer's arrival (``t3``)::

    offset = ((t1 - t0) + (t2 - t3)) / 2        Manager clock - Worker clock
    delay  = (t3 - t0) - (t2 - t1)              the round trip on the wire

The true offset lies within ``delay / 2`` of the measured one, whichever way
the delay splits, at the time of the exchange; since then the two clocks may
have drifted apart by up to :data:`MAX_DRIFT` of the time passed. Samples
that met a queue on the way are far off, so the estimate is the sample whose
bound is the tightest now: ``delay / 2`` plus the drift its age allows. A
clock that steps (set by hand, or by NTP) makes earlier samples wrong: a new
sample whose bounds miss an earlier one's shows it, and the earlier goes. An
exchange that cannot be (its answer came back before it left, once a clock
stepped in between) is dropped.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["MAX_DRIFT", "ClockEstimate", "ClockEstimator"]

#: How fast two clocks may drift apart, as a fraction (100 ppm: 0.1 ms a
#: second; quartz clocks are within ~50 ppm, virtual machines' not always).
MAX_DRIFT = 100e-6


@dataclass(frozen=True)
class ClockEstimate:
    """The offset from a Worker's clock to the Manager's, and how sure it is."""

    #: Manager clock - Worker clock, in ns.
    offset_ns: int
    #: The true offset is within this many ns of :attr:`offset_ns`.
    error_ns: int
    #: How many samples the estimate is drawn from.
    samples: int


@dataclass(frozen=True)
class _Sample:
    #: When it was taken (the monotonic clock, ns).
    at_ns: int
    offset_ns: int
    #: Half the round trip's delay: the bound when it was taken.
    half_delay_ns: int

    def error_ns(self, now_ns: int) -> int:
        """Its bound at *now_ns* (the monotonic clock): widened by the drift since."""
        return self.half_delay_ns + int((now_ns - self.at_ns) * MAX_DRIFT)


class ClockEstimator:
    """Estimates the offset to a reference clock from request/answer timestamps.

    Keeps the last *window* samples that agree with the newest; the estimate is
    the one whose bound is the tightest (see the module's docstring).

    Args:
        window: how many recent samples to choose from.
        clock: the local clock, in ns (``time.time_ns`` by default).
        monotonic: a monotonic clock, in ns, that dates the samples
            (``time.monotonic_ns`` by default).

    Raises:
        ValueError: *window* is not positive.
    """

    def __init__(
        self,
        window: int = 64,
        clock: Callable[[], int] = time.time_ns,
        monotonic: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        if window < 1:
            raise ValueError(f"window must be positive, not {window}")
        self._samples: deque[_Sample] = deque(maxlen=window)
        self._clock, self._monotonic = clock, monotonic
        #: The sample with the tightest bound (which one does not change as
        #: they age: all widen alike), or None.
        self._best: _Sample | None = None

    def add(self, t0: int, t1: int, t2: int, t3: int) -> bool:
        """Add one exchange: sent at *t0*, received at *t1*, answered at *t2*
        (the reference clock), answer received at *t3* (the local clock), all
        ns. Earlier samples that the new one shows wrong (a clock stepped, or
        drifted faster than :data:`MAX_DRIFT`) go.

        Returns:
            Whether the exchange was kept: False if it cannot be (the answer
            came back before the request left, was sent before it arrived, or
            took less time than the reference spent on it: a clock stepped).
        """
        delay = (t3 - t0) - (t2 - t1)
        if t3 < t0 or t2 < t1 or delay < 0:
            return False
        now = self._monotonic()
        new = _Sample(now, ((t1 - t0) + (t2 - t3)) // 2, (delay + 1) // 2)
        agree = [
            sample
            for sample in self._samples
            if abs(sample.offset_ns - new.offset_ns) <= sample.error_ns(now) + new.half_delay_ns
        ]
        self._samples.clear()
        self._samples.extend(agree)
        self._samples.append(new)
        self._best = min(self._samples, key=lambda s: s.error_ns(now))
        return True

    def reset(self) -> None:
        """Forget every sample (another reference: a new connection)."""
        self._samples.clear()
        self._best = None

    def estimate(self) -> ClockEstimate | None:
        """The best estimate now, or None before the first sample."""
        best = self._best
        if best is None:
            return None
        return ClockEstimate(
            offset_ns=best.offset_ns,
            error_ns=best.error_ns(self._monotonic()),
            samples=len(self._samples),
        )

    def now(self) -> int:
        """Cluster time: the local clock plus the estimated offset, in ns (the
        local clock alone before the first sample)."""
        best = self._best
        return self._clock() + (best.offset_ns if best is not None else 0)
